"""Prometheus metrics, served on their own listener (`[metrics]` in the config).

Labels never carry user data: owned routes are labelled by name, everything else as
`forward`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .errors import StoreUnavailable
from .routing import Route

# The owned route a request was dispatched to: its name labels the request's count and
# upstream latency (a request without one is labelled "forward"), its pattern the
# access log's template.
ROUTE = web.RequestKey("route", Route)


class StoreCounts(Protocol):
    async def counts(self) -> tuple[int, int]: ...


# A scrape waits this long for the store's counts, then reports it as down.
_COUNTS_TIMEOUT = 2.0


class Metrics:
    def __init__(self) -> None:
        self._store: StoreCounts | None = None
        self._request_counts: dict[tuple[str, int], Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "msc3391_proxy_requests",
            "Requests answered, by owned route and status",
            ["route", "status"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "msc3391_proxy_upstream_seconds",
            "Time to the homeserver's response headers, by owned route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.deletes = Counter(
            "msc3391_proxy_deletes", "Deletes the homeserver accepted", ["kind"], registry=r
        )
        self.acknowledgements = Counter(
            "msc3391_proxy_acknowledgements",
            "Rows removed because a device saw the delete",
            ["via"],
            registry=r,
        )
        self.lost_revives = Counter(
            "msc3391_proxy_lost_revives",
            "Tombstones dropped because the homeserver holds their type again (a revive the store missed)",
            registry=r,
        )
        self.injected = Counter(
            "msc3391_proxy_injected_entries", "Deletion entries added to /sync responses", registry=r
        )
        self.stripped = Counter(
            "msc3391_proxy_stripped_responses", "Sync responses that had deletion entries removed", registry=r
        )
        self.identity_cache = Counter(
            "msc3391_proxy_identity_cache", "whoami cache look-ups", ["result"], registry=r
        )
        self.devices_pending = Gauge(
            "msc3391_proxy_devices_pending", "Devices with at least one delete to learn", registry=r
        )

    def count_request(self, route: str, status: int) -> None:
        # A labelled child looked up once per (route, status): `labels()` costs more
        # than the increment it leads to.
        child = self._request_counts.get((route, status))
        if child is None:
            child = self._request_counts[(route, status)] = self.requests.labels(route, str(status))
        child.inc()

    def watch_store(self, store: StoreCounts) -> None:
        """Report the store's rows and tombstones, read through its own connection at
        scrape time. A failing store keeps its last counts and sets `store_up` to 0:
        the gauges never vanish, so an alert on them keeps firing."""
        self._store = store
        self.store_rows = Gauge(
            "msc3391_proxy_unsynced_deletes_rows",
            "Rows in account_data_unsynced_deletes: (delete, device) pairs not yet seen",
            registry=self.registry,
        )
        self.store_tombstones = Gauge(
            "msc3391_proxy_tombstones", "Deletes that some device has not seen yet", registry=self.registry
        )
        self.store_up = Gauge(
            "msc3391_proxy_store_up", "1 if the store answered this scrape, else 0", registry=self.registry
        )

    async def _read_store(self) -> None:
        if self._store is None:
            return
        try:
            rows, tombstones = await asyncio.wait_for(self._store.counts(), _COUNTS_TIMEOUT)
        except (StoreUnavailable, TimeoutError):
            self.store_up.set(0)  # the cause is logged by the store
            return
        self.store_rows.set(rows)
        self.store_tombstones.set(tombstones)
        self.store_up.set(1)

    async def handle(self, request: web.Request) -> web.Response:
        await self._read_store()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

"""Prometheus metrics, served on their own listener (`[metrics]` in the config).

Labels never carry user data: owned routes are labelled by name, everything else as
`forward`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

# The owned route being served (labels upstream latency); "forward" for the rest.
current_route: ContextVar[str] = ContextVar("current_route", default="forward")


class _StoreCollector(Collector):
    """Rows pending, read at scrape time through a read-only connection of its own
    (WAL: it never waits on the proxy's writes)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = GaugeMetricFamily(
            "msc3391_proxy_unsynced_deletes_rows",
            "Rows in account_data_unsynced_deletes: (delete, device) pairs not yet seen",
        )
        tombstones = GaugeMetricFamily(
            "msc3391_proxy_tombstones", "Deletes that some device has not seen yet"
        )
        try:
            with sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=1) as db:
                rows.add_metric(
                    [], db.execute("SELECT COUNT(*) FROM account_data_unsynced_deletes").fetchone()[0]
                )
                tombstones.add_metric(
                    [], db.execute("SELECT COUNT(*) FROM account_data_tombstones").fetchone()[0]
                )
        except sqlite3.Error:
            return  # no store yet, or a fault the proxy already logs
        yield rows
        yield tombstones


class Metrics:
    def __init__(self) -> None:
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

    def watch_store(self, path: Path) -> None:
        self.registry.register(_StoreCollector(path))

    async def handle(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

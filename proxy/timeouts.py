"""How long the homeserver may stay silent on an owned route, by the route's policy.

Most requests get `upstream.read_timeout`. A long-poll (`/sync?since=...&timeout=N`,
sliding sync with a `pos`) waits N ms by design, so it gets that plus a margin; an
initial sync of a large account takes minutes on Synapse. Each route in `routes.py`
names its policy, whether the proxy serves it or (feature off) only forwards it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from .config import UpstreamConfig


class ReadTimeout(Enum):
    DEFAULT = "default"
    # `/sync`: initial without `since`, a long-poll with it.
    SYNC = "sync"
    # The legacy `/initialSync` and `/rooms/{roomId}/initialSync`.
    INITIAL_SYNC = "initial_sync"
    # Sliding sync: a connection's first request without `pos`, a long-poll with it.
    SLIDING_SYNC = "sliding_sync"


def _long_poll(config: UpstreamConfig, query: Mapping[str, str]) -> float:
    try:
        wait = max(0, int(query.get("timeout", "0"))) / 1000
    except ValueError:
        wait = 0
    return max(config.read_timeout, wait + config.sync_timeout_margin)


def read_timeout(policy: ReadTimeout, config: UpstreamConfig, query: Mapping[str, str]) -> float | None:
    """Seconds of silence allowed, or None for the default (`upstream.read_timeout`)."""
    initial = max(config.initial_sync_timeout, config.read_timeout)
    if policy is ReadTimeout.SYNC:
        return _long_poll(config, query) if "since" in query else initial
    if policy is ReadTimeout.SLIDING_SYNC:
        return _long_poll(config, query) if "pos" in query else initial
    if policy is ReadTimeout.INITIAL_SYNC:
        return initial
    return None

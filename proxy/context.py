"""What every handler shares: configuration, the upstream, identity, the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .config import Config
from .filters import FilterCache
from .forward import Upstream
from .identity import Identity
from .metrics import Metrics
from .store import Store


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class Context:
    config: Config
    upstream: Upstream
    identity: Identity
    store: Store
    filters: FilterCache
    metrics: Metrics
    # Serialises writes of one (user, room, type): the store's order of events is then
    # the homeserver's order of accepted writes.
    type_locks: KeyedLocks = field(default_factory=KeyedLocks)
    # user_id -> when its device list was last compared with its rows (monotonic).
    device_sweeps: dict[str, float] = field(default_factory=dict)

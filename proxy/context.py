"""What every handler shares: configuration, the upstream, identity, the store."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .confirmed import ConfirmedTombstones
from .filter_cache import FilterCache
from .forward import Upstream
from .identity import Identity
from .metrics import Metrics
from .repairs import Repairs
from .store import DeletionStore
from .store.operations import TypeLocks
from .versions_cache import VersionsCache


@dataclass
class Context:
    config: Config
    upstream: Upstream
    identity: Identity
    store: DeletionStore
    metrics: Metrics
    filters: FilterCache = field(default_factory=FilterCache)
    versions: VersionsCache = field(default_factory=VersionsCache)
    # Serialises writes of one (user, room, type), in this process or (a shared store)
    # across instances: the store's order of events is then the homeserver's order of
    # accepted writes.
    type_locks: TypeLocks = field(init=False)
    # Store writes the homeserver already made true, retried until the store takes them.
    repairs: Repairs = field(init=False)
    # Tombstones the homeserver is known to agree with (see `confirmed.py`).
    confirmed: ConfirmedTombstones = field(default_factory=ConfirmedTombstones)
    # user_id -> when its device list was last compared with its rows (monotonic).
    device_sweeps: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.type_locks = self.store.type_locks
        self.repairs = Repairs(self.type_locks)

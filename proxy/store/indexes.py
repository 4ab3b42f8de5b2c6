"""What the store keeps in memory so that most requests never query it.

`/sync` of a device with nothing to learn takes the fast path on `has_pending` alone, so
the index must never say "nothing pending" for a device that has a row. It is kept true
by the store's own writes (each refreshes its user); a change made elsewhere (another
instance on a shared database) is announced with `invalidate`, after which the index
answers "maybe" (True) for that user until the store has read the user's rows again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

# Nudge marks kept before the expired ones are swept out.
NUDGES_KEPT = 10_000


class PendingIndex:
    def __init__(self) -> None:
        # user_id -> devices that have at least one row (of any tombstone state).
        self._devices: dict[str, frozenset[str]] = {}
        # Users whose entry may be out of date; `None` in place of the set: all of them.
        self._stale: set[str] | None = set()
        # user_id -> stream_ids of deletes whose outcome is unknown (left 'pending' by an
        # earlier process, or by a homeserver write that could not be settled).
        self._orphaned: dict[str, list[int]] = {}
        # Bumped by every invalidation: a read of the rows begun before one must not
        # make the user fresh again with what it read (see `token`).
        self._generation: dict[str, int] = {}
        # While a full load runs: the users invalidated meanwhile (`None` inside: all).
        self._during_load: set[str | None] | None = None
        # (user_id, device_id) -> until when (monotonic) its syncs may carry a nudge.
        self._nudged: dict[tuple[str, str], float] = {}

    # --- questions ----------------------------------------------------------------------

    def is_stale(self, user_id: str) -> bool:
        return self._stale is None or user_id in self._stale

    def has_pending(self, user_id: str, device_id: str | None) -> bool:
        if self.is_stale(user_id):
            return True  # unknown: take the slow path, which reads the rows
        devices = self._devices.get(user_id)
        return devices is not None and device_id in devices

    def has_rows(self, user_id: str) -> bool:
        return self.is_stale(user_id) or user_id in self._devices

    def devices_of(self, user_id: str) -> frozenset[str]:
        return self._devices.get(user_id, frozenset())

    def devices_pending(self) -> int:
        return sum(map(len, self._devices.values()))

    def orphaned(self, user_id: str) -> list[int]:
        return list(self._orphaned.get(user_id, ()))

    def orphan_count(self) -> int:
        return sum(map(len, self._orphaned.values()))

    def nudged(self, user_id: str, device_id: str) -> bool:
        until = self._nudged.get((user_id, device_id))
        return until is not None and until > time.monotonic()

    # --- what the store learnt ----------------------------------------------------------

    def token(self, user_id: str) -> int:
        """Taken before reading a user's rows, handed back to `set_devices`."""
        return self._generation.get(user_id, 0)

    def fresh_token(self, user_id: str) -> int | None:
        """The user's token if its entry is fresh (None if stale): taken before a write
        that works out its new entry from the current one (see `written`)."""
        return None if self.is_stale(user_id) else self.token(user_id)

    def plan(self, user_id: str) -> tuple[int | None, frozenset[str]]:
        """What a write that works out its new entry starts from: `fresh_token` and the
        devices with rows, read together."""
        return self.fresh_token(user_id), self.devices_of(user_id)

    def written(self, user_id: str, devices: Iterable[str]) -> None:
        """The devices with rows after a write of the store's own. A read of the user's
        rows begun before it (another instance's change being read again) would hand
        back what it found before the write: it is made out of date first."""
        self.invalidate(user_id)
        self.set_devices(user_id, devices, self.token(user_id))

    def set_devices(self, user_id: str, devices: Iterable[str], token: int) -> None:
        """What a read of the user's rows found. If the user was invalidated since the
        read began (`token`), what it found may be out of date: the user stays stale."""
        if self._generation.get(user_id, 0) != token:
            return
        found = frozenset(devices)
        if found:
            self._devices[user_id] = found
        else:
            self._devices.pop(user_id, None)
        if self._stale is not None:
            self._stale.discard(user_id)

    def begin_load(self) -> None:
        """Called before the reads of a full `load`."""
        self._during_load = set()

    def load(self, rows: Iterable[tuple[str, str]], orphans: Iterable[tuple[str, int]]) -> None:
        """Everything, from (user, device) pairs with rows and (user, stream_id) intents;
        users invalidated since `begin_load` stay stale."""
        devices: dict[str, set[str]] = {}
        for user_id, device_id in rows:
            devices.setdefault(user_id, set()).add(device_id)
        self._devices = {user: frozenset(found) for user, found in devices.items()}
        self._orphaned = {}
        for user_id, stream_id in orphans:
            self._orphaned.setdefault(user_id, []).append(stream_id)
        meanwhile, self._during_load = self._during_load or set(), None
        self._stale = None if None in meanwhile else {u for u in meanwhile if u is not None}

    def mark_nudged(self, user_id: str, device_id: str, seconds: float) -> None:
        now = time.monotonic()
        if len(self._nudged) > NUDGES_KEPT:
            self._nudged = {key: until for key, until in self._nudged.items() if until > now}
        until = now + seconds
        self._nudged[(user_id, device_id)] = max(until, self._nudged.get((user_id, device_id), until))

    def mark_orphaned(self, user_id: str, stream_id: int) -> None:
        intents = self._orphaned.setdefault(user_id, [])
        if stream_id not in intents:
            intents.append(stream_id)

    def forget_intent(self, user_id: str, stream_id: int) -> None:
        intents = self._orphaned.get(user_id)
        if intents and stream_id in intents:
            intents.remove(stream_id)
            if not intents:
                del self._orphaned[user_id]

    # --- changes made elsewhere -----------------------------------------------------------

    def invalidate(self, user_id: str) -> None:
        self._generation[user_id] = self._generation.get(user_id, 0) + 1
        if self._stale is not None:
            self._stale.add(user_id)
        if self._during_load is not None:
            self._during_load.add(user_id)

    def invalidate_all(self) -> None:
        for user_id in self._generation:
            self._generation[user_id] += 1
        self._stale = None
        if self._during_load is not None:
            self._during_load.add(None)


class IndexedAnswers:
    """The in-memory half of a `DeletionStore`: its questions, answered from `index`."""

    index: PendingIndex

    def has_pending(self, user_id: str, device_id: str | None) -> bool:
        return self.index.has_pending(user_id, device_id)

    def has_rows(self, user_id: str) -> bool:
        return self.index.has_rows(user_id)

    def devices_pending(self) -> int:
        return self.index.devices_pending()

    def nudged(self, user_id: str, device_id: str) -> bool:
        return self.index.nudged(user_id, device_id)

    def orphaned_intents(self, user_id: str) -> list[int]:
        return self.index.orphaned(user_id)

    def mark_orphaned(self, user_id: str, stream_id: int) -> None:
        self.index.mark_orphaned(user_id, stream_id)

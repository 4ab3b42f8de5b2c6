"""Sync filters: would the homeserver deliver an account data entry to this request?

Only the parts of a filter that bear on account data are read (Synapse's
`FilterCollection`): the global `account_data` filter, and `room.account_data` with
the room-level `rooms`/`not_rooms`. Types accept a trailing `*` wildcard. Account
data entries have no sender, so a `senders` list excludes them all, as in Synapse.
Unlike Synapse, which drops all room account data once `room.rooms` is set (its
entries carry no room_id when filtered), rooms are matched against the entry's
real room. `limit` caps how many entries a list may hold after injection.

Pure: dicts in, dataclasses out. Filters uploaded by ID are fetched (and cached) by
`filter_cache.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _strings(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    return tuple(v for v in value if isinstance(v, str))


def _matches_type(actual: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return actual.startswith(pattern[:-1])
    return actual == pattern


@dataclass(frozen=True)
class EventFilter:
    types: tuple[str, ...] | None = None
    not_types: tuple[str, ...] = ()
    rooms: tuple[str, ...] | None = None
    not_rooms: tuple[str, ...] = ()
    senders_listed: bool = False
    limit: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> EventFilter:
        if not isinstance(raw, Mapping):
            return cls()
        limit = raw.get("limit")
        return cls(
            types=_strings(raw.get("types")),
            not_types=_strings(raw.get("not_types")) or (),
            rooms=_strings(raw.get("rooms")),
            not_rooms=_strings(raw.get("not_rooms")) or (),
            senders_listed=isinstance(raw.get("senders"), list),
            limit=limit if isinstance(limit, int) and not isinstance(limit, bool) else None,
        )

    def allows(self, account_data_type: str, room_id: str | None = None) -> bool:
        if any(_matches_type(account_data_type, t) for t in self.not_types):
            return False
        if self.types is not None and not any(_matches_type(account_data_type, t) for t in self.types):
            return False
        if self.senders_listed:
            return False
        if room_id is not None:
            if room_id in self.not_rooms:
                return False
            if self.rooms is not None and room_id not in self.rooms:
                return False
        return True

    def has_room_for(self, count: int) -> bool:
        return self.limit is None or count < self.limit


@dataclass(frozen=True)
class SyncFilter:
    global_account_data: EventFilter = EventFilter()
    room_account_data: EventFilter = EventFilter()
    # room.rooms / room.not_rooms: apply to every room section.
    rooms: EventFilter = EventFilter()

    @classmethod
    def parse(cls, raw: Any) -> SyncFilter:
        if not isinstance(raw, Mapping):
            return cls()
        room = raw.get("room") if isinstance(raw.get("room"), Mapping) else {}
        return cls(
            global_account_data=EventFilter.parse(raw.get("account_data")),
            room_account_data=EventFilter.parse(room.get("account_data")),
            rooms=EventFilter.parse({k: room[k] for k in ("rooms", "not_rooms") if k in room}),
        )

    def allows_global(self, account_data_type: str) -> bool:
        return self.global_account_data.allows(account_data_type)

    def allows_room(self, room_id: str, account_data_type: str) -> bool:
        return self.rooms.allows(account_data_type, room_id) and self.room_account_data.allows(
            account_data_type, room_id
        )


NO_FILTER = SyncFilter()

"""Pure functions over sync bodies: strip, inject and account for deletions.

A deletion is an account data entry whose content is `{}`. Bodies are never
mutated: the functions return a new top-level dict that shares every part they did
not change, so a 10 MiB sync costs a copy of only the lists that were touched.

Where entries live in a `/sync` response:
- global: `account_data.events`
- room:   `rooms.join.<room>.account_data.events` and `rooms.leave.<room>.account_data.events`
In legacy `/initialSync` bodies: `account_data` (a list) and `rooms[i].account_data`.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .filters import SyncFilter
from .records import PendingDelete

# (room_id or None for global, type)
Key = tuple[str | None, str]

# The type of the to-device message the proxy sends a device from itself to move the
# homeserver's sync token (see `sync._with_a_new_token`); no client ever sees one.
NUDGE_TYPE = "org.matrix.msc3391.proxy_nudge"

# Synapse writes compact JSON, but other homeservers may not: allow any whitespace. A
# nudge to strip makes a body worth reading too.
_MAYBE_DELETION = re.compile(rb'"content"\s*:\s*\{\s*\}|' + re.escape(NUDGE_TYPE.encode()))

_ROOM_SECTIONS = ("join", "leave")


def may_hold_deletions(raw: bytes) -> bool:
    """A cheap byte scan: False means the body certainly has no `{}` content."""
    return _MAYBE_DELETION.search(raw) is not None


def is_deletion(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    content = entry.get("content")
    return isinstance(content, dict) and not content


def _type_of(entry: Any) -> str | None:
    kind = entry.get("type") if isinstance(entry, dict) else None
    return kind if isinstance(kind, str) else None


def _events(container: Any) -> list[Any] | None:
    """`container["account_data"]["events"]`, if it is a list."""
    if not isinstance(container, dict):
        return None
    account_data = container.get("account_data")
    if not isinstance(account_data, dict):
        return None
    events = account_data.get("events")
    return events if isinstance(events, list) else None


def _with_events(container: dict[str, Any], events: list[Any]) -> dict[str, Any]:
    account_data = container.get("account_data")
    base = account_data if isinstance(account_data, dict) else {}
    return {**container, "account_data": {**base, "events": events}}


def _rooms(body: dict[str, Any], section: str) -> dict[str, Any]:
    rooms = body.get("rooms")
    if not isinstance(rooms, dict):
        return {}
    found = rooms.get(section)
    return found if isinstance(found, dict) else {}


def entries(body: dict[str, Any]) -> Iterator[tuple[str | None, Any]]:
    """Every account data entry of a /sync body, with its room (None for global)."""
    for entry in _events(body) or ():
        yield None, entry
    for section in _ROOM_SECTIONS:
        for room_id, room in _rooms(body, section).items():
            for entry in _events(room) or ():
                yield room_id, entry


def deletions_in(body: dict[str, Any]) -> set[Key]:
    return {(room, kind) for room, e in entries(body) if is_deletion(e) and (kind := _type_of(e)) is not None}


def live_in(body: dict[str, Any]) -> set[Key]:
    return {
        (room, kind) for room, e in entries(body) if not is_deletion(e) and (kind := _type_of(e)) is not None
    }


def strip_deletions(body: dict[str, Any], keep: Container[Key] = frozenset()) -> dict[str, Any]:
    """Remove every `{}` entry whose (room, type) is not in `keep`."""

    def filtered(room: str | None, events: list[Any]) -> list[Any] | None:
        kept = [e for e in events if not is_deletion(e) or (room, _type_of(e)) in keep]
        return kept if len(kept) != len(events) else None

    out = body
    events = _events(body)
    if events is not None and (new := filtered(None, events)) is not None:
        out = _with_events(out, new)
    for section in _ROOM_SECTIONS:
        changed: dict[str, Any] = {}
        for room_id, room in _rooms(body, section).items():
            room_events = _events(room)
            if room_events is not None and (new := filtered(room_id, room_events)) is not None:
                changed[room_id] = _with_events(room, new)
        if changed:
            out = _replace_rooms(out, section, changed)
    return out


def _replace_rooms(body: dict[str, Any], section: str, changed: dict[str, Any]) -> dict[str, Any]:
    rooms = body.get("rooms") if isinstance(body.get("rooms"), dict) else {}
    current = _rooms(body, section)
    return {**body, "rooms": {**rooms, section: {**current, **changed}}}


def rooms_to_place(body: dict[str, Any], pending: Sequence[PendingDelete]) -> set[str]:
    """Rooms of pending room deletes that the body has no section for."""
    present = {room for section in _ROOM_SECTIONS for room in _rooms(body, section)}
    return {p.room_id for p in pending if p.room_id is not None and p.room_id not in present}


def _new_joined_room() -> dict[str, Any]:
    # What Synapse sends for a joined room with nothing but an account data change.
    return {
        "timeline": {"events": [], "limited": False},
        "state": {"events": []},
        "ephemeral": {"events": []},
        "account_data": {"events": []},
    }


def to_inject(
    pending: Sequence[PendingDelete], present: Container[Key]
) -> Iterator[tuple[PendingDelete, Key, dict[str, Any]]]:
    """Each settled pending delete a body does not carry yet (`present` is read as the
    caller places entries), with its key and the entry that tells it. An intent still
    under way is never injected."""
    for delete in pending:
        key = (delete.room_id, delete.account_data_type)
        if key not in present and delete.settled:
            yield delete, key, {"type": delete.account_data_type, "content": {}}


def inject(
    body: dict[str, Any],
    pending: Sequence[PendingDelete],
    sync_filter: SyncFilter,
    joined_rooms: Container[str],
) -> dict[str, Any]:
    """Add `{"type": T, "content": {}}` for each pending delete the body does not
    carry yet, where the filter lets it through and the room can be placed.

    A type the body carries with real content is left alone: the device sees the
    homeserver's newer value, and the delete stays pending.
    """
    present = deletions_in(body) | live_in(body)
    out = body
    for delete, key, entry in to_inject(pending, present):
        if delete.room_id is None:
            events = _events(out) or []
            if sync_filter.allows_global(delete.account_data_type) and (
                sync_filter.global_account_data.has_room_for(len(events))
            ):
                out = _with_events(out, [*events, entry])
                present.add(key)
            continue
        room_id = delete.room_id
        if not sync_filter.allows_room(room_id, delete.account_data_type):
            continue
        section = next((s for s in _ROOM_SECTIONS if room_id in _rooms(out, s)), None)
        if section is None:
            if room_id not in joined_rooms:
                continue  # Synapse sends room account data only for rooms the user is in
            section, room = "join", _new_joined_room()
        else:
            room = _rooms(out, section)[room_id]
        events = _events(room) or []
        if not sync_filter.room_account_data.has_room_for(len(events)):
            continue
        out = _replace_rooms(out, section, {room_id: _with_events(room, [*events, entry])})
        present.add(key)
    return out


@dataclass(frozen=True)
class SyncRewrite:
    """A rewritten sync body (`/sync` or sliding sync) and what it delivers."""

    body: dict[str, Any]
    # stream_ids of this device's pending deletes that the final body carries.
    delivered: frozenset[int]
    # How many deletion entries the proxy added (the homeserver had not sent them).
    injected: int = 0

    def changed(self, original: dict[str, Any]) -> bool:
        return self.body is not original


def rewrite_sync(
    body: dict[str, Any],
    *,
    incremental: bool,
    full_state: bool,
    pending: Sequence[PendingDelete],
    sync_filter: SyncFilter,
    joined_rooms: Container[str] = frozenset(),
) -> SyncRewrite:
    """The whole /sync rule for one device (see the contract, "Sync").

    - initial sync: no `{}` entry survives; every pending delete counts as delivered,
      because the device now holds the full current state.
    - full_state with since: `{}` entries go, except pending ones; pending ones are
      injected where missing.
    - incremental: the homeserver's `{}` entries pass; pending ones are injected.
    """
    body = strip_nudges(body)
    if not incremental:
        return SyncRewrite(strip_deletions(body), frozenset(p.stream_id for p in pending))
    out = body
    if full_state:
        out = strip_deletions(out, keep={(p.room_id, p.account_data_type) for p in pending})
    if not pending:
        return SyncRewrite(out, frozenset())
    out = inject(out, pending, sync_filter, joined_rooms)
    carried = deletions_in(out)
    delivered = frozenset(p.stream_id for p in pending if (p.room_id, p.account_data_type) in carried)
    return SyncRewrite(out, delivered, injected=len(carried - deletions_in(body)))


def strip_nudges(body: dict[str, Any]) -> dict[str, Any]:
    """Remove the proxy's own to-device nudges from `to_device.events`."""
    return _strip_nudges_in(body, "to_device")


def _strip_nudges_in(container: dict[str, Any], key: str) -> dict[str, Any]:
    """`container` without nudges in `container[key]["events"]` (the same object if none)."""
    to_device = container.get(key)
    events = to_device.get("events") if isinstance(to_device, dict) else None
    if not isinstance(events, list):
        return container
    kept = [e for e in events if not (isinstance(e, dict) and e.get("type") == NUDGE_TYPE)]
    if len(kept) == len(events):
        return container
    assert isinstance(to_device, dict)
    return {**container, key: {**to_device, "events": kept}}


def strip_sliding_nudges(body: dict[str, Any]) -> dict[str, Any]:
    """Remove the proxy's own to-device nudges from a sliding sync body's
    `extensions.to_device.events`."""
    extensions = body.get("extensions")
    if not isinstance(extensions, dict):
        return body
    stripped = _strip_nudges_in(extensions, "to_device")
    return body if stripped is extensions else {**body, "extensions": stripped}


def strip_legacy_initial_sync(body: dict[str, Any]) -> dict[str, Any]:
    """`/initialSync` and `/rooms/{id}/initialSync`: account data lists hold events
    directly; none may carry `{}`."""
    out = body
    top = body.get("account_data")
    if isinstance(top, list) and any(is_deletion(e) for e in top):
        out = {**out, "account_data": [e for e in top if not is_deletion(e)]}
    rooms = body.get("rooms")
    if isinstance(rooms, list):
        new_rooms = [_strip_legacy_room(room) for room in rooms]
        if any(new is not old for new, old in zip(new_rooms, rooms, strict=True)):
            out = {**out, "rooms": new_rooms}
    return out


def _strip_legacy_room(room: Any) -> Any:
    if not isinstance(room, dict):
        return room
    events = room.get("account_data")
    if isinstance(events, list) and any(is_deletion(e) for e in events):
        return {**room, "account_data": [e for e in events if not is_deletion(e)]}
    return room


__all__ = [
    "SyncRewrite",
    "deletions_in",
    "inject",
    "is_deletion",
    "may_hold_deletions",
    "rewrite_sync",
    "rooms_to_place",
    "strip_deletions",
    "strip_legacy_initial_sync",
    "strip_nudges",
    "strip_sliding_nudges",
    "to_inject",
]

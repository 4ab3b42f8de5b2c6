"""Pure functions over simplified sliding sync (MSC4186) bodies: the `/sync` rules of
`rewrite.py`, where the account data extension carries them.

Account data travels in `extensions.account_data` of a response, `{"global": [events],
"rooms": {room_id: [events]}}`, only when the request enables that extension, and only
for the rooms the extension's scope covers (Synapse's
`handlers/sliding_sync/extensions.py`, `find_relevant_room_ids_for_extension`):

- `lists` (absent: `["*"]`, `null`: none) names the lists whose rooms are covered;
- `rooms` (absent: `["*"]`, `null`: none) names the room subscriptions that are; `*`
  covers every room of the response, list rooms included.

Nothing of a request is sticky on a connection: each response is decided by its own
request. Bodies are never mutated; the functions return new dicts that share every part
they did not change.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .records import PendingDelete
from .rewrite import SyncRewrite, is_deletion, strip_sliding_nudges, to_inject

Key = tuple[str | None, str]  # (room_id or None for global, type)


def _names(extension: Mapping[str, Any], field: str) -> tuple[str, ...]:
    value = extension.get(field, ["*"])
    if not isinstance(value, list):
        return ()  # `null` (or nonsense the homeserver refuses anyway): nothing
    return tuple(v for v in value if isinstance(v, str))


@dataclass(frozen=True)
class Scope:
    """What a request asks of the account data extension."""

    enabled: bool = False
    lists: tuple[str, ...] = ("*",)
    rooms: tuple[str, ...] = ("*",)
    subscriptions: frozenset[str] = frozenset()

    @classmethod
    def of(cls, request_body: Any) -> Scope:
        if not isinstance(request_body, Mapping):
            return cls()
        extensions = request_body.get("extensions")
        extension = extensions.get("account_data") if isinstance(extensions, Mapping) else None
        subscriptions = request_body.get("room_subscriptions")
        subscribed = frozenset(subscriptions) if isinstance(subscriptions, Mapping) else frozenset()
        if not isinstance(extension, Mapping) or extension.get("enabled") is not True:
            return cls(subscriptions=subscribed)
        return cls(True, _names(extension, "lists"), _names(extension, "rooms"), subscribed)


def _list_rooms(body: Mapping[str, Any]) -> dict[str, set[str]]:
    """The room IDs of each list in a response (`lists.{name}.ops[].room_ids`)."""
    out: dict[str, set[str]] = {}
    lists = body.get("lists")
    for name, found in lists.items() if isinstance(lists, Mapping) else ():
        rooms: set[str] = set()
        ops = found.get("ops") if isinstance(found, Mapping) else None
        for op in ops if isinstance(ops, list) else ():
            ids = op.get("room_ids") if isinstance(op, Mapping) else None
            rooms.update(r for r in (ids if isinstance(ids, list) else ()) if isinstance(r, str))
        out[name] = rooms
    return out


def _response_rooms(body: Mapping[str, Any]) -> set[str]:
    rooms = body.get("rooms")
    return set(rooms) if isinstance(rooms, Mapping) else set()


def covered_rooms(scope: Scope, body: Mapping[str, Any], subscribed: Container[str] = ()) -> set[str]:
    """The rooms whose account data the homeserver considers for this response.

    A subscription counts where the homeserver kept it: for a room in the response, or
    one of `subscribed` (the rooms the caller is known to be in)."""
    if not scope.enabled:
        return set()
    lists = _list_rooms(body)
    window = set().union(*lists.values()) if lists else set()
    present = _response_rooms(body)
    subscriptions = {r for r in scope.subscriptions if r in present or r in subscribed}
    actual = window | subscriptions
    if "*" in scope.lists:
        rooms = set(window)
    else:
        rooms = set().union(*(lists.get(name, set()) for name in scope.lists)) if scope.lists else set()
    if "*" in scope.rooms:
        rooms |= actual
    else:
        rooms |= {r for r in scope.rooms if r in actual}
    return rooms


def initial_rooms(body: Mapping[str, Any]) -> set[str]:
    """Rooms this response sends the connection for the first time (`initial: true`)."""
    rooms = body.get("rooms")
    if not isinstance(rooms, Mapping):
        return set()
    return {r for r, room in rooms.items() if isinstance(room, Mapping) and room.get("initial") is True}


def _account_data(body: Mapping[str, Any]) -> tuple[list[Any], dict[str, list[Any]]]:
    extensions = body.get("extensions")
    section = extensions.get("account_data") if isinstance(extensions, Mapping) else None
    if not isinstance(section, Mapping):
        return [], {}
    events = section.get("global")
    rooms = section.get("rooms")
    return (
        list(events) if isinstance(events, list) else [],
        {r: list(e) for r, e in rooms.items() if isinstance(e, list)} if isinstance(rooms, Mapping) else {},
    )


def _type_of(entry: Any) -> str | None:
    kind = entry.get("type") if isinstance(entry, Mapping) else None
    return kind if isinstance(kind, str) else None


def carried(body: Mapping[str, Any]) -> set[Key]:
    """Every (room, type) the body's account data extension carries as `{}`."""
    global_events, rooms = _account_data(body)
    found = {(None, t) for e in global_events if is_deletion(e) and (t := _type_of(e)) is not None}
    for room_id, events in rooms.items():
        found |= {(room_id, t) for e in events if is_deletion(e) and (t := _type_of(e)) is not None}
    return found


def _with_account_data(
    body: dict[str, Any], global_events: list[Any], rooms: dict[str, list[Any]]
) -> dict[str, Any]:
    extensions = body.get("extensions")
    base = extensions if isinstance(extensions, dict) else {}
    section = base.get("account_data")
    section = section if isinstance(section, dict) else {}
    account_data = {**section, "global": global_events, "rooms": rooms}
    return {**body, "extensions": {**base, "account_data": account_data}}


def _kept(events: list[Any], room_id: str | None, keep: Container[Key]) -> list[Any]:
    return [e for e in events if not is_deletion(e) or (room_id, _type_of(e)) in keep]


def rewrite_sliding_sync(
    body: dict[str, Any],
    *,
    first: bool,
    scope: Scope,
    pending: Sequence[PendingDelete],
    subscribed: Container[str] = (),
) -> SyncRewrite:
    """The MSC3391 rules for one response to one device (see the contract, "Sliding sync").

    - `first` (a request without `pos`): no `{}` entry survives, global or room; every
      pending delete the response covers (global ones, and those of covered rooms) is
      delivered, because the device now holds the current state of what it covers.
    - incremental: the homeserver's `{}` entries pass, except in rooms sent for the
      first time (`initial: true`), where only this device's pending ones stay; each
      pending delete the body does not carry is injected where the scope covers it.
    """
    body = strip_sliding_nudges(body)
    if not scope.enabled:
        return SyncRewrite(body, frozenset())
    covered = covered_rooms(scope, body, subscribed)
    global_events, rooms = _account_data(body)
    pending_keys = {(p.room_id, p.account_data_type) for p in pending}
    if first:
        new_global = _kept(global_events, None, ())
        new_rooms = {r: _kept(events, r, ()) for r, events in rooms.items()}
        # A type the snapshot shows live was not deleted yet when it was taken (an intent
        # still under way): that delete is not delivered by it.
        live = carried_or_live(new_global, new_rooms)
        delivered = frozenset(
            p.stream_id
            for p in pending
            if (p.room_id is None or p.room_id in covered) and (p.room_id, p.account_data_type) not in live
        )
        return _finish(body, global_events, rooms, new_global, new_rooms, delivered, 0)
    new_global = list(global_events)
    new_rooms = {
        r: _kept(events, r, pending_keys) if r in initial_rooms(body) else list(events)
        for r, events in rooms.items()
    }
    present = carried_or_live(new_global, new_rooms)
    injected = 0
    for delete, key, entry in to_inject(pending, present):
        if delete.room_id is None:
            new_global.append(entry)
        elif delete.room_id in covered:
            new_rooms.setdefault(delete.room_id, []).append(entry)
        else:
            continue
        present.add(key)
        injected += 1
    final = {(None, _type_of(e)) for e in new_global if is_deletion(e)}
    for room_id, events in new_rooms.items():
        final |= {(room_id, _type_of(e)) for e in events if is_deletion(e)}
    delivered = frozenset(p.stream_id for p in pending if (p.room_id, p.account_data_type) in final)
    return _finish(body, global_events, rooms, new_global, new_rooms, delivered, injected)


def carried_or_live(global_events: Iterable[Any], rooms: Mapping[str, Iterable[Any]]) -> set[Key]:
    """Every (room, type) an account data view carries, deleted or live: a type the
    homeserver sends with content is left alone (the device sees its newer value)."""
    found: set[Key] = {(None, t) for e in global_events if (t := _type_of(e)) is not None}
    for room_id, events in rooms.items():
        found |= {(room_id, t) for e in events if (t := _type_of(e)) is not None}
    return found


def _finish(
    body: dict[str, Any],
    old_global: list[Any],
    old_rooms: dict[str, list[Any]],
    new_global: list[Any],
    new_rooms: dict[str, list[Any]],
    delivered: frozenset[int],
    injected: int,
) -> SyncRewrite:
    if new_global == old_global and new_rooms == old_rooms:
        return SyncRewrite(body, delivered, injected)
    return SyncRewrite(_with_account_data(body, new_global, new_rooms), delivered, injected)

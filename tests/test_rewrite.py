"""The sync rewriter: pure functions over sync bodies (contract, "Sync")."""

from __future__ import annotations

import copy
from typing import Any

from proxy.filters import SyncFilter
from proxy.rewrite import (
    deletions_in,
    inject,
    may_hold_deletions,
    rewrite_sync,
    rooms_to_place,
    strip_deletions,
    strip_legacy_initial_sync,
)
from proxy.store import PendingDelete
from tests.matrix import ROOM

OTHER = "!other:localhost"


def entry(kind: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": kind, "content": content if content is not None else {}}


def sync_body(
    global_events: list[dict[str, Any]] | None = None,
    rooms: dict[str, list[dict[str, Any]]] | None = None,
    leave: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"next_batch": "s2", "account_data": {"events": global_events or []}}
    body["rooms"] = {
        "join": {
            room: {
                "timeline": {"events": [{"type": "m.room.message", "content": {}}], "limited": False},
                "state": {"events": []},
                "account_data": {"events": events},
            }
            for room, events in (rooms or {}).items()
        },
        "leave": {room: {"account_data": {"events": events}} for room, events in (leave or {}).items()},
    }
    body["to_device"] = {"events": [{"type": "m.x", "content": {}}]}
    return body


def test_byte_scan_finds_compact_and_spaced_empty_content() -> None:
    assert may_hold_deletions(b'{"type":"a","content":{}}')
    assert may_hold_deletions(b'{"type": "a", "content" : { } }')
    assert not may_hold_deletions(b'{"type":"a","content":{"x":{}}}')


def test_strip_removes_every_empty_entry_and_keeps_the_rest() -> None:
    body = sync_body(
        [entry("a"), entry("b", {"x": 1})],
        rooms={ROOM: [entry("c"), entry("d", {"y": 2})]},
        leave={OTHER: [entry("e")]},
    )
    original = copy.deepcopy(body)
    out = strip_deletions(body)
    assert out["account_data"]["events"] == [entry("b", {"x": 1})]
    assert out["rooms"]["join"][ROOM]["account_data"]["events"] == [entry("d", {"y": 2})]
    assert out["rooms"]["leave"][OTHER]["account_data"]["events"] == []
    # Everything else is untouched, and the input was not mutated.
    assert out["rooms"]["join"][ROOM]["timeline"] == original["rooms"]["join"][ROOM]["timeline"]
    assert out["to_device"] == original["to_device"]
    assert body == original


def test_strip_returns_the_same_object_when_nothing_changes() -> None:
    body = sync_body([entry("b", {"x": 1})])
    assert strip_deletions(body) is body


def test_strip_keeps_listed_keys() -> None:
    body = sync_body([entry("a"), entry("b")], rooms={ROOM: [entry("a")]})
    out = strip_deletions(body, keep={(None, "a")})
    assert out["account_data"]["events"] == [entry("a")]
    assert out["rooms"]["join"][ROOM]["account_data"]["events"] == []


def test_initial_sync_strips_everything_and_delivers_all_pending() -> None:
    pending = [PendingDelete(7, None, "a"), PendingDelete(8, ROOM, "c")]
    body = sync_body([entry("a")], rooms={ROOM: [entry("c")]})
    result = rewrite_sync(
        body, incremental=False, full_state=False, pending=pending, sync_filter=SyncFilter()
    )
    assert deletions_in(result.body) == set()
    assert result.delivered == {7, 8}


def test_incremental_passes_homeserver_deletions_and_counts_them_delivered() -> None:
    pending = [PendingDelete(7, None, "a")]
    body = sync_body([entry("a"), entry("z")])
    result = rewrite_sync(body, incremental=True, full_state=False, pending=pending, sync_filter=SyncFilter())
    assert result.body["account_data"]["events"] == [entry("a"), entry("z")]
    assert result.delivered == {7}
    assert not result.changed(body)


def test_incremental_injects_missing_global_and_room_deletes() -> None:
    pending = [PendingDelete(1, None, "a"), PendingDelete(2, ROOM, "c")]
    body = sync_body([entry("b", {"x": 1})], rooms={ROOM: []})
    result = rewrite_sync(body, incremental=True, full_state=False, pending=pending, sync_filter=SyncFilter())
    assert result.body["account_data"]["events"] == [entry("b", {"x": 1}), entry("a")]
    assert result.body["rooms"]["join"][ROOM]["account_data"]["events"] == [entry("c")]
    assert result.delivered == {1, 2}


def test_injection_creates_a_joined_room_section_only_for_joined_rooms() -> None:
    pending = [PendingDelete(1, ROOM, "c"), PendingDelete(2, OTHER, "d")]
    body: dict[str, Any] = {"next_batch": "s3"}
    assert rooms_to_place(body, pending) == {ROOM, OTHER}
    out = inject(body, pending, SyncFilter(), joined_rooms={ROOM})
    assert out["rooms"]["join"][ROOM]["account_data"]["events"] == [entry("c")]
    assert OTHER not in out["rooms"]["join"]
    assert deletions_in(out) == {(ROOM, "c")}


def test_injection_uses_the_leave_section_when_the_room_is_there() -> None:
    body = sync_body(leave={ROOM: []})
    out = inject(body, [PendingDelete(1, ROOM, "c")], SyncFilter(), joined_rooms=set())
    assert out["rooms"]["leave"][ROOM]["account_data"]["events"] == [entry("c")]
    assert ROOM not in out["rooms"]["join"]


def test_injection_skips_a_type_the_body_carries_with_content() -> None:
    body = sync_body([entry("a", {"new": True})])
    result = rewrite_sync(
        body,
        incremental=True,
        full_state=False,
        pending=[PendingDelete(1, None, "a")],
        sync_filter=SyncFilter(),
    )
    assert result.body["account_data"]["events"] == [entry("a", {"new": True})]
    assert result.delivered == frozenset()


def test_injection_honours_types_not_types_and_wildcards() -> None:
    pending = [
        PendingDelete(1, None, "m.a"),
        PendingDelete(2, None, "org.b"),
        PendingDelete(3, None, "m.skip"),
    ]
    f = SyncFilter.parse({"account_data": {"types": ["m.*", "org.b"], "not_types": ["m.skip"]}})
    out = inject(sync_body(), pending, f, joined_rooms=set())
    assert [e["type"] for e in out["account_data"]["events"]] == ["m.a", "org.b"]


def test_injection_honours_room_filters_at_both_levels() -> None:
    pending = [PendingDelete(1, ROOM, "a"), PendingDelete(2, OTHER, "a")]
    body = sync_body(rooms={ROOM: [], OTHER: []})
    only_room = SyncFilter.parse({"room": {"rooms": [ROOM]}})
    out = inject(body, pending, only_room, joined_rooms=set())
    assert deletions_in(out) == {(ROOM, "a")}
    not_room = SyncFilter.parse({"room": {"account_data": {"not_rooms": [ROOM]}}})
    out = inject(body, pending, not_room, joined_rooms=set())
    assert deletions_in(out) == {(OTHER, "a")}


def test_injection_honours_limit_and_senders() -> None:
    pending = [PendingDelete(1, None, "a")]
    full = sync_body([entry("x", {"1": 1}), entry("y", {"2": 2})])
    limited = SyncFilter.parse({"account_data": {"limit": 2}})
    assert deletions_in(inject(full, pending, limited, joined_rooms=set())) == set()
    senders = SyncFilter.parse({"account_data": {"senders": ["@alice:localhost"]}})
    assert deletions_in(inject(sync_body(), pending, senders, joined_rooms=set())) == set()


def test_full_state_keeps_only_what_this_device_still_has_to_learn() -> None:
    pending = [PendingDelete(1, None, "a")]
    body = sync_body([entry("a"), entry("old")], rooms={ROOM: [entry("gone")]})
    result = rewrite_sync(body, incremental=True, full_state=True, pending=pending, sync_filter=SyncFilter())
    assert deletions_in(result.body) == {(None, "a")}
    assert result.delivered == {1}


def test_full_state_injects_a_pending_delete_the_homeserver_left_out() -> None:
    pending = [PendingDelete(1, None, "a")]
    result = rewrite_sync(
        sync_body([entry("old")]),
        incremental=True,
        full_state=True,
        pending=pending,
        sync_filter=SyncFilter(),
    )
    assert deletions_in(result.body) == {(None, "a")}


def test_rewrite_is_idempotent() -> None:
    pending = [PendingDelete(1, None, "a"), PendingDelete(2, ROOM, "c")]
    body = sync_body([entry("b", {"x": 1})], rooms={ROOM: []})
    once = rewrite_sync(body, incremental=True, full_state=False, pending=pending, sync_filter=SyncFilter())
    twice = rewrite_sync(
        once.body, incremental=True, full_state=False, pending=pending, sync_filter=SyncFilter()
    )
    assert twice.body == once.body
    assert twice.delivered == once.delivered


def test_legacy_initial_sync_strips_top_level_and_room_lists() -> None:
    body = {
        "account_data": [entry("a"), entry("b", {"x": 1})],
        "rooms": [{"room_id": ROOM, "account_data": [entry("c"), entry("d", {"y": 1})]}],
        "end": "s1",
    }
    out = strip_legacy_initial_sync(body)
    assert out["account_data"] == [entry("b", {"x": 1})]
    assert out["rooms"][0]["account_data"] == [entry("d", {"y": 1})]
    assert out["end"] == "s1"
    room_only = {"room_id": ROOM, "account_data": [entry("c")], "messages": {"chunk": []}}
    assert strip_legacy_initial_sync(room_only)["account_data"] == []


def test_malformed_sections_are_left_alone() -> None:
    body: dict[str, Any] = {"account_data": {"events": "nope"}, "rooms": {"join": {ROOM: None}}}
    assert strip_deletions(body) is body
    assert deletions_in(body) == set()


def test_an_unsettled_delete_is_delivered_when_carried_but_never_injected() -> None:
    unsettled = [PendingDelete(1, None, "a", settled=False), PendingDelete(2, None, "b", settled=False)]
    body = sync_body([entry("a")])
    result = rewrite_sync(
        body, incremental=True, full_state=False, pending=unsettled, sync_filter=SyncFilter()
    )
    assert deletions_in(result.body) == {(None, "a")}
    assert result.delivered == {1}

"""The sliding sync rewriter (`proxy/sliding_rewrite.py`): strip, inject, scope, and rooms
sent for the first time; unit cases, then properties on generated bodies."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.records import PendingDelete
from proxy.rewrite import NUDGE_TYPE
from proxy.sliding_rewrite import Scope, carried, covered_rooms, rewrite_sliding_sync

R1, R2, R3 = "!one:hs", "!two:hs", "!three:hs"
ALL = Scope.of({"extensions": {"account_data": {"enabled": True}}})


def entry(kind: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": kind, "content": {} if content is None else content}


def response(
    *,
    global_events: list[Any] | None = None,
    rooms: dict[str, list[Any]] | None = None,
    lists: dict[str, list[str]] | None = None,
    initial: tuple[str, ...] = (),
    response_rooms: tuple[str, ...] = (),
) -> dict[str, Any]:
    body: dict[str, Any] = {"pos": "5/s1", "extensions": {}}
    if lists is not None:
        body["lists"] = {
            name: {"count": len(ids), "ops": [{"op": "SYNC", "range": [0, 9], "room_ids": ids}]}
            for name, ids in lists.items()
        }
    body["rooms"] = {r: {"initial": True} for r in initial} | {r: {"name": r} for r in response_rooms}
    if global_events is not None or rooms is not None:
        body["extensions"]["account_data"] = {"global": global_events or [], "rooms": rooms or {}}
    return body


def account_data(body: dict[str, Any]) -> dict[str, Any]:
    return body["extensions"]["account_data"]


# --- the scope --------------------------------------------------------------------------------


def test_the_scope_defaults_to_every_list_and_every_subscription_and_null_means_none() -> None:
    assert ALL == Scope(True, ("*",), ("*",), frozenset())
    assert Scope.of({"extensions": {"account_data": {"enabled": False}}}).enabled is False
    assert Scope.of({"extensions": {}}).enabled is False
    assert Scope.of({}).enabled is False
    assert (
        Scope.of({"extensions": {"account_data": {"enabled": "yes"}}}).enabled is False
    )  # strict, as Synapse
    none = Scope.of({"extensions": {"account_data": {"enabled": True, "lists": None, "rooms": None}}})
    assert (none.lists, none.rooms) == ((), ())


def test_covered_rooms_follow_synapses_lists_and_rooms_rules() -> None:
    body = response(lists={"a": [R1], "b": [R2]}, response_rooms=(R3,))
    subscribed = {"room_subscriptions": {R3: {}, "!gone:hs": {}}}

    def scope(ext: dict[str, Any]) -> Scope:
        return Scope.of({**subscribed, "extensions": {"account_data": {"enabled": True, **ext}}})

    # rooms: ["*"] covers every room of the response, list rooms included.
    assert covered_rooms(scope({}), body) == {R1, R2, R3}
    assert covered_rooms(scope({"lists": ["a"], "rooms": []}), body) == {R1}
    assert covered_rooms(scope({"lists": [], "rooms": [R3]}), body) == {R3}
    assert covered_rooms(scope({"lists": [], "rooms": [R1]}), body) == {R1}  # a list room, named
    assert covered_rooms(scope({"lists": ["nope"], "rooms": []}), body) == set()
    # A subscription the homeserver did not keep (not in the response) counts only if the
    # caller is known to be in the room.
    assert "!gone:hs" not in covered_rooms(scope({}), body)
    assert "!gone:hs" in covered_rooms(scope({}), body, subscribed={"!gone:hs"})
    assert covered_rooms(Scope(), body) == set()


# --- a connection's first response -------------------------------------------------------------


def test_a_first_response_loses_every_deletion_and_delivers_what_it_covers() -> None:
    body = response(
        global_events=[entry("g.gone"), entry("g.live", {"v": 1}), entry("m.push_rules", {"global": {}})],
        rooms={R1: [entry("r.gone"), entry("r.live", {"v": 1})], R2: []},
        lists={"all": [R1, R2]},
    )
    pending = [
        PendingDelete(1, None, "g.gone"),
        PendingDelete(2, R1, "r.gone"),
        PendingDelete(3, R3, "r.elsewhere"),  # a room this response does not cover
        PendingDelete(4, None, "g.live"),  # shown live: its delete had not landed yet
    ]

    result = rewrite_sliding_sync(body, first=True, scope=ALL, pending=pending)

    assert account_data(result.body)["global"] == [
        entry("g.live", {"v": 1}),
        entry("m.push_rules", {"global": {}}),
    ]
    assert account_data(result.body)["rooms"] == {R1: [entry("r.live", {"v": 1})], R2: []}
    assert carried(result.body) == set()
    assert result.delivered == {1, 2}
    assert account_data(body)["global"][0] == entry("g.gone")  # the input is not mutated


def test_a_first_response_without_deletions_is_returned_as_it_is() -> None:
    body = response(global_events=[entry("g.live", {"v": 1})], rooms={R1: []}, lists={"all": [R1]})
    result = rewrite_sliding_sync(body, first=True, scope=ALL, pending=[])
    assert result.body is body and not result.changed(body)


# --- incremental responses -----------------------------------------------------------------------


def test_incremental_deletions_from_the_homeserver_pass_and_count_as_delivered() -> None:
    body = response(global_events=[entry("g")], rooms={R1: [entry("r")]}, lists={"all": [R1]})
    pending = [PendingDelete(1, None, "g"), PendingDelete(2, R1, "r")]

    result = rewrite_sliding_sync(body, first=False, scope=ALL, pending=pending)

    assert result.body is body
    assert (result.delivered, result.injected) == ({1, 2}, 0)


def test_pending_deletes_are_injected_where_the_scope_covers_them() -> None:
    body = response(global_events=[], rooms={}, lists={"all": [R1]}, response_rooms=(R2,))
    pending = [
        PendingDelete(1, None, "g"),
        PendingDelete(2, R1, "in-list"),
        PendingDelete(3, R2, "in-response-only"),  # not a list room, not subscribed: not covered
        PendingDelete(4, R3, "elsewhere"),
        PendingDelete(5, None, "under-way", settled=False),  # an intent: never injected
    ]

    result = rewrite_sliding_sync(body, first=False, scope=ALL, pending=pending)

    assert account_data(result.body) == {"global": [entry("g")], "rooms": {R1: [entry("in-list")]}}
    assert (result.delivered, result.injected) == ({1, 2}, 2)


def test_a_subscribed_room_is_covered_by_rooms_star() -> None:
    scope = Scope.of({"room_subscriptions": {R2: {}}, "extensions": {"account_data": {"enabled": True}}})
    body = response(global_events=[], rooms={}, response_rooms=(R2,))
    result = rewrite_sliding_sync(body, first=False, scope=scope, pending=[PendingDelete(1, R2, "r")])
    assert account_data(result.body)["rooms"] == {R2: [entry("r")]}


def test_nothing_is_injected_without_the_extension_and_nothing_is_delivered() -> None:
    body = response(lists={"all": [R1]})
    result = rewrite_sliding_sync(body, first=False, scope=Scope(), pending=[PendingDelete(1, None, "g")])
    assert result.body is body and result.delivered == frozenset()


def test_a_type_the_homeserver_sends_with_content_is_left_alone() -> None:
    body = response(global_events=[entry("g", {"v": 2})], rooms={}, lists={"all": []})
    result = rewrite_sliding_sync(body, first=False, scope=ALL, pending=[PendingDelete(1, None, "g")])
    assert result.body is body and result.delivered == frozenset()


def test_a_room_sent_for_the_first_time_keeps_only_what_the_device_has_to_learn() -> None:
    body = response(
        global_events=[entry("g.other")],  # global: incremental, passes
        rooms={
            R1: [entry("old.gone"), entry("pending.gone"), entry("live", {"v": 1})],
            R2: [entry("r2.gone")],
        },
        lists={"all": [R1, R2]},
        initial=(R1,),
    )
    pending = [PendingDelete(1, R1, "pending.gone")]

    result = rewrite_sliding_sync(body, first=False, scope=ALL, pending=pending)

    assert account_data(result.body)["rooms"] == {
        R1: [entry("pending.gone"), entry("live", {"v": 1})],
        R2: [entry("r2.gone")],  # not initial: the homeserver's change passes
    }
    assert account_data(result.body)["global"] == [entry("g.other")]
    assert result.delivered == {1}


def test_the_proxys_nudges_are_stripped_from_to_device_events() -> None:
    body = response()
    body["extensions"]["to_device"] = {
        "next_batch": "7",
        "events": [{"type": NUDGE_TYPE, "content": {}}, {"type": "m.room_key", "content": {"k": 1}}],
    }
    result = rewrite_sliding_sync(body, first=False, scope=Scope(), pending=[])
    assert result.body["extensions"]["to_device"] == {
        "next_batch": "7",
        "events": [{"type": "m.room_key", "content": {"k": 1}}],
    }


# --- properties --------------------------------------------------------------------------------------

TYPES = ["a", "b", "c", "m.push_rules"]
ROOMS = [R1, R2, R3]
types = st.sampled_from(TYPES)
contents = st.one_of(st.just({}), st.dictionaries(st.sampled_from(["k"]), st.integers(), min_size=1))
entries = st.lists(st.fixed_dictionaries({"type": types, "content": contents}), max_size=4)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    window = draw(st.lists(st.sampled_from(ROOMS), unique=True, max_size=3))
    ad_rooms = draw(st.lists(st.sampled_from(ROOMS), unique=True, max_size=3))
    return response(
        global_events=draw(entries),
        rooms={r: draw(entries) for r in ad_rooms},
        lists={"all": window},
        initial=tuple(draw(st.lists(st.sampled_from(ROOMS), unique=True, max_size=2))),
    )


@st.composite
def pendings(draw: st.DrawFn) -> list[PendingDelete]:
    keys = draw(
        st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(ROOMS)), types), unique=True, max_size=5)
    )
    return [PendingDelete(i + 1, room, kind, draw(st.booleans())) for i, (room, kind) in enumerate(keys)]


@settings(max_examples=300, deadline=None)
@given(bodies(), pendings(), st.booleans())
def test_properties_of_every_rewrite(body: dict[str, Any], pending: list[PendingDelete], first: bool) -> None:
    before = copy.deepcopy(body)
    result = rewrite_sliding_sync(body, first=first, scope=ALL, pending=pending)

    assert body == before  # never mutated
    json.dumps(result.body)  # still JSON
    out = carried(result.body)
    if first:
        assert out == set()  # a first response never carries `{}`
    else:
        # Every deletion the homeserver sent outside a room sent for the first time passes.
        initial = {r for r, room in body["rooms"].items() if room.get("initial")}
        assert {k for k in carried(body) if k[0] not in initial} <= out
        # Every settled pending delete of a covered place that the body did not carry
        # with content is carried now.
        live = {
            (room, e["type"])
            for room, events in [(None, account_data(body)["global"]), *account_data(body)["rooms"].items()]
            for e in events
            if e["content"]
        }
        covered = covered_rooms(ALL, body)
        for p in pending:
            key = (p.room_id, p.account_data_type)
            if p.settled and key not in live and (p.room_id is None or p.room_id in covered):
                assert key in out
    # What is delivered is what the body carries (or, first, what it covers and shows gone).
    for p in pending:
        if p.stream_id in result.delivered and not first:
            assert (p.room_id, p.account_data_type) in out
    again = rewrite_sliding_sync(result.body, first=first, scope=ALL, pending=pending)
    assert again.body == result.body  # idempotent

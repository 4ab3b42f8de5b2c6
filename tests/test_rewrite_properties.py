"""Properties of the sync rewriter on generated bodies, filters and pending deletes."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import jsoncodec
from proxy.filters import SyncFilter
from proxy.rewrite import deletions_in, entries, is_deletion, rewrite_sync
from proxy.store import PendingDelete

TYPES = ["m.direct", "m.tag", "org.a", "org.b", "im.x.y"]
ROOMS = ["!a:hs", "!b:hs", "!c:hs"]

types = st.sampled_from(TYPES)
rooms = st.sampled_from(ROOMS)
scalars = st.one_of(st.integers(), st.text(max_size=3), st.booleans(), st.none())
content = st.one_of(st.just({}), st.dictionaries(st.sampled_from(["k", "v"]), scalars, min_size=1))
account_entry = st.fixed_dictionaries({"type": types, "content": content})
events = st.lists(account_entry, max_size=4)
other_section = st.fixed_dictionaries(
    {"events": st.lists(st.fixed_dictionaries({"type": types, "content": content}), max_size=2)}
)


@st.composite
def sync_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"next_batch": "s1"}
    if draw(st.booleans()):
        body["account_data"] = {"events": draw(events)}
    sections: dict[str, Any] = {}
    for section in ("join", "leave", "invite"):
        if draw(st.booleans()):
            sections[section] = {
                room: {
                    "timeline": {"events": draw(st.lists(account_entry, max_size=2)), "limited": False},
                    "state": draw(other_section),
                    "account_data": {"events": draw(events)},
                }
                for room in draw(st.lists(rooms, unique=True, max_size=3))
            }
    if sections:
        body["rooms"] = sections
    body["to_device"] = draw(other_section)
    body["presence"] = draw(other_section)
    return body


@st.composite
def pending_deletes(draw: st.DrawFn) -> list[PendingDelete]:
    keys = draw(st.lists(st.tuples(st.one_of(st.none(), rooms), types), unique=True, max_size=5))
    return [PendingDelete(i + 1, room, kind) for i, (room, kind) in enumerate(keys)]


filters = st.builds(
    SyncFilter.parse,
    st.fixed_dictionaries(
        {},
        optional={
            "account_data": st.fixed_dictionaries(
                {},
                optional={
                    "types": st.lists(st.sampled_from([*TYPES, "org.*", "m.*"]), max_size=3),
                    "not_types": st.lists(st.sampled_from([*TYPES, "org.*"]), max_size=2),
                    "limit": st.integers(0, 5),
                },
            ),
            "room": st.fixed_dictionaries(
                {},
                optional={
                    "rooms": st.lists(rooms, max_size=2),
                    "not_rooms": st.lists(rooms, max_size=2),
                    "account_data": st.fixed_dictionaries(
                        {}, optional={"types": st.lists(st.sampled_from(TYPES), max_size=3)}
                    ),
                },
            ),
        },
    ),
)

modes = st.sampled_from([(False, False), (True, False), (True, True)])  # (incremental, full_state)


def live_entries(body: dict[str, Any]) -> list[tuple[str | None, str]]:
    return sorted(
        (room or "", json.dumps(e, sort_keys=True)) for room, e in entries(body) if not is_deletion(e)
    )


def without_account_data(body: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out.pop("account_data", None)
    for section in out.get("rooms", {}).values():
        for room in section.values():
            room.pop("account_data", None)
    return out


@settings(max_examples=300, deadline=None)
@given(sync_bodies(), pending_deletes(), filters, modes, st.sets(rooms))
def test_rewriter_properties(
    body: dict[str, Any],
    pending: list[PendingDelete],
    sync_filter: SyncFilter,
    mode: tuple[bool, bool],
    joined: set[str],
) -> None:
    incremental, full_state = mode
    original = copy.deepcopy(body)
    result = rewrite_sync(
        body,
        incremental=incremental,
        full_state=full_state,
        pending=pending,
        sync_filter=sync_filter,
        joined_rooms=joined,
    )
    out = result.body

    # The input is never mutated.
    assert body == original
    # Entries with content are never dropped or altered.
    assert live_entries(out) == live_entries(body)
    # Nothing outside account data changes, except room sections created to place a delete.
    stripped_out = without_account_data(out)
    original_rooms = original.get("rooms", {})
    out_rooms = stripped_out.get("rooms", {})
    for room in set(out_rooms.get("join", {})) - set(original_rooms.get("join", {})):
        assert room in joined and any(p.room_id == room for p in pending)
        del out_rooms["join"][room]
    if "join" not in original_rooms and out_rooms.get("join") == {}:
        del out_rooms["join"]
    if "rooms" not in original and out_rooms == {}:
        stripped_out.pop("rooms", None)
    assert stripped_out == without_account_data(original)

    before, after = deletions_in(body), deletions_in(out)
    pending_keys = {(p.room_id, p.account_data_type) for p in pending}
    if not incremental:
        assert after == set()
        assert result.delivered == {p.stream_id for p in pending}
    else:
        # Only pending deletes of this device are ever added ...
        assert after - before <= pending_keys
        # ... and only where the filter lets them through.
        for room, kind in after - before:
            if room is None:
                assert sync_filter.allows_global(kind)
            else:
                assert sync_filter.allows_room(room, kind)
        if full_state:
            assert after <= pending_keys
        else:
            assert before <= after
        # Delivered means carried by the body that goes out.
        assert result.delivered == {p.stream_id for p in pending if (p.room_id, p.account_data_type) in after}

    # Applying it again changes nothing more.
    again = rewrite_sync(
        out,
        incremental=incremental,
        full_state=full_state,
        pending=pending,
        sync_filter=sync_filter,
        joined_rooms=joined,
    )
    assert again.body == out
    # The output is JSON, and reads back as exactly what was produced.
    assert jsoncodec.loads(jsoncodec.dumps(out)) == out

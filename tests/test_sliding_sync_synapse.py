"""MSC3391 over simplified sliding sync (MSC4186), end to end: the proxy in front of a real
Synapse 1.163.2 with its own flag off, driven as Element X drives it (every request
carries its lists and its account data extension)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.rewrite import NUDGE_TYPE
from proxy.store import DeletionStore
from rig.synapse import SynapseServer
from tests.matrix import Device
from tests.proxied_synapse import MakeDevices, rows
from tests.sliding_client import Connection, empty_entries, entries_of

pytestmark = pytest.mark.synapse

# --- Complement's tests/msc3391, over sliding sync --------------------------------------------


@pytest.mark.parametrize("in_room", [False, True], ids=["global", "room"])
@pytest.mark.parametrize("how", ["DELETE", "PUT {}"])
async def test_complement_msc3391_over_sliding_sync(
    devices: MakeDevices, store: DeletionStore, in_room: bool, how: str
) -> None:
    (alice,) = await devices(1)
    room_id = await alice.create_room() if in_room else None
    kind = "org.example.complement"
    connection = Connection(alice)
    await connection.sync(first=True)

    assert (await alice.put(kind, {"foo": "bar"}, room_id)).status == 200
    assert entries_of(await connection.sync(), kind, room_id) == [{"type": kind, "content": {"foo": "bar"}}]
    got = await alice.get(kind, room_id)
    assert (got.status, got.body) == (200, {"foo": "bar"})

    reply = await alice.delete(kind, room_id) if how == "DELETE" else await alice.put(kind, {}, room_id)
    assert (reply.status, reply.body) == (200, {})

    assert entries_of(await connection.sync(), kind, room_id) == [{"type": kind, "content": {}}]
    assert (await alice.get(kind, room_id)).status == 404

    fresh = await Connection(alice, conn_id="fresh").sync(first=True)
    assert entries_of(fresh, kind, room_id) == []
    assert empty_entries(fresh) == []
    assert await rows(store, alice.user_id) == set()


async def test_a_first_response_never_carries_a_deletion_global_or_room(
    devices: MakeDevices, synapse: SynapseServer, http: aiohttp.ClientSession
) -> None:
    """Synapse (its flag off) sends `{}` for deleted types in a new connection's first
    response, global and room alike; with its flag on it still sends the room ones."""
    (alice,) = await devices(1)
    room_id = await alice.create_room()
    for kind, room in (("org.example.g", None), ("org.example.r", room_id)):
        await alice.put(kind, {"v": 1}, room)
        await alice.put(kind, {}, room)
    await alice.put("org.example.live", {"v": 1}, room_id)

    direct = Connection(Device(http, synapse.url, alice.account), conn_id="direct")
    leaked = await direct.sync(first=True)
    assert set(empty_entries(leaked)) == {(None, "org.example.g"), (room_id, "org.example.r")}

    first = await Connection(alice).sync(first=True)
    assert empty_entries(first) == []
    assert entries_of(first, "org.example.live", room_id) == [
        {"type": "org.example.live", "content": {"v": 1}}
    ]


# --- several devices, rows checked after every step ----------------------------------------------


async def test_every_device_learns_once_and_loses_its_row_only_on_proof_of_receipt(
    devices: MakeDevices, store: DeletionStore
) -> None:
    """A deletes; B follows along over sliding sync, C is offline through the delete, D
    syncs without the account data extension, E uses both /sync and sliding sync."""
    a, b, c, d, e = await devices(5)
    room_id = await a.create_room()
    kind = "org.example.multi"
    b_conn, c_conn, e_conn = Connection(b), Connection(c), Connection(e)
    d_conn = Connection(d, account_data=None)
    for connection in (b_conn, c_conn, d_conn, e_conn):
        await connection.sync(first=True)
    await e.sync(initial=True)
    await a.put(kind, {"v": 1})
    await a.put(kind, {"v": 1}, room_id)
    for connection in (b_conn, d_conn, e_conn):
        await connection.sync()
    await e.sync()
    c_offline = c_conn.pos

    assert (await a.delete(kind)).status == 200
    assert (await a.delete(kind, room_id)).status == 200
    everyone = {(room, kind, x.device_id) for room in (None, room_id) for x in (b, c, d, e)}
    assert await rows(store, a.user_id) == everyone

    # B: the answer carries both; its rows go only when B's next request proves it.
    seen = await b_conn.sync()
    assert entries_of(seen, kind) == [{"type": kind, "content": {}}]
    assert entries_of(seen, kind, room_id) == [{"type": kind, "content": {}}]
    assert await rows(store, a.user_id) == everyone
    assert entries_of(await b_conn.sync(), kind) == []
    assert await rows(store, a.user_id) == everyone - {
        (None, kind, b.device_id),
        (room_id, kind, b.device_id),
    }

    # D has no account data extension: it is told nothing, and proves nothing.
    plain = await d_conn.sync()
    assert "account_data" not in plain["extensions"]
    await d_conn.sync()
    assert {(room, k) for room, k, dev in await rows(store, a.user_id) if dev == d.device_id} == {
        (None, kind),
        (room_id, kind),
    }

    # E learns over /sync and proves it there; its sliding sync, from a position before
    # the delete, gets the homeserver's own `{}` (passed through) and no row comes back.
    assert [x["content"] for x in (await e.sync())["account_data"]["events"] if x["type"] == kind] == [{}]
    await e.sync()
    assert not {dev for _, _, dev in await rows(store, a.user_id)} & {e.device_id}
    assert entries_of(await e_conn.sync(), kind) == [{"type": kind, "content": {}}]
    assert entries_of(await e_conn.sync(), kind) == []
    assert not {dev for _, _, dev in await rows(store, a.user_id)} & {e.device_id}

    # C was offline; it comes back from its old position and learns, then proves it.
    back = await c_conn.sync(pos=c_offline)
    assert entries_of(back, kind) == [{"type": kind, "content": {}}]
    await c_conn.sync()
    assert {dev for _, _, dev in await rows(store, a.user_id)} == {d.device_id}


async def test_a_dropped_response_loses_nothing(devices: MakeDevices, store: DeletionStore) -> None:
    a, b = await devices(2)
    kind = "org.example.dropped"
    connection = Connection(b)
    await connection.sync(first=True)
    await a.put(kind, {"v": 1})
    await connection.sync()
    before = connection.pos
    await a.delete(kind)

    lost = await connection.sync(advance=False)  # never read by the client: its pos is not kept
    assert entries_of(lost, kind) == [{"type": kind, "content": {}}]
    retried = await connection.sync(pos=before)
    assert entries_of(retried, kind) == [{"type": kind, "content": {}}]
    assert await rows(store, a.user_id) == {(None, kind, b.device_id)}
    await connection.sync()
    assert await rows(store, a.user_id) == set()


async def test_a_deletion_the_homeserver_does_not_send_is_injected_where_the_scope_covers_it(
    devices: MakeDevices, store: DeletionStore
) -> None:
    """B's connection has the extension off through the delete (Synapse has nothing to
    say after), then covers no room, then every room: each row is told (injected) only
    once the scope covers it, and goes only on proof of receipt."""
    a, b = await devices(2)
    room_id = await a.create_room()
    connection = Connection(b, account_data=None)
    await connection.sync(first=True)
    for kind, room in (("org.example.g", None), ("org.example.r", room_id)):
        await a.put(kind, {"v": 1}, room)
        await a.delete(kind, room)
    await connection.sync()  # the extension off: nothing told, nothing proved
    both = {(None, "org.example.g", b.device_id), (room_id, "org.example.r", b.device_id)}
    assert await rows(store, a.user_id) == both

    connection.account_data = {"enabled": True, "lists": [], "rooms": []}
    narrow = await connection.sync()
    assert entries_of(narrow, "org.example.g") == [{"type": "org.example.g", "content": {}}]
    assert entries_of(narrow, "org.example.r", room_id) == []  # no room in its scope
    await connection.sync()  # proves the global one
    assert await rows(store, a.user_id) == {(room_id, "org.example.r", b.device_id)}

    connection.account_data = {"enabled": True}
    wide = await connection.sync()
    assert entries_of(wide, "org.example.r", room_id) == [{"type": "org.example.r", "content": {}}]
    await connection.sync()
    assert await rows(store, a.user_id) == set()


async def test_two_connections_of_one_device_prove_receipt_each_on_its_own(
    devices: MakeDevices, store: DeletionStore
) -> None:
    a, b = await devices(2)
    kind = "org.example.two"
    one, two = Connection(b, conn_id="one"), Connection(b, conn_id="two")
    await one.sync(first=True)
    await two.sync(first=True)
    await a.put(kind, {"v": 1})
    await a.delete(kind)

    carried = await one.sync()
    assert entries_of(carried, kind) == [{"type": kind, "content": {}}]
    # A pos is one connection's: sent on another (Synapse may even accept a `0/...` one
    # there), it proves nothing about the first.
    await two.request(pos=carried["pos"])
    assert await rows(store, a.user_id) == {(None, kind, b.device_id)}
    await one.sync()
    assert await rows(store, a.user_id) == set()


async def test_unknown_pos_is_relayed_and_a_fresh_connection_starts_clean(
    devices: MakeDevices, store: DeletionStore
) -> None:
    a, b = await devices(2)
    kind = "org.example.unknown"
    connection = Connection(b)
    await connection.sync(first=True)
    await a.put(kind, {"v": 1})
    await a.delete(kind)

    refused = await connection.request(pos="999999/s1_1_0_1_1_1_1_1_0_1_1_1_1_1")
    assert (refused.status, refused.body) == (400, {"errcode": "M_UNKNOWN_POS", "error": "Unknown position"})
    assert await rows(store, a.user_id) == {(None, kind, b.device_id)}

    fresh = await connection.sync(first=True)  # the client starts again without a pos
    assert empty_entries(fresh) == []
    await connection.sync()
    assert await rows(store, a.user_id) == set()


async def test_a_long_poll_is_woken_by_a_deletion_and_told_once(
    devices: MakeDevices, store: DeletionStore
) -> None:
    a, b = await devices(2)
    kind = "org.example.woken"
    connection = Connection(b)
    await connection.sync(first=True)
    await a.put(kind, {"v": 1})
    await connection.sync()

    waiting = asyncio.ensure_future(connection.sync(timeout_ms=20_000))
    assert (await a.delete(kind)).status == 200
    woken = await asyncio.wait_for(waiting, 15)
    assert entries_of(woken, kind) == [{"type": kind, "content": {}}]
    assert entries_of(await connection.sync(), kind) == []
    assert await rows(store, a.user_id) == set()


async def test_a_delete_that_changes_nothing_comes_back_on_the_deleting_devices_sliding_sync(
    devices: MakeDevices, store: DeletionStore
) -> None:
    (a,) = await devices(1)
    kind = "org.example.never"
    connection = Connection(a)
    await connection.sync(first=True)

    assert (await a.put(kind, {})).status == 200
    before = connection.pos
    echoed = await connection.sync()
    assert entries_of(echoed, kind) == [{"type": kind, "content": {}}]
    assert echoed["pos"] != before  # the nudge moved it: the answer can be proved received
    assert entries_of(await connection.sync(), kind) == []
    assert await rows(store, a.user_id) == set()


async def test_the_proxys_nudge_never_reaches_a_connection_that_carries_to_device_messages(
    devices: MakeDevices, store: DeletionStore
) -> None:
    """Element X runs a second connection for encryption: to-device messages only, no
    account data, nothing for the proxy to rewrite. The nudge the proxy sends the device
    (after a delete that changes nothing) travels there too, and is stripped there."""
    (a,) = await devices(1)
    room_list = Connection(a, conn_id="room-list")
    encryption = Connection(a, conn_id="encryption", account_data=None, lists=None, to_device=True)
    await room_list.sync(first=True)
    await encryption.sync(first=True)

    assert (await a.delete("org.example.never-set")).status == 200
    echoed = await room_list.sync()
    assert entries_of(echoed, "org.example.never-set") == [{"type": "org.example.never-set", "content": {}}]
    await room_list.sync()  # proves it: the device has nothing left to learn
    assert await rows(store, a.user_id) == set()

    body = await encryption.sync()

    events = body["extensions"].get("to_device", {}).get("events", [])
    assert [e for e in events if e["type"] == NUDGE_TYPE] == []

"""MSC3391 end to end: the proxy in front of a real Synapse 1.163.2 with its own flag off."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from proxy.server import ProxyServer
from proxy.store import DeletionStore
from rig.synapse import SynapseServer
from tests.matrix import (
    MSC3391,
    Device,
    account_data_path,
    empty_entries,
    entries_of,
    global_entries,
)
from tests.proxied_synapse import AnotherDevice, MakeDevices, rows

pytestmark = pytest.mark.synapse


async def set_and_delete(device: Device, kind: str, room_id: str | None = None) -> None:
    """Set `kind`, delete it, and move `device`'s sync token past both."""
    if device.next_batch is None:
        await device.sync(initial=True)
    await device.put(kind, {"v": 1}, room_id)
    await device.delete(kind, room_id)
    await device.sync()


# --- Complement tests/msc3391, step by step ---------------------------------------------


@pytest.mark.parametrize("in_room", [False, True], ids=["global", "room"])
@pytest.mark.parametrize("how", ["DELETE", "PUT {}"])
async def test_complement_msc3391(devices: MakeDevices, in_room: bool, how: str) -> None:
    (alice,) = await devices(1)
    room_id = await alice.create_room() if in_room else None
    kind = "org.example.complement"
    await alice.sync(initial=True)

    assert (await alice.put(kind, {"foo": "bar"}, room_id)).status == 200
    seen = entries_of(await alice.sync(), kind, room_id)
    assert seen == [{"type": kind, "content": {"foo": "bar"}}]
    got = await alice.get(kind, room_id)
    assert (got.status, got.body) == (200, {"foo": "bar"})

    reply = await alice.delete(kind, room_id) if how == "DELETE" else await alice.put(kind, {}, room_id)
    assert (reply.status, reply.body) == (200, {})

    assert entries_of(await alice.sync(), kind, room_id) == [{"type": kind, "content": {}}]
    got = await alice.get(kind, room_id)
    assert got.status == 404
    assert got.body == {
        "errcode": "M_NOT_FOUND",
        "error": "Room account data not found" if in_room else "Account data not found",
    }

    fresh = await alice.sync(initial=True)
    assert isinstance(fresh["account_data"]["events"], list)
    assert entries_of(fresh, kind, room_id) == []
    assert empty_entries(fresh) == []


# --- errors: Synapse's status codes, errcodes and texts ----------------------------------

FULLY_READ = "Cannot set m.fully_read through this API. Use /rooms/!roomId:server.name/read_markers"
PUSH_RULES = "Cannot set m.push_rules through this API. Use /pushrules"
ROOM = "!abc:localhost"

# (method, prefix, user, room, type, body, status, errcode, error)
ERRORS: list[tuple[str, str, str, str | None, str, bytes | None, int, str, str]] = [
    (
        "DELETE",
        MSC3391,
        "other",
        None,
        "t",
        None,
        403,
        "M_FORBIDDEN",
        "Cannot delete account data for other users.",
    ),
    (
        "DELETE",
        MSC3391,
        "other",
        "bad",
        "m.fully_read",
        None,
        403,
        "M_FORBIDDEN",
        "Cannot delete account data for other users.",
    ),
    ("DELETE", MSC3391, "self", None, "m.fully_read", None, 405, "M_BAD_JSON", FULLY_READ),
    ("DELETE", MSC3391, "self", None, "m.push_rules", None, 405, "M_BAD_JSON", PUSH_RULES),
    (
        "DELETE",
        MSC3391,
        "self",
        "notaroom",
        "t",
        None,
        400,
        "M_INVALID_PARAM",
        "notaroom is not a valid room ID",
    ),
    (
        "DELETE",
        MSC3391,
        "self",
        "notaroom",
        "m.fully_read",
        None,
        400,
        "M_INVALID_PARAM",
        "notaroom is not a valid room ID",
    ),
    ("DELETE", MSC3391, "self", ROOM, "m.fully_read", None, 405, "M_BAD_JSON", FULLY_READ),
    (
        "PUT",
        "/_matrix/client/v3",
        "other",
        None,
        "t",
        b"{}",
        403,
        "M_FORBIDDEN",
        "Cannot add account data for other users.",
    ),
    (
        "PUT",
        "/_matrix/client/r0",
        "self",
        "bad",
        "t",
        b"{}",
        400,
        "M_INVALID_PARAM",
        "bad is not a valid room ID",
    ),
    ("PUT", "/_matrix/client/v3", "self", None, "m.push_rules", b"{}", 405, "M_BAD_JSON", PUSH_RULES),
    ("PUT", "/_matrix/client/v3", "self", ROOM, "m.fully_read", b"{}", 405, "M_BAD_JSON", FULLY_READ),
    ("PUT", "/_matrix/client/v3", "self", None, "t", b"not json", 400, "M_NOT_JSON", "Content not JSON."),
    ("PUT", "/_matrix/client/v3", "self", None, "t", b"", 400, "M_NOT_JSON", "Content not JSON."),
    ("PUT", "/_matrix/client/v3", "self", None, "t", b"\xff\xfe", 400, "M_NOT_JSON", "Content not JSON."),
    ("PUT", "/_matrix/client/v3", "self", None, "t", b'{"a": NaN}', 400, "M_NOT_JSON", "Content not JSON."),
    (
        "PUT",
        "/_matrix/client/unstable",
        "self",
        ROOM,
        "t",
        b"[1]",
        400,
        "M_BAD_JSON",
        "Content must be a JSON object.",
    ),
    (
        "GET",
        "/_matrix/client/v3",
        "other",
        None,
        "t",
        None,
        403,
        "M_FORBIDDEN",
        "Cannot get account data for other users.",
    ),
    (
        "GET",
        "/_matrix/client/v3",
        "self",
        "bad",
        "t",
        None,
        400,
        "M_INVALID_PARAM",
        "bad is not a valid room ID",
    ),
    (
        "GET",
        "/_matrix/client/v3",
        "self",
        None,
        "never.set",
        None,
        404,
        "M_NOT_FOUND",
        "Account data not found",
    ),
    (
        "GET",
        "/_matrix/client/v3",
        "self",
        ROOM,
        "never.set",
        None,
        404,
        "M_NOT_FOUND",
        "Room account data not found",
    ),
    ("POST", MSC3391, "self", None, "t", b"{}", 405, "M_UNRECOGNIZED", "Unrecognized request"),
    ("GET", MSC3391, "self", None, "t", None, 405, "M_UNRECOGNIZED", "Unrecognized request"),
]


@pytest.mark.parametrize(
    ("method", "prefix", "user", "room", "kind", "body", "status", "errcode", "error"),
    ERRORS,
    ids=[f"{m} {p.rsplit('/', 1)[-1]} {u} {r} {k} {b!r}" for m, p, u, r, k, b, *_ in ERRORS],
)
async def test_error_responses(
    devices: MakeDevices,
    store: DeletionStore,
    method: str,
    prefix: str,
    user: str,
    room: str | None,
    kind: str,
    body: bytes | None,
    status: int,
    errcode: str,
    error: str,
) -> None:
    (alice,) = await devices(1)
    target = alice.user_id if user == "self" else "@someone-else:localhost"
    reply = await alice.request(method, account_data_path(prefix, target, kind, room), raw=body)
    assert (reply.status, reply.body) == (status, {"errcode": errcode, "error": error})
    # A refused request leaves no trace.
    assert await store.tombstones(alice.user_id) == []
    assert await rows(store, alice.user_id) == set()


async def test_missing_and_unknown_tokens_are_the_homeservers_answers(
    proxy: ProxyServer, synapse: SynapseServer, http: aiohttp.ClientSession
) -> None:
    path = account_data_path(MSC3391, "@x:localhost", "t")
    for headers in ({}, {"Authorization": "Bearer nonsense"}):
        async with http.delete(proxy.url + path, headers=headers) as via_proxy:
            proxied = (via_proxy.status, await via_proxy.json())
        async with http.get(synapse.url + "/_matrix/client/v3/account/whoami", headers=headers) as direct:
            expected = (direct.status, await direct.json())
        assert proxied == expected
        assert proxied[0] == 401


# --- several devices, rows checked after each step ---------------------------------------


async def test_every_other_device_learns_of_a_delete_and_only_then_loses_its_row(
    devices: MakeDevices, another_device: AnotherDevice, store: DeletionStore
) -> None:
    a, b, c = await devices(3)
    kind = "org.example.multi"
    for d in (a, b, c):
        await d.sync(initial=True)
    await a.put(kind, {"v": 1})
    await b.sync()
    c_offline_token = c.next_batch
    assert await rows(store, a.user_id) == set()

    assert (await a.delete(kind)).status == 200
    assert await rows(store, a.user_id) == {(None, kind, b.device_id), (None, kind, c.device_id)}
    assert [t.state for t in await store.tombstones(a.user_id)] == ["done"]

    # B's sync carries the deletion; the row stays until B proves it received it.
    assert global_entries(await b.sync(), kind) == [{"type": kind, "content": {}}]
    assert await rows(store, a.user_id) == {(None, kind, b.device_id), (None, kind, c.device_id)}
    await b.sync()
    assert await rows(store, a.user_id) == {(None, kind, c.device_id)}

    # A device that logs in after the delete has nothing to learn.
    d = await another_device(a)
    assert (await d.get(kind)).status == 404
    assert await rows(store, a.user_id) == {(None, kind, c.device_id)}

    # C was offline; it syncs from its old token, sees the deletion, then acknowledges it.
    assert global_entries(await c.sync(since=c_offline_token), kind) == [{"type": kind, "content": {}}]
    assert await rows(store, a.user_id) == {(None, kind, c.device_id)}
    await c.sync()
    assert await rows(store, a.user_id) == set()
    assert await store.tombstones(a.user_id) == []


async def test_a_dropped_response_loses_nothing(devices: MakeDevices, store: DeletionStore) -> None:
    a, b = await devices(2)
    kind = "org.example.dropped"
    await a.sync(initial=True)
    await b.sync(initial=True)
    await a.put(kind, {"v": 1})
    await b.sync()
    before = b.next_batch
    await a.delete(kind)

    # The response carrying the deletion is lost: B never uses its next_batch.
    lost = await b.sync(advance=False)
    assert global_entries(lost, kind) == [{"type": kind, "content": {}}]
    # B retries from the token it has; the deletion comes again, the row is still there.
    assert global_entries(await b.sync(since=before), kind) == [{"type": kind, "content": {}}]
    assert await rows(store, b.user_id) == {(None, kind, b.device_id)}
    await b.sync()
    assert await rows(store, b.user_id) == set()


async def test_a_delete_the_homeserver_does_not_send_is_injected(
    devices: MakeDevices, store: DeletionStore
) -> None:
    a, b = await devices(2)
    room_id = await a.create_room()
    await b.sync(initial=True)
    await set_and_delete(a, "org.example.g")
    await set_and_delete(a, "org.example.r", room_id)
    # B syncs from a token the homeserver has nothing new for: only the proxy knows.
    body = await b.sync(since=a.next_batch)
    assert global_entries(body, "org.example.g") == [{"type": "org.example.g", "content": {}}]
    assert entries_of(body, "org.example.r", room_id) == [{"type": "org.example.r", "content": {}}]
    await b.sync()
    assert await rows(store, b.user_id) == set()


async def test_injection_honours_the_filter_inline_and_by_id(
    devices: MakeDevices, store: DeletionStore
) -> None:
    a, b = await devices(2)
    await set_and_delete(a, "org.example.hidden")
    not_hidden = {"account_data": {"not_types": ["org.example.hidden"]}}
    body = await b.sync(since=a.next_batch, filter=not_hidden)
    assert global_entries(body, "org.example.hidden") == []
    await b.sync(filter=not_hidden)
    assert await rows(store, b.user_id) == {(None, "org.example.hidden", b.device_id)}

    created = await b.request("POST", f"/_matrix/client/v3/user/{b.user_id}/filter", not_hidden)
    filter_id = created.body["filter_id"]
    body = await b.sync(since=a.next_batch, filter=filter_id)
    assert global_entries(body, "org.example.hidden") == []
    # Without the filter it arrives, and is acknowledged.
    body = await b.sync(since=a.next_batch)
    assert global_entries(body, "org.example.hidden") == [{"type": "org.example.hidden", "content": {}}]
    await b.sync()
    assert await rows(store, b.user_id) == set()


async def test_full_state_keeps_only_what_the_device_has_to_learn(
    devices: MakeDevices, store: DeletionStore
) -> None:
    a, b = await devices(2)
    await set_and_delete(a, "org.example.fs")
    body = await b.sync(since=a.next_batch, full_state=True)
    assert (None, "org.example.fs") in empty_entries(body)
    await b.sync()
    assert await rows(store, b.user_id) == set()
    again = await b.sync(since=a.next_batch, full_state=True)
    assert empty_entries(again) == []


async def test_get_of_a_deleted_type_acknowledges_it(devices: MakeDevices, store: DeletionStore) -> None:
    a, b = await devices(2)
    room_id = await a.create_room()
    await a.put("org.example.get", {"v": 1}, room_id)
    await a.delete("org.example.get", room_id)
    assert await rows(store, a.user_id) == {(room_id, "org.example.get", b.device_id)}
    got = await b.get("org.example.get", room_id)
    assert (got.status, got.errcode) == (404, "M_NOT_FOUND")
    assert await rows(store, a.user_id) == set()


async def test_put_with_content_brings_a_type_back(devices: MakeDevices, store: DeletionStore) -> None:
    a, b = await devices(2)
    await a.put("org.example.back", {"v": 1})
    await a.put("org.example.back", {})
    assert await rows(store, a.user_id) == {(None, "org.example.back", b.device_id)}
    await b.put("org.example.back", {"v": 2})
    assert await rows(store, a.user_id) == set()
    assert await store.tombstones(a.user_id) == []
    got = await a.get("org.example.back")
    assert (got.status, got.body) == (200, {"v": 2})


# --- devices and accounts -----------------------------------------------------------------


async def test_device_removal_drops_rows_but_an_auth_round_trip_does_not(
    devices: MakeDevices, store: DeletionStore
) -> None:
    a, b, c, d = await devices(4)
    await a.put("org.example.dev", {"v": 1})
    await a.delete("org.example.dev")
    assert {r[2] for r in await rows(store, a.user_id)} == {b.device_id, c.device_id, d.device_id}

    path = f"/_matrix/client/v3/devices/{c.device_id}"
    challenge = await a.request("DELETE", path, {})
    assert challenge.status == 401 and "flows" in challenge.body
    assert {r[2] for r in await rows(store, a.user_id)} == {b.device_id, c.device_id, d.device_id}
    auth = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": a.account.localpart},
        "password": "password",
        "session": challenge.body["session"],
    }
    assert (await a.request("DELETE", path, {"auth": auth})).status == 200
    assert {r[2] for r in await rows(store, a.user_id)} == {b.device_id, d.device_id}

    assert (await b.request("POST", "/_matrix/client/v3/logout", {})).status == 200
    assert {r[2] for r in await rows(store, a.user_id)} == {d.device_id}

    challenge = await a.request("POST", "/_matrix/client/v3/delete_devices", {"devices": [d.device_id]})
    assert challenge.status == 401
    auth["session"] = challenge.body["session"]
    done = await a.request(
        "POST", "/_matrix/client/v3/delete_devices", {"devices": [d.device_id], "auth": auth}
    )
    assert done.status == 200
    assert await rows(store, a.user_id) == set()
    assert await store.tombstones(a.user_id) == []


async def test_logout_all_drops_every_row(devices: MakeDevices, store: DeletionStore) -> None:
    a, b, _c = await devices(3)
    await a.put("org.example.all", {"v": 1})
    await a.delete("org.example.all")
    assert len(await rows(store, a.user_id)) == 2
    assert (await b.request("POST", "/_matrix/client/v3/logout/all", {})).status == 200
    assert await rows(store, a.user_id) == set()
    assert await store.tombstones(a.user_id) == []


async def test_a_device_removed_behind_the_proxys_back_loses_its_rows(
    devices: MakeDevices, store: DeletionStore, synapse: SynapseServer, http: aiohttp.ClientSession
) -> None:
    a, b, c = await devices(3)
    await a.put("org.example.sweep", {"v": 1})
    await a.delete("org.example.sweep")
    # C logs out directly at the homeserver, never passing the proxy.
    async with http.post(synapse.url + "/_matrix/client/v3/logout", headers=c.account.headers, json={}) as r:
        assert r.status == 200
    assert {r[2] for r in await rows(store, a.user_id)} == {b.device_id, c.device_id}
    await a.sync(initial=True)  # any sync of the user compares devices with rows
    assert {r[2] for r in await rows(store, a.user_id)} == {b.device_id}


# --- discovery and legacy endpoints --------------------------------------------------------


async def test_versions_advertises_msc3391_and_keeps_the_rest(
    proxy: ProxyServer, synapse: SynapseServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(synapse.url + "/_matrix/client/versions") as r:
        direct = await r.json()
    async with http.get(proxy.url + "/_matrix/client/versions") as r:
        via = await r.json()
    assert via["unstable_features"].pop("org.matrix.msc3391") is True
    direct["unstable_features"].pop("org.matrix.msc3391", None)
    assert via == direct


async def test_versions_from_the_copy_and_with_a_token_are_synapses_with_msc3391_and_its_headers(
    devices: MakeDevices, proxy: ProxyServer, synapse: SynapseServer, http: aiohttp.ClientSession
) -> None:
    (a,) = await devices(1)
    for headers in ({}, a.account.headers):
        async with http.get(synapse.url + "/_matrix/client/versions", headers=headers) as r:
            direct, direct_headers = await r.json(), r.headers
        direct["unstable_features"].pop("org.matrix.msc3391", None)
        # Without a token the second answer is the proxy's copy of the first.
        for _ in range(2):
            async with http.get(proxy.url + "/_matrix/client/versions", headers=headers) as r:
                assert r.status == 200
                raw, via_headers = await r.read(), r.headers
            via = json.loads(raw)
            assert via["unstable_features"].pop("org.matrix.msc3391") is True
            assert via == direct
            assert int(via_headers["Content-Length"]) == len(raw)
            for name in ("Cache-Control", "Vary", "Access-Control-Allow-Origin", "Content-Type"):
                assert via_headers.getall(name) == direct_headers.getall(name), name


async def test_legacy_initial_syncs_carry_no_deletions(
    devices: MakeDevices, synapse: SynapseServer, http: aiohttp.ClientSession
) -> None:
    (a,) = await devices(1)
    room_id = await a.create_room()
    await a.put("org.example.legacy", {"v": 1})
    await a.put("org.example.legacy", {"v": 1}, room_id)
    await a.delete("org.example.legacy")
    await a.delete("org.example.legacy", room_id)
    for path in ("/_matrix/client/v3/initialSync", f"/_matrix/client/v3/rooms/{room_id}/initialSync"):
        async with http.get(synapse.url + path, headers=a.account.headers) as r:
            direct = await r.read()
        assert b'"content":{}' in direct  # Synapse (flag off) keeps them ...
        via = await a.request("GET", path)
        assert via.status == 200
        assert b'"content":{}' not in via.raw  # ... the proxy does not
        json.loads(via.raw)


# --- consistency ----------------------------------------------------------------------------


async def test_concurrent_writes_end_in_the_homeservers_last_state(
    devices: MakeDevices, store: DeletionStore, synapse: SynapseServer, http: aiohttp.ClientSession
) -> None:
    team = await devices(4)
    kind = "org.example.race"

    async def churn(device: Device, i: int) -> None:
        for step in range(6):
            if (i + step) % 2:
                await device.delete(kind)
            else:
                await device.put(kind, {"by": device.device_id, "step": step})

    await asyncio.gather(*(churn(d, i) for i, d in enumerate(team)))
    path = account_data_path("/_matrix/client/v3", team[0].user_id, kind)
    async with http.get(synapse.url + path, headers=team[0].account.headers) as r:
        final: Any = await r.json()
    tombstones = await store.tombstones(team[0].user_id)
    assert all(t.state == "done" for t in tombstones)
    if final == {}:
        assert len(tombstones) == 1
        assert (await team[0].get(kind)).status == 404
    else:
        assert tombstones == []
        assert await rows(store, team[0].user_id) == set()


# --- a delete that changes nothing is still answered on the deleting device's sync ------


@pytest.mark.parametrize("in_room", [False, True], ids=["global", "room"])
@pytest.mark.parametrize("how", ["DELETE", "PUT {}"])
@pytest.mark.parametrize("before", ["never set", "deleted already"])
async def test_a_delete_that_changes_nothing_comes_back_to_the_deleting_device_once(
    devices: MakeDevices, store: DeletionStore, in_room: bool, how: str, before: str
) -> None:
    """matrix-js-sdk 43 deletes with `PUT {}` and then waits, without a timeout, for the
    deletion to come back over its sync. Synapse writes nothing for a type that was
    never set or is deleted already, so nothing would ever come: the proxy tells the
    deleting device (and only it), once, and wakes its waiting long-poll to do so."""
    a, b = await devices(2)
    room_id = await a.create_room() if in_room else None
    kind = "org.example.noop"
    await a.sync(initial=True)
    await b.sync(initial=True)
    if before == "deleted already":
        await a.put(kind, {"v": 1}, room_id)
        await a.delete(kind, room_id)
        for device in (a, b):  # each sees the deletion and proves it
            await device.sync()
            await device.sync()
        assert await rows(store, a.user_id) == set()

    waiting = asyncio.ensure_future(a.sync(timeout_ms=30_000))  # a sync loop, waiting at Synapse
    reply = await a.delete(kind, room_id) if how == "DELETE" else await a.put(kind, {}, room_id)
    assert (reply.status, reply.body) == (200, {})

    # Woken well before its own 30 s timeout, by the proxy: Synapse had nothing new.
    echoed = await asyncio.wait_for(waiting, 15)
    assert entries_of(echoed, kind, room_id) == [{"type": kind, "content": {}}]
    assert await rows(store, a.user_id) == {(room_id, kind, a.device_id)}
    assert entries_of(await a.sync(), kind, room_id) == []  # the proof of receipt; told once
    assert await rows(store, a.user_id) == set()
    assert await store.tombstones(a.user_id) == []
    assert entries_of(await b.sync(), kind, room_id) == []  # the other device is not told again
    assert (await a.get(kind, room_id)).status == 404
    assert empty_entries(await a.sync(initial=True)) == []


# --- deletions real clients make, as they make them --------------------------------------


async def test_disabling_recovery_as_matrix_rust_sdk_does_deletes_the_key_and_keeps_the_secrets(
    devices: MakeDevices, store: DeletionStore
) -> None:
    """matrix-rust-sdk (Element X) disables recovery by writing `{}` to the default key
    and to the key itself: deletions. Its secrets are written `{"encrypted": {}}`: data."""
    a, b = await devices(2)
    key_id = "recoverykeyid"
    key = {"algorithm": "m.secret_storage.v1.aes-hmac-sha2", "iv": "aXY", "mac": "bWFj"}
    await a.sync(initial=True)
    await b.sync(initial=True)
    assert (await a.put("m.secret_storage.default_key", {"key": key_id})).status == 200
    assert (await a.put(f"m.secret_storage.key.{key_id}", key)).status == 200
    secret = {"encrypted": {key_id: {"ciphertext": "Y3Q", "iv": "aXY", "mac": "bWFj"}}}
    assert (await a.put("m.cross_signing.master", secret)).status == 200
    await b.sync()

    for kind in ("m.secret_storage.default_key", f"m.secret_storage.key.{key_id}"):
        assert (await a.put(kind, {})).status == 200
    assert (await a.put("m.megolm_backup.v1", {"encrypted": {}})).status == 200
    assert {t.account_data_type for t in await store.tombstones(a.user_id)} == {
        "m.secret_storage.default_key",
        f"m.secret_storage.key.{key_id}",
    }

    seen = await b.sync()
    for kind in ("m.secret_storage.default_key", f"m.secret_storage.key.{key_id}"):
        assert global_entries(seen, kind) == [{"type": kind, "content": {}}]
        assert (await b.get(kind)).status == 404
    assert global_entries(seen, "m.megolm_backup.v1") == [
        {"type": "m.megolm_backup.v1", "content": {"encrypted": {}}}
    ]
    got = await b.get("m.megolm_backup.v1")
    assert (got.status, got.body) == (200, {"encrypted": {}})
    assert (await b.get("m.cross_signing.master")).status == 200
    assert await store.tombstones(a.user_id) == []  # B's 404s acknowledged both
    fresh = await b.sync(initial=True)
    assert global_entries(fresh, "m.secret_storage.default_key") == []
    assert global_entries(fresh, "m.megolm_backup.v1") == [
        {"type": "m.megolm_backup.v1", "content": {"encrypted": {}}}
    ]


async def test_element_webs_client_information_cleanup_is_seen_as_gone_by_the_other_devices(
    devices: MakeDevices, store: DeletionStore
) -> None:
    """Element Web writes `io.element.matrix_client_information.<device_id>` for itself,
    and deletes the entries of devices that have gone."""
    gone, cleaner, watcher = await devices(3)
    kind = f"io.element.matrix_client_information.{gone.device_id}"
    for device in (cleaner, watcher):
        await device.sync(initial=True)
    information = {"name": "Element", "version": "1.12.0", "url": "app.element.io"}
    assert (await gone.put(kind, information)).status == 200
    assert global_entries(await watcher.sync(), kind) != []
    assert (await gone.request("POST", "/_matrix/client/v3/logout", {})).status == 200

    assert (await cleaner.delete(kind)).status == 200  # as matrix-js-sdk deletes it

    # No row for the gone device: the homeserver no longer lists it.
    assert await rows(store, watcher.user_id) == {(None, kind, watcher.device_id)}
    assert global_entries(await watcher.sync(), kind) == [{"type": kind, "content": {}}]
    await watcher.sync()
    assert await rows(store, watcher.user_id) == set()
    assert (await watcher.get(kind)).status == 404
    assert global_entries(await watcher.sync(initial=True), kind) == []


async def test_a_deleted_ignore_list_ignores_nobody_and_the_homeserver_owned_types_keep_their_405(
    devices: MakeDevices,
) -> None:
    """`m.ignored_user_list` is interpreted by the homeserver: deleted, the user ignores
    nobody, as after Synapse's own `PUT {}`. `m.push_rules` and `m.fully_read` cannot be
    set through this API, so neither can they be deleted."""
    (alice,) = await devices(1)
    (bob,) = await devices(1)
    room_id = await alice.create_room()
    invite = {"user_id": bob.user_id}
    assert (await alice.request("POST", f"/_matrix/client/v3/rooms/{room_id}/invite", invite)).status == 200
    assert (await bob.request("POST", f"/_matrix/client/v3/join/{room_id}", {})).status == 200
    await alice.sync(initial=True)
    assert (await alice.put("m.ignored_user_list", {"ignored_users": {bob.user_id: {}}})).status == 200

    async def bob_says(text: str) -> None:
        path = f"/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{text}"
        assert (await bob.request("PUT", path, {"msgtype": "m.text", "body": text})).status == 200

    def said(body: dict[str, Any]) -> list[str]:
        timeline = body.get("rooms", {}).get("join", {}).get(room_id, {}).get("timeline", {})
        return [e["content"].get("body") for e in timeline.get("events", []) if e["type"] == "m.room.message"]

    await bob_says("ignored")
    assert said(await alice.sync()) == []
    assert (await alice.delete("m.ignored_user_list")).status == 200
    await bob_says("heard")
    assert said(await alice.sync()) == ["heard"]
    assert (await alice.get("m.ignored_user_list")).status == 404

    for kind, error in (("m.push_rules", PUSH_RULES), ("m.fully_read", FULLY_READ)):
        for reply in (await alice.delete(kind), await alice.put(kind, {})):
            assert (reply.status, reply.body) == (405, {"errcode": "M_BAD_JSON", "error": error})

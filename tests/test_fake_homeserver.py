"""The fake homeserver itself: other tests rely on it behaving like Synapse 1.163."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from tests import matrix
from tests.fake_homeserver import FakeHomeserver
from tests.matrix import ALICE, ROOM, V3, account_data_path

TOKEN = "alice_token"


@pytest.fixture
def hs(fake_hs: FakeHomeserver) -> FakeHomeserver:
    fake_hs.add_device(ALICE, "DEV1", token=TOKEN)
    fake_hs.add_device(ALICE, "DEV2", token="alice_token_2")
    fake_hs.join(ALICE, ROOM)
    return fake_hs


async def call(
    http: aiohttp.ClientSession,
    hs: FakeHomeserver,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
) -> tuple[int, Any]:
    return await matrix.call(http, method, URL(hs.url + path, encoded=True), token, body)


def ad_path(kind: str, room_id: str | None = None, user: str = ALICE, prefix: str = V3) -> str:
    return account_data_path(prefix, user, kind, room_id)


async def test_whoami_and_synapse_auth_errors(hs: FakeHomeserver, http: aiohttp.ClientSession) -> None:
    assert await call(http, hs, "GET", f"{V3}/account/whoami") == (
        200,
        {"user_id": ALICE, "is_guest": False, "device_id": "DEV1"},
    )
    assert await call(
        http, hs, "GET", f"/_matrix/client/r0/account/whoami?access_token={TOKEN}", token=None
    ) == (
        200,
        {"user_id": ALICE, "is_guest": False, "device_id": "DEV1"},
    )
    assert await call(http, hs, "GET", f"{V3}/account/whoami", token=None) == (
        401,
        {"errcode": "M_MISSING_TOKEN", "error": "Missing access token"},
    )
    assert await call(http, hs, "GET", f"{V3}/account/whoami", token="nope") == (
        401,
        {"errcode": "M_UNKNOWN_TOKEN", "error": "Unrecognised access token", "soft_logout": False},
    )
    assert await call(http, hs, "GET", f"{V3}/account/whoami?access_token={TOKEN}") == (
        401,
        {
            "errcode": "M_MISSING_TOKEN",
            "error": "Mixing Authorization headers and access_token query parameters.",
        },
    )
    assert hs.whoami_calls == 5


async def test_appservice_masquerade(hs: FakeHomeserver, http: aiohttp.ClientSession) -> None:
    hs.add_appservice("as_token", "@bot:localhost", user_regex="@br_.*:localhost")
    hs.add_device("@br_x:localhost", "BRDEV")
    whoami = f"{V3}/account/whoami"
    assert await call(http, hs, "GET", whoami, token="as_token") == (
        200,
        {"user_id": "@bot:localhost", "is_guest": False},
    )
    status, body = await call(
        http, hs, "GET", f"{whoami}?user_id=%40br_x%3Alocalhost&device_id=BRDEV", token="as_token"
    )
    assert (status, body["user_id"], body["device_id"]) == (200, "@br_x:localhost", "BRDEV")
    status, body = await call(http, hs, "GET", f"{whoami}?user_id=%40alice%3Alocalhost", token="as_token")
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    status, body = await call(http, hs, "GET", f"{whoami}?user_id=%40br_y%3Alocalhost", token="as_token")
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    status, body = await call(
        http,
        hs,
        "GET",
        f"{whoami}?user_id=%40br_x%3Alocalhost&org.matrix.msc3202.device_id=NOPE",
        token="as_token",
    )
    assert (status, body["errcode"]) == (400, "M_UNKNOWN_DEVICE")


async def test_account_data_round_trip_and_errors(hs: FakeHomeserver, http: aiohttp.ClientSession) -> None:
    assert await call(http, hs, "GET", ad_path("m.x")) == (
        404,
        {"errcode": "M_NOT_FOUND", "error": "Account data not found"},
    )
    assert await call(http, hs, "PUT", ad_path("m.x", prefix="/_matrix/client/r0"), {"a": 1}) == (200, {})
    assert await call(http, hs, "GET", ad_path("m.x", prefix="/_matrix/client/unstable")) == (200, {"a": 1})
    assert await call(http, hs, "PUT", ad_path("m.x"), {}) == (200, {})
    assert await call(http, hs, "GET", ad_path("m.x")) == (200, {})  # flag off: {} is content
    assert await call(http, hs, "GET", ad_path("m.r", ROOM)) == (
        404,
        {"errcode": "M_NOT_FOUND", "error": "Room account data not found"},
    )
    assert await call(http, hs, "PUT", ad_path("m.r", ROOM), {"r": 1}) == (200, {})
    assert hs.account_data(ALICE, "m.r", ROOM) == {"r": 1}
    assert hs.stream_id == 3

    status, body = await call(http, hs, "PUT", ad_path("m.x", user="@bob:localhost"), {"a": 1})
    assert (status, body["error"]) == (403, "Cannot add account data for other users.")
    status, body = await call(http, hs, "PUT", ad_path("m.r", "nonsense"), {"a": 1})
    assert (status, body["error"]) == (400, "nonsense is not a valid room ID")
    status, body = await call(http, hs, "PUT", ad_path("m.push_rules"), {"a": 1})
    assert (status, body["errcode"]) == (405, "M_BAD_JSON")
    status, body = await call(http, hs, "PUT", ad_path("m.x"), [1])
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")
    status, body = await call(
        http, hs, "DELETE", "/_matrix/client/unstable/org.matrix.msc3391" + ad_path("m.x", prefix="")
    )
    assert (status, body) == (404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
    status, body = await call(http, hs, "GET", ad_path("m.x") + "/")
    assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED")
    status, body = await call(http, hs, "DELETE", ad_path("m.x"))
    assert (status, body["errcode"]) == (405, "M_UNRECOGNIZED")


async def test_msc3391_flag_on(hs: FakeHomeserver, http: aiohttp.ClientSession) -> None:
    hs.msc3391_enabled = True
    hs.set_account_data(ALICE, "m.x", {"a": 1})
    hs.set_account_data(ALICE, "m.r", {"a": 1}, ROOM)
    unstable = "/_matrix/client/unstable/org.matrix.msc3391"
    assert await call(http, hs, "DELETE", unstable + ad_path("m.x", prefix="")) == (200, {})
    assert await call(http, hs, "DELETE", unstable + ad_path("m.r", ROOM, prefix="")) == (200, {})
    assert await call(http, hs, "DELETE", unstable + ad_path("m.never", prefix="")) == (200, {})
    assert (await call(http, hs, "GET", ad_path("m.x")))[0] == 404
    assert (await call(http, hs, "GET", ad_path("m.r", ROOM)))[0] == 404
    assert hs.stream_id == 4  # a type that never existed writes nothing

    _, initial = await call(http, hs, "GET", f"{V3}/sync")
    assert "account_data" not in initial
    assert initial["rooms"]["join"][ROOM]["account_data"]["events"] == []
    _, incremental = await call(http, hs, "GET", f"{V3}/sync?since=s2")
    assert incremental["account_data"]["events"] == [{"type": "m.x", "content": {}}]
    assert incremental["rooms"]["join"][ROOM]["account_data"]["events"] == [{"type": "m.r", "content": {}}]


async def test_sync_stream_and_filters(hs: FakeHomeserver, http: aiohttp.ClientSession) -> None:
    hs.set_account_data(ALICE, "m.a", {"a": 1})
    hs.set_account_data(ALICE, "m.b", {"b": 1})
    hs.set_account_data(ALICE, "m.r", {"r": 1}, ROOM)
    hs.set_account_data(ALICE, "m.elsewhere", {"e": 1}, "!notjoined:localhost")

    status, initial = await call(http, hs, "GET", f"{V3}/sync")
    assert status == 200 and initial["next_batch"] == "s4"
    assert initial["account_data"]["events"] == [
        {"type": "m.a", "content": {"a": 1}},
        {"type": "m.b", "content": {"b": 1}},
    ]
    assert list(initial["rooms"]["join"]) == [ROOM]
    assert initial["rooms"]["join"][ROOM]["account_data"]["events"] == [{"type": "m.r", "content": {"r": 1}}]

    hs.set_account_data(ALICE, "m.a", {})
    status, incremental = await call(http, hs, "GET", f"{V3}/sync?since=s4")
    assert incremental == {"next_batch": "s5", "account_data": {"events": [{"type": "m.a", "content": {}}]}}
    status, nothing = await call(http, hs, "GET", f"{V3}/sync?since=s5")
    assert nothing == {"next_batch": "s5"}

    inline = quote(
        json.dumps({"account_data": {"not_types": ["m.a"]}, "room": {"account_data": {"types": []}}})
    )
    status, filtered = await call(http, hs, "GET", f"{V3}/sync?filter={inline}")
    assert filtered["account_data"]["events"] == [{"type": "m.b", "content": {"b": 1}}]
    assert filtered["rooms"]["join"][ROOM]["account_data"]["events"] == []

    status, created = await call(
        http, hs, "POST", f"{V3}/user/%40alice%3Alocalhost/filter", {"account_data": {"limit": 1}}
    )
    assert created == {"filter_id": "0"}
    assert await call(http, hs, "GET", f"{V3}/user/%40alice%3Alocalhost/filter/0") == (
        200,
        {"account_data": {"limit": 1}},
    )
    status, limited = await call(http, hs, "GET", f"{V3}/sync?filter=0")
    assert len(limited["account_data"]["events"]) == 1
    assert await call(http, hs, "GET", f"{V3}/joined_rooms") == (200, {"joined_rooms": [ROOM]})


async def test_sync_long_poll_wakes_on_a_change(hs: FakeHomeserver, http: aiohttp.ClientSession) -> None:
    waiting = asyncio.ensure_future(call(http, hs, "GET", f"{V3}/sync?since=s0&timeout=5000"))
    async with asyncio.timeout(5):
        await hs.wait_for_requests(r"/sync$")
    hs.set_account_data(ALICE, "m.woke", {"w": 1})
    _, body = await asyncio.wait_for(waiting, 5)
    assert body["account_data"]["events"] == [{"type": "m.woke", "content": {"w": 1}}]


async def test_devices_uia_and_logout(hs: FakeHomeserver, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, hs, "GET", f"{V3}/devices")
    assert sorted(d["device_id"] for d in body["devices"]) == ["DEV1", "DEV2"]

    status, body = await call(http, hs, "DELETE", f"{V3}/devices/DEV2", {})
    assert status == 401 and body["flows"] and body["session"]
    assert "DEV2" in hs.devices[ALICE]
    assert await call(http, hs, "DELETE", f"{V3}/devices/DEV2", {"auth": {"type": "m.login.password"}}) == (
        200,
        {},
    )
    assert "DEV2" not in hs.devices[ALICE] and "alice_token_2" not in hs.tokens

    hs.add_device(ALICE, "DEV3", token="t3")
    status, _ = await call(http, hs, "POST", f"{V3}/delete_devices", {"devices": ["DEV3"]})
    assert status == 401
    assert await call(http, hs, "POST", f"{V3}/delete_devices", {"devices": ["DEV3"], "auth": {}}) == (
        200,
        {},
    )
    assert "DEV3" not in hs.devices[ALICE]

    hs.add_device(ALICE, "DEV4", token="t4")
    assert await call(http, hs, "POST", "/_matrix/client/api/v1/logout", {}, token="t4") == (200, {})
    assert "DEV4" not in hs.devices[ALICE]
    hs.add_device(ALICE, "DEV5", token="t5")
    assert await call(http, hs, "POST", f"{V3}/logout/all", {}) == (200, {})
    assert hs.devices[ALICE] == {} and not any(owner[0] == ALICE for owner in hs.tokens.values())


async def test_faults_records_and_down(hs: FakeHomeserver, http: aiohttp.ClientSession) -> None:
    fault = hs.fault(r"/versions$", status=503, json={"errcode": "M_UNKNOWN", "error": "busy"}, times=1)
    assert (await call(http, hs, "GET", "/_matrix/client/versions"))[0] == 503
    assert (await call(http, hs, "GET", "/_matrix/client/versions"))[0] == 200
    assert fault.hits == 1
    assert hs.last_request(r"/versions$").status == 200

    status, body = await call(http, hs, "POST", "/_matrix/client/v3/createRoom", {"x": 1})
    assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED")
    assert hs.last_request().body_size == len(b'{"x": 1}')

    url = hs.url
    await hs.go_down()
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, hs, "GET", "/_matrix/client/versions")
    await hs.come_up()
    assert hs.url == url
    assert (await call(http, hs, "GET", "/_matrix/client/versions"))[0] == 200


async def test_a_fault_that_applies_first_changes_the_state_then_breaks_the_answer(
    hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    hs.fault(r"/account_data/", method="PUT", apply=True, status=500, json={"errcode": "M_UNKNOWN"}, times=1)
    assert await call(http, hs, "PUT", ad_path("t"), {"v": 1}) == (500, {"errcode": "M_UNKNOWN"})
    assert hs.account_data(ALICE, "t") == {"v": 1}

    hs.fault(r"/account_data/", method="PUT", apply=True, hang=True, times=1)
    hanging = asyncio.ensure_future(call(http, hs, "PUT", ad_path("t"), {"v": 2}))
    await asyncio.wait_for(hs.hang_started.wait(), 5)
    assert hs.account_data(ALICE, "t") == {"v": 2}  # applied, and the answer never comes
    hanging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hanging


async def test_go_down_after_answers_then_refuses_until_it_comes_up(
    hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    hs.fault(r"/versions$", go_down_after=True, times=1)
    assert (await call(http, hs, "GET", "/_matrix/client/versions"))[0] == 200
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, hs, "GET", "/_matrix/client/versions")
    await hs.come_up()
    assert (await call(http, hs, "GET", "/_matrix/client/versions"))[0] == 200

"""The identity layer (`proxy/identity.py`) seen through an owned route: a GET of
account data with MSC3391 on makes the proxy ask the homeserver's whoami who calls.

The homeserver decides: the caller's own credentials go to whoami as they came
(header or query, appservice masquerade parameters, client address), its answers are
cached briefly and per credentials, its errors reach the client unchanged, and its
absence is a gateway error, never a token error. No token ever reaches a log."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from proxy.app import CONTEXT
from proxy.server import ProxyServer
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver
from tests.matrix import ALICE, BOB, V3, account_data_path
from tests.raw_http import raw_request

ALICE_TOKEN = "syt_alice_secret_token_3391"
BOB_TOKEN = "syt_bob_secret_token_3391"
CAROL, CAROL_TOKEN = "@carol:localhost", "syt_carol_secret_token_3391"
AS_TOKEN = "as_secret_token_3391"
BRIDGE = "@bridge:localhost"
BRIDGE_ALICE, BRIDGE_BOB = "@bridge_alice:localhost", "@bridge_bob:localhost"
WHOAMI = r"/account/whoami$"


@pytest.fixture
def hs(fake_hs: FakeHomeserver) -> FakeHomeserver:
    fake_hs.add_device(ALICE, "ALICEDEV", token=ALICE_TOKEN)
    fake_hs.add_device(BOB, "BOBDEV", token=BOB_TOKEN)
    fake_hs.add_device(CAROL, "CAROLDEV", token=CAROL_TOKEN)
    fake_hs.add_appservice(AS_TOKEN, BRIDGE, user_regex=r"@bridge_.*:localhost")
    fake_hs.add_device(BRIDGE_ALICE, "BRIDGEDEV")
    fake_hs.add_user(BRIDGE_BOB)
    for user in (ALICE, BOB, CAROL, BRIDGE_ALICE, BRIDGE_BOB):
        fake_hs.set_account_data(user, "m.test", {"who": user})
    return fake_hs


def target(user_id: str, query: str = "") -> str:
    path = account_data_path(V3, user_id, "m.test")
    return f"{path}?{query}" if query else path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get(
    http: aiohttp.ClientSession, proxy: ProxyServer | FakeHomeserver, path: str, **kwargs: Any
) -> tuple[int, bytes, str | None]:
    async with http.get(URL(proxy.url + path, encoded=True), **kwargs) as response:
        return response.status, await response.read(), response.headers.get("Content-Type")


def who(body: bytes) -> str:
    return json.loads(body)["who"]


# --- what whoami receives ----------------------------------------------------------------


async def test_whoami_gets_the_token_from_the_header(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url)
    status, body, _ = await get(
        http, proxy, target(ALICE), headers={**bearer(ALICE_TOKEN), "User-Agent": "client/1"}
    )

    assert (status, who(body)) == (200, ALICE)
    [call] = hs.whoami_requests
    assert call.headers.getall("Authorization") == [f"Bearer {ALICE_TOKEN}"]
    assert "access_token" not in call.query
    assert call.headers["User-Agent"] == "client/1"


async def test_whoami_gets_the_token_from_the_query(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url)
    status, body, _ = await get(http, proxy, target(ALICE, f"access_token={ALICE_TOKEN}"))

    assert (status, who(body)) == (200, ALICE)
    [call] = hs.whoami_requests
    assert call.query.getall("access_token") == [ALICE_TOKEN]
    assert "Authorization" not in call.headers


@pytest.mark.parametrize("device_param", ["device_id", "org.matrix.msc3202.device_id"])
async def test_whoami_gets_the_masquerade_parameters(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession, device_param: str
) -> None:
    proxy = await start_proxy(hs.url)
    query = f"user_id={quote(BRIDGE_ALICE)}&{device_param}=BRIDGEDEV"
    status, body, _ = await get(http, proxy, target(BRIDGE_ALICE, query), headers=bearer(AS_TOKEN))

    assert (status, who(body)) == (200, BRIDGE_ALICE)
    [call] = hs.whoami_requests
    assert call.query.getall("user_id") == [BRIDGE_ALICE]
    assert call.query.getall(device_param) == ["BRIDGEDEV"]
    assert call.headers.getall("Authorization") == [f"Bearer {AS_TOKEN}"]


async def test_whoami_gets_the_client_address(start_proxy: StartProxy, hs: FakeHomeserver) -> None:
    proxy = await start_proxy(hs.url)
    headers = [("Authorization", f"Bearer {ALICE_TOKEN}"), ("X-Forwarded-For", "198.51.100.9")]
    response = await raw_request(proxy.url, "GET", target(ALICE), headers)

    assert response.status == 200
    [call] = hs.whoami_requests
    assert call.headers.getall("X-Forwarded-For") == ["198.51.100.9, 127.0.0.1"]


# --- the cache ---------------------------------------------------------------------------


async def test_second_request_is_answered_from_the_cache(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url)
    for _ in range(3):
        status, body, _ = await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
        assert (status, who(body)) == (200, ALICE)
    assert hs.whoami_calls == 1


async def test_header_and_query_tokens_are_separate_entries(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url)
    await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
    await get(http, proxy, target(ALICE, f"access_token={ALICE_TOKEN}"))
    await get(http, proxy, target(BOB), headers=bearer(BOB_TOKEN))
    assert hs.whoami_calls == 3


async def test_cache_entries_expire_after_the_ttl(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url, proxy={"identity_cache_ttl": 0.2})
    await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
    await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
    assert hs.whoami_calls == 1

    await asyncio.sleep(0.3)  # past the configured TTL
    status, body, _ = await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
    assert (status, who(body)) == (200, ALICE)
    assert hs.whoami_calls == 2


async def test_cache_is_bounded_in_size(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url, proxy={"identity_cache_size": 2})
    for user, token in ((ALICE, ALICE_TOKEN), (BOB, BOB_TOKEN), (CAROL, CAROL_TOKEN)):
        status, body, _ = await get(http, proxy, target(user), headers=bearer(token))
        assert (status, who(body)) == (200, user)
    assert hs.whoami_calls == 3

    # Alice's entry, the oldest, was evicted to make room for Carol's.
    await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
    assert hs.whoami_calls == 4
    # Carol's is still there.
    await get(http, proxy, target(CAROL), headers=bearer(CAROL_TOKEN))
    assert hs.whoami_calls == 4


async def test_concurrent_requests_with_one_token_share_one_whoami(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url)
    identity = proxy.app[CONTEXT].identity
    gate = asyncio.Event()
    hs.fault(WHOAMI, gate=gate)  # whoami answers only once every request is waiting for it
    n = 20

    requests = [
        asyncio.ensure_future(get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))) for _ in range(n)
    ]
    # Every request has reached the identity layer and found no cached answer. The proxy
    # has no event to wait on for that, so poll its counter (bounded by the timeout).
    async with asyncio.timeout(10):
        while identity.misses < n:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*requests)

    assert [(status, who(body)) for status, body, _ in results] == [(200, ALICE)] * n
    assert hs.whoami_calls == 1


async def test_masquerade_targets_do_not_share_cache_entries(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url)
    as_header = bearer(AS_TOKEN)

    status, body, _ = await get(
        http, proxy, target(BRIDGE_ALICE, f"user_id={quote(BRIDGE_ALICE)}"), headers=as_header
    )
    assert (status, who(body)) == (200, BRIDGE_ALICE)
    # Same token, another user: a cache shared by token would make this Bridge Alice
    # asking for Bridge Bob's data (403).
    status, body, _ = await get(
        http, proxy, target(BRIDGE_BOB, f"user_id={quote(BRIDGE_BOB)}"), headers=as_header
    )
    assert (status, who(body)) == (200, BRIDGE_BOB)
    # Same token and user, with a device: another entry again.
    query = f"user_id={quote(BRIDGE_ALICE)}&device_id=BRIDGEDEV"
    status, body, _ = await get(http, proxy, target(BRIDGE_ALICE, query), headers=as_header)
    assert (status, who(body)) == (200, BRIDGE_ALICE)
    # The appservice as itself: its sender, who may not read Bridge Alice's data.
    status, body, _ = await get(http, proxy, target(BRIDGE_ALICE), headers=as_header)
    assert status == 403
    assert json.loads(body) == {"errcode": "M_FORBIDDEN", "error": "Cannot get account data for other users."}
    assert hs.whoami_calls == 4

    # Each of them is cached on its own.
    await get(http, proxy, target(BRIDGE_BOB, f"user_id={quote(BRIDGE_BOB)}"), headers=as_header)
    await get(http, proxy, target(BRIDGE_ALICE, f"user_id={quote(BRIDGE_ALICE)}"), headers=as_header)
    assert hs.whoami_calls == 4


# --- the homeserver's errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "headers", "errcode"),
    [
        ("", [("Authorization", "Bearer syt_unknown_token_3391")], "M_UNKNOWN_TOKEN"),
        ("access_token=syt_unknown_token_3391", [], "M_UNKNOWN_TOKEN"),
        ("", [], "M_MISSING_TOKEN"),
        ("", [("Authorization", "Basic YWxpY2U6cGFzcw==")], "M_MISSING_TOKEN"),
        (
            "",
            [("Authorization", f"Bearer {ALICE_TOKEN}"), ("Authorization", f"Bearer {BOB_TOKEN}")],
            "M_MISSING_TOKEN",
        ),
        # Both places at once: whatever the homeserver says (Synapse 1.163: 401 M_MISSING_TOKEN).
        (f"access_token={ALICE_TOKEN}", [("Authorization", f"Bearer {ALICE_TOKEN}")], "M_MISSING_TOKEN"),
        # An appservice masquerading outside its namespace: Synapse's 403.
        (f"user_id={quote('@alice:localhost')}", [("Authorization", f"Bearer {AS_TOKEN}")], "M_FORBIDDEN"),
    ],
    ids=[
        "unknown-header",
        "unknown-query",
        "missing",
        "not-bearer",
        "two-headers",
        "both-places",
        "as-outside",
    ],
)
async def test_homeserver_auth_errors_are_relayed_unchanged(
    start_proxy: StartProxy,
    hs: FakeHomeserver,
    query: str,
    headers: list[tuple[str, str]],
    errcode: str,
) -> None:
    proxy = await start_proxy(hs.url)
    whoami = "/_matrix/client/v3/account/whoami" + (f"?{query}" if query else "")
    direct = await raw_request(hs.url, "GET", whoami, headers)
    calls = hs.whoami_calls

    relayed = await raw_request(proxy.url, "GET", target(ALICE, query), headers)

    assert hs.whoami_calls == calls + 1
    assert relayed.status == direct.status
    assert relayed.body == direct.body
    assert relayed.headers["Content-Type"] == direct.headers["Content-Type"]
    assert relayed.json()["errcode"] == errcode
    # Nothing else was asked of the homeserver on these credentials.
    assert hs.requests_to(r"/account_data/") == []


async def test_token_in_both_places_gets_the_homeservers_answer(
    start_proxy: StartProxy, hs: FakeHomeserver
) -> None:
    proxy = await start_proxy(hs.url)
    headers = [("Authorization", f"Bearer {ALICE_TOKEN}")]
    response = await raw_request(proxy.url, "GET", target(ALICE, f"access_token={ALICE_TOKEN}"), headers)

    assert response.status == 401
    assert response.json() == {
        "errcode": "M_MISSING_TOKEN",
        "error": "Mixing Authorization headers and access_token query parameters.",
    }
    [call] = hs.whoami_requests
    assert call.headers.getall("Authorization") == [f"Bearer {ALICE_TOKEN}"]
    assert call.query.getall("access_token") == [ALICE_TOKEN]


async def test_a_refused_token_is_not_cached(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url)
    token = "syt_logged_in_later_3391"
    status, _, _ = await get(http, proxy, target(ALICE), headers=bearer(token))
    assert status == 401

    hs.tokens[token] = (ALICE, "NEWDEV")  # the user logs in: the token now exists
    status, body, _ = await get(http, proxy, target(ALICE), headers=bearer(token))
    assert (status, who(body)) == (200, ALICE)


# --- the homeserver unreachable or broken ------------------------------------------------


def assert_gateway_error(status: int, body: bytes, content_type: str | None, expected: int) -> None:
    assert status == expected
    assert content_type is not None and content_type.startswith("application/json")
    parsed = json.loads(body)
    assert parsed["errcode"] == "M_UNKNOWN"
    assert parsed["errcode"] != "M_UNKNOWN_TOKEN"


async def test_whoami_unreachable_is_a_502_never_a_token_error(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(hs.url)
    await hs.go_down()

    for headers, query in ((bearer(ALICE_TOKEN), ""), ({}, f"access_token={ALICE_TOKEN}")):
        status, body, content_type = await get(http, proxy, target(ALICE, query), headers=headers)
        assert_gateway_error(status, body, content_type, 502)

    # Nothing was cached from the failure: once back, the same token works.
    await hs.come_up()
    status, body, _ = await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
    assert (status, who(body)) == (200, ALICE)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"status": 502, "body": b"<html>Bad Gateway</html>", "content_type": "text/html"}, 502),
        ({"status": 500, "body": b"", "content_type": "text/plain"}, 502),
        ({"status": 200, "body": b"not json", "content_type": "application/json"}, 502),
        ({"status": 200, "json": {"device_id": "X"}}, 502),
        ({"status": 200, "json": {"user_id": 42}}, 502),
        ({"disconnect": True}, 502),
        ({"hang": True}, 504),
    ],
    ids=["html-502", "empty-500", "not-json", "no-user-id", "bad-user-id", "disconnect", "hang"],
)
async def test_whoami_failing_is_a_gateway_error(
    start_proxy: StartProxy,
    hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    fault: dict[str, Any],
    expected: int,
) -> None:
    proxy = await start_proxy(hs.url, upstream={"read_timeout": 0.5})
    hs.fault(WHOAMI, **fault)

    status, body, content_type = await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
    assert_gateway_error(status, body, content_type, expected)
    assert hs.requests_to(r"/account_data/") == []


# --- logs --------------------------------------------------------------------------------


async def test_no_token_ever_reaches_a_log_record(
    start_proxy: StartProxy,
    hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger propagates here
    proxy = await start_proxy(hs.url, upstream={"read_timeout": 0.5})
    secrets = [ALICE_TOKEN, AS_TOKEN, "syt_unknown_token_3391"]

    # Successes, header and query.
    await get(http, proxy, target(ALICE), headers=bearer(ALICE_TOKEN))
    await get(http, proxy, target(ALICE, f"access_token={ALICE_TOKEN}&x=1"))
    await get(http, proxy, target(BRIDGE_ALICE, f"user_id={quote(BRIDGE_ALICE)}&access_token={AS_TOKEN}"))
    # Refusals.
    await get(http, proxy, target(ALICE), headers=bearer("syt_unknown_token_3391"))
    await get(http, proxy, target(ALICE, "access_token=syt_unknown_token_3391"))
    await get(http, proxy, target(ALICE, f"access_token={ALICE_TOKEN}"), headers=bearer(ALICE_TOKEN))
    await get(http, proxy, target(BOB, f"access_token={ALICE_TOKEN}"))  # 403
    # Forwarded requests carrying a token.
    await get(http, proxy, f"/_fake/echo/x?access_token={ALICE_TOKEN}")
    await get(http, proxy, f"/_matrix/client/v3/rooms/!r:x/messages?access_token={ALICE_TOKEN}")
    # Failures: whoami broken, hung, then the homeserver gone.
    fault = hs.fault(WHOAMI, status=500, body=b"oops", content_type="text/plain", times=1)
    await get(http, proxy, target(CAROL, "access_token=syt_carol_x_3391&a=b"))
    assert fault.hits == 1
    hs.fault(WHOAMI, hang=True, times=1)
    await get(http, proxy, target(CAROL), headers=bearer("syt_carol_y_3391"))
    secrets += ["syt_carol_x_3391", "syt_carol_y_3391"]
    await hs.go_down()
    await get(http, proxy, target(ALICE, "access_token=syt_down_query_3391"))
    await get(http, proxy, target(ALICE), headers=bearer("syt_down_header_3391"))
    await get(http, proxy, f"/_fake/echo/y?access_token={ALICE_TOKEN}")
    secrets += ["syt_down_query_3391", "syt_down_header_3391"]

    records = caplog.records
    assert any(r.name.startswith("proxy") for r in records), (
        "the proxy logged nothing: the test proves nothing"
    )
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records:
        text = formatter.format(record) + repr(record.__dict__)
        for secret in secrets:
            assert secret not in text, f"{record.name}: {record.getMessage()}"

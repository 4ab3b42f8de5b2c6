"""Authorization: one user can never touch another user's account data or rows.

Through every route shape the proxy owns (`r0`, `v3`, `unstable`; the MSC3391 DELETE;
global and room), with the owner's user ID in every encoding Synapse decodes to the
same string, another user can neither delete, write, read nor acknowledge, and an
appservice can act only as the users its namespace allows. Shapes the proxy does not
own go to the homeserver, which refuses them itself. Bob's syncs and device removals
never touch Alice's rows, even when both have a device called `SHARED`. The identity
cache keeps masquerade targets apart. And no access token ever reaches a log record,
in this process or in the proxy run as `python -m proxy` at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from yarl import URL

from proxy.server import ProxyServer
from rig.proxy_process import ProxyProcess
from tests import matrix
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver
from tests.matrix import ALICE, BOB, MSC3391, ROOM
from tests.raw_http import raw_request
from tests.store_check import Snapshot, snapshot

ALICE_TOKEN, ALICE_SHARED_TOKEN = "syt_authz_alice_a1", "syt_authz_alice_shared"
BOB_TOKEN, BOB_SHARED_TOKEN = "syt_authz_bob_b1", "syt_authz_bob_shared"
AS_TOKEN = "as_authz_secret_token"
BRIDGE = "@bridge:localhost"
BRIDGE_ALICE, BRIDGE_BOB = "@bridge_alice:localhost", "@bridge_bob:localhost"
KIND = "org.example.private"
GONE = "org.example.gone"  # deleted by Alice: her SHARED device has a row for it

# Every spelling of Alice's ID that Synapse decodes to "@alice:localhost".
ALICE_SPELLINGS = [
    "@alice:localhost",
    "%40alice%3Alocalhost",
    "%40alice%3alocalhost",
    "@alice%3Alocalhost",
    "%40alice:localhost",
    "%40%61lice%3Alocalhost",
]
ROOM_SPELLINGS = ["%21room%3Alocalhost", "!room:localhost"]
PREFIXES = ["/_matrix/client/r0", "/_matrix/client/v3", "/_matrix/client/unstable"]


def owned_paths(user: str, *, delete: bool) -> list[str]:
    """Every owned account data path of `user` (already spelled), global and room."""
    prefixes = [MSC3391] if delete else PREFIXES
    paths = []
    for prefix in prefixes:
        paths.append(f"{prefix}/user/{user}/account_data/{KIND}")
        paths += [f"{prefix}/user/{user}/rooms/{room}/account_data/{KIND}" for room in ROOM_SPELLINGS]
    return paths


@pytest.fixture
def hs(fake_hs: FakeHomeserver) -> FakeHomeserver:
    fake_hs.uia_required = False
    fake_hs.add_device(ALICE, "A1", token=ALICE_TOKEN)
    fake_hs.add_device(ALICE, "SHARED", token=ALICE_SHARED_TOKEN)
    fake_hs.add_device(BOB, "B1", token=BOB_TOKEN)
    fake_hs.add_device(BOB, "SHARED", token=BOB_SHARED_TOKEN)
    fake_hs.add_appservice(AS_TOKEN, BRIDGE, user_regex=r"@bridge_.*:localhost")
    fake_hs.add_device(BRIDGE_ALICE, "BA1")
    fake_hs.add_device(BRIDGE_BOB, "BB1")
    for user in (ALICE, BOB, BRIDGE_ALICE, BRIDGE_BOB):
        fake_hs.join(user, ROOM)
        for kind in (KIND, GONE):
            fake_hs.set_account_data(user, kind, {"owner": user})
            fake_hs.set_account_data(user, kind, {"owner": user}, ROOM)
    return fake_hs


@pytest.fixture
async def proxy(start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession) -> ProxyServer:
    """The proxy, after Alice deleted GONE (global and room): her SHARED device has rows."""
    proxy = await start_proxy(hs.url)
    for path in (
        f"{MSC3391}/user/{quote(ALICE)}/account_data/{GONE}",
        f"{MSC3391}/user/{quote(ALICE)}/rooms/{quote(ROOM)}/account_data/{GONE}",
    ):
        assert await call(http, proxy, "DELETE", path, ALICE_TOKEN) == (200, {})
    return proxy


async def call(
    http: aiohttp.ClientSession,
    proxy: ProxyServer | ProxyProcess,
    method: str,
    target: str,
    token: str | None = None,
    body: Any = None,
    *,
    query_token: str | None = None,
) -> tuple[int, Any]:
    if query_token:
        target += ("&" if "?" in target else "?") + f"access_token={query_token}"
    return await matrix.call(http, method, URL(proxy.url + target, encoded=True), token, body)


def forbidden(verb: str) -> dict[str, str]:
    return {"errcode": "M_FORBIDDEN", "error": f"Cannot {verb} account data for other users."}


def alices_rows(state: Snapshot) -> set[tuple[str | None, str, str]]:
    return state.rows_of(ALICE)


ALICES_ROWS = {(None, GONE, "SHARED"), (ROOM, GONE, "SHARED")}


def assert_alice_untouched(hs: FakeHomeserver, proxy: ProxyServer) -> None:
    for room in (None, ROOM):
        assert hs.account_data(ALICE, KIND, room) == {"owner": ALICE}
        assert hs.account_data(ALICE, GONE, room) == {}
    assert alices_rows(snapshot(proxy.config.store.path)) == ALICES_ROWS


# --- another user -----------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ALICE_SPELLINGS)
async def test_bob_cannot_delete_or_write_alices_account_data_through_any_owned_shape(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession, spelling: str
) -> None:
    writes = len(hs.requests_to(r"/account_data/", method="PUT"))
    for path in owned_paths(spelling, delete=True):
        assert await call(http, proxy, "DELETE", path, BOB_TOKEN) == (403, forbidden("delete")), path
    for path in owned_paths(spelling, delete=False):
        assert await call(http, proxy, "PUT", path, BOB_TOKEN, {}) == (403, forbidden("add")), path
        assert await call(http, proxy, "PUT", path, BOB_TOKEN, {"evil": 1}) == (403, forbidden("add")), path

    assert len(hs.requests_to(r"/account_data/", method="PUT")) == writes
    assert_alice_untouched(hs, proxy)


@pytest.mark.parametrize("spelling", ALICE_SPELLINGS)
async def test_bob_cannot_read_alices_account_data_through_any_owned_shape(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession, spelling: str
) -> None:
    reads = len(hs.requests_to(r"/account_data/", method="GET"))
    for path in owned_paths(spelling, delete=False):
        assert await call(http, proxy, "GET", path, BOB_TOKEN) == (403, forbidden("get")), path
        # HEAD is served by the GET handler: the same refusal, without a body.
        assert await call(http, proxy, "HEAD", path, BOB_TOKEN) == (403, None), path
        # Reading a type Alice deleted would acknowledge it for the reader's device.
        gone = path.replace(KIND, GONE)
        assert await call(http, proxy, "GET", gone, BOB_SHARED_TOKEN) == (403, forbidden("get")), gone

    assert len(hs.requests_to(r"/account_data/", method="GET")) == reads
    assert_alice_untouched(hs, proxy)


# Shapes Synapse does not serve as account data (its patterns end in `$`): the proxy
# forwards them and the homeserver refuses them, as it would without the proxy.
UNOWNED = [
    f"/_matrix/client/v3/user/{quote(ALICE)}/account_data/{KIND}/",
    f"/_matrix/client/v3/user/{quote(ALICE)}/account_data/{KIND}/extra",
    f"/_matrix/client/v3//user/{quote(ALICE)}/account_data/{KIND}",
    f"/_matrix/client/v4/user/{quote(ALICE)}/account_data/{KIND}",
    f"{MSC3391}/user/{quote(ALICE)}/account_data/{KIND}/",
]


@pytest.mark.parametrize("path", UNOWNED)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_shapes_the_proxy_does_not_own_are_the_homeservers_to_refuse(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession, path: str, method: str
) -> None:
    status, body = await call(http, proxy, method, path, BOB_TOKEN, {} if method == "PUT" else None)

    assert (status, body) == (404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})
    assert hs.last_request().raw_path == path  # it was the homeserver's answer
    assert_alice_untouched(hs, proxy)


# --- appservices ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "user_id_param", "status", "errcode"),
    [
        # A user's own token: Synapse ignores `user_id`, so this is Bob.
        (BOB_TOKEN, ALICE, 403, "M_FORBIDDEN"),
        (BOB_TOKEN, quote(ALICE), 403, "M_FORBIDDEN"),
        # The appservice, outside its namespace: its whoami is refused.
        (AS_TOKEN, quote(ALICE), 403, "M_FORBIDDEN"),
        # A token nobody knows, asking to be Alice.
        ("as_not_a_real_token", quote(ALICE), 401, "M_UNKNOWN_TOKEN"),
        # The appservice as one of its users, at another of its users' data.
        (AS_TOKEN, quote(BRIDGE_BOB), 403, "M_FORBIDDEN"),
        # The appservice as itself (its sender).
        (AS_TOKEN, None, 403, "M_FORBIDDEN"),
    ],
    ids=[
        "user-token-as-alice",
        "user-token-as-alice-encoded",
        "as-outside",
        "unknown-token",
        "as-other",
        "as-self",
    ],
)
async def test_masquerading_never_reaches_another_users_data(
    proxy: ProxyServer,
    hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    token: str,
    user_id_param: str | None,
    status: int,
    errcode: str,
) -> None:
    # The appservice aims at one of its own users; everyone else at Alice.
    target_user = BRIDGE_ALICE if token == AS_TOKEN and user_id_param != quote(ALICE) else ALICE
    query = f"?user_id={user_id_param}" if user_id_param else ""  # as given: raw or encoded
    before = snapshot(proxy.config.store.path)
    for method, path, body in (
        ("DELETE", f"{MSC3391}/user/{quote(target_user)}/account_data/{KIND}", None),
        ("PUT", f"/_matrix/client/v3/user/{quote(target_user)}/account_data/{KIND}", {}),
        ("GET", f"/_matrix/client/v3/user/{quote(target_user)}/account_data/{KIND}", None),
        ("GET", f"/_matrix/client/v3/user/{quote(target_user)}/account_data/{GONE}", None),
    ):
        answer, error = await call(http, proxy, method, path + query, token, body)
        assert (answer, error["errcode"]) == (status, errcode), (method, path)

    assert hs.account_data(target_user, KIND) == {"owner": target_user}
    assert snapshot(proxy.config.store.path) == before


async def test_an_appservice_acts_only_as_the_user_it_names(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """The positive control: within its namespace the appservice deletes as the user
    it names, and the delete is recorded under that user alone."""
    path = f"{MSC3391}/user/{quote(BRIDGE_ALICE)}/account_data/{KIND}?user_id={quote(BRIDGE_ALICE)}"

    assert await call(http, proxy, "DELETE", path, AS_TOKEN) == (200, {})

    assert hs.account_data(BRIDGE_ALICE, KIND) == {}
    assert hs.account_data(BRIDGE_BOB, KIND) == {"owner": BRIDGE_BOB}
    state = snapshot(proxy.config.store.path)
    assert {t[1] for t in state.tombstones} == {ALICE, BRIDGE_ALICE}
    # No device of its own (no device_id): every device of the account is told.
    assert state.rows_of(BRIDGE_ALICE) == {(None, KIND, "BA1")}
    assert alices_rows(state) == ALICES_ROWS


async def test_the_identity_cache_keeps_masquerade_targets_apart(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    whoami = len(hs.whoami_requests)
    as_alice = f"?user_id={quote(BRIDGE_ALICE)}"
    as_bob = f"?user_id={quote(BRIDGE_BOB)}"

    for _ in range(2):  # the second round is answered from the cache
        for user, query in ((BRIDGE_ALICE, as_alice), (BRIDGE_BOB, as_bob)):
            for other in (BRIDGE_ALICE, BRIDGE_BOB):
                path = f"/_matrix/client/v3/user/{quote(other)}/account_data/{KIND}{query}"
                expected = (200, {"owner": other}) if other == user else (403, forbidden("get"))
                assert await call(http, proxy, "GET", path, AS_TOKEN) == expected
    # The same token with two user_id values: two identities, each looked up once.
    assert [r.query.get("user_id") for r in hs.whoami_requests[whoami:]] == [BRIDGE_ALICE, BRIDGE_BOB]

    # ... and a delete by each lands under its own user.
    for user, query in ((BRIDGE_ALICE, as_alice), (BRIDGE_BOB, as_bob)):
        path = f"{MSC3391}/user/{quote(user)}/account_data/{KIND}{query}"
        assert await call(http, proxy, "DELETE", path, AS_TOKEN) == (200, {})
    state = snapshot(proxy.config.store.path)
    assert state.rows_of(BRIDGE_ALICE) == {(None, KIND, "BA1")}
    assert state.rows_of(BRIDGE_BOB) == {(None, KIND, "BB1")}
    assert len(hs.whoami_requests) == whoami + 2


# --- rows: syncs and device removals of another user ---------------------------------------


async def test_bobs_syncs_never_acknowledge_nor_show_alices_deletes(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    # Alice's SHARED device receives her deletes: the proxy records them under next_batch.
    status, alice_sync = await call(
        http, proxy, "GET", "/_matrix/client/v3/sync?timeout=0&since=s0", ALICE_SHARED_TOKEN
    )
    assert status == 200
    delivered = alice_sync["next_batch"]
    assert {(None, GONE)} <= {
        (None, e["type"]) for e in alice_sync["account_data"]["events"] if e["content"] == {}
    }
    assert len(snapshot(proxy.config.store.path).deliveries) == 2

    # Bob's device of the same name presents the same token, and reads his own type
    # after making it read as deleted: neither is a proof of receipt for Alice.
    hs.set_account_data(BOB, GONE, {})
    for since in (delivered, "s0"):
        query = urlencode({"timeout": 0, "since": since})
        status, bob_sync = await call(
            http, proxy, "GET", f"/_matrix/client/v3/sync?{query}", BOB_SHARED_TOKEN
        )
        assert status == 200
        assert all(
            e.get("content", {}).get("owner", BOB) == BOB
            for e in bob_sync.get("account_data", {}).get("events", [])
        )
        for room in bob_sync.get("rooms", {}).get("join", {}).values():
            assert all(e["content"].get("owner", BOB) == BOB for e in room["account_data"]["events"])
    bob_get = f"/_matrix/client/v3/user/{quote(BOB)}/account_data/{GONE}"
    assert (await call(http, proxy, "GET", bob_get, BOB_SHARED_TOKEN))[0] == 404

    state = snapshot(proxy.config.store.path)
    assert alices_rows(state) == ALICES_ROWS
    assert len(state.deliveries) == 2

    # The positive control: Alice's own next sync is the proof, and her rows go.
    query = urlencode({"timeout": 0, "since": delivered})
    assert (await call(http, proxy, "GET", f"/_matrix/client/v3/sync?{query}", ALICE_SHARED_TOKEN))[0] == 200
    assert snapshot(proxy.config.store.path).empty


async def test_bobs_device_removals_never_drop_alices_rows(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    removals: list[tuple[str, str, Any, str]] = [
        ("DELETE", "/_matrix/client/v3/devices/SHARED", {}, BOB_TOKEN),
        ("POST", "/_matrix/client/v3/delete_devices", {"devices": ["SHARED", "A1"]}, BOB_TOKEN),
        ("POST", "/_matrix/client/r0/logout", {}, BOB_SHARED_TOKEN),
        ("POST", "/_matrix/client/v3/logout/all", {}, BOB_SHARED_TOKEN),
        ("POST", "/_matrix/client/v3/account/deactivate", {"auth": {}}, BOB_SHARED_TOKEN),
    ]
    for method, path, body, token in removals:
        hs.add_device(BOB, "B1", token=BOB_TOKEN)
        hs.add_device(BOB, "SHARED", token=BOB_SHARED_TOKEN)
        assert await call(http, proxy, method, path, token, body) == (
            200,
            {"id_server_unbind_result": "success"} if path.endswith("deactivate") else {},
        )
        assert "SHARED" not in hs.devices[BOB], path
        assert set(hs.devices[ALICE]) == {"A1", "SHARED"}, path
        assert alices_rows(snapshot(proxy.config.store.path)) == ALICES_ROWS, path


# --- logs -------------------------------------------------------------------------------------

SECRETS = [  # every token the run below uses
    ALICE_TOKEN,
    ALICE_SHARED_TOKEN,
    BOB_TOKEN,
    BOB_SHARED_TOKEN,
    AS_TOKEN,
    "syt_unknown_authz_token",
    "syt_down_authz_token",
    "syt_malformed_authz_token",
]


async def varied_run(
    http: aiohttp.ClientSession, proxy: ProxyServer | ProxyProcess, hs: FakeHomeserver
) -> None:
    """Requests of every kind, each carrying a token, header or query: successes,
    refusals, 401s, deletes, syncs, device removal, homeserver failures, malformed HTTP."""
    me = quote(ALICE)
    data = f"/_matrix/client/v3/user/{me}/account_data/{KIND}"
    for token, query_token in ((ALICE_TOKEN, None), (None, ALICE_TOKEN)):
        assert (await call(http, proxy, "GET", data, token, query_token=query_token))[0] == 200
        assert (await call(http, proxy, "PUT", data, token, {"n": 1}, query_token=query_token))[0] == 200
        assert (
            await call(
                http, proxy, "GET", "/_matrix/client/v3/sync?timeout=0", token, query_token=query_token
            )
        )[0] == 200
        assert (await call(http, proxy, "GET", "/_fake/echo/forwarded", token, query_token=query_token))[
            0
        ] == 200
    for token, query_token in ((ALICE_SHARED_TOKEN, None), (None, ALICE_SHARED_TOKEN)):
        status, body = await call(
            http, proxy, "GET", "/_matrix/client/v3/sync?timeout=0&since=s0", token, query_token=query_token
        )
        assert status == 200
        query = urlencode({"timeout": 0, "since": body["next_batch"]})
        assert (
            await call(http, proxy, "GET", f"/_matrix/client/v3/sync?{query}", token, query_token=query_token)
        )[0] == 200
    assert (
        await call(
            http, proxy, "DELETE", f"{MSC3391}/user/{me}/account_data/{KIND}", None, query_token=ALICE_TOKEN
        )
    )[0] == 200
    assert (await call(http, proxy, "PUT", data, ALICE_TOKEN, {}))[0] == 200
    # Refusals and unknown tokens.
    assert (await call(http, proxy, "GET", data, BOB_TOKEN))[0] == 403
    assert (await call(http, proxy, "GET", data, None, query_token=BOB_SHARED_TOKEN))[0] == 403
    assert (await call(http, proxy, "GET", data, "syt_unknown_authz_token"))[0] == 401
    assert (await call(http, proxy, "GET", data, None, query_token="syt_unknown_authz_token"))[0] == 401
    assert (await call(http, proxy, "GET", data, ALICE_TOKEN, query_token=ALICE_TOKEN))[0] == 401
    assert (await call(http, proxy, "GET", f"{data}?user_id={quote(ALICE)}", AS_TOKEN))[0] == 403
    # Device removal.
    assert (await call(http, proxy, "POST", "/_matrix/client/v3/logout", BOB_SHARED_TOKEN, {}))[0] == 200
    # The homeserver failing: an error answer, then down.
    hs.fault(r"/account/whoami$", status=500, body=b"oops", content_type="text/plain", times=1)
    assert (await call(http, proxy, "GET", data, None, query_token="syt_down_authz_token"))[0] == 502
    await hs.go_down()
    assert (await call(http, proxy, "GET", data, "syt_down_authz_token"))[0] == 502
    assert (await call(http, proxy, "GET", "/_fake/echo/x", None, query_token="syt_down_authz_token"))[
        0
    ] == 502
    await hs.come_up()
    # Malformed HTTP whose request line carries a token: aiohttp's parser refuses it.
    response = await raw_request(
        proxy.url, "GET", "/_matrix/client/v3/sync?access_token=syt_malformed_authz_token&x=\xe9"
    )
    assert response.status == 400


async def test_no_access_token_reaches_any_log_record(
    start_proxy: StartProxy,
    hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger propagates to it
    proxy = await start_proxy(hs.url)

    await varied_run(http, proxy, hs)

    names = {r.name for r in caplog.records}
    assert {"proxy.access", "proxy.http", "proxy.forward"} <= names, names  # the run was logged
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in caplog.records:
        text = formatter.format(record) + repr(record.__dict__)
        for secret in SECRETS:
            assert secret not in text, f"{record.name}: {record.getMessage()}"


async def test_no_access_token_reaches_the_log_of_the_proxy_process(
    hs: FakeHomeserver, http: aiohttp.ClientSession, proxy_process: Callable[..., ProxyProcess]
) -> None:
    proxy = await asyncio.to_thread(proxy_process, hs.url, True, '[proxy]\nlog_level = "DEBUG"\n')

    await varied_run(http, proxy, hs)
    await asyncio.to_thread(proxy.stop)

    log = proxy.log
    assert "proxy.access" in log and "malformed request from" in log  # the run was logged
    assert "DEBUG" in log
    for secret in SECRETS:
        assert secret not in log


async def test_the_store_layer_logs_no_user_id_nor_type_at_debug(
    start_proxy: StartProxy,
    hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG the SQLite driver would log every statement with its parameters: the
    user IDs and account data types the store holds."""
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(hs.url)

    await varied_run(http, proxy, hs)

    store_layer = [r for r in caplog.records if r.name.startswith(("aiosqlite", "proxy.store"))]
    for record in store_layer:
        text = record.getMessage() + repr(record.args)
        assert ALICE not in text and quote(ALICE) not in text, text
        assert KIND not in text, text

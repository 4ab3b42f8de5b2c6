"""Plain forwarding through the proxy in front of the real Synapse.

Everything here is the part of the proxy that does *not* involve MSC3391: requests
the proxy does not own must reach the homeserver and come back as if the proxy were
not there (streamed both ways, long-polls held, errors as they were, a dead
homeserver reported as a Matrix 502). Most tests run with the proxy's feature off and
on, since with it on the same requests first pass the route table.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import resource
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from rig.accounts import Account, register
from rig.processes import http_json
from rig.proxy_process import ProxyProcess
from rig.synapse import SynapseServer
from tests import matrix
from tests.matrix import quote

pytestmark = pytest.mark.synapse

MiB = 1024 * 1024


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    account: Account | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    """One JSON request; `url` is already percent-encoded."""
    token = account.access_token if account is not None else None
    return await matrix.call(http, method, URL(url, encoded=True), token, body)


def room_path(room_id: str) -> str:
    return f"/_matrix/client/v3/rooms/{quote(room_id)}"


# --- ordinary client traffic ------------------------------------------------------------


async def test_register_login_create_a_room_and_read_messages_back(
    synapse: SynapseServer,
    start_proxy: Callable[..., Any],
    http: aiohttp.ClientSession,
    unique_name: Callable[..., str],
    msc3391: bool,
) -> None:
    proxy = await start_proxy(synapse.url, msc3391=msc3391)
    base = proxy.url
    name = unique_name("alice")

    status, reg = await call(
        http,
        "POST",
        f"{base}/_matrix/client/v3/register",
        body={"username": name, "password": "secret-pw", "auth": {"type": "m.login.dummy"}},
    )
    assert status == 200, reg
    assert reg["user_id"] == f"@{name}:localhost"
    status, log_in = await call(
        http,
        "POST",
        f"{base}/_matrix/client/v3/login",
        body={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": name},
            "password": "secret-pw",
        },
    )
    assert status == 200, log_in
    first = Account(reg["user_id"], reg["access_token"], reg["device_id"])
    second = Account(log_in["user_id"], log_in["access_token"], log_in["device_id"])
    assert second.user_id == first.user_id and second.device_id != first.device_id

    status, whoami = await call(http, "GET", f"{base}/_matrix/client/v3/account/whoami", account=second)
    assert (status, whoami["device_id"]) == (200, second.device_id)

    status, room = await call(
        http, "POST", f"{base}/_matrix/client/v3/createRoom", account=first, body={"name": "forwarding"}
    )
    assert status == 200, room
    room_id = room["room_id"]

    sent = []
    for i in range(3):
        status, event = await call(
            http,
            "PUT",
            f"{base}{room_path(room_id)}/send/m.room.message/txn-{i}",
            account=first,
            body={"msgtype": "m.text", "body": f"message {i}"},
        )
        assert status == 200, event
        sent.append(event["event_id"])

    status, messages = await call(
        http, "GET", f"{base}{room_path(room_id)}/messages?dir=b&limit=20", account=second
    )
    assert status == 200, messages
    texts = [
        (e["event_id"], e["content"]["body"]) for e in messages["chunk"] if e["type"] == "m.room.message"
    ]
    assert texts == [(sent[2], "message 2"), (sent[1], "message 1"), (sent[0], "message 0")]


async def test_a_100_mib_upload_and_download_stream_through_unchanged(
    synapse: SynapseServer,
    start_proxy: Callable[..., Any],
    http: aiohttp.ClientSession,
    unique_name: Callable[..., str],
) -> None:
    size, chunk_size = 100 * MiB, MiB
    proxy = await start_proxy(synapse.url, msc3391=True)
    account = synapse.register(unique_name())
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // chunk_size):
            chunk = os.urandom(chunk_size)
            sent.update(chunk)
            yield chunk

    # The proxy runs in this process: had it buffered either body, the peak RSS would
    # have grown by 100 MiB.
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    async with http.post(
        f"{proxy.url}/_matrix/media/v3/upload?filename=big.bin",
        data=body(),
        # Synapse requires a Content-Length; with it aiohttp does not chunk the body.
        headers={**account.headers, "Content-Type": "application/octet-stream", "Content-Length": str(size)},
    ) as response:
        uploaded = await response.json()
        assert response.status == 200, uploaded
    server_name, media_id = uploaded["content_uri"].removeprefix("mxc://").split("/")

    received, received_size = hashlib.sha256(), 0
    async with http.get(
        f"{proxy.url}/_matrix/client/v1/media/download/{server_name}/{media_id}", headers=account.headers
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.content_length in (None, size)
        async for chunk in response.content.iter_chunked(chunk_size):
            received.update(chunk)
            received_size += len(chunk)
    assert received_size == size
    assert received.hexdigest() == sent.hexdigest()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak_after - peak_before < 50 * MiB


async def test_a_long_poll_sync_is_held_and_woken_by_another_clients_event(
    synapse: SynapseServer,
    start_proxy: Callable[..., Any],
    http: aiohttp.ClientSession,
    unique_name: Callable[..., str],
    msc3391: bool,
) -> None:
    proxy = await start_proxy(synapse.url, msc3391=msc3391)
    alice, bob = synapse.register(unique_name("alice")), synapse.register(unique_name("bob"))
    status, room = http_json(
        "POST",
        f"{synapse.url}/_matrix/client/v3/createRoom",
        {"preset": "public_chat"},
        token=alice.access_token,
    )
    assert status == 200, room
    room_id = room["room_id"]
    status, _ = http_json("POST", f"{synapse.url}{room_path(room_id)}/join", {}, token=bob.access_token)
    assert status == 200

    async def sync(since: str | None, timeout_ms: int) -> dict[str, Any]:
        query = f"?timeout={timeout_ms}" + (f"&since={since}" if since else "")
        status, body = await call(http, "GET", f"{proxy.url}/_matrix/client/v3/sync{query}", account=bob)
        assert status == 200, body
        return body

    since = (await sync(None, 0))["next_batch"]
    # Until a long-poll runs its whole timeout, there was still news (such as Bob's
    # own join); after that, only something new can end one early.
    for _ in range(10):
        started = time.monotonic()
        since = (await sync(since, 1000))["next_batch"]
        if time.monotonic() - started >= 0.9:
            break
    else:
        pytest.fail("every 1 s long-poll returned early: the sync stream never went quiet")

    poll = asyncio.ensure_future(sync(since, 30_000))
    done, _ = await asyncio.wait({poll}, timeout=1.0)
    assert not done, f"the long-poll returned with nothing new: {poll.result()}"

    sent_at = time.monotonic()
    status, event = await call(
        http,
        "PUT",
        f"{synapse.url}{room_path(room_id)}/send/m.room.message/wake-up",
        account=alice,
        body={"msgtype": "m.text", "body": "wake up"},
    )
    assert status == 200, event
    body = await asyncio.wait_for(poll, timeout=20)
    woke_after = time.monotonic() - sent_at
    timeline = body["rooms"]["join"][room_id]["timeline"]["events"]
    assert event["event_id"] in [e["event_id"] for e in timeline]
    # Far below the 30 s timeout: the event ended the long-poll.
    assert woke_after < 5, f"the long-poll took {woke_after:.1f} s to return after the event"


async def test_a_long_poll_longer_than_the_read_timeout_runs_its_course(
    synapse: SynapseServer,
    start_proxy: Callable[..., Any],
    http: aiohttp.ClientSession,
    unique_name: Callable[..., str],
    msc3391: bool,
) -> None:
    # read_timeout is for ordinary requests; a /sync may stay silent for its own
    # `timeout` plus sync_timeout_margin.
    proxy = await start_proxy(synapse.url, msc3391=msc3391, upstream={"read_timeout": 1})
    account = synapse.register(unique_name())
    status, first = await call(http, "GET", f"{proxy.url}/_matrix/client/v3/sync?timeout=0", account=account)
    assert status == 200, first
    started = time.monotonic()
    status, body = await call(
        http,
        "GET",
        f"{proxy.url}/_matrix/client/v3/sync?since={first['next_batch']}&timeout=2500",
        account=account,
    )
    assert status == 200, body
    assert time.monotonic() - started >= 2.4  # it was held for the whole long-poll


# --- the proxy is invisible ---------------------------------------------------------------

# Per connection, or set by whichever server wrote the response.
_HOP_HEADERS = {"date", "connection", "keep-alive", "transfer-encoding", "content-length"}


async def fetch(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], body: bytes | None
) -> tuple[int, bytes, list[tuple[str, str]], int | None]:
    async with http.request(method, URL(url, encoded=True), headers=headers, data=body) as response:
        raw = await response.read()
        kept = sorted((k.lower(), v) for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS)
        return response.status, raw, kept, response.content_length


async def test_responses_with_msc3391_off_are_synapses_own(
    synapse: SynapseServer,
    start_proxy: Callable[..., Any],
    http: aiohttp.ClientSession,
    unique_name: Callable[..., str],
) -> None:
    proxy = await start_proxy(synapse.url, msc3391=False)
    account = synapse.register(unique_name())
    user = quote(account.user_id)
    auth = account.headers
    json_type = {"Content-Type": "application/json"}
    requests: list[tuple[str, str, dict[str, str], bytes | None]] = [
        ("GET", "/_matrix/client/versions", {}, None),
        ("GET", "/_matrix/client/v3/login", {}, None),
        ("GET", "/_matrix/client/v3/account/whoami", auth, None),
        ("GET", f"/_matrix/client/v3/profile/{user}", auth, None),
        ("GET", f"/_matrix/client/v3/user/{user}/account_data/org.example.nothing", auth, None),
        ("PUT", f"/_matrix/client/v3/user/{user}/account_data/org.example.x", {**auth, **json_type}, b"{"),
        ("GET", "/_matrix/client/v3/no/such/endpoint", auth, None),
        ("GET", f"/_matrix/client/v3/rooms/{quote('!nope:localhost')}/messages", auth, None),
        ("DELETE", f"/_matrix/client/unstable/org.matrix.msc3391/user/{user}/account_data/x", auth, None),
    ]
    for method, path, headers, body in requests:
        direct = await fetch(http, method, synapse.url + path, headers, body)
        proxied = await fetch(http, method, proxy.url + path, headers, body)
        assert proxied == direct, f"{method} {path}"


async def test_authentication_errors_come_back_as_synapse_sent_them(
    synapse: SynapseServer,
    start_proxy: Callable[..., Any],
    http: aiohttp.ClientSession,
    unique_name: Callable[..., str],
    msc3391: bool,
) -> None:
    proxy = await start_proxy(synapse.url, msc3391=msc3391)
    user = quote(f"@{unique_name()}:localhost")
    paths = [
        "/_matrix/client/v3/account/whoami",
        "/_matrix/client/v3/sync?timeout=0",
        "/_matrix/client/v3/joined_rooms",
        f"/_matrix/client/v3/user/{user}/account_data/org.example.x",
    ]
    for credentials in ({}, {"Authorization": "Bearer not-a-token"}):
        for path in paths:
            direct = await fetch(http, "GET", synapse.url + path, credentials, None)
            proxied = await fetch(http, "GET", proxy.url + path, credentials, None)
            assert direct[0] == 401
            if msc3391:
                # The proxy's own routes relay the homeserver's answer to whoami: the
                # status and body are Synapse's, the headers its own.
                assert proxied[:2] == direct[:2], path
                assert dict(proxied[2])["content-type"] == dict(direct[2])["content-type"]
            else:
                assert proxied == direct, path


async def test_with_synapse_stopped_every_request_is_a_matrix_502(
    synapse_factory: Callable[..., SynapseServer],
    start_proxy: Callable[..., Any],
    http: aiohttp.ClientSession,
) -> None:
    homeserver = synapse_factory()
    account = homeserver.register("alice")
    proxies = [
        await start_proxy(homeserver.url, msc3391=False),
        await start_proxy(homeserver.url, msc3391=True),
    ]
    for proxy in proxies:  # working, and (with the feature on) the identity cached
        status, _ = await call(http, "GET", f"{proxy.url}/_matrix/client/v3/account/whoami", account=account)
        assert status == 200
    homeserver.stop()

    user = quote(account.user_id)
    requests: list[tuple[str, str, Any]] = [
        ("GET", "/_matrix/client/versions", None),
        ("GET", "/_matrix/client/v3/account/whoami", None),
        ("POST", "/_matrix/client/v3/register", {"username": "bob", "auth": {"type": "m.login.dummy"}}),
        ("GET", "/_matrix/client/v3/sync?timeout=0", None),
        ("GET", "/_matrix/client/v3/sync?timeout=0&since=s1_1", None),
        ("PUT", f"/_matrix/client/v3/user/{user}/account_data/org.example.x", {"a": 1}),
        ("GET", f"/_matrix/client/v3/user/{user}/account_data/org.example.x", None),
        (
            "DELETE",
            f"/_matrix/client/unstable/org.matrix.msc3391/user/{user}/account_data/org.example.x",
            None,
        ),
        ("POST", "/_matrix/media/v3/upload", None),
    ]
    for proxy in proxies:
        for method, path, body in requests:
            async with http.request(
                method, URL(proxy.url + path, encoded=True), headers=account.headers, json=body
            ) as response:
                raw = await response.read()
                where = f"{method} {path} (msc3391 {proxy.config.msc3391_enabled})"
                assert response.status == 502, f"{where}: {response.status} {raw!r}"
                assert response.content_type == "application/json", where
                error = json.loads(raw)
                assert error["errcode"] == "M_UNKNOWN", where
                assert isinstance(error["error"], str) and error["error"], where
                # No internal address in what the client sees.
                assert homeserver.url.split("//")[1] not in raw.decode(), where


# --- the proxy as a process -----------------------------------------------------------------


def test_the_proxy_process_serves_a_round_trip_and_logs_without_tokens(
    synapse: SynapseServer,
    proxy_process: Callable[..., ProxyProcess],
    unique_name: Callable[..., str],
) -> None:
    proxy = proxy_process(synapse.url, msc3391=True)
    assert proxy.running

    status, versions = http_json("GET", f"{proxy.url}/_matrix/client/versions")
    assert status == 200 and versions["unstable_features"]["org.matrix.msc3391"] is True
    account = register(proxy.url, unique_name())
    user = quote(account.user_id)
    # The token in the query string, where an access log would show it.
    status, whoami = http_json(
        "GET", f"{proxy.url}/_matrix/client/v3/account/whoami?access_token={account.access_token}"
    )
    assert (status, whoami["user_id"]) == (200, account.user_id)
    data_url = f"{proxy.url}/_matrix/client/v3/user/{user}/account_data/org.example.round_trip"
    assert http_json("PUT", data_url, {"n": 1}, token=account.access_token) == (200, {})
    assert http_json("GET", data_url, token=account.access_token) == (200, {"n": 1})

    proxy.stop()
    assert proxy.process is not None and proxy.process.returncode == 0
    log = proxy.log
    assert f"listening on {proxy.url}, forwarding to {synapse.url}" in log
    # One access line per request (query redacted or left out), and never the token.
    assert re.search(r"GET /_matrix/client/v3/account/whoami\S* 200 ", log), log
    assert account.access_token not in log

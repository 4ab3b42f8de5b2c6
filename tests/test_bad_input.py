"""The bad input matrix, through the proxy with MSC3391 on.

`MATRIX_ERRORS` is every malformed request the proxy itself answers with a Matrix
error: bodies (not JSON, not an object, invalid UTF-8, NaN, nested 10,000 deep, larger
than `proxy.max_body_size`), user IDs (malformed, double-encoded, another user's,
another server's), room IDs, types that cannot be set, and access tokens (missing,
unknown, in both places: the homeserver's own answer, relayed). Each row is run in
front of the fake homeserver, asserting the exact status and errcode and that
nothing changed (the store, the homeserver's account data) and nothing but whoami
reached the homeserver; and, where cheap, directly against a real Synapse and
through the proxy in front of it, asserting that both answer the same bytes
(`tests/test_bad_input_synapse.py`). The rows are in `tests/bad_input_cases.py`.

`ACCEPTED` is input that looks odd but is valid (duplicate keys, `%2F` or unicode in
a type, an empty or a 12 KiB type, unencoded user IDs, ...): it must do exactly what
Synapse does with it, checked for what ends up stored.

`FRAMING` is HTTP that aiohttp's parser refuses (conflicting Content-Length and
Transfer-Encoding, a 64 KiB type, ...): `400 M_UNKNOWN` before any handler runs, and
nothing forwarded. Slow clients, trickling headers or an owned body, are cut off after
`proxy.client_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.server import ProxyServer
from tests.bad_input_cases import (
    ACCEPTED,
    ALICE_TOKEN,
    EXISTING,
    KIND,
    MATRIX_ERRORS,
    MAX_BODY,
    OBJECT,
    TOO_LARGE,
    request_for,
    user_ids,
)
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver
from tests.matrix import ALICE, BOB, MSC3391, V3
from tests.raw_http import raw_request
from tests.store_check import assert_consistent, snapshot

# --- in front of the fake homeserver -------------------------------------------------------


@pytest.fixture
def hs(fake_hs: FakeHomeserver) -> FakeHomeserver:
    fake_hs.add_device(ALICE, "ALICE1", token=ALICE_TOKEN)
    fake_hs.add_device(ALICE, "ALICE2")
    fake_hs.add_device(BOB, "BOB1")
    fake_hs.set_account_data(ALICE, KIND, {"before": True})
    fake_hs.set_account_data(ALICE, EXISTING, {"old": 1})
    fake_hs.set_account_data(BOB, KIND, {"bob": True})
    fake_hs.join(ALICE, "!r:localhost")
    return fake_hs


@pytest.fixture
async def proxy(start_proxy: StartProxy, hs: FakeHomeserver) -> ProxyServer:
    return await start_proxy(hs.url, proxy={"max_body_size": MAX_BODY, "client_timeout": 1.0})


@dataclass
class Before:
    """What must not change: the homeserver's account data and the proxy's store."""

    account_data: Any
    store: Any
    requests: int


def before(hs: FakeHomeserver, proxy: ProxyServer) -> Before:
    data = copy.deepcopy((hs.global_account_data, hs.room_account_data, hs.stream_id))
    return Before(data, snapshot(proxy.config.store.path), len(hs.requests))


def assert_unchanged(hs: FakeHomeserver, proxy: ProxyServer, was: Before, *, whoami: bool) -> None:
    assert (hs.global_account_data, hs.room_account_data, hs.stream_id) == was.account_data
    assert snapshot(proxy.config.store.path) == was.store
    reached = [r.path for r in hs.requests[was.requests :]]
    expected = ["/_matrix/client/v3/account/whoami"] if whoami else []
    assert reached == expected


@pytest.mark.parametrize(
    ("method", "template", "credentials", "body", "status", "errcode"),
    [row[1:] for row in MATRIX_ERRORS],
    ids=[row[0] for row in MATRIX_ERRORS],
)
async def test_bad_input_gets_its_matrix_error_and_changes_nothing(
    proxy: ProxyServer,
    hs: FakeHomeserver,
    method: str,
    template: str,
    credentials: str,
    body: bytes | None,
    status: int,
    errcode: str,
) -> None:
    target, headers = request_for(template, credentials, ALICE_TOKEN, user_ids(ALICE))
    was = before(hs, proxy)

    response = await raw_request(proxy.url, method, target, headers, body or b"")

    assert response.status == status, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()
    assert error["errcode"] == errcode
    assert isinstance(error["error"], str) and error["error"]
    assert_unchanged(hs, proxy, was, whoami=True)


@pytest.mark.parametrize(
    ("method", "template", "body", "status", "then"),
    [row[1:] for row in ACCEPTED],
    ids=[row[0] for row in ACCEPTED],
)
async def test_odd_but_valid_input_is_served_as_synapse_serves_it(
    proxy: ProxyServer,
    hs: FakeHomeserver,
    method: str,
    template: str,
    body: bytes,
    status: int,
    then: tuple[str, str | None, Any],
) -> None:
    target, headers = request_for(template, "token", ALICE_TOKEN, user_ids(ALICE))

    response = await raw_request(proxy.url, method, target, headers, body)

    assert (response.status, response.json()) == (status, {})
    kind, room, content = then
    assert hs.account_data(ALICE, kind, room) == content
    state = assert_consistent(
        proxy.config.store.path, lambda user, room, kind: bool(hs.account_data(user, kind, room))
    )
    # A delete is tracked for the account's other device under the decoded type.
    assert state.rows_of(ALICE) == ({(room, kind, "ALICE2")} if content == {} else set())


async def test_a_type_with_2f_is_deleted_under_its_own_name(proxy: ProxyServer, hs: FakeHomeserver) -> None:
    """`%2F` stays inside the type on the way to the homeserver: the proxy's own write
    does not split it into two path segments (and escapes nothing a path segment may
    hold as it is, such as the `@` and `:` of a user ID)."""
    hs.set_account_data(ALICE, "m.a/b", {"x": 1})
    target, headers = request_for(
        f"{MSC3391}/user/{{me}}/account_data/m.a%2Fb", "token", ALICE_TOKEN, user_ids(ALICE)
    )

    response = await raw_request(proxy.url, "DELETE", target, headers)

    assert response.status == 200
    assert hs.account_data(ALICE, "m.a/b") == {}
    assert [r.raw_path for r in hs.requests_to(r"/account_data/", method="PUT")] == [
        f"{V3}/user/@alice:localhost/account_data/m.a%2Fb"
    ]
    assert snapshot(proxy.config.store.path).rows_of(ALICE) == {(None, "m.a/b", "ALICE2")}


# --- HTTP framing: aiohttp's parser refuses it before any handler runs ------------------------


def _head(method: str, target: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {target} HTTP/1.1", "Host: proxy", *headers, "", ""]).encode("latin-1")


_OWNED = f"{V3}/user/%40alice%3Alocalhost/account_data/{KIND}"
_AUTH = f"Authorization: Bearer {ALICE_TOKEN}"

# (what, the request's bytes, status, errcode): the parser's refusals are answered
# `400 M_UNKNOWN` (see `test_hostile_requests` for what the answer must never echo).
FRAMING: list[tuple[str, bytes, int, str]] = [
    (
        "Content-Length and Transfer-Encoding both",
        _head("PUT", _OWNED, _AUTH, "Content-Length: 8", "Transfer-Encoding: chunked")
        + b'8\r\n{"x": 1}\r\n0\r\n\r\n',
        400,
        "M_UNKNOWN",
    ),
    (
        "two different Content-Lengths",
        _head("PUT", _OWNED, _AUTH, "Content-Length: 8", "Content-Length: 7") + OBJECT,
        400,
        "M_UNKNOWN",
    ),
    (
        "Content-Length not a number",
        _head("PUT", _OWNED, _AUTH, "Content-Length: eight") + OBJECT,
        400,
        "M_UNKNOWN",
    ),
    (
        "a chunk size that is not hex",
        _head("PUT", _OWNED, _AUTH, "Transfer-Encoding: chunked") + b'zz\r\n{"x": 1}\r\n0\r\n\r\n',
        400,
        "M_UNKNOWN",
    ),
    ("a NUL byte in a header", _head("GET", _OWNED, _AUTH, "X-Bad: a\x00b"), 400, "M_UNKNOWN"),
    ("a raw non-ASCII byte in the path", _head("GET", _OWNED + "\xe9", _AUTH), 400, "M_UNKNOWN"),
    ("a space in the request target", _head("GET", f"{V3}/user/a b/account_data/x", _AUTH), 400, "M_UNKNOWN"),
    (
        "a 64 KiB type (a request line over 16 KiB)",
        _head("GET", f"{V3}/user/%40alice%3Alocalhost/account_data/{'t' * 65536}", _AUTH),
        400,
        "M_UNKNOWN",
    ),
    ("a 20 KiB header", _head("GET", _OWNED, _AUTH, "X-Big: " + "b" * 20480), 400, "M_UNKNOWN"),
    (
        "a chunked body larger than max_body_size",
        _head("PUT", _OWNED, _AUTH, "Transfer-Encoding: chunked")
        + f"{len(TOO_LARGE):x}\r\n".encode()
        + TOO_LARGE
        + b"\r\n0\r\n\r\n",
        413,
        "M_TOO_LARGE",
    ),
]


async def exchange(base: str, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are; read one response (status and body)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(
                int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length"
            )
            return int(lines[0].split(" ")[1]), await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize(
    ("data", "status", "errcode"), [row[1:] for row in FRAMING], ids=[row[0] for row in FRAMING]
)
async def test_malformed_http_is_refused_and_nothing_is_forwarded(
    proxy: ProxyServer, hs: FakeHomeserver, data: bytes, status: int, errcode: str
) -> None:
    was = before(hs, proxy)

    answer, body = await exchange(proxy.url, data)

    assert answer == status
    assert json.loads(body)["errcode"] == errcode
    # The 413 is the proxy's own (the handler ran: whoami, then the body's size).
    assert_unchanged(hs, proxy, was, whoami=status == 413)


# --- slow clients ------------------------------------------------------------------------------


@dataclass
class Trickled:
    answer: bytes  # everything the proxy sent
    answered_after: float | None  # seconds until its first byte, None if it sent none
    closed_after: float  # seconds until it closed the connection


async def trickle(base: str, pieces: list[bytes], interval: float) -> Trickled:
    """Send `pieces` one at a time, `interval` apart, while reading; stop when the
    proxy closes the connection."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(interval)

    sending = asyncio.ensure_future(send())
    try:
        answer = b""
        answered_after = None
        while chunk := await reader.read(65536):  # until the proxy closes the connection
            answered_after = answered_after or loop.time() - started
            answer += chunk
        return Trickled(answer, answered_after, loop.time() - started)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_client_trickling_its_headers_is_cut_off_after_client_timeout(
    proxy: ProxyServer, hs: FakeHomeserver
) -> None:
    was = before(hs, proxy)
    head = _head("PUT", _OWNED, _AUTH, "Content-Length: 8")
    # One byte every 0.1 s: the whole head would take over a minute to arrive.
    async with asyncio.timeout(15):
        trickled = await trickle(proxy.url, [bytes([b]) for b in head], 0.1)

    assert trickled.answer == b""
    assert 1.0 <= trickled.closed_after < 5
    assert_unchanged(hs, proxy, was, whoami=False)


async def test_a_client_trickling_an_owned_body_gets_408_after_client_timeout(
    proxy: ProxyServer, hs: FakeHomeserver
) -> None:
    was = before(hs, proxy)
    body = b'{"a": "' + b"x" * 100 + b'"}'
    head = _head("PUT", _OWNED, _AUTH, f"Content-Length: {len(body)}")
    async with asyncio.timeout(15):
        trickled = await trickle(proxy.url, [head, *(bytes([b]) for b in body)], 0.1)

    status_line, _, rest = trickled.answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    assert rest.endswith(b'{"errcode":"M_UNKNOWN","error":"The request body did not arrive in time"}')
    assert b"Connection: close" in rest
    # Answered once client_timeout is spent; closed after at most as long again (aiohttp
    # drains the unread body for `lingering_time`, bounded by the same timeout).
    assert trickled.answered_after is not None and 1.0 <= trickled.answered_after < 5
    assert trickled.closed_after < trickled.answered_after + 3
    assert hs.account_data(ALICE, KIND) == {"before": True}
    assert_unchanged(hs, proxy, was, whoami=True)

"""The bad input matrix, through the proxy with MSC3391 on.

`MATRIX_ERRORS` is every malformed request the proxy itself answers with a Matrix
error: bodies (not JSON, not an object, invalid UTF-8, NaN, nested 10,000 deep, larger
than `proxy.max_body_size`), user IDs (malformed, double-encoded, another user's,
another server's), room IDs, types that cannot be set, and access tokens (missing,
unknown, in both places: the homeserver's own answer, relayed). Each row is run in
front of the fake homeserver, asserting the exact status and errcode and that
nothing changed (the store, the homeserver's account data) and nothing but whoami
reached the homeserver; and, where cheap, directly against a real Synapse and
through the proxy in front of it, asserting that both answer the same bytes.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from proxy.server import ProxyServer
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver
from tests.raw_http import raw_request
from tests.store_check import assert_consistent, snapshot
from tests.synapse_rig import SynapseServer

ALICE, ALICE_TOKEN = "@alice:localhost", "syt_bad_input_alice"
BOB = "@bob:localhost"
KIND = "org.example.bad"
EXISTING = "org.example.existing"  # set before every row; the one deletes act on
MAX_BODY = 65536

V3 = "/_matrix/client/v3"
MSC3391 = "/_matrix/client/unstable/org.matrix.msc3391"
# Targets are templates: {me} is the caller's own user ID, percent-encoded; the other
# fields are the variants `user_ids()` makes of it.
DATA = f"{V3}/user/{{me}}/account_data/{KIND}"
DELETE = f"{MSC3391}/user/{{me}}/account_data/{EXISTING}"


def room_data(room: str, kind: str = KIND) -> str:
    return f"{V3}/user/{{me}}/rooms/{room}/account_data/{kind}"


def user_data(user_field: str, prefix: str = V3, kind: str = KIND) -> str:
    return f"{prefix}/user/{{{user_field}}}/account_data/{kind}"


def user_ids(user_id: str) -> dict[str, str]:
    localpart, server = user_id[1:].split(":", 1)
    return {
        "me": quote(user_id, safe=""),
        "me_raw": user_id,
        "me_partly": f"@{localpart}%3A{server}",
        "me_lower": quote(user_id, safe="").lower(),
        "me_bare": quote(f"{localpart}:{server}", safe=""),
        "me_local": localpart,
        "me_twice": quote(quote(user_id, safe=""), safe=""),
        "me_elsewhere": quote(f"@{localpart}:other.example", safe=""),
        "me_upper": quote(f"@{localpart.upper()}:{server}", safe=""),
        "me_newline": quote(user_id + "\n", safe=""),
        "bob": quote(BOB, safe=""),
    }


DEEP_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
DEEP_LIST_IN_OBJECT = b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
TOO_LARGE = b'{"a":"' + b"x" * MAX_BODY + b'"}'
OBJECT = b'{"x": 1}'

# (what, method, target, credentials, body, status, errcode)
# credentials: "token" (Authorization: Bearer), "none", "unknown" (a token the homeserver
# does not know), "both" (header and ?access_token=), "basic" (not a Bearer header).
MATRIX_ERRORS: list[tuple[str, str, str, str, bytes | None, int, str]] = [
    # --- bodies
    ("body not JSON", "PUT", DATA, "token", b"{not json", 400, "M_NOT_JSON"),
    ("body empty", "PUT", DATA, "token", b"", 400, "M_NOT_JSON"),
    ("body a JSON array", "PUT", DATA, "token", b"[1, 2]", 400, "M_BAD_JSON"),
    ("body a JSON string", "PUT", DATA, "token", b'"text"', 400, "M_BAD_JSON"),
    ("body JSON null", "PUT", DATA, "token", b"null", 400, "M_BAD_JSON"),
    ("body with NaN", "PUT", DATA, "token", b'{"a": NaN}', 400, "M_NOT_JSON"),
    ("body invalid UTF-8", "PUT", DATA, "token", b'{"a": "\xff\xfe"}', 400, "M_NOT_JSON"),
    ("body UTF-16", "PUT", DATA, "token", '{"a": 1}'.encode("utf-16"), 400, "M_NOT_JSON"),
    ("body nested 10,000 deep", "PUT", DATA, "token", DEEP_OBJECT, 400, "M_NOT_JSON"),
    ("body a list nested 10,000 deep", "PUT", DATA, "token", DEEP_LIST_IN_OBJECT, 400, "M_NOT_JSON"),
    ("body larger than max_body_size", "PUT", DATA, "token", TOO_LARGE, 413, "M_TOO_LARGE"),
    # --- user IDs: Synapse compares the decoded path segment with the caller, exactly
    ("user ID of another user, PUT", "PUT", user_data("bob"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID of another user, GET", "GET", user_data("bob"), "token", None, 403, "M_FORBIDDEN"),
    (
        "user ID of another user, DELETE",
        "DELETE",
        user_data("bob", MSC3391),
        "token",
        None,
        403,
        "M_FORBIDDEN",
    ),
    ("user ID on another server", "PUT", user_data("me_elsewhere"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID without its sigil", "PUT", user_data("me_bare"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID a bare localpart", "DELETE", user_data("me_local", MSC3391), "token", None, 403, "M_FORBIDDEN"),
    ("user ID percent-encoded twice", "PUT", user_data("me_twice"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID in upper case", "GET", user_data("me_upper"), "token", None, 403, "M_FORBIDDEN"),
    ("user ID with a trailing newline", "PUT", user_data("me_newline"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID empty", "PUT", f"{V3}/user//account_data/{KIND}", "token", OBJECT, 403, "M_FORBIDDEN"),
    # --- room IDs
    ("room ID without its sigil", "PUT", room_data("notaroom"), "token", OBJECT, 400, "M_INVALID_PARAM"),
    ("room ID without a server", "PUT", room_data("%21nocolon"), "token", OBJECT, 400, "M_INVALID_PARAM"),
    ("room ID with an empty server", "PUT", room_data("%21r%3A"), "token", OBJECT, 400, "M_INVALID_PARAM"),
    ("room ID with a space", "PUT", room_data("%21r%3Abad%20host"), "token", OBJECT, 400, "M_INVALID_PARAM"),
    (
        "room ID with a newline",
        "PUT",
        room_data("%21r%3Alocalhost%0A"),
        "token",
        OBJECT,
        400,
        "M_INVALID_PARAM",
    ),
    ("room ID empty", "PUT", room_data(""), "token", OBJECT, 400, "M_INVALID_PARAM"),
    ("room ID malformed, GET", "GET", room_data("notaroom"), "token", None, 400, "M_INVALID_PARAM"),
    (
        "room ID malformed, DELETE",
        "DELETE",
        f"{MSC3391}/user/{{me}}/rooms/notaroom/account_data/{KIND}",
        "token",
        None,
        400,
        "M_INVALID_PARAM",
    ),
    (
        "room ID malformed and another user's ID: the user is checked first",
        "PUT",
        f"{V3}/user/{{bob}}/rooms/notaroom/account_data/{KIND}",
        "token",
        OBJECT,
        403,
        "M_FORBIDDEN",
    ),
    # --- types
    (
        "type m.fully_read, PUT",
        "PUT",
        user_data("me", kind="m.fully_read"),
        "token",
        OBJECT,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.fully_read, DELETE",
        "DELETE",
        user_data("me", MSC3391, "m.fully_read"),
        "token",
        None,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.push_rules, PUT",
        "PUT",
        user_data("me", kind="m.push_rules"),
        "token",
        OBJECT,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.push_rules, PUT {}",
        "PUT",
        user_data("me", kind="m.push_rules"),
        "token",
        b"{}",
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.push_rules, DELETE",
        "DELETE",
        user_data("me", MSC3391, "m.push_rules"),
        "token",
        None,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.fully_read in a room, DELETE",
        "DELETE",
        f"{MSC3391}/user/{{me}}/rooms/%21r%3Alocalhost/account_data/m.fully_read",
        "token",
        None,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.fully_read with a body that is not JSON: the type is checked first",
        "PUT",
        user_data("me", kind="m.fully_read"),
        "token",
        b"not json",
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.fully_read in a malformed room: the room is checked first",
        "PUT",
        room_data("notaroom", "m.fully_read"),
        "token",
        OBJECT,
        400,
        "M_INVALID_PARAM",
    ),
    # --- access tokens: the homeserver's answer to whoami, relayed
    ("no access token", "PUT", DATA, "none", OBJECT, 401, "M_MISSING_TOKEN"),
    ("no access token, DELETE", "DELETE", DELETE, "none", None, 401, "M_MISSING_TOKEN"),
    ("unknown access token", "PUT", DATA, "unknown", OBJECT, 401, "M_UNKNOWN_TOKEN"),
    ("unknown access token, DELETE", "DELETE", DELETE, "unknown", None, 401, "M_UNKNOWN_TOKEN"),
    ("access token in header and query", "DELETE", DELETE, "both", None, 401, "M_MISSING_TOKEN"),
    ("Authorization not Bearer", "GET", DATA, "basic", None, 401, "M_MISSING_TOKEN"),
]

# Rows whose answer is the proxy's own choice rather than Synapse's (Synapse reads far
# larger bodies): not compared with Synapse.
PROXY_ONLY = {"body larger than max_body_size"}


def request_for(
    template: str, credentials: str, token: str, fields: dict[str, str]
) -> tuple[str, list[tuple[str, str]]]:
    target = template.format(**fields)
    headers = [("Content-Type", "application/json")]
    if credentials in ("token", "both"):
        headers.append(("Authorization", f"Bearer {token}"))
    elif credentials == "unknown":
        headers.append(("Authorization", "Bearer syt_nobody_knows_this_token"))
    elif credentials == "basic":
        headers.append(("Authorization", "Basic YWxpY2U6c2VjcmV0"))
    if credentials == "both":
        target += ("&" if "?" in target else "?") + f"access_token={token}"
    return target, headers


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


# (what, method, target, body, status, then: (type, room or None, what the homeserver holds))
ACCEPTED: list[tuple[str, str, str, bytes, int, tuple[str, str | None, Any]]] = [
    ("duplicate keys: the last one wins", "PUT", DATA, b'{"a": 1, "a": 2}', 200, (KIND, None, {"a": 2})),
    (
        "an empty object written with whitespace is a delete",
        "PUT",
        user_data("me", kind=EXISTING),
        b" {\n} ",
        200,
        (EXISTING, None, {}),
    ),
    ("a DELETE's body is ignored", "DELETE", DELETE, b"not json at all", 200, (EXISTING, None, {})),
    ("%2F in a type", "PUT", user_data("me", kind="m.a%2Fb"), OBJECT, 200, ("m.a/b", None, {"x": 1})),
    (
        "unicode in a type",
        "PUT",
        user_data("me", kind=quote("m.é✓", safe="")),
        OBJECT,
        200,
        ("m.é✓", None, {"x": 1}),
    ),
    (
        "an invalid UTF-8 escape in a type is U+FFFD, as in Synapse",
        "PUT",
        user_data("me", kind="m.%FF"),
        OBJECT,
        200,
        ("m.\ufffd", None, {"x": 1}),
    ),
    ("an empty type", "PUT", user_data("me", kind=""), OBJECT, 200, ("", None, {"x": 1})),
    ("a 12 KiB type", "PUT", user_data("me", kind="t" * 12288), OBJECT, 200, ("t" * 12288, None, {"x": 1})),
    ("user ID not percent-encoded", "PUT", user_data("me_raw"), OBJECT, 200, (KIND, None, {"x": 1})),
    ("user ID partly percent-encoded", "PUT", user_data("me_partly"), OBJECT, 200, (KIND, None, {"x": 1})),
    ("lower-case percent escapes", "PUT", user_data("me_lower"), OBJECT, 200, (KIND, None, {"x": 1})),
    ("r0 prefix", "PUT", user_data("me", "/_matrix/client/r0"), OBJECT, 200, (KIND, None, {"x": 1})),
    (
        "unstable prefix",
        "PUT",
        user_data("me", "/_matrix/client/unstable"),
        OBJECT,
        200,
        (KIND, None, {"x": 1}),
    ),
    (
        "a room on another server (no membership check, as in Synapse)",
        "PUT",
        room_data("%21r%3Aother.example"),
        OBJECT,
        200,
        (KIND, "!r:other.example", {"x": 1}),
    ),
    (
        "a room ID percent-encoded or not",
        "PUT",
        room_data("!r:localhost"),
        OBJECT,
        200,
        (KIND, "!r:localhost", {"x": 1}),
    ),
]


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


# --- the same rows against a real Synapse --------------------------------------------------------


@dataclass
class SynapseSide:
    """One user on two Synapses: the reference (its own MSC3391 flag on, asked directly)
    and the one behind the proxy (flag off), so that both answer every route."""

    reference: SynapseServer
    proxy: ProxyServer
    behind: SynapseServer
    user_id: str
    reference_token: str
    token: str


@pytest.fixture
async def side(
    start_proxy: StartProxy,
    synapse: SynapseServer,
    synapse_msc3391: SynapseServer,
    unique_name: Callable[[str], str],
) -> SynapseSide:
    proxy = await start_proxy(synapse.url)
    name = unique_name("bad")
    account = await asyncio.to_thread(synapse.register, name)
    await asyncio.to_thread(synapse.login, name)  # a second device, so deletes have rows
    reference = await asyncio.to_thread(synapse_msc3391.register, name)
    assert reference.user_id == account.user_id
    return SynapseSide(
        synapse_msc3391, proxy, synapse, account.user_id, reference.access_token, account.access_token
    )


async def synapse_holds(side: SynapseSide, kind: str, room: str | None) -> Any:
    """What the Synapse behind the proxy stores for the type (None: nothing)."""
    path = f"{V3}/user/{quote(side.user_id, safe='')}"
    if room is not None:
        path += f"/rooms/{quote(room, safe='')}"
    headers = [("Authorization", f"Bearer {side.token}")]
    response = await raw_request(
        side.behind.url, "GET", f"{path}/account_data/{quote(kind, safe='')}", headers
    )
    return response.json() if response.status == 200 else None


async def seed(side: SynapseSide) -> None:
    fields = user_ids(side.user_id)
    for url, token in ((side.reference.url, side.reference_token), (side.proxy.url, side.token)):
        for kind, content in ((KIND, {"before": True}), (EXISTING, {"old": 1})):
            target, headers = request_for(user_data("me", kind=kind), "token", token, fields)
            response = await raw_request(url, "PUT", target, headers, json.dumps(content).encode())
            assert response.status == 200


@pytest.mark.synapse
async def test_every_matrix_error_row_is_answered_as_synapse_answers_it(side: SynapseSide) -> None:
    await seed(side)
    fields = user_ids(side.user_id)
    for what, method, template, credentials, body, status, errcode in MATRIX_ERRORS:
        if what in PROXY_ONLY:
            continue
        target, headers = request_for(template, credentials, side.reference_token, fields)
        direct = await raw_request(side.reference.url, method, target, headers, body or b"")
        target, headers = request_for(template, credentials, side.token, fields)
        proxied = await raw_request(side.proxy.url, method, target, headers, body or b"")

        assert (direct.status, direct.json()["errcode"]) == (status, errcode), what
        assert (proxied.status, proxied.body) == (direct.status, direct.body), what

    assert await synapse_holds(side, KIND, None) == {"before": True}
    assert await synapse_holds(side, EXISTING, None) == {"old": 1}
    assert snapshot(side.proxy.config.store.path).empty


@pytest.mark.synapse
async def test_odd_but_valid_input_is_stored_by_synapse_as_expected(side: SynapseSide) -> None:
    fields = user_ids(side.user_id)
    for what, method, template, body, status, (kind, room, content) in ACCEPTED:
        target, headers = request_for(user_data("me", kind=EXISTING), "token", side.token, fields)
        assert (await raw_request(side.proxy.url, "PUT", target, headers, b'{"old": 1}')).status == 200
        target, headers = request_for(template, "token", side.token, fields)

        response = await raw_request(side.proxy.url, method, target, headers, body)

        assert (response.status, response.json()) == (status, {}), what
        assert await synapse_holds(side, kind, room) == content, what


@pytest.mark.synapse
async def test_head_of_a_deleted_type_is_404_as_synapse_answers_it(side: SynapseSide) -> None:
    """Synapse serves HEAD with its GET servlet: a deleted type is 404 for both."""
    await seed(side)
    answers = []
    for url, token in ((side.reference.url, side.reference_token), (side.proxy.url, side.token)):
        headers = [("Authorization", f"Bearer {token}")]
        path = f"{V3}/user/{quote(side.user_id, safe='')}/account_data/{KIND}"
        assert (await raw_request(url, "HEAD", path, headers)).status == 200
        delete = f"{MSC3391}/user/{quote(side.user_id, safe='')}/account_data/{KIND}"
        assert (await raw_request(url, "DELETE", delete, headers)).status == 200
        head = await raw_request(url, "HEAD", path, headers)
        get = await raw_request(url, "GET", path, headers)
        answers.append((head.status, head.body, get.status))
    reference, proxied = answers
    assert reference == (404, b"", 404)
    assert proxied == reference


@pytest.mark.synapse
async def test_a_very_long_type_is_set_read_and_deleted_alike(side: SynapseSide) -> None:
    """A type of 5,400 `:` fits Synapse's 16 KiB request line as the client sends it;
    the proxy's own write of the delete must not grow it past that (`%3A` is three
    characters): what can be set and read can be deleted."""
    kind = ":" * 5400
    headers = [("Authorization", f"Bearer {side.token}")]
    path = f"{V3}/user/{side.user_id}/account_data/{kind}"

    assert (await raw_request(side.proxy.url, "PUT", path, headers, b'{"long": true}')).status == 200
    got = await raw_request(side.proxy.url, "GET", path, headers)
    assert (got.status, got.json()) == (200, {"long": True})
    delete = f"{MSC3391}/user/{side.user_id}/account_data/{kind}"
    deleted = await raw_request(side.proxy.url, "DELETE", delete, headers)
    assert (deleted.status, deleted.json()) == (200, {})

    assert (await raw_request(side.proxy.url, "GET", path, headers)).status == 404
    assert await synapse_holds(side, kind, None) == {}
    rows = snapshot(side.proxy.config.store.path).rows_of(side.user_id)
    assert [(room, k) for room, k, _ in rows] == [(None, kind)]  # the second device's row

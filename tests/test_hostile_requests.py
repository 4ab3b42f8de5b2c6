"""Hostile and odd requests (issue 14): request targets, content codings, malformed HTTP,
user data in log templates, trickled bodies.

Each behaviour mirrors what Synapse 1.163.2 does with the same bytes where Synapse
answers at all; where it is the proxy's own (an absolute-form target must never pick the
upstream host), the answer is a Matrix error and nothing reaches any upstream. The
cases that need a real Synapse are in `tests/test_hostile_requests_synapse.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client.exposition import generate_latest

from proxy.log_templates import template
from proxy.server import ProxyServer
from rig.proxy_process import ProxyProcess
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver
from tests.matrix import MSC3391, V3
from tests.raw_http import raw_request

# --- B: request targets that are not a path ------------------------------------------------------


class HostsTable(AbstractResolver):
    """Name resolution from a table, {name: port on 127.0.0.1}: the operator's DNS, in
    which `hs` is the homeserver and `hshttp` some other internal service."""

    def __init__(self, table: dict[str, int]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return [
            ResolveResult(
                hostname=host,
                host="127.0.0.1",
                port=self.table[host],
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
async def internal() -> AsyncIterator[FakeHomeserver]:
    """Another server on the upstream's network, which no client may reach."""
    async with FakeHomeserver() as server:
        yield server


@pytest.fixture(params=["with-port", "port-less"])
async def upstream_shape(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    start_proxy: StartProxy,
    fake_hs: FakeHomeserver,
    internal: FakeHomeserver,
) -> ProxyServer:
    """The proxy in front of `fake_hs`, named by address and port, or by a port-less
    host name (which the configuration accepts) that the operator's DNS resolves."""
    if request.param == "with-port":
        return await start_proxy(fake_hs.url)
    table = HostsTable({"hs": fake_hs.port, "hshttp": internal.port})
    connector = aiohttp.TCPConnector

    def resolving_connector(**kwargs: object) -> aiohttp.TCPConnector:
        return connector(resolver=table, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(aiohttp, "TCPConnector", resolving_connector)
    proxy = await start_proxy("http://hs")
    # The table is in use: an ordinary request reaches the homeserver through it.
    assert (await raw_request(proxy.url, "GET", "/_fake/echo/wired")).status == 200
    fake_hs.requests.clear()
    return proxy


SECRET = "syt_absolute_form_secret"

# (method, target, status, errcode). Synapse answers every target that does not start
# with `/` with Twisted's `404 No Such Resource` HTML page (OPTIONS: its `204` CORS
# answer), and `*` with nothing at all (it fails an assertion and drops the connection).
NOT_A_PATH = [
    ("GET", "http://internal.example/_matrix/client/versions", 404, "M_UNRECOGNIZED"),
    ("GET", f"http://127.0.0.1:1/_matrix/client/v3/sync?access_token={SECRET}", 404, "M_UNRECOGNIZED"),
    ("PUT", "http://hs/_matrix/client/v3/user/%40a%3Alocalhost/account_data/x", 404, "M_UNRECOGNIZED"),
    ("GET", "HTTP://internal/_fake/echo/x", 404, "M_UNRECOGNIZED"),
    ("GET", "http://user:password@internal:80/_fake/echo/x", 404, "M_UNRECOGNIZED"),
    ("POST", "admin://internal/_fake/echo/x", 404, "M_UNRECOGNIZED"),
    ("GET", "http://internal/health", 404, "M_UNRECOGNIZED"),
    ("OPTIONS", "http://internal.example/_matrix/client/versions", 404, "M_UNRECOGNIZED"),
    ("CONNECT", "internal:80", 404, "M_UNKNOWN"),
    ("OPTIONS", "*", 404, "M_UNKNOWN"),
]


@pytest.mark.parametrize(
    ("method", "target", "status", "errcode"), NOT_A_PATH, ids=[f"{m} {t}" for m, t, *_ in NOT_A_PATH]
)
async def test_a_target_that_is_not_a_path_gets_a_matrix_404_and_reaches_no_upstream(
    upstream_shape: ProxyServer,
    fake_hs: FakeHomeserver,
    internal: FakeHomeserver,
    method: str,
    target: str,
    status: int,
    errcode: str,
) -> None:
    """An absolute-form target (`GET http://host/path`), an authority (`CONNECT`) or `*`
    never becomes part of an upstream URL: no 500 from a URL that does not parse (an
    upstream URL with a port), no request to another host (a port-less one, whose name
    the target's letters would extend). Answered as Synapse answers: 404, as JSON."""
    headers = [("Authorization", f"Bearer {SECRET}")]
    body = b"{}" if method in ("PUT", "POST") else b""

    response = await raw_request(upstream_shape.url, method, target, headers, body)

    assert response.status == status, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["errcode"] == errcode
    assert SECRET.encode() not in response.body
    assert internal.requests == [], "another host was reached"
    assert fake_hs.requests == [], "the target was forwarded"


# --- C: request bodies with a Content-Encoding -----------------------------------------------------


def compressible(size: int) -> bytes:
    return b"".join(b"line %d of a log file the client uploads\n" % i for i in range(size // 40 + 1))[:size]


# (what, the plain bytes): gzip inflates the first, is barely larger than the second.
UPLOADS = [("compressible", compressible(300_000)), ("incompressible", random.Random(14).randbytes(300_000))]


@pytest.mark.parametrize("plain", [u[1] for u in UPLOADS], ids=[u[0] for u in UPLOADS])
async def test_a_gzip_upload_is_forwarded_byte_for_byte_with_its_headers(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, plain: bytes, msc3391: bool
) -> None:
    """The body goes upstream as it came, still compressed, with its own Content-Length
    and Content-Encoding: the homeserver stores what the client sent (Synapse never
    decodes a request body). Decoded on the way, a compressible body arrived cut to the
    old Content-Length (stored corrupted); an incompressible one came up short, and the
    homeserver waited for the rest until the proxy's read timeout (504)."""
    proxy = await start_proxy(fake_hs.url, msc3391=msc3391)
    body = gzip.compress(plain, mtime=0)
    headers = [("Content-Type", "application/octet-stream"), ("Content-Encoding", "gzip")]

    async with asyncio.timeout(10):  # promptly: no wait on a body that never completes
        response = await raw_request(proxy.url, "POST", "/_fake/upload", headers, body)

    assert response.status == 200, response.body
    assert response.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    arrived = fake_hs.last_request("/_fake/upload").headers
    assert arrived.getall("Content-Encoding") == ["gzip"]
    assert arrived.getall("Content-Length") == [str(len(body))]


async def test_a_chunked_gzip_upload_is_forwarded_byte_for_byte(
    start_proxy: StartProxy, fake_hs: FakeHomeserver
) -> None:
    proxy = await start_proxy(fake_hs.url)
    body = gzip.compress(compressible(300_000), mtime=0)
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096]) for i in range(0, len(body), 4096)
    )
    head = (
        b"POST /_fake/upload HTTP/1.1\r\nHost: proxy\r\nContent-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )

    async with asyncio.timeout(10):
        status, answer = await send_bytes(proxy.url, head + chunked + b"0\r\n\r\n")

    assert status == 200
    assert json.loads(answer) == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert fake_hs.last_request("/_fake/upload").headers["Content-Encoding"] == "gzip"


async def send_bytes(base: str, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are on a connection of their own; read the response to the
    end (the request asks for Connection: close)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        decoded = b""
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, body = decoded + body[:size], body[size + 2 :]
        body = decoded
    return int(head.split(b" ")[1]), body


# --- D: HTTP that aiohttp's parser refuses ------------------------------------------------------

QUERY_SECRET, HEADER_SECRET = "syt_malformed_query_secret", "syt_malformed_header_secret"
_SYNC = f"/_matrix/client/v3/sync?access_token={QUERY_SECRET}"
_HEADERS = f"Host: proxy\r\nAuthorization: Bearer {HEADER_SECRET}\r\n"


def _bytes(text: str) -> bytes:
    return text.encode("latin-1")


# (what, the bytes): each carries both tokens, the query one in the request line that
# aiohttp quotes in its error message.
MALFORMED = [
    ("raw non-ASCII in the query", _bytes(f"GET {_SYNC}&x=\xe9 HTTP/1.1\r\n{_HEADERS}\r\n")),
    ("a space in the target", _bytes(f"GET {_SYNC}&x=a b HTTP/1.1\r\n{_HEADERS}\r\n")),
    ("a NUL in a header", _bytes(f"GET {_SYNC} HTTP/1.1\r\n{_HEADERS}X-Bad: a\x00b\r\n\r\n")),
    ("a request line over 16 KiB", _bytes(f"GET {_SYNC}&pad={'p' * 17000} HTTP/1.1\r\n{_HEADERS}\r\n")),
    ("a 20 KiB header", _bytes(f"GET {_SYNC} HTTP/1.1\r\n{_HEADERS}X-Big: {'b' * 20480}\r\n\r\n")),
    (
        "Content-Length and Transfer-Encoding",
        _bytes(
            f"PUT {_SYNC} HTTP/1.1\r\n{_HEADERS}Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            "2\r\n{}\r\n0\r\n\r\n"
        ),
    ),
    ("a header without a colon", _bytes(f"GET {_SYNC} HTTP/1.1\r\n{_HEADERS}no colon here\r\n\r\n")),
    ("an unknown HTTP version", _bytes(f"GET {_SYNC} HTTP/7.1\r\n{_HEADERS}\r\n")),
    ("a method with a bad character", _bytes(f"G(T {_SYNC} HTTP/1.1\r\n{_HEADERS}\r\n")),
    ("the target `*` of a GET", _bytes(f"GET * HTTP/1.1\r\n{_HEADERS}\r\n")),
]


async def exchange_all(base: str, data: bytes) -> bytes:
    """Send `data`; everything the proxy answers until it closes the connection (which
    it must do: nothing after a malformed request on the same connection is trusted)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def assert_matrix_400(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert status_line.split(" ")[1] == "400", answer[:300]
    assert headers["content-type"].startswith("application/json"), answer[:300]
    assert json.loads(body)["errcode"] == "M_UNKNOWN", body


@pytest.mark.parametrize("data", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
async def test_malformed_http_gets_a_matrix_400_that_echoes_nothing_and_logs_no_traceback(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger propagates to it
    proxy = await start_proxy(fake_hs.url)

    answer = await exchange_all(proxy.url, data)

    assert_matrix_400(answer)
    for secret in (QUERY_SECRET, HEADER_SECRET, "pppp", "bbbb"):
        assert secret.encode() not in answer
    assert fake_hs.requests == []
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info or r.exc_text]
    assert not problems, caplog.text
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert QUERY_SECRET not in text and HEADER_SECRET not in text, text
    assert any(r.name == "proxy.http" and "malformed request" in r.getMessage() for r in caplog.records)
    # ...and the access log has its line (it failed with a traceback for want of a match_info).
    assert any(r.name == "proxy.access" and " 400 " in r.getMessage() for r in caplog.records)


async def test_malformed_http_leaves_no_traceback_nor_token_in_the_proxy_process_log(
    fake_hs: FakeHomeserver, proxy_process: Callable[..., ProxyProcess]
) -> None:
    proxy = await asyncio.to_thread(proxy_process, fake_hs.url, True, '[proxy]\nlog_level = "DEBUG"\n')

    for _, data in MALFORMED:
        assert_matrix_400(await exchange_all(proxy.url, data))
    await asyncio.to_thread(proxy.stop)

    log = proxy.log
    assert log.count("malformed request from") == len(MALFORMED), log
    assert "Traceback" not in log and "ERROR" not in log, log
    assert QUERY_SECRET not in log and HEADER_SECRET not in log


# --- E: user data in access-log templates --------------------------------------------------------

# (a request path, its template). Every data segment is a lowercase word the user chose
# (they all end in `zq`, so none is an endpoint word by accident), or an endpoint word in
# a data position (an account data type `sync`, a device called `devices`, ...).
U = "%40alice%3Alocalhost"
R = "%21room%3Alocalhost"
TEMPLATES = [
    (f"{V3}/user/{U}/account_data/secretzq", f"{V3}/user/{{}}/account_data/{{}}"),
    (f"{V3}/user/{U}/rooms/{R}/account_data/diaryzq", f"{V3}/user/{{}}/rooms/{{}}/account_data/{{}}"),
    (f"{MSC3391}/user/{U}/account_data/sync", f"{MSC3391}/user/{{}}/account_data/{{}}"),
    (f"{V3}/user/sync/account_data/devices", f"{V3}/user/{{}}/account_data/{{}}"),
    (f"{V3}/rooms/{R}/state/kindzq/keyzq", f"{V3}/rooms/{{}}/state/{{}}/{{}}"),
    (f"{V3}/rooms/{R}/state/m.room.member/state", f"{V3}/rooms/{{}}/state/{{}}/{{}}"),
    (f"{V3}/rooms/{R}/state/m.room.name/", f"{V3}/rooms/{{}}/state/{{}}/"),
    (f"{V3}/rooms/{R}/send/lovenotezq/txnzq", f"{V3}/rooms/{{}}/send/{{}}/{{}}"),
    (f"{V3}/sendToDevice/handshakezq/txnzq", f"{V3}/sendToDevice/{{}}/{{}}"),
    (f"{V3}/user/{U}/rooms/{R}/tags/favouritezq", f"{V3}/user/{{}}/rooms/{{}}/tags/{{}}"),
    (f"{V3}/devices/laptopzq", f"{V3}/devices/{{}}"),
    (f"{V3}/devices/devices", f"{V3}/devices/{{}}"),
    (f"{V3}/user/{U}/filter/filterzq", f"{V3}/user/{{}}/filter/{{}}"),
    (f"{V3}/pushrules/global/override/rulezq/enabled", f"{V3}/pushrules/{{}}/{{}}/{{}}/enabled"),
    (f"{V3}/pushrules/global/content/rulezq/actions", f"{V3}/pushrules/{{}}/{{}}/{{}}/actions"),
    ("/_matrix/media/v3/download/serverzq/mediazq/holidayzq", "/_matrix/media/v3/download/{}/{}/{}"),
    ("/_matrix/client/v1/media/download/serverzq/mediazq", "/_matrix/client/v1/media/download/{}/{}"),
    ("/_matrix/client/v1/media/thumbnail/serverzq/mediazq", "/_matrix/client/v1/media/thumbnail/{}/{}"),
    ("/_matrix/media/v3/upload/serverzq/mediazq", "/_matrix/media/v3/upload/{}/{}"),
    (f"{V3}/rooms/{R}/event/eventzq", f"{V3}/rooms/{{}}/event/{{}}"),
    (f"{V3}/rooms/{R}/context/eventzq", f"{V3}/rooms/{{}}/context/{{}}"),
    (
        f"/_matrix/client/v1/rooms/{R}/relations/eventzq/reltypezq/evtypezq",
        "/_matrix/client/v1/rooms/{}/relations/{}/{}/{}",
    ),
    (f"{V3}/rooms/{R}/receipt/receiptzq/eventzq", f"{V3}/rooms/{{}}/receipt/{{}}/{{}}"),
    (f"{V3}/rooms/{R}/typing/someonezq", f"{V3}/rooms/{{}}/typing/{{}}"),
    (f"{V3}/join/roomzq", f"{V3}/join/{{}}"),
    (f"{V3}/knock/roomzq", f"{V3}/knock/{{}}"),
    (f"{V3}/rooms/roomzq/join", f"{V3}/rooms/{{}}/join"),
    (f"{V3}/rooms/{R}/redact/eventzq/txnzq", f"{V3}/rooms/{{}}/redact/{{}}/{{}}"),
    (f"{V3}/directory/room/aliaszq", f"{V3}/directory/room/{{}}"),
    (f"{V3}/directory/list/room/roomzq", f"{V3}/directory/list/room/{{}}"),
    (f"{V3}/directory/list/appservice/networkzq/roomzq", f"{V3}/directory/list/appservice/{{}}/{{}}"),
    (f"{V3}/profile/someonezq/displayname", f"{V3}/profile/{{}}/displayname"),
    (f"{V3}/profile/someonezq/fieldzq", f"{V3}/profile/{{}}/{{}}"),
    (f"{V3}/presence/someonezq/status", f"{V3}/presence/{{}}/status"),
    (f"{V3}/rooms/{R}/report/eventzq", f"{V3}/rooms/{{}}/report/{{}}"),
    (f"{V3}/user/someonezq/openid/request_token", f"{V3}/user/{{}}/openid/request_token"),
    (f"{V3}/thirdparty/protocol/protocolzq", f"{V3}/thirdparty/protocol/{{}}"),
    (f"{V3}/auth/stagezq/fallback/web", f"{V3}/auth/{{}}/fallback/web"),
    (f"{V3}/login/sso/redirect/idpzq", f"{V3}/login/sso/redirect/{{}}"),
    (f"{V3}/room_keys/keys/{R}/sessionzq", f"{V3}/room_keys/keys/{{}}/{{}}"),
    (f"{V3}/room_keys/version/versionzq", f"{V3}/room_keys/version/{{}}"),
    (f"{V3}/admin/whois/someonezq", f"{V3}/admin/whois/{{}}"),
    ("/_matrix/client/v1/appservice/bridgezq/ping", "/_matrix/client/v1/appservice/{}/ping"),
    ("/_matrix/client/v1/delayed_events/delayzq/cancel", "/_matrix/client/v1/delayed_events/{}/cancel"),
    (f"{V3}/rooms/{R}/messages?from=tokenzq&filter=filterzq", f"{V3}/rooms/{{}}/messages"),
    (f"{V3}/endpointzq/wordzq", f"{V3}/{{}}/{{}}"),
    ("/_matrix/federation/v1/send/txnzq", "/_matrix/federation/v1/send/{}"),
    ("/_matrix/federation/v1/make_join/roomzq/someonezq", "/_matrix/federation/v1/make_join/{}/{}"),
    ("/_matrix/federation/v1/user/devices/someonezq", "/_matrix/federation/v1/user/{}/{}"),
    ("/_matrix/key/v2/query/serverzq/keyzq", "/_matrix/key/v2/query/{}/{}"),
    ("/_matrix/app/v1/transactions/txnzq", "/_matrix/app/v1/transactions/{}"),
    ("/_synapse/admin/v2/users/someonezq", "/_synapse/admin/v2/users/{}"),
    ("/_synapse/admin/v1/media/download/mediazq", "/_synapse/admin/v1/media/{}/{}"),
    # Endpoint shapes stay readable.
    (f"{V3}/sync?since=s1&access_token=tokenzq", f"{V3}/sync"),
    (f"{V3}/keys/upload", f"{V3}/keys/upload"),
    (f"{V3}/logout/all", f"{V3}/logout/all"),
    ("/_matrix/client/versions", "/_matrix/client/versions"),
    (
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
    ),
    ("/.well-known/matrix/client", "/.well-known/matrix/client"),
]


@pytest.mark.parametrize(("path", "expected"), TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_a_template_hides_every_user_supplied_segment_and_keeps_the_endpoint_words(
    path: str, expected: str
) -> None:
    assert template(path) == expected


async def test_no_user_data_reaches_the_access_log_or_the_metrics(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, caplog: pytest.LogCaptureFixture
) -> None:
    """Every path above, sent through the proxy: the access log and the metrics name
    none of the data, and a body that broke off logs the template too."""
    caplog.set_level(logging.INFO)
    fake_hs.add_device("@alice:localhost", "ALICE1", token="syt_template_alice")
    proxy = await start_proxy(fake_hs.url)
    auth = [("Authorization", "Bearer syt_template_alice")]
    for path, _ in TEMPLATES:
        await raw_request(proxy.url, "GET", path, auth)
    # A download the homeserver cuts off (after the headers, so it is logged).
    with contextlib.suppress(asyncio.IncompleteReadError):
        await raw_request(proxy.url, "GET", "/_fake/reset/mediazq?size=4000000&after=1000000")

    records = [r for r in caplog.records if r.name == "proxy.access"]
    assert len(records) == len(TEMPLATES) + 1
    assert any("broke off" in r.getMessage() for r in caplog.records)
    metrics = generate_latest(proxy.metrics.registry).decode()
    for record in caplog.records:
        assert "zq" not in record.getMessage(), record.getMessage()
    assert "zq" not in metrics


# --- F: a forwarded body that trickles -----------------------------------------------------------


@dataclass
class Trickled:
    answer: bytes  # everything the proxy sent
    answered_after: float | None  # seconds until its first byte
    closed_after: float  # seconds until it closed the connection


async def trickle(base: str, head: bytes, pieces: list[tuple[float, bytes]]) -> Trickled:
    """Send `head`, then each piece after its pause, while reading; return once the proxy
    closed the connection (bounded by the caller)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            await writer.drain()
            for pause, piece in pieces:
                await asyncio.sleep(pause)
                writer.write(piece)
                await writer.drain()

    sending = asyncio.ensure_future(send())
    try:
        answer, answered_after = b"", None
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                answered_after = answered_after or loop.time() - started
                answer += chunk
        return Trickled(answer, answered_after, loop.time() - started)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()


def upload_head(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST /_fake/upload HTTP/1.1\r\nHost: proxy\r\n{framing}\r\n\r\n".encode()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_forwarded_body_that_stalls_gets_408_and_the_upstream_request_is_aborted(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, framing: str, msc3391: bool
) -> None:
    """Like Twisted's idle timeout (60 s, reset by every byte that arrives, active while a
    request's head and body come in), a forwarded body may pause for at most
    `proxy.client_timeout`; then the upstream request is abandoned, and the client, told
    nothing yet, gets 408 and a closed connection."""
    proxy = await start_proxy(fake_hs.url, msc3391=msc3391, proxy={"client_timeout": 1.0})
    if framing == "chunked":
        head, pieces = upload_head(None), [(0.2, b"5\r\nhello\r\n"), (0.5, b"1\r\nx\r\n")]
    else:
        head, pieces = upload_head(100), [(0.2, b"hello"), (0.5, b"x")]

    async with asyncio.timeout(15):
        trickled = await trickle(proxy.url, head, pieces)

    status_line, _, rest = trickled.answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", trickled.answer
    assert rest.endswith(b'{"errcode":"M_UNKNOWN","error":"The request body did not arrive in time"}')
    assert b"Connection: close" in rest
    # Silent for client_timeout after its last byte (at 0.7 s): answered then. Closed
    # once aiohttp has drained what else arrives for `lingering_time` (bounded by the same
    # timeout), so that the 408 is not lost to a reset.
    assert trickled.answered_after is not None and 1.6 <= trickled.answered_after < 4
    assert trickled.closed_after < trickled.answered_after + 3
    async with asyncio.timeout(5):
        await fake_hs.handler_cancelled.wait()  # the upstream request went with it
    assert fake_hs.last_request("/_fake/upload").status is None


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_slow_but_steady_forwarded_body_is_never_cut_off(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, framing: str
) -> None:
    """A byte every 0.25 s for 5 s: far longer than `proxy.client_timeout` in all, never
    silent that long. It streams through and completes."""
    proxy = await start_proxy(fake_hs.url, proxy={"client_timeout": 1.0})
    body = bytes(range(65, 85))
    if framing == "chunked":
        head = upload_head(None)
        pieces = [(0.25, b"1\r\n" + body[i : i + 1] + b"\r\n") for i in range(len(body))]
        pieces.append((0.25, b"0\r\n\r\n"))
    else:
        head = upload_head(len(body))
        pieces = [(0.25, body[i : i + 1]) for i in range(len(body))]
    head = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")

    async with asyncio.timeout(20):
        trickled = await trickle(proxy.url, head, pieces)

    assert trickled.answer.startswith(b"HTTP/1.1 200 OK"), trickled.answer
    assert trickled.closed_after >= 5
    received = fake_hs.last_request("/_fake/upload")
    assert (received.body_size, received.body_sha256) == (len(body), hashlib.sha256(body).hexdigest())

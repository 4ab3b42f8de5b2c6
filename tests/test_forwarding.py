"""The forwarding core (`proxy/forward.py` and the dispatch in `proxy/app.py`) against
the fake homeserver: what the client sends arrives exactly, what the homeserver
answers comes back exactly, bodies stream, and every transport failure becomes a
Matrix error. Each test runs with `msc3391_enabled` off and on, since with it on the
same requests first pass the route table."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.config import parse_config
from proxy.forward import Upstream
from proxy.metrics import Metrics
from proxy.server import ProxyServer
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver, gzip_payload, pattern_chunks, pattern_sha256
from tests.matrix import ALICE
from tests.raw_http import raw_request

MiB = 1024 * 1024
ALICE_TOKEN = "alice_token_forwarding"


@pytest.fixture
async def proxy(start_proxy: StartProxy, fake_hs: FakeHomeserver, msc3391: bool) -> ProxyServer:
    return await start_proxy(fake_hs.url, msc3391=msc3391)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Not the shared client: no transparent decompression, no cookies, so that the test
    # sees the bytes as they came.
    async with aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        yield session


def raw_url(base: str, target: str) -> URL:
    """A URL that aiohttp sends exactly as written (no re-quoting, no normalising)."""
    return URL(base + target, encoded=True)


def assert_matrix_error(status: int, body: bytes, content_type: str | None, expected: int) -> None:
    assert status == expected
    assert content_type is not None and content_type.startswith("application/json")
    parsed = json.loads(body)
    assert parsed["errcode"] == "M_UNKNOWN"
    assert isinstance(parsed["error"], str) and parsed["error"]


# --- memory -----------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


class RssWatch:
    """This process's resident memory: the proxy, the fake and the client all live here.

    The peak is the highest of periodic samples and, where the kernel lets us reset
    it, the VmHWM high-water mark (which also catches spikes between samples)."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._hwm = True
        except OSError:
            self._hwm = False
        self.before = _status_kib("VmRSS")
        self.peak = self.before

    def sample(self) -> None:
        self.peak = max(self.peak, _status_kib("VmRSS"))

    def growth_mib(self) -> float:
        self.sample()
        if self._hwm:
            self.peak = max(self.peak, _status_kib("VmHWM"))
        return (self.peak - self.before) / 1024


# --- method, path, query, body -----------------------------------------------------------

TARGETS = [
    "/_fake/echo/a%2Fb/%40alice%3Aexample.org/%21room%3Aexample.org/100%25?q=%2F&q=2&empty=&plus=a+b&x=%40%21%25",
    "/_fake/echo/%7Euser/%E2%9C%93/a;b=c/x,y?a==b&&c",
    "/_fake/echo/./a/../b/%2E%2E/c",
    "/_fake/echo//double//slash/",
    "/_fake/echo/%2f%2F%252F",
    "/_fake/echo/type#x/y?q=1#z",  # `#` is no fragment to Twisted: it goes out as sent
    "/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/txn%2F1?user_id=%40bot%3Aexample.org",
    "/_matrix/client/v3/user/%40alice%3Alocalhost/account_data/m.x/extra?access_token=not_owned",
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
async def test_method_raw_path_query_and_body_arrive_exactly(
    proxy: ProxyServer, fake_hs: FakeHomeserver, method: str, target: str
) -> None:
    body = b"" if method == "GET" else json.dumps({"k": "v\u00e9", "n": [1, 2]}).encode()
    response = await raw_request(proxy.url, method, target, [("Content-Type", "application/json")], body)

    arrived = fake_hs.last_request()
    assert arrived.method == method
    assert arrived.raw_path == target
    assert arrived.query_string == target.partition("?")[2]
    assert arrived.body_size == len(body)
    assert arrived.body_sha256 == hashlib.sha256(body).hexdigest()
    # ...and the homeserver's answer came back as it was sent.
    assert response.status == arrived.status
    if target.startswith("/_fake/echo"):
        assert response.json()["raw_path"] == target


async def test_aiohttp_client_with_encoded_url_reaches_upstream_unchanged(
    proxy: ProxyServer, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    target = "/_fake/echo/%40alice%3Alocalhost/m.foo%2Fbar/%21r%3Ax/50%25?filter=%7B%22a%22%3A1%7D&x=%2F"
    async with http.put(raw_url(proxy.url, target), data=b"hello") as response:
        echoed = await response.json()
    assert response.status == 200
    assert echoed["raw_path"] == target
    assert echoed["method"] == "PUT"
    assert echoed["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


async def test_head_is_forwarded_with_its_headers(proxy: ProxyServer, fake_hs: FakeHomeserver) -> None:
    response = await raw_request(proxy.url, "HEAD", "/_fake/download?size=5000")
    assert response.status == 200
    assert response.headers["Content-Length"] == "5000"
    assert response.body == b""
    assert fake_hs.last_request().method == "HEAD"


# --- headers -----------------------------------------------------------------------------

HOP_BY_HOP_REQUEST = [
    ("Connection", "keep-alive, X-Hop-Custom"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("TE", "trailers"),
    ("Upgrade", "example/1"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Proxy-Connection", "keep-alive"),
    ("X-Hop-Custom", "named in Connection"),
]
END_TO_END_REQUEST = [
    ("Authorization", "Bearer not_checked_here"),
    ("User-Agent", "forwarding-test/1.0"),
    ("Accept", "application/json"),
    ("Accept-Encoding", "gzip, br"),
    ("Accept-Language", "fr"),
    ("Content-Type", "application/json"),
    ("Cookie", "a=1"),
    ("X-End-To-End", "kept"),
    ("X-Multi", "one"),
    ("X-Multi", "two"),
]


async def test_hop_by_hop_request_headers_are_removed_and_the_rest_kept(
    proxy: ProxyServer, fake_hs: FakeHomeserver
) -> None:
    await raw_request(proxy.url, "POST", "/_fake/echo/h", HOP_BY_HOP_REQUEST + END_TO_END_REQUEST, b"{}")

    arrived = fake_hs.last_request().headers
    for name, _ in HOP_BY_HOP_REQUEST:
        assert name not in arrived, name
    for name, value in END_TO_END_REQUEST:
        assert value in arrived.getall(name, []), name
    assert arrived.getall("X-Multi") == ["one", "two"]
    assert arrived["Content-Length"] == "2"


# What aiohttp's client adds to a request that lacks them, unless told not to.
AIOHTTP_DEFAULTS = ("Content-Type", "User-Agent", "Accept", "Accept-Encoding")


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/_fake/echo/bare"),
        ("POST", "/_fake/echo/bare"),  # a body streamed through
        # An owned write: its body is read by the proxy and sent on as bytes.
        ("PUT", f"/_matrix/client/v3/user/{quote(ALICE)}/account_data/org.example.bare"),
    ],
)
async def test_a_request_without_aiohttps_default_headers_arrives_without_them(
    proxy: ProxyServer, fake_hs: FakeHomeserver, method: str, target: str
) -> None:
    token = fake_hs.add_device(ALICE, "BARE")
    body = b"" if method == "GET" else b'{"k":1}'

    response = await raw_request(proxy.url, method, target, [("Authorization", f"Bearer {token}")], body)

    assert response.status == 200, response.body
    arrived = fake_hs.last_request(method=method).headers
    for name in AIOHTTP_DEFAULTS:
        assert name not in arrived, name


async def test_every_header_named_in_connection_is_removed(
    proxy: ProxyServer, fake_hs: FakeHomeserver
) -> None:
    headers = [
        ("Connection", "X-First"),
        ("Connection", " x-second ,X-Third"),
        ("X-First", "1"),
        ("X-Second", "2"),
        ("X-Third", "3"),
        ("X-Fourth", "4"),
    ]
    await raw_request(proxy.url, "GET", "/_fake/echo/c", headers)

    arrived = fake_hs.last_request().headers
    assert not {"Connection", "X-First", "X-Second", "X-Third"} & {k for k in arrived}
    assert arrived["X-Fourth"] == "4"


async def test_response_headers_are_kept_and_hop_by_hop_ones_removed(
    proxy: ProxyServer, fake_hs: FakeHomeserver
) -> None:
    sent = [
        "X-Upstream:kept",
        "Set-Cookie:a=1; Path=/",
        "Set-Cookie:b=2; Path=/",
        "Cache-Control:no-store",
        'ETag:"v1"',
        "Connection:X-Resp-Hop",
        "X-Resp-Hop:secret",
        "Keep-Alive:timeout=5",
        "Proxy-Authenticate:Basic",
        "Trailer:X-Never",
        "Upgrade:example/1",
    ]
    target = "/_fake/echo/r?status=202&" + "&".join(f"h={quote(s, safe='')}" for s in sent)
    response = await raw_request(proxy.url, "GET", target)

    assert response.status == 202
    assert response.reason == "Accepted"
    assert response.headers["X-Upstream"] == "kept"
    assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["ETag"] == '"v1"'
    assert response.headers["Content-Type"] == "application/json"
    for name in ("X-Resp-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
        assert name not in response.headers, name
    assert "x-resp-hop" not in response.headers.get("Connection", "").lower()


async def test_x_forwarded_for_is_appended_from_a_trusted_peer(
    proxy: ProxyServer, fake_hs: FakeHomeserver
) -> None:
    # The default trusted_forwarders include 127.0.0.0/8: the test client is nginx here.
    headers = [
        ("Host", "matrix.example.org"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-Proto", "https"),
    ]
    await raw_request(proxy.url, "GET", "/_fake/echo/xff", headers)

    arrived = fake_hs.last_request().headers
    assert arrived.getall("X-Forwarded-For") == ["203.0.113.7, 198.51.100.1, 127.0.0.1"]
    assert arrived.getall("X-Forwarded-Proto") == ["https"]
    assert arrived.getall("Host") == ["matrix.example.org"]


async def test_x_forwarded_for_is_set_when_absent(proxy: ProxyServer, fake_hs: FakeHomeserver) -> None:
    await raw_request(proxy.url, "GET", "/_fake/echo/xff", [("Host", "hs.example")])

    arrived = fake_hs.last_request().headers
    assert arrived.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert arrived.getall("X-Forwarded-Proto") == ["http"]
    assert arrived["Host"] == "hs.example"


async def test_x_forwarded_for_is_replaced_from_an_untrusted_peer(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, msc3391: bool
) -> None:
    proxy = await start_proxy(fake_hs.url, msc3391=msc3391, proxy={"trusted_forwarders": []})
    headers = [
        ("Host", "matrix.example.org"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Proto", "https"),
    ]
    await raw_request(proxy.url, "GET", "/_fake/echo/xff", headers)

    arrived = fake_hs.last_request().headers
    assert arrived.getall("X-Forwarded-For") == ["127.0.0.1"]  # the spoofed chain is gone
    assert arrived.getall("X-Forwarded-Proto") == ["http"]  # what the proxy itself saw
    assert arrived.getall("Host") == ["matrix.example.org"]


# --- bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 3 * MiB], ids=["small", "streamed"])
async def test_gzip_body_arrives_byte_identical_and_still_encoded(
    proxy: ProxyServer, fake_hs: FakeHomeserver, http: aiohttp.ClientSession, size: int
) -> None:
    plain, compressed = gzip_payload(size)
    async with http.get(
        f"{proxy.url}/_fake/gzip?size={size}", headers={"Accept-Encoding": "gzip"}
    ) as response:
        body = await response.read()

    assert response.status == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert body == compressed == fake_hs.gzip_sent
    assert gzip.decompress(body) == plain
    assert fake_hs.last_request().headers["Accept-Encoding"] == "gzip"


async def test_200_mib_upload_streams_with_flat_memory(
    proxy: ProxyServer, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    size = 200 * MiB
    # Warm up: connection pools, buffers and code paths exist before the measurement.
    async with http.post(f"{proxy.url}/_fake/upload", data=b"x" * MiB) as response:
        assert response.status == 200
    watch = RssWatch()
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for index, chunk in enumerate(pattern_chunks(size)):
            sent.update(chunk)
            if index % 64 == 0:
                watch.sample()
            yield chunk

    async with http.post(
        f"{proxy.url}/_fake/upload",
        data=body(),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
    ) as response:
        received = await response.json()

    growth = watch.growth_mib()
    assert response.status == 200
    assert received == {"size": size, "sha256": sent.hexdigest()}
    assert fake_hs.last_request("/_fake/upload").headers["Content-Length"] == str(size)
    assert growth < 32, f"memory grew by {growth:.1f} MiB for a 200 MiB upload"


# Either side of the sizes where the relay changes how it writes: one write with the
# headers, the headers then the body, and streamed (above 1 MiB).
@pytest.mark.parametrize("size", [0, 1, (1 << 16) - 1, 1 << 16, MiB, MiB + 1])
async def test_known_length_body_of_any_size_arrives_whole_and_exact(
    proxy: ProxyServer, http: aiohttp.ClientSession, size: int
) -> None:
    async with http.get(f"{proxy.url}/_fake/download?size={size}") as response:
        body = await response.read()

    assert response.status == 200
    assert response.headers["Content-Length"] == str(size)
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert "Transfer-Encoding" not in response.headers
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(size)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_200_mib_download_streams_with_flat_memory(
    proxy: ProxyServer, http: aiohttp.ClientSession, chunked: bool
) -> None:
    size = 200 * MiB
    expected = pattern_sha256(size)
    query = f"size={size}" + ("&chunked=1" if chunked else "")
    async with http.get(f"{proxy.url}/_fake/download?size={MiB}") as response:
        await response.read()  # warm-up
    watch = RssWatch()
    received = hashlib.sha256()
    got = 0

    async with http.get(f"{proxy.url}/_fake/download?{query}") as response:
        assert response.status == 200
        if not chunked:
            assert response.headers["Content-Length"] == str(size)
        async for chunk in response.content.iter_chunked(1 << 16):
            received.update(chunk)
            got += len(chunk)
            if got % (4 * MiB) < len(chunk):
                watch.sample()

    growth = watch.growth_mib()
    assert got == size
    assert received.hexdigest() == expected
    assert growth < 32, f"memory grew by {growth:.1f} MiB for a 200 MiB download"


async def test_chunked_upload_is_streamed_through(
    proxy: ProxyServer, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    size = 8 * MiB + 123

    async def body() -> AsyncIterator[bytes]:
        for chunk in pattern_chunks(size):
            yield chunk

    async with http.put(f"{proxy.url}/_fake/upload", data=body()) as response:
        received = await response.json()

    assert received == {"size": size, "sha256": pattern_sha256(size)}
    arrived = fake_hs.last_request("/_fake/upload").headers
    assert "Content-Length" not in arrived
    assert arrived["Transfer-Encoding"] == "chunked"


# --- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/_fake/echo/x"),
        ("POST", "/_matrix/client/v3/createRoom"),
        ("GET", "/_matrix/client/versions"),
    ],
)
async def test_upstream_down_is_a_502_matrix_error(
    proxy: ProxyServer, fake_hs: FakeHomeserver, http: aiohttp.ClientSession, method: str, target: str
) -> None:
    async with http.get(f"{proxy.url}/_fake/echo/warm") as response:
        assert response.status == 200  # a pooled connection exists and must not be trusted
    await fake_hs.go_down()

    async with http.request(method, raw_url(proxy.url, target), data=b"{}") as response:
        body = await response.read()
    assert_matrix_error(response.status, body, response.headers.get("Content-Type"), 502)


async def test_upstream_silent_beyond_read_timeout_is_a_504_matrix_error(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession, msc3391: bool
) -> None:
    proxy = await start_proxy(fake_hs.url, msc3391=msc3391, upstream={"read_timeout": 0.5})
    async with http.get(f"{proxy.url}/_fake/slow?delay=5") as response:
        body = await response.read()
    assert_matrix_error(response.status, body, response.headers.get("Content-Type"), 504)


@dataclass
class Outcome:
    status: int | None = None
    body: bytes = b""
    content_type: str | None = None
    broken: BaseException | None = None


async def fetch(http: aiohttp.ClientSession, url: str) -> Outcome:
    outcome = Outcome()
    try:
        async with http.get(url) as response:
            outcome.status = response.status
            outcome.content_type = response.headers.get("Content-Type")
            outcome.body = await response.read()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        outcome.broken = e
    return outcome


@pytest.mark.parametrize(
    ("query", "expect"),
    [
        (f"size={4 * MiB}&after={MiB}", "broken"),
        (f"size={4 * MiB}&after={MiB}&chunked=1", "broken"),
        (f"size={4 * MiB}&after={MiB}&rst=1", "broken or 502"),
        (f"size={4 * MiB}&after={MiB}&chunked=1&rst=1", "broken or 502"),
        (f"size={512 * 1024}&after={100 * 1024}", "502"),  # small: read whole, then answered
    ],
)
async def test_upstream_reset_mid_body_never_looks_complete(
    proxy: ProxyServer, http: aiohttp.ClientSession, query: str, expect: str
) -> None:
    size = int(query.split("&")[0].removeprefix("size="))
    outcome = await fetch(http, f"{proxy.url}/_fake/reset?{query}")

    assert not (outcome.broken is None and outcome.status == 200 and len(outcome.body) == size)
    if outcome.broken is None:
        assert "502" in expect, f"the client got {outcome.status} with {len(outcome.body)} bytes"
        assert_matrix_error(outcome.status or 0, outcome.body, outcome.content_type, 502)
    else:
        assert "broken" in expect, f"the client saw {outcome.broken!r}"


async def test_client_disconnect_cancels_the_upstream_request(
    proxy: ProxyServer, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    request = asyncio.ensure_future(http.get(f"{proxy.url}/_fake/hang"))
    await asyncio.wait_for(fake_hs.hang_started.wait(), 5)
    request.cancel()  # closes the client's connection to the proxy
    with contextlib.suppress(asyncio.CancelledError):
        await request

    await asyncio.wait_for(fake_hs.handler_cancelled.wait(), 5)
    assert [r.path for r in fake_hs.cancelled] == ["/_fake/hang"]


async def test_a_client_gone_just_before_a_whole_body_is_written_is_no_error(
    fake_hs: FakeHomeserver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The window between a handler's last await and its write: the client's hang-up
    has closed the transport but not yet cancelled the handler (aiohttp does that a
    loop turn later). Closing the transport by hand, with that cancellation off, puts
    the write inside the window every time. Nobody is left to answer: not a 502, nor a
    warning that the homeserver is unreachable (what the write's error was taken for)."""
    upstream = Upstream(parse_config({"upstream": {"url": fake_hs.url}}, tmp_path), Metrics())
    await upstream.start()
    forwarded: asyncio.Future[web.StreamResponse] = asyncio.get_running_loop().create_future()

    async def hangs_up_then_forwards(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        try:
            response = await upstream.forward(request)
        except BaseException as e:
            forwarded.set_exception(e)
            raise
        forwarded.set_result(response)
        return response

    app = web.Application()
    app.router.add_get("/{path:.*}", hangs_up_then_forwards)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        # Known length, above the size whose headers go apart from the body, so the
        # answer is read whole and written by `_answer_whole`.
        size = 256 * 1024
        with caplog.at_level(logging.WARNING, logger="proxy"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /_fake/download?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing sent
            writer.close()
            response = await asyncio.wait_for(forwarded, 10)
        assert response.status == 200 and response.content_length == size
        assert len(fake_hs.requests_to(r"^/_fake/download$")) == 1
        assert [r.getMessage() for r in caplog.records if r.name.startswith("proxy")] == []
    finally:
        await runner.cleanup()
        await upstream.close()


# --- /sync long-polls --------------------------------------------------------------------


@pytest.fixture
def alice(fake_hs: FakeHomeserver) -> dict[str, str]:
    fake_hs.add_device(ALICE, "ALICEDEV", token=ALICE_TOKEN)
    return {"Authorization": f"Bearer {ALICE_TOKEN}"}


async def test_sync_long_poll_gets_the_clients_timeout_plus_margin(
    start_proxy: StartProxy,
    fake_hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    alice: dict[str, str],
    msc3391: bool,
) -> None:
    proxy = await start_proxy(fake_hs.url, msc3391=msc3391, upstream={"read_timeout": 0.5})
    fake_hs.set_account_data(ALICE, "m.news", {"n": 1})  # so the fake answers once the delay is over
    fake_hs.fault(r"/sync$", delay=1.5)  # the homeserver holds the long-poll 1.5 s

    async with http.get(
        f"{proxy.url}/_matrix/client/v3/sync?since=s0&timeout=3000", headers=alice
    ) as response:
        body = await response.read()
    assert response.status == 200, body
    assert json.loads(body)["next_batch"] == fake_hs.next_batch


async def test_sync_without_a_long_poll_gets_only_the_margin(
    start_proxy: StartProxy,
    fake_hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    alice: dict[str, str],
    msc3391: bool,
) -> None:
    proxy = await start_proxy(
        fake_hs.url, msc3391=msc3391, upstream={"read_timeout": 0.5, "sync_timeout_margin": 0.5}
    )
    fake_hs.fault(r"/sync$", delay=5)

    async with http.get(f"{proxy.url}/_matrix/client/v3/sync?since=s0&timeout=0", headers=alice) as response:
        body = await response.read()
    assert_matrix_error(response.status, body, response.headers.get("Content-Type"), 504)


async def test_initial_sync_gets_the_initial_sync_timeout(
    start_proxy: StartProxy,
    fake_hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    alice: dict[str, str],
    msc3391: bool,
) -> None:
    proxy = await start_proxy(fake_hs.url, msc3391=msc3391, upstream={"read_timeout": 0.5})
    fake_hs.fault(r"/sync$", delay=1.5)  # a large account's initial sync is slow

    async with http.get(f"{proxy.url}/_matrix/client/v3/sync", headers=alice) as response:
        body = await response.read()
    assert response.status == 200, body
    assert json.loads(body)["next_batch"] == fake_hs.next_batch


# --- feature off: a transparent pass-through -------------------------------------------


async def direct_and_proxied(
    http: aiohttp.ClientSession,
    fake_hs: FakeHomeserver,
    proxy: ProxyServer,
    method: str,
    target: str,
    **kw: Any,
) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    results = []
    for base in (fake_hs.url, proxy.url):
        async with http.request(method, raw_url(base, target), **kw) as response:
            results.append((response.status, await response.read()))
    return results[0], results[1]


async def test_msc3391_off_intercepts_nothing(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession, alice: dict[str, str]
) -> None:
    proxy = await start_proxy(fake_hs.url, msc3391=False)
    user = "%40alice%3Alocalhost"
    fake_hs.set_account_data(ALICE, "m.gone", {"a": 1})

    # The unstable DELETE reaches the homeserver, which (flag off) does not know it.
    target = f"/_matrix/client/unstable/org.matrix.msc3391/user/{user}/account_data/m.gone"
    direct, proxied = await direct_and_proxied(http, fake_hs, proxy, "DELETE", target, headers=alice)
    assert proxied == direct
    assert proxied[0] == 404 and json.loads(proxied[1])["errcode"] == "M_UNRECOGNIZED"
    assert fake_hs.last_request().raw_path == target
    assert fake_hs.last_request().method == "DELETE"

    # PUT {} stores {}, and GET returns it: no delete semantics.
    target = f"/_matrix/client/v3/user/{user}/account_data/m.gone"
    async with http.put(raw_url(proxy.url, target), json={}, headers=alice) as response:
        assert response.status == 200
    assert fake_hs.account_data(ALICE, "m.gone") == {}
    direct, proxied = await direct_and_proxied(http, fake_hs, proxy, "GET", target, headers=alice)
    assert proxied == direct == (200, b"{}")

    # /versions, initial and incremental sync: byte for byte what the homeserver said.
    seen = {}
    for path in ("/_matrix/client/versions", "/_matrix/client/v3/sync", "/_matrix/client/v3/sync?since=s0"):
        direct, proxied = await direct_and_proxied(http, fake_hs, proxy, "GET", path, headers=alice)
        assert proxied == direct, path
        seen[path] = proxied[1]
    assert b"org.matrix.msc3391" not in seen["/_matrix/client/versions"]
    assert b'{"type":"m.gone","content":{}}' in seen["/_matrix/client/v3/sync"]  # not stripped

    # The proxy asked the homeserver nothing of its own.
    assert fake_hs.whoami_calls == 0
    assert fake_hs.requests_to(r"/devices$") == []


async def test_msc3391_off_forwards_the_unstable_delete_to_a_homeserver_that_has_it(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession, alice: dict[str, str]
) -> None:
    fake_hs.msc3391_enabled = True  # the homeserver's own flag
    proxy = await start_proxy(fake_hs.url, msc3391=False)
    fake_hs.set_account_data(ALICE, "m.gone", {"a": 1})
    target = "/_matrix/client/unstable/org.matrix.msc3391/user/%40alice%3Alocalhost/account_data/m.gone"

    async with http.delete(raw_url(proxy.url, target), headers=alice) as response:
        assert response.status == 200
        assert await response.json() == {}
    assert fake_hs.account_data(ALICE, "m.gone") == {}
    async with http.get(f"{proxy.url}/_matrix/client/versions") as response:
        versions = await response.json()
    assert versions == fake_hs.versions
    assert fake_hs.whoami_calls == 0

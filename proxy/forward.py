"""The one way to the homeserver: streaming forwarding and the proxy's own calls.

Every upstream request goes through `Upstream`, which owns the single shared
`ClientSession` (no cookie jar, no transparent decompression, no default headers)
and turns every transport failure into a Matrix-shaped 502 or 504.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import aiohttp
from aiohttp import hdrs, web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import Config
from .cors import HomeserverHeaders
from .errors import (
    ClientTooSlow,
    MatrixError,
    ResponseError,
    bad_gateway,
    gateway_timeout,
    unrecognized,
    upstream_refusal,
)
from .forwarders import TrustedForwarders
from .headers import end_to_end
from .log_templates import template
from .metrics import ROUTE, Metrics

log = logging.getLogger(__name__)

# A known-length upstream body up to this size is read whole and answered in one
# write: measured 8-45% faster than chunk-by-chunk streaming, and bounded in memory.
_WHOLE_BODY_LIMIT = 1 << 20
# From this size on, a whole body goes out after its headers rather than joined to them:
# the join, and the copy of what the socket did not take at once, each cost a copy of
# the body (asyncio's transport slices bytes; a memoryview slices for free).
_SEPARATE_HEADERS_FROM = 1 << 16


class _StreamedBody:
    """A client's request body on its way upstream, chunk by chunk as it arrives (never
    buffered), each wait for the next chunk bounded by `idle` seconds.

    Twisted's HTTP channel (Synapse) has the same bound: an idle timeout, reset by every
    read, active while a request's head and body come in (60 s there; client_timeout
    here). Waits while the homeserver is slow to take the body do not count: the body is
    only read as fast as it is sent on."""

    def __init__(self, content: StreamReader, idle: float) -> None:
        self._content = content
        self._idle = idle
        self.timed_out = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._content.readany()
            except TimeoutError:
                # Not re-raised as a TimeoutError: aiohttp's client would report that as
                # the homeserver's timeout (504). The flag tells `open` what happened.
                self.timed_out = True
                raise ClientTooSlow() from None
            if not chunk:
                return
            yield chunk


@dataclass(frozen=True)
class UpstreamReply:
    """A small upstream answer, read whole (whoami, devices, account data, filters)."""

    status: int
    body: bytes
    headers: CIMultiDictProxy[str]
    reason: str | None = None

    @property
    def content_type(self) -> str | None:
        return self.headers.get(hdrs.CONTENT_TYPE)

    def response(self) -> web.Response:
        """This answer for the client, as the homeserver gave it."""
        headers = end_to_end(self.headers, drop=(hdrs.CONTENT_LENGTH,))
        return web.Response(status=self.status, reason=self.reason, body=self.body, headers=headers)

    def refusal(self, what: str) -> ResponseError:
        """The error to raise for this answer to the proxy's own call (`what`)."""
        headers = end_to_end(self.headers, drop=(hdrs.CONTENT_LENGTH,))
        return upstream_refusal(self.status, self.body, headers, what)


def _gateway_error(exc: BaseException) -> MatrixError | None:
    """The Matrix error a client expects of a gateway for a transport failure (None:
    `exc` is not one)."""
    if isinstance(exc, TimeoutError):
        return gateway_timeout()
    if isinstance(exc, aiohttp.ClientResponseError):
        # The homeserver's answer could not be parsed as HTTP.
        log.warning("bad response from the homeserver: %s", exc.message)
        return bad_gateway("The homeserver sent an invalid response")
    if isinstance(exc, aiohttp.ClientError):
        log.warning("homeserver unreachable: %s", type(exc).__name__)
        return bad_gateway()
    return None


class _TransportErrors:
    """`async with transport_errors():` maps transport failures to Matrix errors.

    Classes, this one and `_Exchange`, rather than `asynccontextmanager`s: every request
    enters them, and a generator-based one costs an async generator (and the event loop's
    bookkeeping of it) each time."""

    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and (error := _gateway_error(exc)) is not None:
            raise error from None


_TRANSPORT_ERRORS = _TransportErrors()


def transport_errors() -> _TransportErrors:
    return _TRANSPORT_ERRORS


class _Exchange:
    """`Upstream.open`'s request: entered, the homeserver's response with its body
    unread; left, the connection released. A failure on the way, in the caller's block
    included, leaves as a Matrix error."""

    __slots__ = ("_request", "_sending", "_started", "_streamed", "_upstream")

    def __init__(
        self, upstream: Upstream, request: web.BaseRequest, sending: Any, streamed: _StreamedBody | None
    ) -> None:
        self._upstream = upstream
        self._request = request
        self._sending = sending  # aiohttp's request context manager, not entered yet
        self._streamed = streamed
        self._started = time.monotonic()

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            response = await self._sending.__aenter__()
        except BaseException as e:
            self._raise_instead(e)
            raise
        route = self._request.get(ROUTE)
        self._upstream.observe(route.name if route else "forward", time.monotonic() - self._started)
        return response

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._sending.__aexit__(exc_type, exc, tb)
        except BaseException as e:
            self._raise_instead(e)
            raise
        if exc is not None:
            self._raise_instead(exc)

    def _raise_instead(self, exc: BaseException) -> None:
        """Raise what the client should be told instead of `exc`, if anything else."""
        error = _gateway_error(exc)
        if isinstance(error or exc, MatrixError) and self._streamed is not None and self._streamed.timed_out:
            # The client's body stalled: aiohttp abandoned the upstream request (its
            # connection is closed, not reused) and reports a broken connection. The
            # client is the one to be told (a relayed answer already under way is cut
            # off by `relay` instead, as for any body that breaks off).
            raise ClientTooSlow() from None
        if error is not None:
            raise error from None


@functools.lru_cache(maxsize=64)
def _client_timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    # Shared, not one per request: every held long-poll would keep its own, and the
    # read timeouts in use are few (a client's long-poll `timeout` plus the margin).
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)


class Upstream:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._config = config
        self._latency = metrics.upstream_latency
        # Per-request costs paid once: labelled histogram children, the default timeout.
        self._latency_by_route: dict[str, Any] = {}
        self._default_timeout = self._make_timeout(config.upstream.read_timeout)
        self._origin = config.upstream.url
        self.forwarders = TrustedForwarders(config.proxy.trusted_forwarders)
        self._session: aiohttp.ClientSession | None = None
        # The homeserver's CORS headers, learnt from its answers to the proxy's own calls.
        self.homeserver_headers = HomeserverHeaders()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._config.upstream.max_connections, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Cookies set for one user must never reach another user's requests.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Bodies pass through with their Content-Encoding intact.
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
            # Forward only what the client sent; add nothing of aiohttp's own.
            skip_auto_headers=(hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    # --- timeouts ---------------------------------------------------------------------

    def timeout(self, read: float | None = None) -> aiohttp.ClientTimeout:
        return self._default_timeout if read is None else self._make_timeout(read)

    def _make_timeout(self, read: float) -> aiohttp.ClientTimeout:
        return _client_timeout(self._config.upstream.connect_timeout, read)

    # --- headers ------------------------------------------------------------------------

    def _request_headers(self, request: web.BaseRequest) -> CIMultiDict[str]:
        headers = end_to_end(request.headers, drop=(hdrs.X_FORWARDED_FOR, hdrs.X_FORWARDED_PROTO))
        headers.update(self.forwarders.headers(request))
        return headers

    # --- forwarding ---------------------------------------------------------------------

    def url_for(self, raw_path: str) -> URL:
        """`upstream.url` with the request target's path and query exactly as the client
        sent them (encoded=True: nothing re-quoted or normalised).

        Built from parts, never by parsing a concatenation: the target splits at its first
        `?` only, as Twisted splits it, so a `#` stays in the path (`.../account_data/T#x`
        is the type `T#x` to Synapse; read as a URL, yarl would take `#x` for a fragment
        and drop it on the way out), and the scheme, host and port come from the
        configuration alone. A target that is not a path (absolute-form, `*`) is refused
        here too, whoever calls: it is the client's to fix, and nothing is sent."""
        if not raw_path.startswith("/"):
            raise unrecognized()
        path, _, query = raw_path.partition("?")
        return URL.build(
            scheme=self._origin.scheme,
            authority=self._origin.raw_authority,
            path=path,
            query_string=query,
            encoded=True,
        )

    def open(
        self,
        request: web.BaseRequest,
        *,
        read_timeout: float | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        method: str | None = None,
    ) -> _Exchange:
        """`async with upstream.open(request) as response:` sends the client's request
        upstream; `response` is the homeserver's, its body unread.

        The body is the client's, streamed, unless `body` is given (one the proxy
        already read to inspect it). `headers` override single headers; `method`
        the request's own (a HEAD the proxy serves as GET).
        """
        out_headers = self._request_headers(request)
        if headers:
            out_headers.update(headers)
        data: Any
        streamed: _StreamedBody | None = None
        if body is not None:
            data = body
            out_headers.pop(hdrs.TRANSFER_ENCODING, None)
            out_headers[hdrs.CONTENT_LENGTH] = str(len(body))
        elif request.body_exists:
            streamed = _StreamedBody(request.content, self._config.proxy.client_timeout)
            data = streamed.chunks()
        else:
            data = None
        sending = self.session.request(
            method or request.method,
            self.url_for(request.raw_path),
            headers=out_headers,
            data=data,
            allow_redirects=False,
            timeout=self.timeout(read_timeout),
        )
        return _Exchange(self, request, sending, streamed)

    def observe(self, route: str, seconds: float) -> None:
        child = self._latency_by_route.get(route)
        if child is None:
            child = self._latency_by_route[route] = self._latency.labels(route)
        child.observe(seconds)

    async def relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, *, prefix: bytes = b""
    ) -> web.StreamResponse:
        """Send an upstream response back to the client, streaming unless small.

        `prefix` is the start of the body, already read from `upstream` by the caller.
        """
        headers = end_to_end(upstream.headers, drop=(hdrs.CONTENT_LENGTH,))
        length = upstream.content_length
        if length is not None and length <= _WHOLE_BODY_LIMIT and request.method != "HEAD":
            async with transport_errors():
                body = prefix + await upstream.read()
            return await _answer_whole(request, upstream.status, upstream.reason, headers, body)

        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        if request.method == "HEAD":
            return response  # a HEAD served as GET upstream: the headers are the answer
        try:
            if prefix:
                await response.write(prefix)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as e:
            # Headers are gone already: all that is left is to cut the connection, so
            # the client sees a truncated body rather than a complete-looking one.
            # The template, as in the access log: the raw path holds IDs and types.
            log.warning(
                "upstream body broke off for %s %s: %r", request.method, template(request.raw_path), e
            )
            response.force_close()
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def read_whole(self, upstream: aiohttp.ClientResponse) -> bytes:
        async with transport_errors():
            return await upstream.read()

    async def read_prefix(self, upstream: aiohttp.ClientResponse, size: int) -> tuple[bytes, bool]:
        """Read at most `size` bytes; returns them and whether that was the whole body."""
        chunks: list[bytes] = []
        got = 0
        async with transport_errors():
            while got < size:
                chunk = await upstream.content.read(size - got)
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks), upstream.content.at_eof()

    async def exchange(self, request: web.BaseRequest, *, body: bytes) -> UpstreamReply:
        """The client's request, with a body the proxy read, sent upstream; the (small)
        answer read whole, so that the caller can finish its work before answering."""
        async with self.open(request, body=body) as upstream:
            data = await self.read_whole(upstream)
            return UpstreamReply(upstream.status, data, upstream.headers, upstream.reason)

    async def forward(
        self, request: web.BaseRequest, *, read_timeout: float | None = None
    ) -> web.StreamResponse:
        """The chokepoint: everything the proxy does not own goes through here."""
        async with self.open(request, read_timeout=read_timeout) as upstream:
            return await self.relay(request, upstream)

    # --- the proxy's own calls ----------------------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        params: Sequence[tuple[str, str]] = (),
        json_body: Any = None,
        data: bytes | None = None,
        read_timeout: float | None = None,
    ) -> UpstreamReply:
        """A small request of the proxy's own (on a caller's behalf), read whole.

        `path` is already percent-encoded (and may carry a query). The body is
        `json_body` serialised, or `data` as it is.
        """
        url = self.url_for(path)
        if params:
            url = url.update_query(params)
        async with transport_errors():
            async with self.session.request(
                method,
                url,
                headers=headers,
                json=json_body,
                data=data,
                allow_redirects=False,
                timeout=self.timeout(read_timeout),
            ) as response:
                body = await response.read()
                self.homeserver_headers.learn(response.headers)
                return UpstreamReply(response.status, body, response.headers, response.reason)


async def _answer_whole(
    request: web.BaseRequest, status: int, reason: str | None, headers: CIMultiDict[str], body: bytes
) -> web.StreamResponse:
    """A body read whole, answered without copying it again on its way to the socket."""
    if len(body) < _SEPARATE_HEADERS_FROM:
        return web.Response(status=status, reason=reason, body=body, headers=headers)
    response = web.StreamResponse(status=status, reason=reason, headers=headers)
    response.content_length = len(body)
    try:
        await response.prepare(request)  # a StreamResponse sends its headers at once
        await response.write(memoryview(body))
        await response.write_eof()
    except ConnectionResetError:
        # Gone between its handler's last check and this write (a hang-up before it
        # cancels the handler): nobody is left to answer, as aiohttp's own write treats it.
        response.force_close()
    return response


class Answer(Protocol):
    """What `body_response` needs of a homeserver answer (a streamed or a whole one)."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]


def body_response(upstream: Answer, body: bytes, *, decoded: bool) -> web.Response:
    """An upstream response with `body` in place of its own. `decoded`: the body is
    plain (rewritten or decompressed), so the Content-Encoding header goes too."""
    drop = (hdrs.CONTENT_LENGTH, hdrs.CONTENT_ENCODING) if decoded else (hdrs.CONTENT_LENGTH,)
    headers = end_to_end(upstream.headers, drop=drop)
    return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)

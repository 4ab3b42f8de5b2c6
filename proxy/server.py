"""Running the app on a socket: used by the command line and by the tests alike."""

from __future__ import annotations

import logging
from http import HTTPStatus
from types import TracebackType

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from .app import build_app
from .config import Config
from .errors import M_UNKNOWN, error_response, http_error_response
from .health import CONTEXT, health
from .log_templates import template
from .metrics import ROUTE, Metrics

log = logging.getLogger("proxy")


class AccessLogger(AbstractAccessLogger):
    """One line per request: client, method, route template (no IDs, no query), status.

    The client is the peer, or, from a trusted forwarder (nginx), the address that
    forwarder saw (the last hop it appended to X-Forwarded-For)."""

    @property
    def enabled(self) -> bool:
        # Skipped entirely (no template built) when the level hides the access log.
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.3fs",
            _client(request),
            request.method,
            _template(request),
            response.status,
            time,
        )


def _template(request: web.BaseRequest) -> str:
    """An owned route's template is its own (the route table knows its data segments)."""
    route = request.get(ROUTE)
    return route.template(request.raw_path) if route is not None else template(request.raw_path)


def _client(request: web.BaseRequest) -> str:
    try:
        context = request.app.get(CONTEXT)  # type: ignore[attr-defined]
    except (AttributeError, AssertionError):
        # A request aiohttp's parser refused never reached the app (web.Request.app
        # asserts it has a match_info): nothing of it, headers included, is believed.
        return request.remote or "-"
    if context is None:
        return request.remote or "-"
    return context.upstream.forwarders.client_address(request)


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse as an error, with a traceback whose
    message quotes the request's bytes: an `access_token` in the query included. It
    is the client's mistake, and may come in floods: one line at INFO instead, naming
    the problem but quoting nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
        record.msg = "malformed request from %s: %d %s"
        record.args = (peer, error.code, type(error).__name__)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return _http_log.isEnabledFor(logging.INFO)


# What aiohttp's HTTP server has to say about connections and unparseable requests.
_http_log = logging.getLogger("proxy.http")
_http_log.addFilter(_MalformedRequestFilter())


class _MatrixRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering what aiohttp answers itself (a request its
    parser refused, a target its router matches to no route, a handler that escaped
    `app.answering`) as a Matrix error.

    aiohttp's own answer is plain text quoting the parser's message, which holds the
    offending bytes: the request line, `access_token` query included, goes back to the
    sender (and to anything between it and the proxy)."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own first: it logs (a parser error as one INFO line, see
        # `_MalformedRequestFilter`) and refuses to answer twice once bytes went out.
        super().handle_error(request, status, exc, message)
        if status == 500:
            text = "Internal server error"
        elif isinstance(exc, HttpProcessingError):
            text = "Malformed HTTP request"
        else:
            text = HTTPStatus(status).phrase
        response = error_response(status, M_UNKNOWN, text)
        response.force_close()  # as aiohttp does: what follows on the connection is not trusted
        return response

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        # aiohttp closes the connections it knows as shutdown begins (`close`: an idle one
        # stops waiting for its next request). One accepted just after that, as the
        # listener closed, would wait for a first request it no longer reads, and its
        # client would hang for the whole grace: it is closed the same way here.
        self.close()
        await super().shutdown(timeout)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # The router's own answer to a target that no route can match (`OPTIONS *`, an
        # authority): raised before any handler runs, so `app.answering` never sees it.
        if isinstance(resp, web.HTTPException):
            resp = http_error_response(resp)
            context = request.app.get(CONTEXT) if isinstance(request, web.Request) else None
            if context is not None:
                context.upstream.homeserver_headers.apply(resp)
        return await super().finish_response(request, resp, start_time)


class _MatrixServer(web.Server):
    """aiohttp's Server (the protocol factory), making `_MatrixRequestHandler`s."""

    def __call__(self) -> web.RequestHandler:
        return _MatrixRequestHandler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no parameter for the handler class: the Server it built is made
        # one that builds ours (same layout, `__call__` differs).
        server.__class__ = _MatrixServer
        return server


class ProxyServer:
    """`async with ProxyServer(config) as server:` serves on `server.url` (and the
    metrics on `server.metrics_url` when enabled) until exit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.app = build_app(config, self.metrics)
        self._runner = _Runner(
            self.app,
            # A client that goes away cancels its handler, and with it the upstream request.
            handler_cancellation=True,
            access_log_class=AccessLogger,
            access_log=logging.getLogger("proxy.access"),
            # On shutdown, in-flight requests get this long; then long-polls are cut.
            shutdown_timeout=config.proxy.shutdown_grace,
            # aiohttp closes a connection that has not sent a whole request head this
            # long after it opened or after its last answer: a bound on slow clients.
            keepalive_timeout=config.proxy.client_timeout,
            # After answering a request whose body was not read whole (a refusal, a 408),
            # aiohttp reads and drops the rest for this long before closing: bounded by
            # the same client timeout, so a trickling client cannot stretch it.
            lingering_time=min(10.0, config.proxy.client_timeout),
            # Synapse (Twisted) accepts a request head of up to 16 KiB; aiohttp's default
            # of 8190 bytes would refuse long account data types that Synapse serves.
            max_line_size=16384,
            max_field_size=16384,
            # Request bodies stay as they came: a forwarded one goes upstream byte for byte
            # under its own Content-Length and Content-Encoding, and an owned one is read as
            # Synapse reads it (it never decodes a request body: gzip bytes are not JSON).
            auto_decompress=False,
            logger=_http_log,
        )
        self._metrics_runner: web.AppRunner | None = None
        self.url = ""
        self.metrics_url = ""

    async def start(self) -> None:
        await self._runner.setup()
        try:
            self.url = await _listen(self._runner, self.config.listen.host, self.config.listen.port)
            if self.config.metrics.enabled:
                metrics_app = web.Application()
                metrics_app[CONTEXT] = self.app[CONTEXT]
                metrics_app.router.add_get("/metrics", self.metrics.handle)
                metrics_app.router.add_get("/health", health)
                self._metrics_runner = web.AppRunner(metrics_app, access_log=None)
                await self._metrics_runner.setup()
                self.metrics_url = await _listen(
                    self._metrics_runner, self.config.metrics.host, self.config.metrics.port
                )
                log.info("metrics on %s/metrics", self.metrics_url)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "listening on %s, forwarding to %s (msc3391 %s)",
            self.url,
            self.config.upstream.url,
            "enabled" if self.config.msc3391_enabled else "disabled",
        )

    async def stop(self) -> None:
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self._runner.cleanup()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _listen(runner: web.AppRunner, host: str, port: int) -> str:
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[-1][:2]
    return f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"

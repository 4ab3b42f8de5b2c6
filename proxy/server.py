"""Running the app on a socket: used by the command line and by the tests alike."""

from __future__ import annotations

import logging
from types import TracebackType

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .app import build_app
from .config import Config
from .metrics import Metrics
from .routing import template

log = logging.getLogger("proxy")


class AccessLogger(AbstractAccessLogger):
    """One line per request: peer, method, route template (no IDs, no query), status."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.3fs",
            request.remote,
            request.method,
            template(request.raw_path),
            response.status,
            time,
        )


class ProxyServer:
    """`async with ProxyServer(config) as server:` serves on `server.url` (and the
    metrics on `server.metrics_url` when enabled) until exit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.app = build_app(config, self.metrics)
        self._runner = web.AppRunner(
            self.app,
            # A client that goes away cancels its handler, and with it the upstream request.
            handler_cancellation=True,
            access_log_class=AccessLogger,
            access_log=logging.getLogger("proxy.access"),
            # On shutdown, in-flight requests get this long; then long-polls are cut.
            shutdown_timeout=config.proxy.shutdown_grace,
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
                metrics_app.router.add_get("/metrics", self.metrics.handle)
                metrics_app.router.add_get("/health", _ok)
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


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})

"""Running the app on a socket: used by the command line and by the tests alike."""

from __future__ import annotations

import logging
from types import TracebackType

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .app import build_app
from .config import Config
from .forward import redact

log = logging.getLogger("proxy")


class AccessLogger(AbstractAccessLogger):
    """One line per request; the query's access_token is redacted."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %d %.3fs",
            request.remote,
            request.method,
            redact(request.raw_path),
            response.status,
            time,
        )


class ProxyServer:
    """`async with ProxyServer(config) as server:` serves on `server.url` until exit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.app = build_app(config)
        self._runner = web.AppRunner(
            self.app,
            # A client that goes away cancels its handler, and with it the upstream request.
            handler_cancellation=True,
            access_log_class=AccessLogger,
            access_log=logging.getLogger("proxy.access"),
        )
        self.url = ""

    async def start(self) -> None:
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, self.config.listen.host, self.config.listen.port)
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        log.info(
            "listening on %s, forwarding to %s (msc3391 %s)",
            self.url,
            self.config.upstream.url,
            "enabled" if self.config.msc3391_enabled else "disabled",
        )

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

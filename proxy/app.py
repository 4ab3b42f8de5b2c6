"""The application: where every request goes, and what lives as long as the process.

With `experimental_features.msc3391_enabled = false` nothing is routed: every request
is forwarded unchanged. With it on, the route table (`routes.py`) decides; a request
that matches no route is forwarded unchanged too.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .config import Config
from .context import Context
from .errors import M_UNKNOWN, ResponseError, error_response, http_error_response, unrecognized
from .forward import Upstream
from .health import CONTEXT, health
from .identity import Identity
from .log_templates import template
from .logs import new_request_id, request_id
from .metrics import ROUTE, Metrics
from .routes import ROUTES
from .routing import is_origin_form, match
from .store import open_store
from .timeouts import read_timeout

log = logging.getLogger(__name__)

__all__ = ["CONTEXT", "build_app"]


def dispatch(ctx: Context, request: web.Request) -> Awaitable[web.StreamResponse]:
    """The route table's answer for this request, not awaited yet (`answering` awaits
    it, so a held long-poll keeps no frame of this function)."""
    if not is_origin_form(request.raw_path):
        raise unrecognized()  # as Synapse answers an absolute-form target; never forwarded
    found = match(request.method, request.raw_path, ROUTES)
    # A preflight (OPTIONS) is the homeserver's to answer, on owned paths too.
    if found is not None and ctx.config.msc3391_enabled and request.method != "OPTIONS":
        request[ROUTE] = found.route
        if found.handler is not None:
            return found.handler(ctx, request, found.params)
        if found.route.owns_path:
            raise unrecognized(405)
    # Forwarded untouched, an owned route (feature off) keeps its timeout: long-polls.
    timeout = read_timeout(found.route.read_timeout, ctx.config.upstream, request.query) if found else None
    return ctx.upstream.forward(request, read_timeout=timeout)


Decide = Callable[[Context, web.Request], Awaitable[web.StreamResponse]]


def answering(decide: Decide) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler around `decide`: every failure leaves as a Matrix error body,
    nothing as a traceback. Each request gets an id for its log lines, and owned routes
    are counted.

    A wrapper, not an aiohttp middleware: a middleware keeps two more coroutine frames
    (its own and aiohttp's `_fix_request_current_app`) alive for as long as a request
    is held, and thousands of long-polls are held at once."""

    async def handle(request: web.Request) -> web.StreamResponse:
        request_id.set(new_request_id())
        ctx = request.app[CONTEXT]
        try:
            response = await decide(ctx, request)
        except ResponseError as e:
            response = e.response()
        except web.HTTPException as e:
            response = http_error_response(e)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, template(request.raw_path))
            response = error_response(500, M_UNKNOWN, "Internal server error")
        ctx.upstream.homeserver_headers.apply(response)
        route = request.get(ROUTE)
        if route is not None:
            ctx.metrics.count_request(route.name, response.status)
        return response

    return handle


def build_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    metrics = metrics or Metrics()
    app = web.Application(client_max_size=config.proxy.max_body_size)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        upstream = Upstream(config, metrics)
        await upstream.start()
        store = open_store(config.store)
        try:
            if config.msc3391_enabled:
                await store.open()
                metrics.watch_store(store)
                metrics.devices_pending.set_function(store.devices_pending)
            identity = Identity(
                upstream,
                metrics,
                ttl=config.proxy.identity_cache_ttl,
                max_size=config.proxy.identity_cache_size,
            )
            context = app[CONTEXT] = Context(config, upstream, identity, store, metrics)
            context.repairs.start()
            yield
            await context.repairs.stop()
        finally:
            await store.close()
            await upstream.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/health", answering(lambda ctx, request: health(request)))
    # [\s\S], not ".": a decoded path may hold a newline (%0A), and must still reach dispatch.
    app.router.add_route("*", r"/{path:[\s\S]*}", answering(dispatch))
    return app

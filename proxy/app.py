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
from .errors import M_TOO_LARGE, M_UNKNOWN, ResponseError, error_response, unrecognized
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


async def dispatch(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    if not is_origin_form(request.raw_path):
        raise unrecognized()  # as Synapse answers an absolute-form target; never forwarded
    found = match(request.method, request.raw_path, ROUTES)
    # A preflight (OPTIONS) is the homeserver's to answer, on owned paths too.
    if found is not None and ctx.config.msc3391_enabled and request.method != "OPTIONS":
        request[ROUTE] = found.route
        if found.handler is not None:
            return await found.handler(ctx, request, found.params)
        if found.route.owns_path:
            raise unrecognized(405)
    # Forwarded untouched, an owned route (feature off) keeps its timeout: long-polls.
    timeout = read_timeout(found.route.read_timeout, ctx.config.upstream, request.query) if found else None
    return await ctx.upstream.forward(request, read_timeout=timeout)


@web.middleware
async def matrix_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves as a Matrix error body; nothing leaves as a traceback.
    Each request gets an id for its log lines, and owned routes are counted."""
    request_id.set(new_request_id())
    response = await _answer(request, handler)
    ctx = request.app[CONTEXT]
    ctx.upstream.homeserver_headers.apply(response)
    route = request.get(ROUTE)
    if route is not None:
        ctx.metrics.count_request(route.name, response.status)
    return response


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ResponseError as e:
        return e.response()
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, M_TOO_LARGE, "Request content is too large")
    except web.HTTPException as e:
        return error_response(e.status, M_UNKNOWN, e.reason)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, template(request.raw_path))
        return error_response(500, M_UNKNOWN, "Internal server error")


def build_app(config: Config, metrics: Metrics | None = None) -> web.Application:
    metrics = metrics or Metrics()
    app = web.Application(middlewares=[matrix_errors], client_max_size=config.proxy.max_body_size)

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
    app.router.add_get("/health", health)
    # [\s\S], not ".": a decoded path may hold a newline (%0A), and must still reach dispatch.
    app.router.add_route("*", r"/{path:[\s\S]*}", dispatch)
    return app

"""Where every request goes.

With `experimental_features.msc3391_enabled = false` nothing is routed: every
request is forwarded unchanged. With it on, `ROUTES` below decides; a request that
matches no route is forwarded unchanged too. Route shapes live in `routing.py`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from . import account_data, devices, sync, versions
from .config import Config
from .context import Context
from .errors import (
    M_TOO_LARGE,
    M_UNKNOWN,
    MatrixError,
    RelayedResponse,
    error_response,
    unrecognized,
)
from .filters import FilterCache
from .forward import Upstream
from .identity import Identity
from .logs import new_request_id, request_id
from .metrics import Metrics, current_route
from .routing import RouteMatch, RouteName, is_origin_form, match, template
from .store import Store

log = logging.getLogger(__name__)

Handler = Callable[[Context, web.Request, dict[str, str]], Awaitable[web.StreamResponse]]

ROUTES: dict[RouteName, Handler] = {
    RouteName.DELETE_GLOBAL_ACCOUNT_DATA: account_data.delete,
    RouteName.DELETE_ROOM_ACCOUNT_DATA: account_data.delete,
    RouteName.GLOBAL_ACCOUNT_DATA: account_data.put_or_get,
    RouteName.ROOM_ACCOUNT_DATA: account_data.put_or_get,
    RouteName.SYNC: sync.sync,
    RouteName.INITIAL_SYNC: sync.legacy_initial_sync,
    RouteName.ROOM_INITIAL_SYNC: sync.legacy_initial_sync,
    RouteName.VERSIONS: versions.versions,
    RouteName.DELETE_DEVICE: devices.delete_device,
    RouteName.DELETE_DEVICES: devices.delete_devices,
    RouteName.LOGOUT: devices.logout,
    RouteName.LOGOUT_ALL: devices.logout_all,
    RouteName.DEACTIVATE: devices.deactivate,
}

CONTEXT = web.AppKey("context", Context)
ROUTE = web.RequestKey("route", str)  # the owned route a request was dispatched to


async def dispatch(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    if not is_origin_form(request.raw_path):
        raise unrecognized()  # as Synapse answers an absolute-form target; never forwarded
    found = match(request.method, request.raw_path)
    if ctx.config.msc3391_enabled and found is not None and request.method != "OPTIONS":
        current_route.set(found.name.value)
        request[ROUTE] = found.name.value
        if found.method_allowed:
            return await ROUTES[found.name](ctx, request, found.params)
        if found.route.owns_path:
            raise unrecognized(405)
    return await ctx.upstream.forward(request, read_timeout=_forward_read_timeout(ctx, request, found))


def _forward_read_timeout(ctx: Context, request: web.Request, found: RouteMatch | None) -> float | None:
    """Syncs forwarded untouched (feature off) keep their long-poll and initial-sync time."""
    if found is None or not found.method_allowed:
        return None
    if found.name is RouteName.SYNC:
        return ctx.upstream.sync_read_timeout(request.query)
    if found.name in (RouteName.INITIAL_SYNC, RouteName.ROOM_INITIAL_SYNC):
        return max(ctx.config.upstream.initial_sync_timeout, ctx.config.upstream.read_timeout)
    return None


async def health(request: web.Request) -> web.Response:
    """The proxy's own health: its store (when the feature is on) and, with
    `?upstream=true`, the homeserver. 503 names what fails: with a failing store the
    proxy still forwards and syncs, but refuses deletes."""
    if not is_origin_form(request.raw_path):
        raise unrecognized()  # `GET http://host/health` is no health check, as in `dispatch`
    ctx = request.app[CONTEXT]
    report: dict[str, str] = {"status": "ok"}
    problem = ctx.store.problem() if ctx.config.msc3391_enabled else None
    if problem is not None:
        report.update(status="unavailable", store=problem)
    elif ctx.config.msc3391_enabled:
        report["store"] = "ok"
    if request.query.get("upstream") in ("true", "1"):
        try:
            reply = await ctx.upstream.call("GET", "/_matrix/client/versions", headers={}, read_timeout=5.0)
            upstream = "ok" if reply.status == 200 else f"HTTP {reply.status}"
        except MatrixError as e:
            upstream = e.message
        report["upstream"] = upstream
        if upstream != "ok":
            report["status"] = "unavailable"
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)


@web.middleware
async def matrix_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves as a Matrix error body; nothing leaves as a traceback.
    Each request gets an id for its log lines, and owned routes are counted."""
    request_id.set(new_request_id())
    response = await _answer(request, handler)
    request.app[CONTEXT].upstream.homeserver_headers.apply(response)
    route = request.get(ROUTE)
    if route is not None:
        request.app[CONTEXT].metrics.requests.labels(route, str(response.status)).inc()
    return response


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except (MatrixError, RelayedResponse) as e:
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
        store = Store(config.store.path, busy_timeout=config.store.busy_timeout)
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
            filters = FilterCache(upstream, identity)
            context = app[CONTEXT] = Context(config, upstream, identity, store, filters, metrics)
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

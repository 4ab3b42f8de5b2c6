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
from .forward import Upstream, redact
from .identity import Identity
from .routing import RouteName, match
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


async def dispatch(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    if ctx.config.msc3391_enabled:
        found = match(request.method, request.raw_path)
        if found is not None:
            if found.method_allowed:
                return await ROUTES[found.name](ctx, request, found.params)
            if found.route.owns_path:
                raise unrecognized(405)
    return await ctx.upstream.forward(request)


@web.middleware
async def matrix_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves as a Matrix error body; nothing leaves as a traceback."""
    try:
        return await handler(request)
    except (MatrixError, RelayedResponse) as e:
        return e.response()
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, M_TOO_LARGE, "Request content is too large")
    except web.HTTPException as e:
        return error_response(e.status, M_UNKNOWN, e.reason)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, redact(request.raw_path))
        return error_response(500, M_UNKNOWN, "Internal server error")


def build_app(config: Config) -> web.Application:
    app = web.Application(middlewares=[matrix_errors], client_max_size=config.proxy.max_body_size)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        upstream = Upstream(config)
        await upstream.start()
        store = Store(config.store.path)
        try:
            if config.msc3391_enabled:
                await store.open()
            identity = Identity(
                upstream, ttl=config.proxy.identity_cache_ttl, max_size=config.proxy.identity_cache_size
            )
            app[CONTEXT] = Context(config, upstream, identity, store, FilterCache(upstream, identity))
            yield
        finally:
            await store.close()
            await upstream.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{path:.*}", dispatch)
    return app

"""Device and account removal: a device that is gone has nothing left to learn.

Each request goes to the homeserver first; only its 200 changes the store, so a
user-interactive-auth round trip (401 with flows) or a refusal changes nothing.
"""

from __future__ import annotations

import json
from functools import partial

from aiohttp import web

from .context import Context
from .errors import StoreUnavailable
from .handling import caller, read_body
from .identity import Requester


async def _forward_then(
    ctx: Context, request: web.Request, body: bytes | None, on_success: list[str] | None, requester: Requester
) -> web.StreamResponse:
    async with ctx.upstream.open(request, body=body) as upstream:
        if upstream.status == 200:
            user_id = requester.user_id
            if on_success is None:
                ctx.identity.forget_user(user_id)
                forget = partial(ctx.store.remove_all_devices, user_id)
            else:
                forget = partial(ctx.store.remove_devices, user_id, on_success)
            try:
                await forget()
            except StoreUnavailable:
                # The homeserver removed the devices and the client is told so. Their rows
                # go once the store takes it: nobody may ever ask again (after logout/all
                # or a deactivation, the account has no token left), so it is retried.
                which = None if on_success is None else tuple(on_success)
                ctx.repairs.add(("forget-devices", user_id, which), forget)
        return await ctx.upstream.relay(request, upstream)


async def delete_device(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    return await _forward_then(ctx, request, await read_body(ctx, request), [params["device_id"]], requester)


async def delete_devices(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    raw = await read_body(ctx, request)
    try:
        listed = json.loads(raw).get("devices")
        devices = [d for d in listed if isinstance(d, str)] if isinstance(listed, list) else []
    except (ValueError, AttributeError):
        devices = []  # the homeserver will refuse it, and nothing changes
    return await _forward_then(ctx, request, raw, devices, requester)


async def logout(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    gone = [requester.device_id] if requester.device_id is not None else []
    response = await _forward_then(ctx, request, await read_body(ctx, request), gone, requester)
    ctx.identity.forget_user(requester.user_id) if response.status == 200 else None
    return response


async def logout_all(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    return await _forward_then(ctx, request, await read_body(ctx, request), None, requester)


async def deactivate(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    return await _forward_then(ctx, request, await read_body(ctx, request), None, requester)

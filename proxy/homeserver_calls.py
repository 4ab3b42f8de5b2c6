"""The proxy's own requests to the homeserver, made as the caller (with the caller's
credentials, address and user agent): what the delete and sync handlers need to know
that the client's own request does not tell."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from .context import Context
from .errors import MatrixError
from .forward import UpstreamReply
from .identity import Requester
from .rewrite import NUDGE_TYPE
from .routing import encode_segment, split_raw_path

# How long after a nudge the device's syncs are read for it (it is acknowledged by the
# device's next sync, or by the to-device `since` of a sliding sync connection).
NUDGE_VISIBLE_FOR = 600.0


async def call_as(
    ctx: Context,
    request: web.Request,
    requester: Requester,
    method: str,
    path: str,
    json_body: Any = None,
    *,
    params: Sequence[tuple[str, str]] | None = None,
    data: bytes | None = None,
) -> UpstreamReply:
    """`path` (already percent-encoded) as the caller. `params`: the query, which carries
    the caller's credential parameters (an `access_token`, an appservice's `user_id`) by
    default. The body: `json_body`, or `data` (JSON already) as it is."""
    headers = ctx.identity.headers_for(request, requester.credentials)
    if data is not None:
        headers["Content-Type"] = "application/json"
    return await ctx.upstream.call(
        method,
        path,
        headers=headers,
        params=requester.credentials.params if params is None else params,
        json_body=json_body,
        data=data,
    )


def account_data_path(user_id: str, room_id: str | None, account_data_type: str) -> str:
    path = f"/_matrix/client/v3/user/{encode_segment(user_id)}"
    if room_id is not None:
        path += f"/rooms/{encode_segment(room_id)}"
    return path + f"/account_data/{encode_segment(account_data_type)}"


async def device_ids(ctx: Context, request: web.Request, requester: Requester) -> list[str]:
    """The account's devices, as the homeserver lists them now."""
    reply = await call_as(ctx, request, requester, "GET", "/_matrix/client/v3/devices")
    if reply.status != 200:
        raise reply.refusal("the device list")
    try:
        listed = json.loads(reply.body)["devices"]
        return [d["device_id"] for d in listed if isinstance(d.get("device_id"), str)]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MatrixError(502, "M_UNKNOWN", "The homeserver sent an invalid device list") from None


async def joined_rooms(ctx: Context, request: web.Request, requester: Requester) -> frozenset[str] | None:
    """The rooms the caller is joined to, or None if the homeserver cannot say."""
    reply = await call_as(ctx, request, requester, "GET", "/_matrix/client/v3/joined_rooms")
    if reply.status != 200:
        return None
    try:
        rooms = json.loads(reply.body)["joined_rooms"]
        return frozenset(r for r in rooms if isinstance(r, str))
    except (ValueError, KeyError, TypeError):
        return None


async def nudge(ctx: Context, request: web.Request, requester: Requester) -> bool:
    """A to-device message from the caller's device to itself, of a type of the proxy's
    own that the sync rewriters strip from every answer they read. It changes the
    homeserver's state for that device alone: a waiting long-poll of the device wakes,
    and its next sync token differs from the last one. True if the homeserver took it."""
    if requester.device_id is None:
        return False
    # Until it is acknowledged, every sync of the device may carry it, on any of its
    # connections (an encryption-only sliding sync connection too), answered by any
    # instance: marked before it is sent, since it wakes a waiting sync at once.
    await ctx.store.note_nudge(requester.user_id, requester.device_id, NUDGE_VISIBLE_FOR)
    try:
        reply = await call_as(
            ctx,
            request,
            requester,
            "PUT",
            f"/_matrix/client/v3/sendToDevice/{NUDGE_TYPE}/{secrets.token_hex(16)}",
            {"messages": {requester.user_id: {requester.device_id: {}}}},
        )
    except MatrixError:
        return False
    return reply.status == 200


async def again_after_a_nudge(
    ctx: Context, request: web.Request, requester: Requester, *, data: bytes | None = None
) -> UpstreamReply | None:
    """The client's sync request once more, without its wait, after a nudge: the answer
    then has a token (`next_batch`, `pos`) of its own, so that its arrival can be told
    apart from a retry of it. `data`: the request's body, if it has one. None if the
    homeserver refused either."""
    if not await nudge(ctx, request, requester):
        return None
    path, _ = split_raw_path(request.raw_path)
    query = [(k, "0" if k == "timeout" else v) for k, v in request.query.items()]
    again = await call_as(ctx, request, requester, request.method, path, params=query, data=data)
    return again if again.status == 200 else None

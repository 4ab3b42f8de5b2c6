"""Account data endpoints: DELETE (MSC3391), PUT (`{}` deletes), GET (404 once deleted).

Each handler runs Synapse's checks in Synapse's order with Synapse's texts, then does
one thing (the delete and the revive themselves are in `deletion.py`).
"""

from __future__ import annotations

from aiohttp import web

from .context import Context
from .deletion import delete as delete_account_data
from .deletion import is_empty_object, write_content
from .errors import (
    M_BAD_JSON,
    M_FORBIDDEN,
    M_INVALID_PARAM,
    M_NOT_FOUND,
    MatrixError,
    StoreUnavailable,
    json_response,
)
from .forward import body_response
from .handling import caller, parse_json_object, read_body
from .identity import Requester
from .matrix_ids import is_valid_room_id

# A GET answer longer than this is neither `{}` nor a Matrix 404 error body.
_SMALL = 512


def _check_room_id(room_id: str | None) -> None:
    if room_id is not None and not is_valid_room_id(room_id):
        raise MatrixError(400, M_INVALID_PARAM, f"{room_id} is not a valid room ID")


def _check_can_set(account_data_type: str) -> None:
    if account_data_type == "m.fully_read":
        raise MatrixError(
            405,
            M_BAD_JSON,
            "Cannot set m.fully_read through this API. Use /rooms/!roomId:server.name/read_markers",
        )
    if account_data_type == "m.push_rules":
        raise MatrixError(405, M_BAD_JSON, "Cannot set m.push_rules through this API. Use /pushrules")


def _check_own(requester: Requester, user_id: str, verb: str) -> None:
    if user_id != requester.user_id:
        raise MatrixError(403, M_FORBIDDEN, f"Cannot {verb} account data for other users.")


async def _target(
    ctx: Context, request: web.Request, params: dict[str, str], verb: str
) -> tuple[Requester, str | None, str]:
    """The caller and the (room, type) the path names, after Synapse's first checks."""
    requester = await caller(ctx, request)
    _check_own(requester, params["user_id"], verb)
    room_id = params.get("room_id")
    _check_room_id(room_id)
    return requester, room_id, params["account_data_type"]


async def delete(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester, room_id, account_data_type = await _target(ctx, request, params, "delete")
    _check_can_set(account_data_type)
    await delete_account_data(ctx, request, requester, room_id, account_data_type)
    return json_response({})


async def put(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester, room_id, account_data_type = await _target(ctx, request, params, "add")
    _check_can_set(account_data_type)
    raw = await read_body(ctx, request)
    if parse_json_object(raw) == {}:
        await delete_account_data(ctx, request, requester, room_id, account_data_type)
        return json_response({})
    reply = await write_content(ctx, request, requester, (requester.user_id, room_id, account_data_type), raw)
    return reply.response()


async def get(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester, room_id, account_data_type = await _target(ctx, request, params, "get")
    # HEAD is served as GET (Synapse does the same), so a deleted type is 404 for both;
    # aiohttp leaves the body out of the answer to a HEAD.
    async with ctx.upstream.open(request, method="GET", headers={"Accept-Encoding": "identity"}) as upstream:
        if upstream.status not in (200, 404):
            return await ctx.upstream.relay(request, upstream)
        prefix, whole = await ctx.upstream.read_prefix(upstream, _SMALL)
        if not whole:
            return await ctx.upstream.relay(request, upstream, prefix=prefix)
    deleted = upstream.status == 404 or is_empty_object(prefix)
    if deleted and requester.device_id is not None:
        # The device now knows the type is gone: the proof of receipt for a GET. Best
        # effort, as in /sync: if the store fails, the row stays and a sync tells again.
        try:
            acknowledged = await ctx.store.acknowledge_type(
                requester.user_id, requester.device_id, room_id, account_data_type
            )
        except StoreUnavailable:
            acknowledged = 0  # logged by the store, once per burst
        ctx.metrics.acknowledgements.labels("get").inc(acknowledged)
    if upstream.status == 200 and deleted:
        message = "Room account data not found" if room_id is not None else "Account data not found"
        raise MatrixError(404, M_NOT_FOUND, message)
    return body_response(upstream, prefix, decoded=False)

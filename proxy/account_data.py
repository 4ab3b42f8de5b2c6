"""Account data endpoints: DELETE (MSC3391), PUT (`{}` deletes), GET (404 once deleted).

Each handler runs Synapse's checks in Synapse's order with Synapse's texts, then
does one thing. A delete is a PUT of `{}` to the homeserver with the caller's own
credentials, bracketed by an intent in the store:

    begin_delete (tombstone 'pending' + one row per other device)
    -> PUT {} upstream
    -> commit_delete on 200 | abort_delete on a refusal | settle when unsure

so a delete answered 200 is recorded, and a refused one leaves no trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .context import Context
from .errors import (
    M_BAD_JSON,
    M_FORBIDDEN,
    M_INVALID_PARAM,
    M_NOT_FOUND,
    M_NOT_JSON,
    MatrixError,
    upstream_refusal,
)
from .forward import ClientTooSlow, UpstreamReply
from .identity import Requester
from .matrix_ids import is_valid_room_id
from .store import StoreUnavailable

log = logging.getLogger(__name__)

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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Synapse's `parse_json_object_from_request`: same rules, same errors."""
    try:
        content = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise MatrixError(400, M_NOT_JSON, "Content not JSON.") from None
    if not isinstance(content, dict):
        raise MatrixError(400, M_BAD_JSON, "Content must be a JSON object.")
    return content


def _account_data_path(user_id: str, room_id: str | None, account_data_type: str) -> str:
    path = f"/_matrix/client/v3/user/{quote(user_id, safe='')}"
    if room_id is not None:
        path += f"/rooms/{quote(room_id, safe='')}"
    return path + f"/account_data/{quote(account_data_type, safe='')}"


def _ok() -> web.Response:
    return web.json_response({})


async def read_body(ctx: Context, request: web.Request) -> bytes:
    """The body of a request the proxy reads itself, within `proxy.client_timeout`
    (aiohttp has no body read timeout of its own: a trickling client would hold the
    handler for ever). Its size is bounded by `proxy.max_body_size` (413)."""
    try:
        async with asyncio.timeout(ctx.config.proxy.client_timeout):
            return await request.read()
    except TimeoutError:
        raise ClientTooSlow() from None


async def caller(ctx: Context, request: web.Request) -> Requester:
    """The authenticated caller, after settling deletes an earlier process left open."""
    requester = await ctx.identity.requester(request)
    for stream_id in ctx.store.orphaned_intents(requester.user_id):
        try:
            await settle(ctx, request, requester, stream_id)
        except StoreUnavailable:
            break  # logged by the store; the intent waits for a later request
    return requester


# --- handlers --------------------------------------------------------------------------


async def delete(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    _check_own(requester, params["user_id"], "delete")
    room_id = params.get("room_id")
    _check_room_id(room_id)
    _check_can_set(params["account_data_type"])
    await delete_account_data(ctx, request, requester, room_id, params["account_data_type"])
    return _ok()


async def put_or_get(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    if request.method == "PUT":
        return await put(ctx, request, params)
    return await get(ctx, request, params)


async def put(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    _check_own(requester, params["user_id"], "add")
    room_id = params.get("room_id")
    account_data_type = params["account_data_type"]
    _check_room_id(room_id)
    _check_can_set(account_data_type)
    raw = await read_body(ctx, request)
    if parse_json_object(raw) == {}:
        await delete_account_data(ctx, request, requester, room_id, account_data_type)
        return _ok()
    key = (requester.user_id, room_id, account_data_type)
    async with ctx.type_locks.hold(key):
        async with ctx.upstream.open(request, body=raw) as upstream:
            if upstream.status == 200 and ctx.store.has_rows(requester.user_id):
                # Live again: no device needs to hear of the old delete any more. (A
                # settled tombstone always has rows: without any, there is none to drop,
                # and the write does not depend on the store at all.)
                await ctx.store.revive(*key)
            return await ctx.upstream.relay(request, upstream)


async def get(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    _check_own(requester, params["user_id"], "get")
    room_id = params.get("room_id")
    account_data_type = params["account_data_type"]
    _check_room_id(room_id)
    async with ctx.upstream.open(request, headers={"Accept-Encoding": "identity"}) as upstream:
        if upstream.status not in (200, 404):
            return await ctx.upstream.relay(request, upstream)
        prefix, whole = await ctx.upstream.read_prefix(upstream, _SMALL)
        if not whole:
            return await ctx.upstream.relay(request, upstream, prefix=prefix)
    deleted = upstream.status == 404 or _is_empty_object(prefix)
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
    return web.Response(
        status=upstream.status,
        body=prefix,
        headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")},
    )


def _is_empty_object(raw: bytes) -> bool:
    try:
        return json.loads(raw) == {}
    except ValueError:
        return False


# --- the delete itself -----------------------------------------------------------------


async def delete_account_data(
    ctx: Context, request: web.Request, requester: Requester, room_id: str | None, account_data_type: str
) -> None:
    """Delete, or raise the error to answer. Runs to completion even if the client
    goes away, so the store and the homeserver never disagree because of a hang-up."""
    task = asyncio.ensure_future(_delete(ctx, request, requester, room_id, account_data_type))
    await asyncio.shield(task)


async def _delete(
    ctx: Context, request: web.Request, requester: Requester, room_id: str | None, account_data_type: str
) -> None:
    user_id = requester.user_id
    path = _account_data_path(user_id, room_id, account_data_type)
    async with ctx.type_locks.hold((user_id, room_id, account_data_type)):
        current = await _call(ctx, request, requester, "GET", path)
        if current.status == 404 or (current.status == 200 and _is_empty_object(current.body)):
            # Never set, or deleted already: as in Synapse, nothing changes and no
            # device is told again.
            return
        if current.status != 200:
            # Whether there is anything to delete is unknown: the homeserver's error
            # goes back rather than a guess (a `{}` written for a type never set).
            raise upstream_refusal(current.status, current.body, current.content_type, "the read")
        devices = await device_ids(ctx, request, requester)
        stream_id = await ctx.store.begin_delete(
            user_id, room_id, account_data_type, requester.device_id, devices
        )
        try:
            reply = await _call(ctx, request, requester, "PUT", path, {})
        except MatrixError:
            # 502/504: the write may or may not have landed. Ask, rather than guess.
            if await settle(ctx, request, requester, stream_id) is True:
                return
            raise
        except BaseException:
            await ctx.store.abort_delete(stream_id)
            raise
        if reply.status >= 500:
            # The homeserver failed while handling the write, perhaps after storing it.
            if await settle(ctx, request, requester, stream_id) is True:
                return
            raise upstream_refusal(reply.status, reply.body, reply.content_type, "the write")
        if reply.status != 200:
            await ctx.store.abort_delete(stream_id)
            raise upstream_refusal(reply.status, reply.body, reply.content_type, "the write")
        await ctx.store.commit_delete(stream_id)
        ctx.metrics.deletes.labels("global" if room_id is None else "room").inc()


async def settle(ctx: Context, request: web.Request, requester: Requester, stream_id: int) -> bool | None:
    """Settle a delete whose homeserver write has an unknown outcome by reading the
    type back: `{}` means it landed (commit), anything else that it did not (abort).
    Returns None, leaving the intent for a later request, if the homeserver cannot say."""
    tombstone = await ctx.store.tombstone(stream_id)
    if tombstone is None or tombstone.state != "pending":
        return None
    try:
        reply = await _call(
            ctx,
            request,
            requester,
            "GET",
            _account_data_path(tombstone.user_id, tombstone.room_id, tombstone.account_data_type),
        )
    except MatrixError:
        ctx.store.mark_orphaned(tombstone.user_id, stream_id)
        return None
    if reply.status == 200 and _is_empty_object(reply.body):
        await ctx.store.commit_delete(stream_id)
        return True
    if reply.status in (200, 404):
        await ctx.store.abort_delete(stream_id)
        return False
    ctx.store.mark_orphaned(tombstone.user_id, stream_id)
    return None


async def device_ids(ctx: Context, request: web.Request, requester: Requester) -> list[str]:
    """The account's devices, as the homeserver lists them now."""
    reply = await _call(ctx, request, requester, "GET", "/_matrix/client/v3/devices")
    if reply.status != 200:
        raise upstream_refusal(reply.status, reply.body, reply.content_type, "the device list")
    try:
        listed = json.loads(reply.body)["devices"]
        return [d["device_id"] for d in listed if isinstance(d.get("device_id"), str)]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MatrixError(502, "M_UNKNOWN", "The homeserver sent an invalid device list") from None


async def _call(
    ctx: Context, request: web.Request, requester: Requester, method: str, path: str, json_body: Any = None
) -> UpstreamReply:
    return await ctx.upstream.call(
        method,
        path,
        headers=ctx.identity.headers_for(request, requester.credentials),
        params=requester.credentials.params,
        json_body=json_body,
    )

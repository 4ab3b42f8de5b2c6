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
import secrets
from collections.abc import Coroutine
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from .context import Context
from .errors import (
    M_BAD_JSON,
    M_FORBIDDEN,
    M_INVALID_PARAM,
    M_NOT_FOUND,
    M_NOT_JSON,
    MatrixError,
    StoreUnavailable,
    json_response,
)
from .forward import ClientTooSlow, UpstreamReply, body_response
from .identity import Requester
from .matrix_ids import is_valid_room_id
from .repairs import TypeKey
from .rewrite import NUDGE_TYPE
from .routing import encode_segment

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    path = f"/_matrix/client/v3/user/{encode_segment(user_id)}"
    if room_id is not None:
        path += f"/rooms/{encode_segment(room_id)}"
    return path + f"/account_data/{encode_segment(account_data_type)}"


def _ok() -> web.Response:
    return json_response({})


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
    reply = await _to_completion(_write(ctx, request, requester, key, raw))
    return reply.response()


async def _write(
    ctx: Context, request: web.Request, requester: Requester, key: TypeKey, raw: bytes
) -> UpstreamReply:
    """Forward a PUT of content; once the homeserver holds it, the type is live again
    and no device needs to hear of an old delete of it. A store that fails after the
    homeserver accepted does not turn the accepted write into an error: the revive is
    queued and retried (`repairs.py`)."""
    async with ctx.type_locks.hold(key):
        reply = await ctx.upstream.exchange(request, body=raw)
        # A settled tombstone always has rows: a user without any has none to drop, and
        # the write does not depend on the store at all.
        if reply.status == 200 and (ctx.store.has_rows(requester.user_id) or ctx.repairs.queued(key)):
            await ctx.repairs.run_or_queue(key, partial(ctx.store.revive, *key), revive=True)
        return reply


async def get(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    _check_own(requester, params["user_id"], "get")
    room_id = params.get("room_id")
    account_data_type = params["account_data_type"]
    _check_room_id(room_id)
    # HEAD is served as GET (Synapse does the same), so a deleted type is 404 for both;
    # aiohttp leaves the body out of the answer to a HEAD.
    async with ctx.upstream.open(request, method="GET", headers={"Accept-Encoding": "identity"}) as upstream:
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
    return body_response(upstream, prefix, decoded=False)


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
    await _to_completion(_delete(ctx, request, requester, room_id, account_data_type))


async def _to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even if the client goes away (its handler is cancelled):
    a write the homeserver accepted is always followed by the store's part of it."""
    return await asyncio.shield(asyncio.ensure_future(work))


async def _delete(
    ctx: Context, request: web.Request, requester: Requester, room_id: str | None, account_data_type: str
) -> None:
    user_id = requester.user_id
    key = (user_id, room_id, account_data_type)
    path = _account_data_path(user_id, room_id, account_data_type)
    async with ctx.type_locks.hold(key):
        # A store write of this type still queued from a fault comes first; if the
        # store still fails, so would this delete's, before anything reaches the homeserver.
        await ctx.repairs.flush(key)
        current = await _call(ctx, request, requester, "GET", path)
        if current.status == 404 or (current.status == 200 and _is_empty_object(current.body)):
            # Never set, or deleted already: as in Synapse, the homeserver is not written
            # and no other device is told again. The device that asked is: a client
            # deleting with `PUT {}` waits for the deletion to come back over its sync
            # (matrix-js-sdk 43 waits for ever).
            await _echo_to_the_deleting_device(ctx, request, requester, key)
            return
        if current.status != 200:
            # Whether there is anything to delete is unknown: the homeserver's error
            # goes back rather than a guess (a `{}` written for a type never set).
            raise current.refusal("the read")
        devices = await device_ids(ctx, request, requester)
        stream_id = await ctx.store.begin_delete(
            user_id, room_id, account_data_type, requester.device_id, devices
        )
        try:
            reply = await _call(ctx, request, requester, "PUT", path, {})
        except MatrixError:
            # 502/504: the write may or may not have landed. Ask, rather than guess.
            if await _settle_held(ctx, request, requester, stream_id) is True:
                return
            raise
        except BaseException:
            # Cancelled at shutdown, or a bug: whether the write landed is unknown, so
            # the intent stays for the user's next request (or the next start) to settle.
            ctx.store.mark_orphaned(user_id, stream_id)
            raise
        if reply.status >= 500:
            # The homeserver failed while handling the write, perhaps after storing it.
            if await _settle_held(ctx, request, requester, stream_id) is True:
                return
            raise reply.refusal("the write")
        if reply.status != 200:
            await _abort(ctx, key, stream_id)
            raise reply.refusal("the write")
        await _commit(ctx, key, stream_id)


async def _echo_to_the_deleting_device(
    ctx: Context, request: web.Request, requester: Requester, key: TypeKey
) -> None:
    """A row for the deleting device alone, delivered by its next sync like any other;
    the nudge wakes that sync if it is waiting at the homeserver, where nothing changed."""
    if requester.device_id is None:
        return  # an appservice acting as a user without a device: there is no sync to tell
    await ctx.store.echo_delete(*key, requester.device_id)
    await nudge(ctx, request, requester)


async def _commit(ctx: Context, key: TypeKey, stream_id: int) -> None:
    """The homeserver holds the delete: so must the store. If the store fails now (a
    full disk), the delete still happened and is answered 200: its intent is on disk
    already, and the commit is retried until the store takes it."""
    await ctx.repairs.run_or_queue(key, partial(ctx.store.commit_delete, stream_id))
    ctx.metrics.deletes.labels("global" if key[1] is None else "room").inc()


async def _abort(ctx: Context, key: TypeKey, stream_id: int) -> None:
    """The homeserver refused the write: the intent goes (now, or once the store takes it)."""
    await ctx.repairs.run_or_queue(key, partial(ctx.store.abort_delete, stream_id))


async def settle(ctx: Context, request: web.Request, requester: Requester, stream_id: int) -> bool | None:
    """Settle a delete whose homeserver write has an unknown outcome by reading the
    type back: `{}` means it landed (commit), anything else that it did not (abort).
    Returns None, leaving the intent for a later request, if the homeserver cannot say
    (or it is settled already).

    Several requests of the user may try at once (a retried DELETE beside a sync
    loop): each settles under the type's lock, and only an intent still pending."""
    tombstone = await ctx.store.tombstone(stream_id)
    if tombstone is None or tombstone.state != "pending":
        return None
    async with ctx.type_locks.hold((tombstone.user_id, tombstone.room_id, tombstone.account_data_type)):
        return await _settle_held(ctx, request, requester, stream_id)


async def _settle_held(
    ctx: Context, request: web.Request, requester: Requester, stream_id: int
) -> bool | None:
    """`settle`, for a caller that holds the type's lock already."""
    tombstone = await ctx.store.tombstone(stream_id)
    if tombstone is None or tombstone.state != "pending":
        return None  # settled by another request while this one waited for the lock
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
    key = (tombstone.user_id, tombstone.room_id, tombstone.account_data_type)
    if reply.status == 200 and _is_empty_object(reply.body):
        await _commit(ctx, key, stream_id)
        return True
    if reply.status in (200, 404):
        await _abort(ctx, key, stream_id)
        return False
    ctx.store.mark_orphaned(tombstone.user_id, stream_id)
    return None


async def nudge(ctx: Context, request: web.Request, requester: Requester) -> bool:
    """A to-device message from the caller's device to itself, of a type of the proxy's
    own that the sync rewriter strips from every answer it reads. It changes the
    homeserver's state for that device alone: a waiting long-poll of the device wakes,
    and its next sync token differs from the last one. True if the homeserver took it."""
    if requester.device_id is None:
        return False
    try:
        reply = await _call(
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


async def device_ids(ctx: Context, request: web.Request, requester: Requester) -> list[str]:
    """The account's devices, as the homeserver lists them now."""
    reply = await _call(ctx, request, requester, "GET", "/_matrix/client/v3/devices")
    if reply.status != 200:
        raise reply.refusal("the device list")
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

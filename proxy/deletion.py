"""A delete, and a write that makes a deleted type live again: the store and the
homeserver kept in step.

A delete is a PUT of `{}` to the homeserver with the caller's own credentials,
bracketed by an intent in the store:

    begin_delete (tombstone 'pending' + one row per other device)
    -> PUT {} upstream
    -> commit_delete on 200 | abort_delete on a refusal | settle when unsure

so a delete answered 200 is recorded, and a refused one leaves no trace. Writes of one
`(user, room, type)` hold that type's lock, so the store follows the order in which the
homeserver accepted them; each runs to its end even if its client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from dataclasses import replace
from enum import Enum
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from .context import Context
from .errors import MatrixError, ResponseError, StoreUnavailable
from .forward import UpstreamReply
from .homeserver_calls import account_data_path, call_as, device_ids, nudge
from .identity import Requester
from .records import PendingDelete
from .repairs import TypeKey

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_empty_object(raw: bytes) -> bool:
    try:
        return json.loads(raw) == {}
    except ValueError:
        return False


class Held(Enum):
    """What the homeserver's answer to a GET of one type says it holds."""

    NOTHING = "nothing"  # 404: never set (or deleted, by a homeserver with MSC3391 of its own)
    EMPTY = "empty"  # 200 `{}`: deleted
    CONTENT = "content"  # 200 with content: live
    UNKNOWN = "unknown"  # any other answer: it cannot say now


def held(reply: UpstreamReply) -> Held:
    if reply.status == 404:
        return Held.NOTHING
    if reply.status != 200:
        return Held.UNKNOWN
    return Held.EMPTY if is_empty_object(reply.body) else Held.CONTENT


async def _held_now(ctx: Context, request: web.Request, requester: Requester, key: TypeKey) -> Held:
    """What the homeserver holds for `key`, asked as the caller; a homeserver that
    cannot be reached cannot say either."""
    try:
        reply = await call_as(ctx, request, requester, "GET", account_data_path(*key))
    except MatrixError:
        return Held.UNKNOWN
    return held(reply)


async def settle_orphans(ctx: Context, request: web.Request, requester: Requester) -> None:
    """Settle the deletes of this user that an earlier process (or a write whose outcome
    stayed unknown) left open: every owned request of the user does this first."""
    for stream_id in ctx.store.orphaned_intents(requester.user_id):
        try:
            await settle(ctx, request, requester, stream_id)
        except StoreUnavailable:
            break  # logged by the store; the intent waits for a later request


async def delete(
    ctx: Context, request: web.Request, requester: Requester, room_id: str | None, account_data_type: str
) -> None:
    """Delete, or raise the error to answer. Runs to completion even if the client
    goes away, so the store and the homeserver never disagree because of a hang-up."""
    await _to_completion(_delete(ctx, request, requester, room_id, account_data_type))


async def write_content(
    ctx: Context, request: web.Request, requester: Requester, key: TypeKey, raw: bytes
) -> UpstreamReply:
    """Forward the client's PUT of content (`raw`, not `{}`); see `_write_content`."""
    return await _to_completion(_write_content(ctx, request, requester, key, raw))


async def _write_content(
    ctx: Context, request: web.Request, requester: Requester, key: TypeKey, raw: bytes
) -> UpstreamReply:
    """Forward a PUT of content; once the homeserver holds it, the type is live again
    and no device needs to hear of an old delete of it. A store that fails after the
    homeserver accepted does not turn the accepted write into an error: the revive is
    queued and retried (`repairs.py`)."""
    # Not required: a write of content does not depend on the store. If it is down, no
    # instance can begin a delete of the type either.
    async with ctx.type_locks.hold(key, required=False):
        reply = await ctx.upstream.exchange(request, body=raw)
        # A settled tombstone always has rows: a user without any has none to drop, and
        # the write does not depend on the store at all.
        if reply.status == 200 and (ctx.store.has_rows(requester.user_id) or ctx.repairs.queued(key)):
            await ctx.repairs.run_or_queue(key, partial(ctx.store.revive, *key), revive=True)
        return reply


async def _to_completion(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even if the client goes away (its handler is cancelled):
    a write the homeserver accepted is always followed by the store's part of it."""
    return await asyncio.shield(asyncio.ensure_future(work))


async def _delete(
    ctx: Context, request: web.Request, requester: Requester, room_id: str | None, account_data_type: str
) -> None:
    user_id = requester.user_id
    key = (user_id, room_id, account_data_type)
    path = account_data_path(user_id, room_id, account_data_type)
    async with ctx.type_locks.hold(key):
        # A store write of this type still queued from a fault comes first; if the
        # store still fails, so would this delete's, before anything reaches the homeserver.
        await ctx.repairs.flush(key)
        stream_id = await _read_and_begin(ctx, request, requester, key, path)
        if stream_id is None:
            return
        try:
            reply = await call_as(ctx, request, requester, "PUT", path, {})
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


async def _read_and_begin(
    ctx: Context, request: web.Request, requester: Requester, key: TypeKey, path: str
) -> int | None:
    """Read the account's devices, then the type, and begin the intent while the type is
    read. Returns the intent's stream_id, or None if there was nothing to delete (the
    deleting device is told, as Synapse would); raises the error to answer otherwise.

    Both reads are made under the type's lock, so the devices are the ones the account
    has when the homeserver takes the write. One after the other, not at once: a
    homeserver process serves them no sooner together (Synapse, through the proxy:
    7.5 ms for both at once, 7.3 ms in turn), and in turn the intent's durable write
    hides behind the second read instead of following both."""
    listing_error: ResponseError | None = None
    intent: asyncio.Future[int] | None = None
    try:
        devices = await device_ids(ctx, request, requester)
    except ResponseError as e:
        listing_error = e  # answered only if there is something to delete
    else:
        # A pending intent is never injected into a sync, and is withdrawn if the
        # read finds nothing to delete.
        intent = asyncio.ensure_future(ctx.store.begin_delete(*key, requester.device_id, devices))
    try:
        current = await call_as(ctx, request, requester, "GET", path)
    except MatrixError:
        await _withdraw(ctx, key, intent)
        raise
    except BaseException:
        if intent is not None:  # cancelled at shutdown, or a bug: settled later
            intent.add_done_callback(partial(_orphan_if_begun, ctx, key[0]))
        raise
    value = held(current)
    if value in (Held.NOTHING, Held.EMPTY):
        # Never set, or deleted already: as in Synapse, the homeserver is not written
        # and no other device is told again. The device that asked is: a client
        # deleting with `PUT {}` waits for the deletion to come back over its sync
        # (matrix-js-sdk 43 waits for ever).
        await _withdraw(ctx, key, intent)
        await _echo_to_the_deleting_device(ctx, request, requester, key)
        return None
    if value is Held.UNKNOWN:
        # Whether there is anything to delete is unknown: the homeserver's error goes
        # back rather than a guess (a `{}` written for a type never set).
        await _withdraw(ctx, key, intent)
        raise current.refusal("the read")
    if listing_error is not None:
        raise listing_error
    assert intent is not None
    return await intent


async def _withdraw(ctx: Context, key: TypeKey, intent: asyncio.Future[int] | None) -> None:
    """An intent begun while the type was read, not wanted after all: it goes, as a
    refused write's does (none was begun if the store failed)."""
    if intent is None:
        return
    try:
        stream_id = await intent
    except StoreUnavailable:
        return
    await _abort(ctx, key, stream_id)


def _orphan_if_begun(ctx: Context, user_id: str, intent: asyncio.Future[int]) -> None:
    if not intent.cancelled() and intent.exception() is None:
        ctx.store.mark_orphaned(user_id, intent.result())


async def _echo_to_the_deleting_device(
    ctx: Context, request: web.Request, requester: Requester, key: TypeKey
) -> None:
    """A row for the deleting device alone, delivered by its next sync like any other;
    the nudge wakes that sync if it is waiting at the homeserver, where nothing changed."""
    if requester.device_id is None:
        return  # an appservice acting as a user without a device: there is no sync to tell
    ctx.confirmed.add(await ctx.store.echo_delete(*key, requester.device_id))
    await nudge(ctx, request, requester)


async def _commit(ctx: Context, key: TypeKey, stream_id: int) -> None:
    """The homeserver holds the delete: so must the store. If the store fails now (a
    full disk), the delete still happened and is answered 200: its intent is on disk
    already, and the commit is retried until the store takes it."""
    await ctx.repairs.run_or_queue(key, partial(ctx.store.commit_delete, stream_id))
    ctx.confirmed.add(stream_id)
    ctx.metrics.deletes.labels("global" if key[1] is None else "room").inc()


async def tellable(
    ctx: Context, request: web.Request, requester: Requester, pending: list[PendingDelete]
) -> list[PendingDelete]:
    """`pending` as a sync may tell it: each settled delete that this process has not
    seen the homeserver agree with is read back first (once; see `confirmed.py`). One
    whose type is live again is revived, and goes; one the homeserver cannot say of
    stays unsettled for now (never injected, as an intent is)."""
    out = []
    for delete in pending:
        if delete.settled and delete.stream_id not in ctx.confirmed:
            agrees = await _confirm(ctx, request, requester, delete)
            if agrees is False:
                continue
            if agrees is None:
                delete = replace(delete, settled=False)
        out.append(delete)
    return out


async def _confirm(
    ctx: Context, request: web.Request, requester: Requester, delete: PendingDelete
) -> bool | None:
    """Whether the homeserver still holds `{}` (or nothing) for a settled delete's type;
    if it holds content, the tombstone is revived. None if it cannot be told now. Under
    the type's lock, so that no delete or revive of the type runs between the read and
    what follows from it."""
    key = (requester.user_id, delete.room_id, delete.account_data_type)
    try:
        async with ctx.type_locks.hold(key):
            tombstone = await ctx.store.tombstone(delete.stream_id)
            if tombstone is None or tombstone.state != "done":
                return False  # revived, or gone with its device, while this waited
            value = await _held_now(ctx, request, requester, key)
            if value is Held.UNKNOWN:
                return None
            if value is not Held.CONTENT:
                ctx.confirmed.add(delete.stream_id)
                return True
            log.warning("a delete whose type is live on the homeserver again was dropped (a lost revive)")
            ctx.metrics.lost_revives.inc()
            await ctx.repairs.run_or_queue(key, partial(ctx.store.revive, *key), revive=True)
            return False
    except StoreUnavailable:
        return None  # logged by the store, once per burst


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
    key = (tombstone.user_id, tombstone.room_id, tombstone.account_data_type)
    value = await _held_now(ctx, request, requester, key)
    if value is Held.EMPTY:
        await _commit(ctx, key, stream_id)
        return True
    if value is not Held.UNKNOWN:
        await _abort(ctx, key, stream_id)
        return False
    ctx.store.mark_orphaned(tombstone.user_id, stream_id)
    return None

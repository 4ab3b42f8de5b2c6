"""What both sync handlers (`/sync`, sliding sync) ask of the store, and how.

The store only refines what the homeserver sends (acknowledgements, injections): when
it fails, a sync goes on without it, and the rows wait for a later one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from .context import Context
from .deletion import tellable
from .errors import ResponseError, StoreUnavailable
from .homeserver_calls import device_ids
from .identity import Requester
from .records import PendingDelete

T = TypeVar("T")

# How often a user's device list is compared with the devices that have rows.
DEVICE_SWEEP_INTERVAL = 600.0


async def best_effort(operation: Awaitable[T], fallback: T) -> T:
    try:
        return await operation
    except StoreUnavailable:
        return fallback  # logged by the store, once per burst


async def acknowledge(ctx: Context, requester: Requester, token: str, via: str) -> None:
    """The device asks for what follows `token`: every delete the answer that returned
    it carried has arrived (proof of receipt)."""
    if requester.device_id is None:
        return
    gone = await best_effort(ctx.store.acknowledge_since(requester.user_id, requester.device_id, token), 0)
    ctx.metrics.acknowledgements.labels(via).inc(gone)


async def record(ctx: Context, requester: Requester, token: str, delivered: frozenset[int]) -> None:
    """An answer returning `token` carries these deletes: recorded before it leaves, so
    that the request that sends `token` back can prove it arrived."""
    if delivered and requester.device_id is not None:
        recording = ctx.store.record_delivery(requester.user_id, requester.device_id, token, delivered)
        await best_effort(recording, None)


def must_read(ctx: Context, requester: Requester) -> bool:
    """Answered from memory: whether this device has anything to learn, or may be handed
    a nudge of the proxy's own (which must be stripped): either way its sync answers are
    read rather than streamed."""
    device_id = requester.device_id
    if device_id is None:
        return False
    if ctx.store.has_pending(requester.user_id, device_id):
        return True
    return ctx.store.nudged(requester.user_id, device_id)


async def pending_for(ctx: Context, request: web.Request, requester: Requester) -> list[PendingDelete]:
    """What this device has to learn, but a type that is live on the homeserver, which
    must never be told deleted: one whose revive waits for the store, or one whose
    tombstone the homeserver contradicts (`deletion.tellable`)."""
    if requester.device_id is None or not ctx.store.has_pending(requester.user_id, requester.device_id):
        return []
    pending = await best_effort(ctx.store.pending_for_device(requester.user_id, requester.device_id), [])
    user_id = requester.user_id
    waiting = [p for p in pending if not ctx.repairs.reviving(user_id, p.room_id, p.account_data_type)]
    return await tellable(ctx, request, requester, waiting)


async def sweep_vanished_devices(ctx: Context, request: web.Request, requester: Requester) -> None:
    """Drop rows of devices the homeserver no longer lists (removed behind the proxy's
    back, through an admin API say), at most once per interval per user with rows."""
    user_id = requester.user_id
    if not ctx.store.has_rows(user_id):
        ctx.device_sweeps.pop(user_id, None)
        return
    now = time.monotonic()
    last = ctx.device_sweeps.get(user_id)
    if last is not None and now - last < DEVICE_SWEEP_INTERVAL:
        return
    ctx.device_sweeps[user_id] = now
    try:
        devices = await device_ids(ctx, request, requester)
    except ResponseError:
        return  # try again after the interval; the sync itself must not fail for this
    await best_effort(ctx.store.keep_only_devices(user_id, devices), None)

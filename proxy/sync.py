"""`/sync` and the legacy initial syncs: the fast path, or a rewrite.

Fast path: an incremental sync of a device with nothing pending is streamed
through untouched, without a database query or a parse. Otherwise the body is
read whole; an initial or full_state sync whose bytes cannot hold a `{}` entry,
and whose device has nothing pending, still goes out byte for byte. Only what
needs a change is parsed (orjson) and rewritten (`rewrite.py`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from . import jsoncodec
from .account_data import caller, device_ids, nudge
from .context import Context
from .errors import MatrixError, RelayedResponse, StoreUnavailable, bad_gateway
from .filters import NO_FILTER, SyncFilter
from .forward import UpstreamReply, accept_encoding_we_can_read, body_response, can_decode, decode_body
from .identity import Requester
from .rewrite import (
    SyncRewrite,
    may_hold_deletions,
    rewrite_sync,
    rooms_to_place,
    strip_legacy_initial_sync,
)
from .routing import split_raw_path
from .store import PendingDelete

log = logging.getLogger(__name__)

# Bodies above this are parsed and rewritten on a worker thread, so one huge initial
# sync does not stall every other request on the event loop for its whole parse.
_THREAD_THRESHOLD = 1 << 20

# How often a user's device list is compared with the devices that have rows.
DEVICE_SWEEP_INTERVAL = 600.0

T = TypeVar("T")


_gc_holds = 0
_gc_was_enabled = True


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold the cyclic collector off from a body's parse until the tree is released.

    A parse allocates millions of objects that hold no cycles (refcounting frees them);
    a collection while they live would only traverse them, repeatedly (measured: 141 ms
    -> 85 ms for 10 MiB). Pauses nest across concurrent requests (on the loop thread)."""
    global _gc_holds, _gc_was_enabled
    if _gc_holds == 0:
        _gc_was_enabled = gc.isenabled()
        gc.disable()
    _gc_holds += 1
    try:
        yield
    finally:
        _gc_holds -= 1
        if _gc_holds == 0 and _gc_was_enabled:
            gc.enable()


async def _off_loop(size: int, work: Callable[[], T]) -> T:
    if size > _THREAD_THRESHOLD:
        return await asyncio.to_thread(work)
    return work()


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = jsoncodec.loads(raw)
    except ValueError:
        raise bad_gateway("The homeserver sent a sync response that is not JSON") from None
    if not isinstance(body, dict):
        raise bad_gateway("The homeserver sent a sync response that is not a JSON object")
    return body


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return jsoncodec.dumps(body)
    except ValueError:
        raise bad_gateway("The homeserver sent a sync response that cannot be rewritten") from None


async def sync(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    query = request.query
    since = query.get("since")
    full_state = query.get("full_state") == "true"
    device_id = requester.device_id
    store = ctx.store

    # The store only refines what the homeserver sends (acknowledgements, injections):
    # when it fails, the sync goes on without it and the rows wait for a later one.
    await _best_effort(_sweep_vanished_devices(ctx, request, requester), None)
    if since and device_id is not None:
        # Asking for what follows `since` proves the response that returned it arrived.
        acknowledged = await _best_effort(store.acknowledge_since(requester.user_id, device_id, since), 0)
        ctx.metrics.acknowledgements.labels("sync").inc(acknowledged)
    has_pending = device_id is not None and store.has_pending(requester.user_id, device_id)
    incremental = bool(since)

    always_inspect = not incremental or full_state
    # Ask for a body the proxy can read only when it expects to read it: otherwise the
    # client's own Accept-Encoding goes up and the answer comes back as it is.
    headers = (
        {"Accept-Encoding": accept_encoding_we_can_read(request)} if always_inspect or has_pending else None
    )
    async with ctx.upstream.open(
        request, read_timeout=ctx.upstream.sync_read_timeout(query), headers=headers
    ) as upstream:
        if upstream.status != 200:
            return await ctx.upstream.relay(request, upstream)
        # A delete may have begun while this long-poll waited, and its `{}` may be what
        # woke it: decide on the fast path now, from the in-memory index.
        has_pending = device_id is not None and store.has_pending(requester.user_id, device_id)
        if not always_inspect and not (has_pending and can_decode(upstream.headers.get("Content-Encoding"))):
            # The fast path: streamed through, unparsed, no database query.
            return await ctx.upstream.relay(request, upstream)
        raw = await ctx.upstream.read_whole(upstream)
    encoding = upstream.headers.get("Content-Encoding")
    plain = decode_body(raw, encoding)
    if not has_pending and not may_hold_deletions(plain):
        return body_response(upstream, raw, decoded=False)

    pending = (
        await _best_effort(store.pending_for_device(requester.user_id, device_id), []) if has_pending else []
    )
    # A type whose revive waits for the store is live on the homeserver: never tell it deleted.
    pending = [
        p for p in pending if not ctx.repairs.reviving(requester.user_id, p.room_id, p.account_data_type)
    ]
    with _gc_paused():
        return await _rewrite(ctx, request, requester, upstream, raw, plain, pending, since, full_state)


async def _rewrite(
    ctx: Context,
    request: web.Request,
    requester: Requester,
    upstream: Any,
    raw: bytes,
    plain: bytes,
    pending: list[PendingDelete],
    since: str | None,
    full_state: bool,
    *,
    nudged: bool = False,
) -> web.StreamResponse:
    """Parse, rewrite, record and answer; every reference to the parsed tree is gone
    when this returns (see `_gc_paused`). `upstream`: the homeserver's answer (its
    status, reason and headers); `nudged`: this is the answer to `_with_a_new_token`."""
    device_id = requester.device_id
    incremental = bool(since)
    body = await _off_loop(len(plain), lambda: _parse(plain))
    sync_filter, joined = await _injection_context(ctx, request, requester, body, pending, incremental)
    if joined is not None:
        pending = await _forget_unreachable(ctx, requester, body, pending, joined)

    work = partial(
        _rewrite_and_dump,
        body,
        incremental=incremental,
        full_state=full_state,
        pending=pending,
        sync_filter=sync_filter,
        joined_rooms=joined or frozenset(),
    )
    out, result = await _off_loop(len(plain), work)
    del work
    delivered = result.delivered
    ctx.metrics.injected.inc(result.injected)
    if out is not None and result.injected == 0:
        ctx.metrics.stripped.inc()
    next_batch = body.get("next_batch")
    del body, result
    if delivered and device_id is not None and next_batch == since and not nudged:
        # The homeserver handed back the request's own `since` (nothing changed on its
        # side): the next request will send that token again whether this answer
        # arrives or is lost, so it could prove nothing, and a delivery recorded
        # against it would be acknowledged by a retry. Make the token move instead.
        again = await _with_a_new_token(ctx, request, requester)
        if again is not None:
            again_plain = decode_body(again.body, again.headers.get("Content-Encoding"))
            return await _rewrite(
                ctx,
                request,
                requester,
                again,
                again.body,
                again_plain,
                pending,
                since,
                full_state,
                nudged=True,
            )
    # Recorded before the response leaves: if it arrives, the proof can be checked. (If
    # the token still did not move, nothing is recorded: the rows stay, and the next
    # answer tells the device again.)
    if delivered and device_id is not None and isinstance(next_batch, str) and next_batch != since:
        await _best_effort(
            ctx.store.record_delivery(requester.user_id, device_id, next_batch, delivered), None
        )
    if out is None:
        return body_response(upstream, raw, decoded=False)
    return body_response(upstream, out, decoded=True)


async def _with_a_new_token(ctx: Context, request: web.Request, requester: Requester) -> UpstreamReply | None:
    """The same sync once more, after something changed for this device alone (a
    nudge, see `account_data.nudge`), so that the answer carrying the deletions has a
    token of its own and can be proved received. None if the homeserver refused."""
    if not await nudge(ctx, request, requester):
        return None
    # The client's own request, without the wait: the homeserver has news for it now.
    path, _ = split_raw_path(request.raw_path)
    query = [(k, "0" if k == "timeout" else v) for k, v in request.query.items()]
    again = await ctx.upstream.call(
        "GET",
        path,
        headers=ctx.identity.headers_for(request, requester.credentials),
        params=query,
    )
    return again if again.status == 200 else None


def _rewrite_and_dump(body: dict[str, Any], **rules: Any) -> tuple[bytes | None, SyncRewrite]:
    result = rewrite_sync(body, **rules)
    return (_dumps(result.body) if result.changed(body) else None), result


async def _best_effort(operation: Awaitable[T], fallback: T) -> T:
    try:
        return await operation
    except StoreUnavailable:
        return fallback  # logged by the store, once per burst


async def _sweep_vanished_devices(ctx: Context, request: web.Request, requester: Requester) -> None:
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
    except (MatrixError, RelayedResponse):
        return  # try again after the interval; the sync itself must not fail for this
    await ctx.store.keep_only_devices(user_id, devices)


async def _injection_context(
    ctx: Context,
    request: web.Request,
    requester: Requester,
    body: dict[str, Any],
    pending: list[PendingDelete],
    incremental: bool,
) -> tuple[SyncFilter, frozenset[str] | None]:
    """The filter and joined rooms an injection needs; fetched only when it does
    (joined rooms: None when not fetched, or when the homeserver could not say)."""
    if not incremental or not pending:
        return NO_FILTER, None
    sync_filter = await ctx.filters.get(request, requester, request.query.get("filter"))
    joined = None
    if rooms_to_place(body, pending):
        joined = await _joined_rooms(ctx, request, requester)
    return sync_filter, joined


async def _forget_unreachable(
    ctx: Context,
    requester: Requester,
    body: dict[str, Any],
    pending: list[PendingDelete],
    joined: frozenset[str],
) -> list[PendingDelete]:
    """Room account data travels only in rooms the user is in: a delete in a room the
    user has left, and that this body does not carry, can never reach the device. Its
    row goes now rather than waiting for ever (a rejoin brings the room's account data
    afresh, as the homeserver holds it)."""
    placeable = rooms_to_place(body, pending)
    unreachable = [p for p in pending if p.settled and p.room_id in placeable and p.room_id not in joined]
    if not unreachable or requester.device_id is None:
        return pending
    gone = await _best_effort(
        ctx.store.acknowledge_stream_ids(
            requester.user_id, requester.device_id, [p.stream_id for p in unreachable]
        ),
        0,
    )
    ctx.metrics.acknowledgements.labels("left_room").inc(gone)
    return [p for p in pending if p not in unreachable]


async def _joined_rooms(ctx: Context, request: web.Request, requester: Requester) -> frozenset[str] | None:
    reply = await ctx.upstream.call(
        "GET",
        "/_matrix/client/v3/joined_rooms",
        headers=ctx.identity.headers_for(request, requester.credentials),
        params=requester.credentials.params,
    )
    if reply.status != 200:
        return None  # place nothing new; the rows stay for the next sync
    try:
        rooms = json.loads(reply.body)["joined_rooms"]
        return frozenset(r for r in rooms if isinstance(r, str))
    except (ValueError, KeyError, TypeError):
        return None


async def legacy_initial_sync(
    ctx: Context, request: web.Request, params: dict[str, str]
) -> web.StreamResponse:
    """`/initialSync` and `/rooms/{roomId}/initialSync` obey the initial-sync rule too
    (Synapse leaks `{}` entries in the latter even with its own flag on)."""
    headers = {"Accept-Encoding": accept_encoding_we_can_read(request)}
    async with ctx.upstream.open(
        request, read_timeout=ctx.config.upstream.initial_sync_timeout, headers=headers
    ) as upstream:
        if upstream.status != 200:
            return await ctx.upstream.relay(request, upstream)
        raw = await ctx.upstream.read_whole(upstream)
    plain = decode_body(raw, upstream.headers.get("Content-Encoding"))
    if not may_hold_deletions(plain):
        return body_response(upstream, raw, decoded=False)
    with _gc_paused():
        body = await _off_loop(len(plain), lambda: _parse(plain))
        stripped = strip_legacy_initial_sync(body)
        out = None if stripped is body else _dumps(stripped)
        del body, stripped
    if out is None:
        return body_response(upstream, raw, decoded=False)
    ctx.metrics.stripped.inc()
    return body_response(upstream, out, decoded=True)

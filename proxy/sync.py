"""`/sync` and the legacy initial syncs: the fast path, or a rewrite.

Fast path: an incremental sync of a device with nothing pending is streamed
through untouched, without a database query or a parse. Otherwise the body is
read whole; an initial or full_state sync whose bytes cannot hold a `{}` entry,
and whose device has nothing pending, still goes out byte for byte. Only what
needs a change is parsed (orjson) and rewritten (`rewrite.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from .codings import accept_encoding_we_can_read, can_decode, decode_body
from .context import Context
from .filters import NO_FILTER, SyncFilter
from .forward import Answer, body_response
from .handling import caller
from .homeserver_calls import again_after_a_nudge, call_as, joined_rooms
from .identity import Requester
from .records import PendingDelete
from .rewrite import (
    SyncRewrite,
    may_hold_deletions,
    rewrite_sync,
    rooms_to_place,
    strip_legacy_initial_sync,
)
from .sync_bodies import dumps, gc_paused, off_loop, parse
from .sync_state import acknowledge, best_effort, must_read, pending_for, record, sweep_vanished_devices
from .timeouts import ReadTimeout, read_timeout

log = logging.getLogger(__name__)


async def sync(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    query = request.query
    since = query.get("since")
    full_state = query.get("full_state") == "true"
    await sweep_vanished_devices(ctx, request, requester)
    if since:
        # Asking for what follows `since` proves the response that returned it arrived.
        await acknowledge(ctx, requester, since, "sync")
    pending_now = must_read(ctx, requester)
    incremental = bool(since)

    always_inspect = not incremental or full_state
    # Ask for a body the proxy can read only when it expects to read it: otherwise the
    # client's own Accept-Encoding goes up and the answer comes back as it is.
    headers = (
        {"Accept-Encoding": accept_encoding_we_can_read(request)} if always_inspect or pending_now else None
    )
    async with ctx.upstream.open(
        request, read_timeout=read_timeout(ReadTimeout.SYNC, ctx.config.upstream, query), headers=headers
    ) as upstream:
        if upstream.status != 200:
            return await ctx.upstream.relay(request, upstream)
        # A delete may have begun while this long-poll waited, and its `{}` may be what
        # woke it: decide on the fast path now, from the in-memory index.
        pending_now = must_read(ctx, requester)
        if not always_inspect and not (pending_now and can_decode(upstream.headers.get("Content-Encoding"))):
            # The fast path: streamed through, unparsed, no database query.
            return await ctx.upstream.relay(request, upstream)
        raw = await ctx.upstream.read_whole(upstream)
    encoding = upstream.headers.get("Content-Encoding")
    plain = decode_body(raw, encoding)
    if not pending_now and not may_hold_deletions(plain):
        return body_response(upstream, raw, decoded=False)

    pending = await pending_for(ctx, request, requester)
    with gc_paused():
        job = _Rewrite(ctx, request, requester, pending, since, full_state)
        return await _rewrite(job, upstream, raw, plain)


@dataclass(frozen=True)
class _Rewrite:
    """One sync being rewritten for one device: the request and what the device has to learn."""

    ctx: Context
    request: web.Request
    requester: Requester
    pending: list[PendingDelete]
    since: str | None
    full_state: bool


async def _rewrite(
    job: _Rewrite, upstream: Answer, raw: bytes, plain: bytes, *, nudged: bool = False
) -> web.StreamResponse:
    """Parse, rewrite, record and answer. `upstream`: the homeserver's answer (its status,
    reason and headers), `raw` its body and `plain` that body decoded; `nudged`: this is
    the answer to `homeserver_calls.again_after_a_nudge`."""
    out, delivered, next_batch = await _rewritten(job, plain)
    device_id = job.requester.device_id
    if delivered and device_id is not None and next_batch == job.since and not nudged:
        # The homeserver handed back the request's own `since` (nothing changed on its
        # side): the next request will send that token again whether this answer
        # arrives or is lost, so it could prove nothing, and a delivery recorded
        # against it would be acknowledged by a retry. Make the token move instead.
        again = await again_after_a_nudge(job.ctx, job.request, job.requester)
        if again is not None:
            again_plain = decode_body(again.body, again.headers.get("Content-Encoding"))
            return await _rewrite(job, again, again.body, again_plain, nudged=True)
    # Recorded before the response leaves: if it arrives, the proof can be checked. (If
    # the token still did not move, nothing is recorded: the rows stay, and the next
    # answer tells the device again.)
    if isinstance(next_batch, str) and next_batch != job.since:
        await record(job.ctx, job.requester, next_batch, delivered)
    if out is None:
        return body_response(upstream, raw, decoded=False)
    return body_response(upstream, out, decoded=True)


async def _rewritten(job: _Rewrite, plain: bytes) -> tuple[bytes | None, frozenset[int], Any]:
    """(the new body or None if unchanged, the deletes it delivers, its `next_batch`).
    Every reference to the parsed tree is gone when this returns (see
    `sync_bodies.gc_paused`)."""
    ctx, incremental = job.ctx, bool(job.since)
    body = await off_loop(len(plain), lambda: parse(plain))
    pending = job.pending
    sync_filter, joined = await _injection_context(job, body)
    if joined is not None:
        pending = await _forget_unreachable(job, body, joined)
    work = partial(
        _rewrite_and_dump,
        body,
        incremental=incremental,
        full_state=job.full_state,
        pending=pending,
        sync_filter=sync_filter,
        joined_rooms=joined or frozenset(),
    )
    out, result = await off_loop(len(plain), work)
    ctx.metrics.injected.inc(result.injected)
    if out is not None and result.injected == 0:
        ctx.metrics.stripped.inc()
    return out, result.delivered, body.get("next_batch")


def _rewrite_and_dump(body: dict[str, Any], **rules: Any) -> tuple[bytes | None, SyncRewrite]:
    result = rewrite_sync(body, **rules)
    return (dumps(result.body) if result.changed(body) else None), result


async def _injection_context(job: _Rewrite, body: dict[str, Any]) -> tuple[SyncFilter, frozenset[str] | None]:
    """The filter and joined rooms an injection needs; fetched only when it does
    (joined rooms: None when not fetched, or when the homeserver could not say)."""
    if not job.since or not job.pending:
        return NO_FILTER, None
    fetch = partial(call_as, job.ctx, job.request, job.requester, "GET")
    sync_filter = await job.ctx.filters.get(job.requester.user_id, job.request.query.get("filter"), fetch)
    joined = None
    if rooms_to_place(body, job.pending):
        joined = await joined_rooms(job.ctx, job.request, job.requester)
    return sync_filter, joined


async def _forget_unreachable(
    job: _Rewrite, body: dict[str, Any], joined: frozenset[str]
) -> list[PendingDelete]:
    """Room account data travels only in rooms the user is in: a delete in a room the
    user has left, and that this body does not carry, can never reach the device. Its
    row goes now rather than waiting for ever (a rejoin brings the room's account data
    afresh, as the homeserver holds it)."""
    placeable = rooms_to_place(body, job.pending)
    unreachable = [p for p in job.pending if p.settled and p.room_id in placeable and p.room_id not in joined]
    device_id = job.requester.device_id
    if not unreachable or device_id is None:
        return job.pending
    stream_ids = [p.stream_id for p in unreachable]
    gone = await best_effort(
        job.ctx.store.acknowledge_stream_ids(job.requester.user_id, device_id, stream_ids), 0
    )
    job.ctx.metrics.acknowledgements.labels("left_room").inc(gone)
    return [p for p in job.pending if p not in unreachable]


async def legacy_initial_sync(
    ctx: Context, request: web.Request, params: dict[str, str]
) -> web.StreamResponse:
    """`/initialSync` and `/rooms/{roomId}/initialSync` obey the initial-sync rule too
    (Synapse leaks `{}` entries in the latter even with its own flag on)."""
    headers = {"Accept-Encoding": accept_encoding_we_can_read(request)}
    timeout = read_timeout(ReadTimeout.INITIAL_SYNC, ctx.config.upstream, request.query)
    async with ctx.upstream.open(request, read_timeout=timeout, headers=headers) as upstream:
        if upstream.status != 200:
            return await ctx.upstream.relay(request, upstream)
        raw = await ctx.upstream.read_whole(upstream)
    plain = decode_body(raw, upstream.headers.get("Content-Encoding"))
    if not may_hold_deletions(plain):
        return body_response(upstream, raw, decoded=False)
    with gc_paused():
        body = await off_loop(len(plain), lambda: parse(plain))
        stripped = strip_legacy_initial_sync(body)
        out = None if stripped is body else dumps(stripped)
        del body, stripped
    if out is None:
        return body_response(upstream, raw, decoded=False)
    ctx.metrics.stripped.inc()
    return body_response(upstream, out, decoded=True)

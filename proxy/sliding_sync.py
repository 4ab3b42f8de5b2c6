"""Simplified sliding sync (MSC4186): the fast path, or a rewrite of the account data
extension (`sliding_rewrite.py`).

`pos` plays the part of `/sync`'s `since`. The request body (bounded by
`proxy.max_body_size`) goes upstream byte for byte; it is parsed only when the proxy
needs the connection (`conn_id`) or the extension's scope. The answer to a request of
a device with nothing pending that carries a `pos` is streamed back unparsed, with no
database query; otherwise it is read whole, and a first answer whose bytes cannot hold
a `{}` entry still goes out unchanged. Deliveries are recorded per connection: a `pos`
is unique only within its (device, `conn_id`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from .codings import accept_encoding_we_can_read, can_decode, decode_body
from .context import Context
from .forward import Answer, body_response
from .handling import caller, read_body
from .homeserver_calls import again_after_a_nudge, joined_rooms
from .identity import Requester
from .records import PendingDelete
from .rewrite import SyncRewrite, may_hold_deletions
from .sliding_rewrite import Scope, rewrite_sliding_sync
from .sync_bodies import dumps, gc_paused, off_loop, parse
from .sync_state import acknowledge, must_read, pending_for, record, sweep_vanished_devices
from .timeouts import ReadTimeout, read_timeout


def delivery_token(conn_id: str, pos: str) -> str:
    """The key a delivery on a connection is recorded under (a `/sync` token never
    starts with `[`, so the two kinds cannot meet)."""
    return json.dumps(["sliding_sync", conn_id, pos], separators=(",", ":"))


@dataclass(frozen=True)
class _Request:
    """What the proxy learnt of a sliding sync request it reads."""

    raw: bytes
    conn_id: str
    scope: Scope

    @classmethod
    def of(cls, raw: bytes) -> _Request:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # the homeserver will refuse it: nothing to do here
        conn_id = body.get("conn_id") if isinstance(body, dict) else None
        return cls(raw, conn_id if isinstance(conn_id, str) else "", Scope.of(body))


async def sliding_sync(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    requester = await caller(ctx, request)
    pos = request.query.get("pos")
    timeout = read_timeout(ReadTimeout.SLIDING_SYNC, ctx.config.upstream, request.query)
    # Read (not parsed) however it goes on: a delete may begin while the request waits
    # at the homeserver, and then the answer is rewritten after all.
    raw = await read_body(ctx, request)
    await sweep_vanished_devices(ctx, request, requester)
    inspect = pos is None or must_read(ctx, requester)
    if pos is not None and inspect:
        # Asking for what follows `pos` proves the answer that returned it arrived.
        await acknowledge(ctx, requester, delivery_token(_Request.of(raw).conn_id, pos), "sliding_sync")
    # Ask for a body the proxy can read only when it expects to read it.
    headers = {"Accept-Encoding": accept_encoding_we_can_read(request)} if inspect else None
    async with ctx.upstream.open(request, body=raw, headers=headers, read_timeout=timeout) as upstream:
        if upstream.status != 200:
            return await ctx.upstream.relay(request, upstream)  # M_UNKNOWN_POS included
        # Decided now, from the in-memory index: the delete may be what woke a long-poll.
        pending_now = must_read(ctx, requester)
        if pos is not None and not (pending_now and can_decode(upstream.headers.get("Content-Encoding"))):
            # The fast path: streamed back unparsed, with no database query.
            return await ctx.upstream.relay(request, upstream)
        answer = await ctx.upstream.read_whole(upstream)
    plain = decode_body(answer, upstream.headers.get("Content-Encoding"))
    if not pending_now and not may_hold_deletions(plain):
        return body_response(upstream, answer, decoded=False)
    pending = await pending_for(ctx, request, requester)
    with gc_paused():
        job = _Rewrite(ctx, request, requester, _Request.of(raw), pos, pending)
        return await _rewrite(job, upstream, answer, plain)


@dataclass(frozen=True)
class _Rewrite:
    ctx: Context
    request: web.Request
    requester: Requester
    asked: _Request
    pos: str | None
    pending: list[PendingDelete]


async def _rewrite(
    job: _Rewrite, upstream: Answer, raw: bytes, plain: bytes, *, nudged: bool = False
) -> web.StreamResponse:
    """Parse, rewrite, record and answer (as `sync._rewrite`, with `pos` for `since`)."""
    out, delivered, new_pos = await _rewritten(job, plain)
    if delivered and new_pos == job.pos and not nudged:
        # Handed back the request's own `pos` (nothing changed for the connection): a
        # retry would look the same as the next request. Make the position move.
        again = await again_after_a_nudge(job.ctx, job.request, job.requester, data=job.asked.raw)
        if again is not None:
            again_plain = decode_body(again.body, again.headers.get("Content-Encoding"))
            return await _rewrite(job, again, again.body, again_plain, nudged=True)
    if isinstance(new_pos, str) and new_pos != job.pos:
        await record(job.ctx, job.requester, delivery_token(job.asked.conn_id, new_pos), delivered)
    if out is None:
        return body_response(upstream, raw, decoded=False)
    return body_response(upstream, out, decoded=True)


async def _rewritten(job: _Rewrite, plain: bytes) -> tuple[bytes | None, frozenset[int], Any]:
    """(the new body or None if unchanged, the deletes it delivers, its `pos`)."""
    body = await off_loop(len(plain), lambda: parse(plain))
    subscribed = await _subscribed(job, body)
    work = partial(
        _rewrite_and_dump,
        body,
        first=job.pos is None,
        scope=job.asked.scope,
        pending=job.pending,
        subscribed=subscribed,
    )
    out, result = await off_loop(len(plain), work)
    job.ctx.metrics.injected.inc(result.injected)
    if out is not None and result.injected == 0:
        job.ctx.metrics.stripped.inc()
    return out, result.delivered, body.get("pos")


def _rewrite_and_dump(body: dict[str, Any], **rules: Any) -> tuple[bytes | None, SyncRewrite]:
    result = rewrite_sliding_sync(body, **rules)
    return (dumps(result.body) if result.changed(body) else None), result


async def _subscribed(job: _Rewrite, body: dict[str, Any]) -> frozenset[str]:
    """The subscribed rooms the caller is in, asked of the homeserver only when a pending
    room delete waits for a subscription the response does not show."""
    rooms = body.get("rooms") if isinstance(body.get("rooms"), dict) else {}
    wanted = {
        p.room_id
        for p in job.pending
        if p.room_id in job.asked.scope.subscriptions and p.room_id not in rooms
    }
    if not wanted:
        return frozenset()
    return await joined_rooms(job.ctx, job.request, job.requester) or frozenset()

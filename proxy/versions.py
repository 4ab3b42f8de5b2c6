"""`GET /_matrix/client/versions`: advertise MSC3391, keep the rest as the homeserver said."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import jsoncodec
from .codings import decode_body
from .context import Context
from .forward import body_response
from .versions_cache import carries_credentials

UNSTABLE_FEATURE = "org.matrix.msc3391"


def advertise(body: dict[str, Any]) -> dict[str, Any]:
    features = body.get("unstable_features")
    features = features if isinstance(features, dict) else {}
    return {**body, "unstable_features": {**features, UNSTABLE_FEATURE: True}}


async def versions(ctx: Context, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
    shared = request.method == "GET" and not carries_credentials(request)
    if shared and (kept := ctx.versions.answer()) is not None:
        return kept
    async with ctx.upstream.open(request, headers={"Accept-Encoding": "identity"}) as upstream:
        if upstream.status != 200 or request.method == "HEAD":
            return await ctx.upstream.relay(request, upstream)
        raw = await ctx.upstream.read_whole(upstream)
    try:
        body = jsoncodec.loads(decode_body(raw, upstream.headers.get("Content-Encoding")))
    except ValueError:
        return body_response(upstream, raw, decoded=False)
    if not isinstance(body, dict):
        return body_response(upstream, raw, decoded=False)
    response = body_response(upstream, jsoncodec.dumps(advertise(body)), decoded=True)
    if shared:
        ctx.versions.keep(response)
    return response

"""What every handler needs: who the caller is, and the body of a request it reads itself.

Handler modules import this one (and the services below it), never each other.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .context import Context
from .deletion import settle_orphans
from .errors import M_BAD_JSON, M_NOT_JSON, ClientTooSlow, MatrixError
from .identity import Requester


async def caller(ctx: Context, request: web.Request) -> Requester:
    """The authenticated caller (or the homeserver's error for its credentials), after
    settling deletes of the user that an earlier process left open."""
    requester = await ctx.identity.requester(request)
    await settle_orphans(ctx, request, requester)
    return requester


async def read_body(ctx: Context, request: web.Request) -> bytes:
    """The body of a request the proxy reads itself, within `proxy.client_timeout`
    (aiohttp has no body read timeout of its own: a trickling client would hold the
    handler for ever). Its size is bounded by `proxy.max_body_size` (413)."""
    try:
        async with asyncio.timeout(ctx.config.proxy.client_timeout):
            return await request.read()
    except TimeoutError:
        raise ClientTooSlow() from None


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

"""`GET /health`: the proxy's own health, for load balancers and monitoring."""

from __future__ import annotations

from aiohttp import web

from .context import Context
from .errors import MatrixError, unrecognized
from .routing import is_origin_form

CONTEXT = web.AppKey("context", Context)


async def health(request: web.Request) -> web.Response:
    """Its store (when the feature is on) and, with `?upstream=true`, the homeserver.
    503 names what fails: with a failing store the proxy still forwards and syncs, but
    refuses deletes."""
    if not is_origin_form(request.raw_path):
        raise unrecognized()  # `GET http://host/health` is no health check, as in `dispatch`
    ctx = request.app[CONTEXT]
    report: dict[str, str] = {"status": "ok"}
    problem = ctx.store.problem() if ctx.config.msc3391_enabled else None
    if problem is not None:
        report.update(status="unavailable", store=problem)
    elif ctx.config.msc3391_enabled:
        report["store"] = "ok"
    if request.query.get("upstream") in ("true", "1"):
        try:
            reply = await ctx.upstream.call("GET", "/_matrix/client/versions", headers={}, read_timeout=5.0)
            upstream = "ok" if reply.status == 200 else f"HTTP {reply.status}"
        except MatrixError as e:
            upstream = e.message
        report["upstream"] = upstream
        if upstream != "ok":
            report["status"] = "unavailable"
    return web.json_response(report, status=200 if report["status"] == "ok" else 503)

"""The least an aiohttp reverse proxy does: the yardstick of issue 13 for the proxy's
owned requests (/sync and sliding sync fast paths, `/versions` CPU per request).

`python bench/minimal_proxy.py PORT UPSTREAM_URL`: one shared ClientSession, the raw
path forwarded (with the request body, read whole, when there is one), the answer read
whole and sent in one response, hop-by-hop headers dropped; nothing else (no routing,
no identity, no metrics, no logging). Its req/s and CPU per request on the same machine
in the same run tell how much of the proxy's cost is the framework's and how much the
proxy's own.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te", "trailer"}
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def forward(request: web.Request) -> web.Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    # A sliding sync is a POST: its body goes on too (the proxy forwards it byte for byte).
    data = await request.read() if request.body_exists else None
    async with request.app[SESSION].request(
        request.method, UPSTREAM + request.raw_path, headers=headers, data=data, allow_redirects=False
    ) as upstream:
        body = await upstream.read()
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        return web.Response(status=upstream.status, body=body, headers=out)


async def session(app: web.Application) -> AsyncIterator[None]:
    # No limit on upstream connections (aiohttp's default is 100): held long-polls each
    # need their own, as in the proxy.
    app[SESSION] = aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0),
    )
    yield
    await app[SESSION].close()


if __name__ == "__main__":
    PORT, UPSTREAM = int(sys.argv[1]), sys.argv[2]
    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{path:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=PORT, access_log=None, print=None)

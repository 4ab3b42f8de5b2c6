"""A tiny homeserver stand-in for the memory figures: `python bench/slow_upstream.py --port N`.

- `GET /_matrix/client/v3/account/whoami`: answers at once; the user is taken from the
  bearer token (`Bearer u123` -> `@u123:localhost`), so every token is its own device.
- `GET /_matrix/client/v3/sync`: a long-poll that never answers before `--hold`
  seconds (then an empty incremental sync); a client that goes away ends it.
- `GET /_matrix/client/v3/capabilities`: a 26-byte JSON body, for latency probes.
- `GET /_matrix/client/v1/media/download/...?size=N`: N bytes, streamed.
- `POST /_matrix/media/v3/upload`: the body is read and thrown away; answers how
  many bytes arrived.
- `GET /_bench/stats`: `{"held": N}`, the long-polls being held right now.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

SMALL = b'{"user_id":"@b:localhost"}'  # 26 bytes, like the pass-through figure's body
CHUNK = bytes(256 * 1024)


class State:
    held = 0
    hold = 60.0


state = State()


async def whoami(request: web.Request) -> web.Response:
    token = request.headers.get("Authorization", "Bearer anonymous").split(" ", 1)[-1]
    return web.json_response({"user_id": f"@{token}:localhost", "device_id": "DEVICE"})


async def sync(request: web.Request) -> web.Response:
    state.held += 1
    try:
        await asyncio.sleep(state.hold)
    finally:
        state.held -= 1
    return web.json_response({"next_batch": "s2", "rooms": {}})


async def small(request: web.Request) -> web.Response:
    return web.Response(body=SMALL, content_type="application/json")


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    left = size
    while left > 0:
        piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"content_uri": "mxc://localhost/bench", "received": received})


async def stats(request: web.Request) -> web.Response:
    return web.Response(body=json.dumps({"held": state.held}), content_type="application/json")


def build() -> web.Application:
    app = web.Application()
    app.router.add_get("/_matrix/client/v3/account/whoami", whoami)
    app.router.add_get("/_matrix/client/v3/sync", sync)
    app.router.add_get("/_matrix/client/v3/capabilities", small)
    app.router.add_get("/_matrix/client/v1/media/download/{tail:.*}", download)
    app.router.add_post("/_matrix/media/v3/upload", upload)
    app.router.add_get("/_bench/stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hold", type=float, default=60.0)
    args = parser.parse_args()
    state.hold = args.hold
    web.run_app(
        build(),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()

"""A loopback HTTP/1.1 server that records every request exactly as it arrived: the
request line's method and target byte for byte (nothing parsed into a URL, so `%2F`,
`#`, `..` and `//` stay as they were sent), the headers, the body and the peer's port
(the same port twice: a kept-alive connection). It answers `200 {"upstream": NAME}`
and keeps the connection open, as a homeserver or the proxy would for nginx.

Raw asyncio rather than aiohttp: an HTTP framework would parse the target before the
test could see what nginx actually sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from multidict import CIMultiDict


@dataclass(frozen=True)
class Recorded:
    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes
    peer_port: int


class RecordingUpstream:
    """`delay(request)`: seconds to wait before answering it (default none)."""

    def __init__(self, name: str, delay: Callable[[Recorded], float] | None = None) -> None:
        self.name = name
        self.delay = delay
        self.requests: list[Recorded] = []
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() was not awaited"
        return self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await self._server.wait_closed()

    def take(self) -> list[Recorded]:
        """The requests recorded since the last `take()`."""
        taken, self.requests = self.requests, []
        return taken

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer_port = writer.get_extra_info("peername")[1]
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the peer closed an idle connection
                request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _version = request_line.split(" ")
                headers: CIMultiDict[str] = CIMultiDict()
                for line in lines:
                    name, _, value = line.partition(":")
                    headers.add(name.strip(), value.strip())
                if "Transfer-Encoding" in headers:
                    raise AssertionError("a chunked request body: nginx buffers bodies and sends a length")
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                recorded = Recorded(method, target, headers, body, peer_port)
                self.requests.append(recorded)
                if self.delay is not None and (wait := self.delay(recorded)) > 0:
                    await asyncio.sleep(wait)
                answer = json.dumps({"upstream": self.name}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
                if headers.get("Connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

"""A raw HTTP/1.1 client for tests: the request goes out byte for byte (target not
normalised or re-quoted, header order and duplicates as given)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    base: str,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    local_host: str | None = None,
    tls_server_name: str | None = None,
) -> RawResponse:
    """Send one request byte for byte (target, header order and duplicates as given),
    from `local_host` if given (another loopback address, say); with `tls_server_name`,
    over TLS with that name (SNI), the server's certificate not checked (a test's own)."""
    parts = urlsplit(base)
    local_addr = (local_host, 0) if local_host is not None else None
    tls = None
    if tls_server_name is not None:
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port, local_addr=local_addr, ssl=tls, server_hostname=tls_server_name
    )
    try:
        head = [f"{method} {target} HTTP/1.1"]
        given = list(headers)
        if not any(k.lower() == "host" for k, _ in given):
            head.append(f"Host: {parts.netloc}")
        head += [f"{k}: {v}" for k, v in given]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

        status_line = (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")
        _, status, *reason = status_line.split(" ", 2)
        response_headers: CIMultiDict[str] = CIMultiDict()
        while (line := (await reader.readuntil(b"\r\n")).decode("latin-1").rstrip("\r\n")) != "":
            name, _, value = line.partition(":")
            response_headers.add(name.strip(), value.strip())
        if method == "HEAD" or status in ("204", "304"):
            content = b""
        elif response_headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) != 0:
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            content = b"".join(chunks)
        elif "Content-Length" in response_headers:
            content = await reader.readexactly(int(response_headers["Content-Length"]))
        else:
            content = await reader.read()
        return RawResponse(int(status), reason[0] if reason else "", response_headers, content)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

"""Content codings of homeserver answers the proxy reads (sync bodies, /versions)."""

from __future__ import annotations

import zlib

from aiohttp import hdrs, web

from .errors import bad_gateway

_DECODABLE = frozenset({"identity", "gzip", "x-gzip", "deflate"})
_REFUSED = ("q=0", "q=0.0", "q=0.00", "q=0.000")


def can_decode(content_encoding: str | None) -> bool:
    return (content_encoding or "identity").strip().lower() in _DECODABLE


def decode_body(raw: bytes, content_encoding: str | None) -> bytes:
    """The body with its Content-Encoding undone (only what the proxy asked for)."""
    coding = (content_encoding or "identity").strip().lower()
    try:
        if coding == "identity":
            return raw
        if coding in ("gzip", "x-gzip"):
            return zlib.decompress(raw, 16 + zlib.MAX_WBITS)
        if coding == "deflate":
            try:
                return zlib.decompress(raw)
            except zlib.error:
                return zlib.decompress(raw, -zlib.MAX_WBITS)  # raw deflate, as some servers send
    except zlib.error:
        raise bad_gateway("The homeserver sent a corrupt compressed body") from None
    raise bad_gateway(f"The homeserver used a content coding the proxy did not ask for: {coding}")


def accept_encoding_we_can_read(request: web.BaseRequest) -> str:
    """Accept-Encoding to send upstream for a body the proxy may have to inspect:
    gzip if the client takes it (so an unchanged body still travels compressed),
    otherwise none."""
    for part in request.headers.get(hdrs.ACCEPT_ENCODING, "").split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*") and params.replace(" ", "") not in _REFUSED:
            return "gzip"
    return "identity"

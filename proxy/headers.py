"""Which headers travel end to end, and which belong to one hop (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 section 7.6.1, plus the non-standard Proxy-Connection. `Expect` is answered
# by our own server already, and Host is handled separately.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall(hdrs.CONNECTION, ()):
        tokens.update(t.strip().lower() for t in value.split(","))
    return tokens


def end_to_end(headers: CIMultiDictProxy[str], *, drop: Sequence[str] = ()) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop headers (nor those listed in Connection)."""
    out = CIMultiDict(headers)  # copied in C; the few names to remove are looked up
    for name in (*_HOP_BY_HOP, *_connection_tokens(headers), *drop):
        if name in out:
            del out[name]
    return out

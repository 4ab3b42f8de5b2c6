"""The homeserver's `/versions` answer to callers without credentials, kept briefly.

Without an access token, Synapse's `/versions` depends only on its configuration: every
such caller gets the same answer, and clients ask for it at every start. Synapse says so
itself (`Cache-Control: public, max-age=600, s-maxage=3600`, `Vary: Authorization`, both
kept on the copy). Answering those from a copy a few seconds old spares the homeserver
the request and the proxy the parse and rewrite. With credentials, the answer may hold
per-user features (Synapse's MSC3881/MSC3575 switches): those are never served from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDict

# Long enough that a busy proxy asks the homeserver a few times a minute at most, short
# enough that a restarted homeserver's new answer shows before anyone could notice.
FRESH_FOR = 5.0


def carries_credentials(request: web.BaseRequest) -> bool:
    return hdrs.AUTHORIZATION in request.headers or "access_token" in request.query


@dataclass(frozen=True)
class _Kept:
    expires: float
    reason: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes


class VersionsCache:
    def __init__(self) -> None:
        self._kept: _Kept | None = None

    def answer(self) -> web.Response | None:
        """The kept answer as a new response, or None if there is none still fresh."""
        kept = self._kept
        if kept is None or kept.expires <= time.monotonic():
            return None
        # A new header set each time: aiohttp adds Content-Length and Date to it.
        return web.Response(status=200, reason=kept.reason, body=kept.body, headers=CIMultiDict(kept.headers))

    def keep(self, response: web.Response) -> None:
        """Keep a 200 answer as the proxy is about to send it (not yet prepared: without
        the length and the date, which each response gets afresh)."""
        assert isinstance(response.body, bytes) and not response.prepared
        headers = CIMultiDict(response.headers)
        headers.popall(hdrs.DATE, None)
        expires = time.monotonic() + FRESH_FOR
        self._kept = _Kept(expires, response.reason, tuple(headers.items()), response.body)

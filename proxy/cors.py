"""The homeserver's CORS headers, on the answers the proxy builds itself.

A browser client on another origin (Element Web on its own domain) can read an answer
only if it carries `Access-Control-Allow-Origin`. The homeserver's own answers carry
its CORS headers already and pass through as they are; the answers the proxy builds
(a delete's `200 {}`, a deleted type's 404, every Matrix error) get the same headers,
learnt from the homeserver's answers to the proxy's own calls (every owned request
asks whoami first) rather than guessed, so a homeserver configured otherwise is
mirrored as it is. Only answers to client-API calls are learnt from: Synapse sends
other CORS headers on a few paths of its own (rendezvous). Its `Cache-Control` for JSON
comes along for the same reason: an error must not be cached where its answer is not.
Preflights (`OPTIONS`) on owned paths go to the homeserver (see `app.dispatch`).
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDictProxy

# Set on a response the proxy built (errors, `200 {}`): `app.answering` then adds
# the mirrored headers. Answers relayed from the homeserver are left as they came.
BUILT = web.ResponseKey("built_by_proxy", bool)

_MIRRORED = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Allow-Credentials",
    "Access-Control-Max-Age",
    "Cache-Control",
)


def built(response: web.Response) -> web.Response:
    """Mark an answer as the proxy's own."""
    response[BUILT] = True
    return response


class HomeserverHeaders:
    def __init__(self) -> None:
        self._headers: tuple[tuple[str, str], ...] = ()

    def learn(self, headers: CIMultiDictProxy[str]) -> None:
        """Remember the CORS headers of a homeserver answer (one that has any)."""
        if "Access-Control-Allow-Origin" in headers:
            self._headers = tuple((name, v) for name in _MIRRORED for v in headers.getall(name, ()))

    def apply(self, response: web.StreamResponse) -> None:
        """Add the learnt headers to an answer the proxy built, keeping any it set."""
        if not response.get(BUILT) or response.prepared:
            return
        for name, value in self._headers:
            if name not in response.headers:
                response.headers.add(name, value)

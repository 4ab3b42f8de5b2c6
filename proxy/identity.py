"""Who is calling: `(user_id, device_id)` from the homeserver's own `/account/whoami`.

The proxy never interprets a token itself. It passes the caller's credentials
exactly as they came (every Authorization header, the `access_token` query
parameter, the appservice masquerade parameters) to whoami, so the homeserver
decides, and its errors (401 M_UNKNOWN_TOKEN, 400 for a token in both places, ...)
reach the client unchanged. Answers are cached briefly, keyed by a hash of the
credentials; concurrent look-ups of one key share one upstream request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDict

from .errors import bad_gateway
from .forward import Upstream
from .metrics import Metrics

WHOAMI_PATH = "/_matrix/client/v3/account/whoami"

# Query parameters that change who the homeserver takes the caller to be.
_CREDENTIAL_PARAMS = ("access_token", "user_id", "device_id", "org.matrix.msc3202.device_id")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The caller's credentials exactly as sent; never logged, only hashed."""

    authorization: tuple[str, ...]
    params: tuple[tuple[str, str], ...]

    @classmethod
    def from_request(cls, request: web.BaseRequest) -> Credentials:
        query = request.query
        return cls(
            authorization=tuple(request.headers.getall(hdrs.AUTHORIZATION, ())),
            params=tuple((k, v) for k in _CREDENTIAL_PARAMS for v in query.getall(k, ())),
        )

    def cache_key(self) -> bytes:
        # Length-prefixed parts: no two different credentials give the same text.
        parts = [*self.authorization, *(p for pair in self.params for p in pair)]
        text = "".join(f"{len(part)}:{part}" for part in parts) + f"#{len(self.authorization)}"
        return hashlib.sha256(text.encode()).digest()

    def __repr__(self) -> str:  # a Credentials in a traceback must not print the token
        return "Credentials(<redacted>)"


@dataclass(frozen=True, slots=True)
class Requester:
    user_id: str
    device_id: str | None
    credentials: Credentials


class Identity:
    def __init__(self, upstream: Upstream, metrics: Metrics, *, ttl: float, max_size: int) -> None:
        self._upstream = upstream
        self._hit = metrics.identity_cache.labels("hit")
        self._miss = metrics.identity_cache.labels("miss")
        self._ttl = ttl
        self._max_size = max_size
        self._cache: OrderedDict[bytes, tuple[float, str, str | None]] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Future[tuple[str, str | None]]] = {}
        self.misses = 0  # look-ups that went upstream (or joined one that did)

    def headers_for(self, request: web.BaseRequest, credentials: Credentials) -> CIMultiDict[str]:
        """Headers for a request the proxy makes on the caller's behalf."""
        headers: CIMultiDict[str] = CIMultiDict()
        for value in credentials.authorization:
            headers.add(hdrs.AUTHORIZATION, value)
        headers.update(self._upstream.forwarders.headers(request))
        if hdrs.USER_AGENT in request.headers:
            # The homeserver records (IP, user agent) per device from authenticated calls.
            headers[hdrs.USER_AGENT] = request.headers[hdrs.USER_AGENT]
        return headers

    async def requester(self, request: web.BaseRequest) -> Requester:
        """Resolve the caller, or raise the homeserver's error for these credentials."""
        credentials = Credentials.from_request(request)
        key = credentials.cache_key()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            self._hit.inc()
            return Requester(cached[1], cached[2], credentials)

        self.misses += 1
        self._miss.inc()
        future = self._in_flight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._whoami(request, credentials))
            self._in_flight[key] = future
            future.add_done_callback(lambda f: self._look_up_done(key, f))
        # shield: one waiter that disconnects must not cancel the others' look-up.
        user_id, device_id = await asyncio.shield(future)
        self._remember(key, user_id, device_id)
        return Requester(user_id, device_id, credentials)

    def _look_up_done(self, key: bytes, future: asyncio.Future[tuple[str, str | None]]) -> None:
        self._in_flight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved here, so a look-up nobody waits for is not logged

    def _remember(self, key: bytes, user_id: str, device_id: str | None) -> None:
        self._cache[key] = (time.monotonic() + self._ttl, user_id, device_id)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_size:
            self._cache.popitem(last=False)

    def forget_user(self, user_id: str) -> None:
        """Drop cached answers for a user whose tokens were just invalidated."""
        for key in [k for k, v in self._cache.items() if v[1] == user_id]:
            del self._cache[key]

    async def _whoami(self, request: web.BaseRequest, credentials: Credentials) -> tuple[str, str | None]:
        reply = await self._upstream.call(
            "GET",
            WHOAMI_PATH,
            headers=self.headers_for(request, credentials),
            params=credentials.params,
        )
        if reply.status != 200:
            raise reply.refusal("whoami")
        try:
            body = json.loads(reply.body)
            user_id = body["user_id"]
            device_id = body.get("device_id")
        except (ValueError, KeyError, TypeError):
            raise bad_gateway("The homeserver sent an invalid whoami response") from None
        if not isinstance(user_id, str) or not (device_id is None or isinstance(device_id, str)):
            raise bad_gateway("The homeserver sent an invalid whoami response")
        return user_id, device_id

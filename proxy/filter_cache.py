"""Sync filters by ID: fetched from the homeserver as the caller, and cached (a filter
is immutable once uploaded)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from .filters import NO_FILTER, EventFilter, SyncFilter
from .forward import UpstreamReply
from .routing import encode_segment

Fetch = Callable[[str], Awaitable[UpstreamReply]]

# What to apply when a stored filter cannot be fetched: the homeserver served the sync
# with this filter, so it exists, and an error here is transient. Inject nothing rather
# than guess (the rows stay for a later sync).
_NOTHING = SyncFilter(EventFilter(types=()), EventFilter(types=()))


class FilterCache:
    def __init__(self, max_size: int = 10_000) -> None:
        self._max_size = max_size
        self._cache: OrderedDict[tuple[str, str], SyncFilter] = OrderedDict()

    async def get(self, user_id: str, param: str | None, fetch: Fetch) -> SyncFilter:
        """The filter of a /sync request: inline JSON, a stored filter's ID (fetched with
        `fetch(path)`, a GET as the caller), or none."""
        if not param:
            return NO_FILTER
        if param.lstrip().startswith("{"):
            try:
                return SyncFilter.parse(json.loads(param))
            except ValueError:
                return NO_FILTER  # the homeserver accepted the request, so this is unreachable
        key = (user_id, param)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        reply = await fetch(
            f"/_matrix/client/v3/user/{encode_segment(user_id)}/filter/{encode_segment(param)}"
        )
        if reply.status != 200:
            return _NOTHING
        try:
            parsed = SyncFilter.parse(json.loads(reply.body))
        except ValueError:
            return _NOTHING
        self._cache[key] = parsed
        while len(self._cache) > self._max_size:
            self._cache.popitem(last=False)
        return parsed

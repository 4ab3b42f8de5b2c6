"""Matching a request to a route exactly the way Synapse matches it (pure functions).

Synapse tries each servlet's regular expression with `re.match` against the *raw*
request path (no query string, nothing decoded), in registration order, and only
then percent-decodes the captured groups. The first pattern that matches decides,
whatever the method (another method gets 405). The route table itself is in
`routes.py`; this module knows nothing of handlers beyond their type.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from .timeouts import ReadTimeout

if TYPE_CHECKING:
    from aiohttp import web

    from .context import Context

    Handler = Callable[[Context, web.Request, dict[str, str]], Awaitable[web.StreamResponse]]
else:
    Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    """One owned route: what the proxy serves, and how, in one declaration."""

    name: str  # metrics label and log name
    pattern: re.Pattern[str]  # Synapse's own, anchors included
    handlers: Mapping[str, Handler]  # by method, as Synapse's servlets have on_GET, on_PUT
    # The path is the proxy's alone, so other methods get Synapse's 405 instead of
    # being forwarded (the homeserver may not know the path at all).
    owns_path: bool = False
    # How long the homeserver may stay silent, whether served or (feature off) forwarded.
    read_timeout: ReadTimeout = ReadTimeout.DEFAULT

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(self.handlers)

    def template(self, raw_path: str) -> str:
        """The raw request target's path with each parameter replaced by `{}`, and no
        query: for the access log."""
        path, _ = split_raw_path(raw_path)
        found = self.pattern.match(path)
        if found is None:
            return path
        out, end = [], 0
        for index in range(1, (found.lastindex or 0) + 1):
            out.append(path[end : found.start(index)] + "{}")
            end = found.end(index)
        return "".join(out) + path[end:]


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    params: dict[str, str]
    handler: Handler | None  # None: the path is the route's, the method is not

    @property
    def name(self) -> str:
        return self.route.name

    @property
    def method_allowed(self) -> bool:
        return self.handler is not None


def is_origin_form(raw_path: str) -> bool:
    """Whether a request target is a path (RFC 9112 origin-form), the only kind the
    proxy serves. aiohttp also accepts an absolute URI (`GET http://host/path`), an
    authority (`CONNECT host:port`) and `*`; Synapse answers all of those 404 (no
    resource of its tree is named `http:`), and none may become part of an upstream URL:
    appended to `upstream.url` its letters would name another host."""
    return raw_path.startswith("/")


def split_raw_path(raw_path: str) -> tuple[str, str]:
    """Split a raw request target into (path, query) without decoding either."""
    path, _, query = raw_path.partition("?")
    return path, query


def match(method: str, raw_path: str, routes: Sequence[Route]) -> RouteMatch | None:
    """Find the route Synapse would dispatch `raw_path` to, if the proxy owns it.

    `raw_path` is the request target as the client sent it; a query string is ignored.
    Captured parameters are percent-decoded as Synapse decodes them.
    """
    path, _ = split_raw_path(raw_path)
    if not path.startswith("/_matrix/client/"):
        return None  # most traffic (media, federation, admin) is decided here, cheaply
    for route in routes:
        m = route.pattern.match(path)
        if m is None:
            continue
        params = {k: unquote(v) if v else v for k, v in m.groupdict().items()}
        return RouteMatch(route, params, route.handlers.get(method))
    return None


# RFC 3986 `pchar` without the unreserved characters `quote` keeps anyway: what may
# stand in a path segment unescaped.
_SEGMENT_SAFE = "!$&'()*+,;=:@"


def encode_segment(value: str) -> str:
    """`value` as one path segment that Synapse decodes back to `value`, escaping only
    what must be escaped: a user ID, room ID or type goes out no longer than a client
    may send it (Synapse refuses request lines over 16 KiB, and `%3A` is three times
    as long as `:`)."""
    return quote(value, safe=_SEGMENT_SAFE)

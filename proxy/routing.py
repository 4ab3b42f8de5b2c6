"""Which requests the proxy owns, matched exactly the way Synapse matches them.

Synapse tries each servlet's regular expression with `re.match` against the *raw*
request path (no query string, nothing decoded), in registration order, and only
then percent-decodes the captured groups. The first pattern that matches decides,
whatever the method (another method gets 405). In Synapse 1.163 every pattern owned
here ends in `$`, so a trailing slash or an extra segment is not account data at
all (the homeserver answers 404 M_UNRECOGNIZED; so does the proxy, by forwarding),
while `[^/]*` lets a type be empty and `%2F` inside a type stay part of it. Every
client endpoint is served under `r0`, `v3` and `unstable` (some under `api/v1` too).
A path shape the homeserver would serve as account data but the proxy failed to
recognise would bypass it, so these patterns copy Synapse's, anchors included.

Everything here is pure: `match()` takes a method and a raw path and returns what
it found. `app.py` maps route names to handlers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote


class RouteName(Enum):
    DELETE_GLOBAL_ACCOUNT_DATA = "delete_global_account_data"
    DELETE_ROOM_ACCOUNT_DATA = "delete_room_account_data"
    GLOBAL_ACCOUNT_DATA = "global_account_data"
    ROOM_ACCOUNT_DATA = "room_account_data"
    SYNC = "sync"
    INITIAL_SYNC = "initial_sync"
    ROOM_INITIAL_SYNC = "room_initial_sync"
    VERSIONS = "versions"
    DELETE_DEVICE = "delete_device"
    DELETE_DEVICES = "delete_devices"
    LOGOUT = "logout"
    LOGOUT_ALL = "logout_all"
    DEACTIVATE = "deactivate"


@dataclass(frozen=True)
class Route:
    name: RouteName
    methods: frozenset[str]
    pattern: re.Pattern[str]
    # The path is the proxy's alone, so other methods get Synapse's 405 instead of
    # being forwarded (the homeserver may not know the path at all).
    owns_path: bool = False


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    params: dict[str, str]
    method_allowed: bool

    @property
    def name(self) -> RouteName:
        return self.route.name


_CLIENT = r"^/_matrix/client/(?:r0|v3|unstable)"
_CLIENT_V1 = r"^/_matrix/client/(?:api/v1|r0|v3|unstable)"
# Synapse writes this prefix as a regular expression with unescaped dots, so any
# character matches there; mirror that so no spelling reaches a homeserver with
# the flag on behind the proxy's back.
_MSC3391 = r"^/_matrix/client/unstable/org.matrix.msc3391"
_USER = r"/user/(?P<user_id>[^/]*)"
_ROOM = r"/rooms/(?P<room_id>[^/]*)"
_TYPE = r"/account_data/(?P<account_data_type>[^/]*)$"

_GET = frozenset({"GET", "HEAD"})  # Synapse serves HEAD with the GET servlet.


def _route(name: RouteName, methods: frozenset[str], pattern: str, *, owns_path: bool = False) -> Route:
    return Route(name, methods, re.compile(pattern), owns_path)


# The MSC3391 routes, in Synapse's registration order: the first pattern that
# matches the path decides, whatever the method.
MSC3391_ROUTES: tuple[Route, ...] = (
    _route(RouteName.GLOBAL_ACCOUNT_DATA, _GET | {"PUT"}, _CLIENT + _USER + _TYPE),
    _route(RouteName.ROOM_ACCOUNT_DATA, _GET | {"PUT"}, _CLIENT + _USER + _ROOM + _TYPE),
    _route(
        RouteName.DELETE_GLOBAL_ACCOUNT_DATA,
        frozenset({"DELETE"}),
        _MSC3391 + _USER + _TYPE,
        owns_path=True,
    ),
    _route(
        RouteName.DELETE_ROOM_ACCOUNT_DATA,
        frozenset({"DELETE"}),
        _MSC3391 + _USER + _ROOM + _TYPE,
        owns_path=True,
    ),
    _route(RouteName.SYNC, _GET, _CLIENT + r"/sync$"),
    _route(RouteName.INITIAL_SYNC, _GET, _CLIENT_V1 + r"/initialSync$"),
    _route(RouteName.ROOM_INITIAL_SYNC, _GET, _CLIENT_V1 + _ROOM + r"/initialSync$"),
    _route(RouteName.VERSIONS, _GET, r"^/_matrix/client/versions$"),
    _route(RouteName.DELETE_DEVICE, frozenset({"DELETE"}), _CLIENT + r"/devices/(?P<device_id>[^/]*)$"),
    _route(RouteName.DELETE_DEVICES, frozenset({"POST"}), _CLIENT + r"/delete_devices$"),
    _route(RouteName.LOGOUT, frozenset({"POST"}), _CLIENT_V1 + r"/logout$"),
    _route(RouteName.LOGOUT_ALL, frozenset({"POST"}), _CLIENT_V1 + r"/logout/all$"),
    _route(RouteName.DEACTIVATE, frozenset({"POST"}), _CLIENT + r"/account/deactivate$"),
)


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


def match(method: str, raw_path: str, routes: tuple[Route, ...] = MSC3391_ROUTES) -> RouteMatch | None:
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
        return RouteMatch(route, params, method in route.methods)
    return None


# Path segments that are part of an endpoint's name rather than data: lowercase words,
# API versions, and namespaced unstable prefixes. Everything else (IDs, event types,
# tokens, media IDs, device IDs) is user data and never reaches a log line or a label.
_STATIC_SEGMENT = re.compile(r"^(?:[a-z_]+|v\d+|r0|api|org\.matrix\.[a-z0-9._]+)$")


def template(raw_path: str) -> str:
    """The request path with every data segment replaced by `{}`, and no query."""
    path, _ = split_raw_path(raw_path)
    return "/".join(s if not s or _STATIC_SEGMENT.match(s) else "{}" for s in path.split("/"))

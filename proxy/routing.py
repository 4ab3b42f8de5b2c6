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
from urllib.parse import quote, unquote


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


# RFC 3986 `pchar` without the unreserved characters `quote` keeps anyway: what may
# stand in a path segment unescaped.
_SEGMENT_SAFE = "!$&'()*+,;=:@"


def encode_segment(value: str) -> str:
    """`value` as one path segment that Synapse decodes back to `value`, escaping only
    what must be escaped: a user ID, room ID or type goes out no longer than a client
    may send it (Synapse refuses request lines over 16 KiB, and `%3A` is three times
    as long as `:`)."""
    return quote(value, safe=_SEGMENT_SAFE)



# --- log-safe path templates ---------------------------------------------------------------
#
# A template keeps the shape of an endpoint for operators and hides everything a user
# chose: a segment is kept only if it is one of the words Matrix and Synapse name their
# endpoints with (below), a version, or an unstable MSC prefix, AND it does not stand
# where data stands (the segments after `user`, `rooms`, `account_data`, `send`, ...).
# Anything else, a lowercase word included (account data types, state keys, tags, device
# IDs, transaction IDs, push rule IDs, server names, media IDs), is `{}`. Over-masking is
# the safe direction: an endpoint word missing here costs readability, never privacy.

_ENDPOINT_WORDS = frozenset(
    """
    _matrix _synapse .well-known matrix client server support federation key media app push identity
    api unstable admin
    3pid account account_data account_details actions add aliases all appservice auth auth_issuer
    auth_metadata authn_response available avatar_url backchannel_logout backfill ban bind callback
    cancel capabilities changes check claim config context create createRoom deactivate delayed_events
    delete delete_devices dehydrated_device destinations device_signing devices directory displayname
    download email enabled event event_auth event_reports events exchange_third_party_invite fallback
    filter forget get_missing_events get_token global hierarchy initialSync invite jwks join
    joined_members joined_rooms keys kick knock leave list location login logout make_join make_knock
    make_leave members messages msisdn mutual_rooms new_user_consent notifications notify oidc openid
    password password_reset pick_idp pick_username ping presence preview_url profile protect protocol
    protocols publicRooms public_rooms purge_history pushers pushrules query query_auth quarantine
    read_markers receipt redact redirect refresh register registration_tokens relations rendezvous
    report request_token requestToken restart room room_keys room_summary rooms saml2 search send
    sendToDevice send_join send_knock send_leave server_version set signatures sso sso_register
    state state_ids status submit_token summary sync tags thirdparty threads thumbnail
    timestamp_to_event token transactions turnServer typing unban unbind unprotect unsubscribe upgrade
    upload user user_directory userinfo users validity version versions voip web whoami whois
    """.split()
)
_VERSION_OR_PREFIX = re.compile(r"v\d+|r0|org\.matrix\.(?:simplified_)?msc\d+(?:\.v\d+)?")

# How many segments after an endpoint word are data (`/rooms/{roomId}`,
# `/state/{eventType}/{stateKey}`, `/pushrules/{scope}/{kind}/{ruleId}`, ...).
_DATA_AFTER: dict[str, int] = {
    "user": 1, "users": 1, "rooms": 1, "room": 1, "account_data": 1, "tags": 1, "devices": 1,
    "filter": 1, "state": 2, "send": 2, "sendToDevice": 2, "pushrules": 3, "download": 3,
    "thumbnail": 2, "upload": 2, "event": 1, "events": 1, "context": 1, "relations": 3, "receipt": 2,
    "typing": 1, "join": 1, "knock": 1, "redact": 2, "profile": 1, "presence": 1, "report": 1,
    "protocol": 1, "location": 1, "auth": 1, "redirect": 1, "whois": 1, "appservice": 1, "version": 1,
    "invite": 2, "make_join": 2, "make_leave": 2, "make_knock": 2, "send_join": 2, "send_leave": 2,
    "send_knock": 2, "backfill": 1, "get_missing_events": 1, "event_auth": 2, "query_auth": 2,
    "state_ids": 1, "query": 2, "server": 1, "transactions": 1, "exchange_third_party_invite": 1,
    "delayed_events": 1, "room_summary": 1, "timestamp_to_event": 1, "hierarchy": 1,
    "dehydrated_device": 1, "rendezvous": 1,
}  # fmt: skip
# ...where the word before decides: `/room_keys/keys/{roomId}/{sessionId}` (but
# `/keys/upload`), `/directory/list/appservice/{networkId}/{roomId}`.
_DATA_AFTER_PAIR: dict[tuple[str, str], int] = {("room_keys", "keys"): 2, ("list", "appservice"): 2}
# ...and in Synapse's admin API, which names media by `/media/{serverName}/{mediaId}`.
_DATA_AFTER_ADMIN: dict[str, int] = {
    "media": 2, "registration_tokens": 1, "event_reports": 1, "destinations": 1, "purge_history": 2,
    "protect": 1, "unprotect": 1,
}  # fmt: skip


def _is_endpoint_word(segment: str) -> bool:
    return segment in _ENDPOINT_WORDS or _VERSION_OR_PREFIX.fullmatch(segment) is not None


def template(raw_path: str) -> str:
    """The request path with every user-supplied segment replaced by `{}`, and no query:
    the only form of a path that reaches a log line (or, as a route name, a metric)."""
    path, _ = split_raw_path(raw_path)
    admin = path.startswith("/_synapse/admin/")
    out: list[str] = []
    data = 0  # how many of the coming segments stand where data stands
    previous = ""
    for segment in path.split("/"):
        if data:
            data -= 1
            out.append("{}" if segment else "")
            previous = ""
        elif not segment:
            out.append("")
            previous = ""
        elif _is_endpoint_word(segment):
            out.append(segment)
            data = (
                _DATA_AFTER_PAIR.get((previous, segment))
                or (_DATA_AFTER_ADMIN.get(segment, 0) if admin else 0)
                or _DATA_AFTER.get(segment, 0)
            )
            previous = segment
        else:
            out.append("{}")
            previous = ""
    return "/".join(out)

"""The route table: every request the proxy owns, in one place.

Routes are listed in Synapse's registration order, with Synapse's own patterns: the
first pattern that matches the raw path decides, whatever the method (`routing.match`).
In Synapse 1.163 every pattern owned here ends in `$`, so a trailing slash or an extra
segment is not account data at all (the homeserver answers 404 M_UNRECOGNIZED; so does
the proxy, by forwarding), while `[^/]*` lets a type be empty and `%2F` inside a type
stay part of it. Every client endpoint is served under `r0`, `v3` and `unstable` (some
under `api/v1` too). A path shape the homeserver would serve as an owned endpoint but
the proxy failed to recognise would bypass it, so these patterns copy Synapse's,
anchors included.

Dispatch (`app.py`), metrics labels, access-log templates and read timeouts all read
this table. Adding a route is adding one entry.
"""

from __future__ import annotations

import re

from . import account_data, devices, sliding_sync, sync, versions
from .routing import Handler, Route
from .timeouts import ReadTimeout

_CLIENT = r"^/_matrix/client/(?:r0|v3|unstable)"
_CLIENT_V1 = r"^/_matrix/client/(?:api/v1|r0|v3|unstable)"
# Synapse writes this prefix as a regular expression with unescaped dots, so any
# character matches there; mirror that so no spelling reaches a homeserver with
# the flag on behind the proxy's back.
_MSC3391 = r"^/_matrix/client/unstable/org.matrix.msc3391"
_USER = r"/user/(?P<user_id>[^/]*)"
_ROOM = r"/rooms/(?P<room_id>[^/]*)"
_TYPE = r"/account_data/(?P<account_data_type>[^/]*)$"


def _get(handler: Handler) -> dict[str, Handler]:
    return {"GET": handler, "HEAD": handler}  # Synapse serves HEAD with the GET servlet


def _route(
    name: str,
    pattern: str,
    handlers: dict[str, Handler],
    *,
    owns_path: bool = False,
    read_timeout: ReadTimeout = ReadTimeout.DEFAULT,
) -> Route:
    return Route(name, re.compile(pattern), handlers, owns_path, read_timeout)


_ACCOUNT_DATA = {**_get(account_data.get), "PUT": account_data.put}

ROUTES: tuple[Route, ...] = (
    _route("global_account_data", _CLIENT + _USER + _TYPE, _ACCOUNT_DATA),
    _route("room_account_data", _CLIENT + _USER + _ROOM + _TYPE, _ACCOUNT_DATA),
    _route(
        "delete_global_account_data",
        _MSC3391 + _USER + _TYPE,
        {"DELETE": account_data.delete},
        owns_path=True,
    ),
    _route(
        "delete_room_account_data",
        _MSC3391 + _USER + _ROOM + _TYPE,
        {"DELETE": account_data.delete},
        owns_path=True,
    ),
    _route("sync", _CLIENT + r"/sync$", _get(sync.sync), read_timeout=ReadTimeout.SYNC),
    _route(
        "initial_sync",
        _CLIENT_V1 + r"/initialSync$",
        _get(sync.legacy_initial_sync),
        read_timeout=ReadTimeout.INITIAL_SYNC,
    ),
    _route(
        "room_initial_sync",
        _CLIENT_V1 + _ROOM + r"/initialSync$",
        _get(sync.legacy_initial_sync),
        read_timeout=ReadTimeout.INITIAL_SYNC,
    ),
    # Simplified sliding sync (MSC4186): Synapse's unstable path (its dots unescaped, as
    # Synapse writes them), and the spec's stable one for homeservers that serve it.
    _route(
        "sliding_sync",
        r"^/_matrix/client/unstable/org.matrix.simplified_msc3575/sync$",
        {"POST": sliding_sync.sliding_sync},
        read_timeout=ReadTimeout.SLIDING_SYNC,
    ),
    _route(
        "sliding_sync_v4",
        r"^/_matrix/client/v4/sync$",
        {"POST": sliding_sync.sliding_sync},
        read_timeout=ReadTimeout.SLIDING_SYNC,
    ),
    _route("versions", r"^/_matrix/client/versions$", _get(versions.versions)),
    _route("delete_device", _CLIENT + r"/devices/(?P<device_id>[^/]*)$", {"DELETE": devices.delete_device}),
    _route("delete_devices", _CLIENT + r"/delete_devices$", {"POST": devices.delete_devices}),
    _route("logout", _CLIENT_V1 + r"/logout$", {"POST": devices.logout}),
    _route("logout_all", _CLIENT_V1 + r"/logout/all$", {"POST": devices.logout_all}),
    _route("deactivate", _CLIENT + r"/account/deactivate$", {"POST": devices.deactivate}),
)

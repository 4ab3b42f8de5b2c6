"""Every request shape the nginx tests send, and where each must end up.

The owned shapes are the routing tests' full lists (`tests/test_routing.py`: every
prefix, percent-encoded IDs with `%2F`, `%21`, `%40`, `%3A`, the MSC3391 prefix with
other characters where Synapse's unescaped dots are, `api/v1` where Synapse serves it,
the query string, other methods on owned paths), sliding sync on both paths, and the
shapes that nginx's decoded, normalised `$uri` turns into something else (`#` ends the
path there, `..%2F` climbs out of `/_matrix`, `%2F` splits a segment): Synapse would
serve every one of them as an owned endpoint (checked with `routing.match`, which
mirrors its patterns), so each must reach the proxy. The ordinary shapes are client,
media, key and federation traffic that must go straight to the homeserver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from proxy import routing
from proxy.routes import ROUTES
from tests.test_routing import (
    ALICE,
    NOT_OWNED,
    OWNED,
    PREFIXES,
    ROOM,
    ROOM_ID_SHAPES,
    SPELLINGS,
    TYPE_SHAPES,
    USER_ID_SHAPES,
    c,
    unstable_delete,
)

# proxy: reaches the proxy (and not the homeserver); homeserver: the reverse; refused:
# nginx answers 400 itself (a target it cannot decode), nowhere: nginx answers 404 (a
# path outside /_matrix and /_synapse/client). Neither of the last two reaches anyone.
Destination = Literal["proxy", "homeserver", "refused", "nowhere"]

SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
CLIMB = "..%2F" * 6  # nginx: out of /_matrix/client/v3/user/{u}/account_data/ and above


@dataclass(frozen=True)
class Shape:
    method: str
    target: str
    destination: Destination
    # What the upstream receives, when it is not `target` (an absolute-form target
    # arrives as its path).
    arrives_as: str | None = None

    @property
    def expected_target(self) -> str:
        return self.target if self.arrives_as is None else self.arrives_as

    @property
    def owned(self) -> bool:
        """Synapse would dispatch this target to an owned servlet."""
        path = self.expected_target
        return routing.match(self.method, path, ROUTES) is not None


def _undecodable(target: str) -> bool:
    # nginx refuses a `%` not followed by two hex digits, and `%00`, with 400.
    return re.search(r"%(?![0-9A-Fa-f]{2})|%00", target.partition("?")[0]) is not None


def _owned(method: str, target: str, arrives_as: str | None = None) -> Shape:
    return Shape(method, target, "refused" if _undecodable(target) else "proxy", arrives_as)


def owned_shapes() -> list[Shape]:
    shapes = [_owned(method, path) for method, path, _, _ in OWNED]
    for prefix in PREFIXES:
        for tail, _ in TYPE_SHAPES:
            shapes += [
                _owned("PUT", c(prefix, f"/user/{ALICE}/account_data/{tail}")),
                _owned("PUT", c(prefix, f"/user/{ALICE}/rooms/{ROOM}/account_data/{tail}")),
            ]
    for tail, _ in TYPE_SHAPES:
        shapes += [
            _owned("DELETE", unstable_delete(f"/user/{ALICE}/account_data/{tail}")),
            _owned("DELETE", unstable_delete(f"/user/{ALICE}/rooms/{ROOM}/account_data/{tail}")),
        ]
    for raw, _ in USER_ID_SHAPES:
        shapes += [
            _owned("GET", c("v3", f"/user/{raw}/account_data/m.test")),
            _owned("GET", c("v3", f"/user/{raw}/rooms/{ROOM}/account_data/m.test")),
            _owned("DELETE", unstable_delete(f"/user/{raw}/account_data/m.test")),
        ]
    for raw, _ in ROOM_ID_SHAPES:
        shapes += [
            _owned("GET", c("r0", f"/user/{ALICE}/rooms/{raw}/account_data/m.test")),
            _owned("DELETE", unstable_delete(f"/user/{ALICE}/rooms/{raw}/account_data/m.test")),
            _owned("GET", c("v3", f"/rooms/{raw}/initialSync")),
        ]
    for spelling in SPELLINGS:
        shapes += [
            _owned("DELETE", unstable_delete(f"/user/{ALICE}/account_data/m.test", spelling)),
            _owned("DELETE", unstable_delete(f"/user/{ALICE}/rooms/{ROOM}/account_data/m.test", spelling)),
        ]
    shapes += [
        # the query string, whatever it holds
        _owned("GET", c("v3", "/sync?since=s1&timeout=30000")),
        _owned("GET", c("v3", f"/user/{ALICE}/account_data/m.test?x=/y?z#w")),
        _owned("GET", "/_matrix/client/versions?x=/y"),
        # other methods on owned paths: the proxy forwards them, or (MSC3391) answers 405
        _owned("OPTIONS", c("v3", f"/user/{ALICE}/account_data/m.test")),
        _owned("GET", c("v3", "/devices/ABCDEF")),
        _owned("PATCH", unstable_delete(f"/user/{ALICE}/account_data/m.test")),
        # sliding sync, both paths, and Synapse's unescaped dots in the unstable one
        _owned("POST", SLIDING_SYNC),
        _owned("POST", SLIDING_SYNC + "?pos=p1&timeout=30000"),
        _owned("POST", "/_matrix/client/v4/sync?pos=p1"),
        _owned("POST", "/_matrix/client/unstable/orgXmatrixYsimplified_msc3575/sync"),
        _owned("POST", "/_matrix/client/unstable/org/matrix/simplified_msc3575/sync"),
        # what nginx's $uri makes of them: `#` ends the path there...
        _owned("DELETE", unstable_delete(f"/user/{ALICE}/account_data/m.test", "org#matrix.msc3391")),
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/m.test#x")),
        _owned("GET", c("v3", "/user/@alice#x/account_data/m.test")),
        _owned("POST", "/_matrix/client/unstable/org#matrix.simplified_msc3575/sync"),
        # ... `..` removes segments, `%2F` first becoming a separator ...
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/{CLIMB}x")),  # $uri: /x
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/..%2F..%2F..%2F..%2Fmedia%2Fv3%2Fupload")),
        _owned("GET", c("v3", "/user/../rooms/../account_data/m.test")),
        _owned("GET", c("v3", "/user/%2E%2E/account_data/m.test")),
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/.")),
        _owned("DELETE", c("v3", "/devices/..%2F..%2Fkeys%2Fquery")),
        # ... and other characters nginx decodes or keeps
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/m.test;x=1")),
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/m%23test%3Fx")),
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/m%00test")),  # nginx: 400
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/+m.test")),
        # an absolute-form target: nginx passes its path on
        _owned("GET", "http://evil.example/_matrix/client/v3/sync?x=1", "/_matrix/client/v3/sync?x=1"),
        # a long type (the request line under 16 KiB)
        _owned("PUT", c("v3", f"/user/{ALICE}/account_data/{'t' * 15_000}")),
    ]
    return shapes


ORDINARY = [
    ("GET", "/_matrix/client/v3/capabilities"),
    ("GET", "/_matrix/client/v3/account/whoami"),
    ("GET", "/_matrix/client/v3/joined_rooms"),
    ("POST", "/_matrix/client/v3/login"),
    ("POST", "/_matrix/client/v3/register"),
    ("POST", "/_matrix/client/v3/createRoom"),
    ("GET", f"/_matrix/client/v3/rooms/{ROOM}/messages?dir=b&limit=10"),
    ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/txn1"),
    ("GET", f"/_matrix/client/v3/rooms/{ROOM}/state/m.room.name/"),
    ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/typing/{ALICE}"),
    ("PUT", f"/_matrix/client/v3/user/{ALICE}/rooms/{ROOM}/tags/m.favourite"),
    ("POST", f"/_matrix/client/v3/user/{ALICE}/filter"),
    ("GET", "/_matrix/client/v3/pushrules/"),
    ("GET", f"/_matrix/client/v3/profile/{ALICE}"),
    ("GET", "/_matrix/client/v3/devices"),
    ("POST", "/_matrix/client/v3/keys/upload"),
    ("POST", "/_matrix/client/v3/keys/query"),
    ("POST", "/_matrix/client/v3/keys/claim"),
    ("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/txn2"),
    ("POST", "/_matrix/media/v3/upload?filename=a.png"),
    ("GET", "/_matrix/media/v3/download/localhost/abcdef"),
    ("GET", "/_matrix/client/v1/media/download/localhost/abcdef"),
    ("GET", "/_matrix/client/v1/media/thumbnail/localhost/abcdef?width=32&height=32"),
    ("GET", "/_matrix/federation/v1/version"),
    ("PUT", "/_matrix/federation/v1/send/txn3"),
    ("GET", "/_matrix/key/v2/server"),
    ("GET", "/_synapse/client/oidc/callback"),
    ("GET", "/_matrix/client/V3/sync"),  # Synapse's patterns are case-sensitive
]


def not_owned_shapes() -> list[Shape]:
    shapes = [Shape(method, target, "homeserver") for method, target in ORDINARY]
    for path in NOT_OWNED:
        if not path:
            continue  # no request line has an empty target
        # nginx serves only /_matrix and /_synapse/client (after merging slashes).
        inside = re.match(r"/+_matrix(/|$)", path) is not None
        shapes.append(Shape("GET", path, "homeserver" if inside else "nowhere"))
    return shapes


def all_shapes() -> list[Shape]:
    return owned_shapes() + not_owned_shapes()

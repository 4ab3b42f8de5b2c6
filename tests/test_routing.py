"""`proxy/routing.py`: the proxy owns exactly the paths Synapse would dispatch to an
owned servlet: every prefix Synapse serves, its anchors, raw-path matching with the
captured groups percent-decoded afterwards.

The reference is Synapse 1.163.2 (the version the integration rig runs), whose
account data, `delete_devices` and MSC3391 patterns all end in `$`: a trailing slash
or an extra segment is not account data there (404 M_UNRECOGNIZED), so the proxy
must not take it either. (Synapse 1.157 and older left those patterns unanchored.)"""

from __future__ import annotations

import pytest

from proxy import routing
from proxy.routes import ROUTES


class R:
    """The names of the owned routes (`proxy/routes.py`)."""

    GLOBAL_ACCOUNT_DATA = "global_account_data"
    ROOM_ACCOUNT_DATA = "room_account_data"
    DELETE_GLOBAL_ACCOUNT_DATA = "delete_global_account_data"
    DELETE_ROOM_ACCOUNT_DATA = "delete_room_account_data"
    SYNC = "sync"
    INITIAL_SYNC = "initial_sync"
    ROOM_INITIAL_SYNC = "room_initial_sync"
    VERSIONS = "versions"
    DELETE_DEVICE = "delete_device"
    DELETE_DEVICES = "delete_devices"
    LOGOUT = "logout"
    LOGOUT_ALL = "logout_all"
    DEACTIVATE = "deactivate"


RouteName = str


def match(method: str, raw_path: str) -> routing.RouteMatch | None:
    return routing.match(method, raw_path, ROUTES)


PREFIXES = ("r0", "v3", "unstable")
V1_PREFIXES = ("api/v1", "r0", "v3", "unstable")
ALICE = "%40alice%3Alocalhost"
ROOM = "%21room%3Alocalhost"


def c(prefix: str, rest: str) -> str:
    return f"/_matrix/client/{prefix}{rest}"


def unstable_delete(rest: str, spelling: str = "org.matrix.msc3391") -> str:
    return f"/_matrix/client/unstable/{spelling}{rest}"


# --- what must match ---------------------------------------------------------------------

OWNED: list[tuple[str, str, RouteName, dict[str, str]]] = []
for p in PREFIXES:
    OWNED += [
        ("GET", c(p, f"/user/{ALICE}/account_data/m.test"), R.GLOBAL_ACCOUNT_DATA, {}),
        ("PUT", c(p, f"/user/{ALICE}/account_data/m.test"), R.GLOBAL_ACCOUNT_DATA, {}),
        ("HEAD", c(p, f"/user/{ALICE}/account_data/m.test"), R.GLOBAL_ACCOUNT_DATA, {}),
        ("GET", c(p, f"/user/{ALICE}/rooms/{ROOM}/account_data/m.test"), R.ROOM_ACCOUNT_DATA, {}),
        ("PUT", c(p, f"/user/{ALICE}/rooms/{ROOM}/account_data/m.test"), R.ROOM_ACCOUNT_DATA, {}),
        ("GET", c(p, "/sync"), R.SYNC, {}),
        ("HEAD", c(p, "/sync"), R.SYNC, {}),
        ("DELETE", c(p, "/devices/ABCDEF"), R.DELETE_DEVICE, {"device_id": "ABCDEF"}),
        ("POST", c(p, "/delete_devices"), R.DELETE_DEVICES, {}),
        ("POST", c(p, "/account/deactivate"), R.DEACTIVATE, {}),
    ]
for p in V1_PREFIXES:
    OWNED += [
        ("POST", c(p, "/logout"), R.LOGOUT, {}),
        ("POST", c(p, "/logout/all"), R.LOGOUT_ALL, {}),
        ("GET", c(p, "/initialSync"), R.INITIAL_SYNC, {}),
        ("GET", c(p, f"/rooms/{ROOM}/initialSync"), R.ROOM_INITIAL_SYNC, {"room_id": "!room:localhost"}),
    ]
OWNED += [
    ("DELETE", unstable_delete(f"/user/{ALICE}/account_data/m.test"), R.DELETE_GLOBAL_ACCOUNT_DATA, {}),
    (
        "DELETE",
        unstable_delete(f"/user/{ALICE}/rooms/{ROOM}/account_data/m.test"),
        R.DELETE_ROOM_ACCOUNT_DATA,
        {"room_id": "!room:localhost"},
    ),
    ("GET", "/_matrix/client/versions", R.VERSIONS, {}),
    ("HEAD", "/_matrix/client/versions", R.VERSIONS, {}),
]


@pytest.mark.parametrize(("method", "path", "name", "params"), OWNED)
def test_owned_shapes_match(method: str, path: str, name: RouteName, params: dict[str, str]) -> None:
    found = match(method, path)
    assert found is not None, path
    assert found.name == name
    assert found.method_allowed
    for key, value in params.items():
        assert found.params[key] == value
    if "account_data" in path:
        assert found.params["user_id"] == "@alice:localhost"
        assert found.params["account_data_type"] == "m.test"


TYPE_SHAPES = [
    ("", ""),  # empty type: `[^/]*`
    ("m.foo%2Fbar", "m.foo/bar"),  # %2F inside a type is part of the type
    ("m%2Etest", "m.test"),
    ("%F0%9F%90%88", "\U0001f408"),
    ("a%20b%25c", "a b%c"),
]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(("tail", "expected_type"), TYPE_SHAPES)
def test_account_data_type_shapes(prefix: str, tail: str, expected_type: str) -> None:
    for path, name in (
        (c(prefix, f"/user/{ALICE}/account_data/{tail}"), R.GLOBAL_ACCOUNT_DATA),
        (c(prefix, f"/user/{ALICE}/rooms/{ROOM}/account_data/{tail}"), R.ROOM_ACCOUNT_DATA),
        (unstable_delete(f"/user/{ALICE}/account_data/{tail}"), R.DELETE_GLOBAL_ACCOUNT_DATA),
        (unstable_delete(f"/user/{ALICE}/rooms/{ROOM}/account_data/{tail}"), R.DELETE_ROOM_ACCOUNT_DATA),
    ):
        method = "DELETE" if "msc3391" in path else "PUT"
        found = match(method, path)
        assert found is not None, path
        assert found.name == name
        assert found.params["account_data_type"] == expected_type


USER_ID_SHAPES = [
    (ALICE, "@alice:localhost"),
    ("@alice:localhost", "@alice:localhost"),
    ("%40ALICE%3aexample.org%3A8448", "@ALICE:example.org:8448"),
    ("%40a%2Fb%3Alocalhost", "@a/b:localhost"),
    ("", ""),  # `/user//account_data/T`: Synapse dispatches it too (and answers 403)
]


@pytest.mark.parametrize(("raw", "decoded"), USER_ID_SHAPES)
def test_user_ids_are_decoded(raw: str, decoded: str) -> None:
    for path in (
        c("v3", f"/user/{raw}/account_data/m.test"),
        c("v3", f"/user/{raw}/rooms/{ROOM}/account_data/m.test"),
        unstable_delete(f"/user/{raw}/account_data/m.test"),
    ):
        found = match("DELETE" if "msc3391" in path else "GET", path)
        assert found is not None, path
        assert found.params["user_id"] == decoded


ROOM_ID_SHAPES = [
    (ROOM, "!room:localhost"),
    ("!room:localhost", "!room:localhost"),
    ("%21room%3aexample.org", "!room:example.org"),
    ("%21abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ", "!abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ"),
    ("not-a-room", "not-a-room"),  # still routed: the handler answers 400 like Synapse
]


@pytest.mark.parametrize(("raw", "decoded"), ROOM_ID_SHAPES)
def test_room_ids_are_decoded(raw: str, decoded: str) -> None:
    for method, path in (
        ("GET", c("r0", f"/user/{ALICE}/rooms/{raw}/account_data/m.test")),
        ("DELETE", unstable_delete(f"/user/{ALICE}/rooms/{raw}/account_data/m.test")),
        ("GET", c("v3", f"/rooms/{raw}/initialSync")),
    ):
        found = match(method, path)
        assert found is not None, path
        assert found.params["room_id"] == decoded


SPELLINGS = [
    "org.matrix.msc3391",
    "orgXmatrixYmsc3391",
    "org_matrix-msc3391",
    "org%matrix%msc3391",
    "org/matrix/msc3391",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_unstable_prefix_allows_any_character_for_its_dots(spelling: str) -> None:
    # Synapse's pattern has the dots unescaped; every spelling it serves is owned.
    found = match("DELETE", unstable_delete(f"/user/{ALICE}/account_data/m.test", spelling))
    assert found is not None
    assert found.name == R.DELETE_GLOBAL_ACCOUNT_DATA
    found = match("DELETE", unstable_delete(f"/user/{ALICE}/rooms/{ROOM}/account_data/m.test", spelling))
    assert found is not None
    assert found.name == R.DELETE_ROOM_ACCOUNT_DATA


def test_device_ids_are_decoded() -> None:
    found = match("DELETE", c("v3", "/devices/A%2FB%20C"))
    assert found is not None
    assert found.params["device_id"] == "A/B C"
    found = match("DELETE", c("v3", "/devices/"))
    assert found is not None
    assert found.params["device_id"] == ""


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("tail", ["m.test/", "m.test/extra", "m.test/extra/more/", "/", "/m.test"])
def test_account_data_patterns_are_anchored(prefix: str, tail: str) -> None:
    # Synapse 1.163.2: `.../account_data/(?P<account_data_type>[^/]*)$`.
    for path in (
        c(prefix, f"/user/{ALICE}/account_data/{tail}"),
        c(prefix, f"/user/{ALICE}/rooms/{ROOM}/account_data/{tail}"),
        unstable_delete(f"/user/{ALICE}/account_data/{tail}"),
        unstable_delete(f"/user/{ALICE}/rooms/{ROOM}/account_data/{tail}"),
    ):
        for method in ("GET", "PUT", "DELETE"):
            assert match(method, path) is None, (method, path)


@pytest.mark.parametrize("tail", ["/", "/extra", "x"])
def test_delete_devices_is_anchored(tail: str) -> None:
    # Synapse 1.163.2: client_patterns("/delete_devices$").
    assert match("POST", c("v3", f"/delete_devices{tail}")) is None


# --- the query string --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("GET", c("v3", "/sync?since=s1&timeout=30000"), R.SYNC),
        ("GET", c("v3", "/sync?"), R.SYNC),
        ("GET", "/_matrix/client/versions?x=/y", R.VERSIONS),
        ("GET", c("v3", f"/user/{ALICE}/account_data/m.test?access_token=abc"), R.GLOBAL_ACCOUNT_DATA),
        ("POST", c("v3", "/logout?user_id=%40a%3Ab"), R.LOGOUT),
        ("DELETE", c("v3", "/devices/D1?x=%2F"), R.DELETE_DEVICE),
    ],
)
def test_query_string_is_ignored(method: str, path: str, name: RouteName) -> None:
    found = match(method, path)
    assert found is not None
    assert found.name == name


def test_query_string_never_becomes_a_parameter() -> None:
    found = match("GET", c("v3", f"/user/{ALICE}/account_data/m.test?x=/y/z"))
    assert found is not None
    assert found.params["account_data_type"] == "m.test"
    assert match("GET", c("v3", "/joined_rooms?/sync")) is None


# --- what must not match -----------------------------------------------------------------


NOT_OWNED = [
    # $-anchored endpoints
    c("v3", "/sync/"),
    c("v3", "/sync/extra"),
    c("v3", "/syncx"),
    "/_matrix/client/versions/",
    "/_matrix/client/versionsx",
    c("v3", "/initialSync/"),
    c("v3", f"/rooms/{ROOM}/initialSync/"),
    c("v3", "/logout/"),
    c("v3", "/logout/all/"),
    c("v3", "/logout/everything"),
    c("v3", "/account/deactivate/"),
    c("v3", "/devices/ABC/"),
    c("v3", "/devices/ABC/extra"),
    c("v3", "/devices"),
    # prefixes Synapse does not serve these under
    c("v1", f"/user/{ALICE}/account_data/m.test"),
    c("v2", f"/user/{ALICE}/account_data/m.test"),
    c("api/v1", f"/user/{ALICE}/account_data/m.test"),
    c("api/v1", f"/user/{ALICE}/rooms/{ROOM}/account_data/m.test"),
    c("r1", f"/user/{ALICE}/account_data/m.test"),
    c("V3", f"/user/{ALICE}/account_data/m.test"),
    c("v1", "/sync"),
    c("api/v1", "/sync"),
    c("v2_alpha", "/sync"),
    c("api/v1", "/delete_devices"),
    c("api/v1", "/devices/ABC"),
    c("api/v1", "/account/deactivate"),
    c("v1", "/logout"),
    "/_matrix/client/v3/versions",
    "/_matrix/client/unstable/versions",
    # the MSC3391 DELETE exists under unstable only
    c("v3", f"/org.matrix.msc3391/user/{ALICE}/account_data/m.test"),
    c("r0", f"/org.matrix.msc3391/user/{ALICE}/rooms/{ROOM}/account_data/m.test"),
    c("unstable", f"/org.matrix.msc3391x/user/{ALICE}/account_data/m.test"),
    c("unstable", f"/org.matrix.msc339/user/{ALICE}/account_data/m.test"),
    # double slashes where Synapse's patterns have one
    f"//_matrix/client/v3/user/{ALICE}/account_data/m.test",
    f"/_matrix//client/v3/user/{ALICE}/account_data/m.test",
    f"/_matrix/client//v3/user/{ALICE}/account_data/m.test",
    f"/_matrix/client/v3//user/{ALICE}/account_data/m.test",
    f"/_matrix/client/v3/user/{ALICE}//account_data/m.test",
    f"/_matrix/client/v3/user/{ALICE}/rooms/{ROOM}//account_data/m.test",
    "/_matrix/client/v3//sync",
    "/_matrix/client//versions",
    "//_matrix/client/versions",
    # encoded slashes are not separators in the raw path
    f"/_matrix/client/v3%2Fuser/{ALICE}/account_data/m.test",
    f"/_matrix/client/v3/user/{ALICE}%2Faccount_data/m.test",
    "/_matrix/client/v3%2Fsync",
    # other shapes
    c("v3", f"/user/{ALICE}/account_data"),
    c("v3", f"/user/{ALICE}/rooms/{ROOM}/account_data"),
    c("v3", f"/user/{ALICE}/filter/1"),
    c("v3", f"/user/{ALICE}/rooms/{ROOM}/tags/m.favourite"),
    c("v3", "/account/whoami"),
    c("v3", "/joined_rooms"),
    f"/prefix/_matrix/client/v3/user/{ALICE}/account_data/m.test",
    "/_matrix/media/v3/upload",
    "/",
    "",
]


@pytest.mark.parametrize("path", NOT_OWNED)
def test_shapes_synapse_would_not_dispatch_there_do_not_match(path: str) -> None:
    for method in ("GET", "PUT", "POST", "DELETE"):
        assert match(method, path) is None, (method, path)


# --- methods -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("DELETE", c("v3", f"/user/{ALICE}/account_data/m.test"), R.GLOBAL_ACCOUNT_DATA),
        ("POST", c("v3", f"/user/{ALICE}/account_data/m.test"), R.GLOBAL_ACCOUNT_DATA),
        ("DELETE", c("v3", f"/user/{ALICE}/rooms/{ROOM}/account_data/m.test"), R.ROOM_ACCOUNT_DATA),
        ("POST", c("v3", "/sync"), R.SYNC),
        ("PUT", "/_matrix/client/versions", R.VERSIONS),
        ("GET", c("v3", "/devices/ABC"), R.DELETE_DEVICE),
        ("PUT", c("v3", "/devices/ABC"), R.DELETE_DEVICE),
        ("GET", c("v3", "/delete_devices"), R.DELETE_DEVICES),
        ("GET", c("v3", "/logout"), R.LOGOUT),
        ("GET", c("v3", "/logout/all"), R.LOGOUT_ALL),
        ("GET", c("v3", "/account/deactivate"), R.DEACTIVATE),
        ("POST", c("v3", "/initialSync"), R.INITIAL_SYNC),
    ],
)
def test_other_methods_on_shared_paths_are_not_allowed_and_not_owned(
    method: str, path: str, name: RouteName
) -> None:
    # The homeserver serves other methods there (or answers its own 405): forward them.
    found = match(method, path)
    assert found is not None
    assert found.name == name
    assert not found.method_allowed
    assert not found.route.owns_path


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "POST", "OPTIONS", "PATCH"])
def test_other_methods_on_the_unstable_delete_paths_are_owned(method: str) -> None:
    # The proxy alone serves these paths: it answers 405 rather than forward them.
    for path, name in (
        (unstable_delete(f"/user/{ALICE}/account_data/m.test"), R.DELETE_GLOBAL_ACCOUNT_DATA),
        (unstable_delete(f"/user/{ALICE}/rooms/{ROOM}/account_data/m.test"), R.DELETE_ROOM_ACCOUNT_DATA),
    ):
        found = match(method, path)
        assert found is not None
        assert found.name == name
        assert not found.method_allowed
        assert found.route.owns_path


@pytest.mark.parametrize("method", ["get", "Put", "delete"])
def test_methods_are_case_sensitive(method: str) -> None:
    # HTTP methods are case-sensitive; Synapse compares bytes exactly.
    found = match(method, c("v3", f"/user/{ALICE}/account_data/m.test"))
    assert found is not None
    assert not found.method_allowed


def test_first_matching_pattern_decides_whatever_the_method() -> None:
    # A DELETE on the v3 account data path is the GET/PUT servlet's path (405 there),
    # never the unstable DELETE route.
    found = match("DELETE", c("unstable", f"/user/{ALICE}/account_data/m.test"))
    assert found is not None
    assert found.name == R.GLOBAL_ACCOUNT_DATA
    assert not found.method_allowed


def test_only_the_owned_routes_are_owned_paths() -> None:
    owners = {
        found.name
        for method, path, _, _ in OWNED
        if (found := match(method, path)) is not None and found.route.owns_path
    }
    assert owners == {R.DELETE_GLOBAL_ACCOUNT_DATA, R.DELETE_ROOM_ACCOUNT_DATA}

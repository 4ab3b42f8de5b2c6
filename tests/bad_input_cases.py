"""The bad input matrix: rows of malformed and of odd but valid requests, run through the
proxy in front of the fake homeserver (`tests/test_bad_input.py`) and, where cheap, in
front of a real Synapse and against Synapse itself (`tests/test_bad_input_synapse.py`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from tests.matrix import BOB, MSC3391, V3

ALICE_TOKEN = "syt_bad_input_alice"
KIND = "org.example.bad"
EXISTING = "org.example.existing"  # set before every row; the one deletes act on
MAX_BODY = 65536

# Targets are templates: {me} is the caller's own user ID, percent-encoded; the other
# fields are the variants `user_ids()` makes of it.
DATA = f"{V3}/user/{{me}}/account_data/{KIND}"
DELETE = f"{MSC3391}/user/{{me}}/account_data/{EXISTING}"


def room_data(room: str, kind: str = KIND) -> str:
    return f"{V3}/user/{{me}}/rooms/{room}/account_data/{kind}"


def user_data(user_field: str, prefix: str = V3, kind: str = KIND) -> str:
    return f"{prefix}/user/{{{user_field}}}/account_data/{kind}"


def user_ids(user_id: str) -> dict[str, str]:
    localpart, server = user_id[1:].split(":", 1)
    return {
        "me": quote(user_id, safe=""),
        "me_raw": user_id,
        "me_partly": f"@{localpart}%3A{server}",
        "me_lower": quote(user_id, safe="").lower(),
        "me_bare": quote(f"{localpart}:{server}", safe=""),
        "me_local": localpart,
        "me_twice": quote(quote(user_id, safe=""), safe=""),
        "me_elsewhere": quote(f"@{localpart}:other.example", safe=""),
        "me_upper": quote(f"@{localpart.upper()}:{server}", safe=""),
        "me_newline": quote(user_id + "\n", safe=""),
        "bob": quote(BOB, safe=""),
    }


DEEP_OBJECT = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
DEEP_LIST_IN_OBJECT = b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
TOO_LARGE = b'{"a":"' + b"x" * MAX_BODY + b'"}'
OBJECT = b'{"x": 1}'

# (what, method, target, credentials, body, status, errcode)
# credentials: "token" (Authorization: Bearer), "none", "unknown" (a token the homeserver
# does not know), "both" (header and ?access_token=), "basic" (not a Bearer header).
MATRIX_ERRORS: list[tuple[str, str, str, str, bytes | None, int, str]] = [
    # --- bodies
    ("body not JSON", "PUT", DATA, "token", b"{not json", 400, "M_NOT_JSON"),
    ("body empty", "PUT", DATA, "token", b"", 400, "M_NOT_JSON"),
    ("body a JSON array", "PUT", DATA, "token", b"[1, 2]", 400, "M_BAD_JSON"),
    ("body a JSON string", "PUT", DATA, "token", b'"text"', 400, "M_BAD_JSON"),
    ("body JSON null", "PUT", DATA, "token", b"null", 400, "M_BAD_JSON"),
    ("body with NaN", "PUT", DATA, "token", b'{"a": NaN}', 400, "M_NOT_JSON"),
    ("body invalid UTF-8", "PUT", DATA, "token", b'{"a": "\xff\xfe"}', 400, "M_NOT_JSON"),
    ("body UTF-16", "PUT", DATA, "token", '{"a": 1}'.encode("utf-16"), 400, "M_NOT_JSON"),
    ("body nested 10,000 deep", "PUT", DATA, "token", DEEP_OBJECT, 400, "M_NOT_JSON"),
    ("body a list nested 10,000 deep", "PUT", DATA, "token", DEEP_LIST_IN_OBJECT, 400, "M_NOT_JSON"),
    ("body larger than max_body_size", "PUT", DATA, "token", TOO_LARGE, 413, "M_TOO_LARGE"),
    # --- user IDs: Synapse compares the decoded path segment with the caller, exactly
    ("user ID of another user, PUT", "PUT", user_data("bob"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID of another user, GET", "GET", user_data("bob"), "token", None, 403, "M_FORBIDDEN"),
    (
        "user ID of another user, DELETE",
        "DELETE",
        user_data("bob", MSC3391),
        "token",
        None,
        403,
        "M_FORBIDDEN",
    ),
    ("user ID on another server", "PUT", user_data("me_elsewhere"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID without its sigil", "PUT", user_data("me_bare"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID a bare localpart", "DELETE", user_data("me_local", MSC3391), "token", None, 403, "M_FORBIDDEN"),
    ("user ID percent-encoded twice", "PUT", user_data("me_twice"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID in upper case", "GET", user_data("me_upper"), "token", None, 403, "M_FORBIDDEN"),
    ("user ID with a trailing newline", "PUT", user_data("me_newline"), "token", OBJECT, 403, "M_FORBIDDEN"),
    ("user ID empty", "PUT", f"{V3}/user//account_data/{KIND}", "token", OBJECT, 403, "M_FORBIDDEN"),
    # --- room IDs
    ("room ID without its sigil", "PUT", room_data("notaroom"), "token", OBJECT, 400, "M_INVALID_PARAM"),
    ("room ID without a server", "PUT", room_data("%21nocolon"), "token", OBJECT, 400, "M_INVALID_PARAM"),
    ("room ID with an empty server", "PUT", room_data("%21r%3A"), "token", OBJECT, 400, "M_INVALID_PARAM"),
    ("room ID with a space", "PUT", room_data("%21r%3Abad%20host"), "token", OBJECT, 400, "M_INVALID_PARAM"),
    (
        "room ID with a newline",
        "PUT",
        room_data("%21r%3Alocalhost%0A"),
        "token",
        OBJECT,
        400,
        "M_INVALID_PARAM",
    ),
    ("room ID empty", "PUT", room_data(""), "token", OBJECT, 400, "M_INVALID_PARAM"),
    ("room ID malformed, GET", "GET", room_data("notaroom"), "token", None, 400, "M_INVALID_PARAM"),
    (
        "room ID malformed, DELETE",
        "DELETE",
        f"{MSC3391}/user/{{me}}/rooms/notaroom/account_data/{KIND}",
        "token",
        None,
        400,
        "M_INVALID_PARAM",
    ),
    (
        "room ID malformed and another user's ID: the user is checked first",
        "PUT",
        f"{V3}/user/{{bob}}/rooms/notaroom/account_data/{KIND}",
        "token",
        OBJECT,
        403,
        "M_FORBIDDEN",
    ),
    # --- types
    (
        "type m.fully_read, PUT",
        "PUT",
        user_data("me", kind="m.fully_read"),
        "token",
        OBJECT,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.fully_read, DELETE",
        "DELETE",
        user_data("me", MSC3391, "m.fully_read"),
        "token",
        None,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.push_rules, PUT",
        "PUT",
        user_data("me", kind="m.push_rules"),
        "token",
        OBJECT,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.push_rules, PUT {}",
        "PUT",
        user_data("me", kind="m.push_rules"),
        "token",
        b"{}",
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.push_rules, DELETE",
        "DELETE",
        user_data("me", MSC3391, "m.push_rules"),
        "token",
        None,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.fully_read in a room, DELETE",
        "DELETE",
        f"{MSC3391}/user/{{me}}/rooms/%21r%3Alocalhost/account_data/m.fully_read",
        "token",
        None,
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.fully_read with a body that is not JSON: the type is checked first",
        "PUT",
        user_data("me", kind="m.fully_read"),
        "token",
        b"not json",
        405,
        "M_BAD_JSON",
    ),
    (
        "type m.fully_read in a malformed room: the room is checked first",
        "PUT",
        room_data("notaroom", "m.fully_read"),
        "token",
        OBJECT,
        400,
        "M_INVALID_PARAM",
    ),
    # --- access tokens: the homeserver's answer to whoami, relayed
    ("no access token", "PUT", DATA, "none", OBJECT, 401, "M_MISSING_TOKEN"),
    ("no access token, DELETE", "DELETE", DELETE, "none", None, 401, "M_MISSING_TOKEN"),
    ("unknown access token", "PUT", DATA, "unknown", OBJECT, 401, "M_UNKNOWN_TOKEN"),
    ("unknown access token, DELETE", "DELETE", DELETE, "unknown", None, 401, "M_UNKNOWN_TOKEN"),
    ("access token in header and query", "DELETE", DELETE, "both", None, 401, "M_MISSING_TOKEN"),
    ("Authorization not Bearer", "GET", DATA, "basic", None, 401, "M_MISSING_TOKEN"),
]

# Rows whose answer is the proxy's own choice rather than Synapse's (Synapse reads far
# larger bodies): not compared with Synapse.
PROXY_ONLY = {"body larger than max_body_size"}


def request_for(
    template: str, credentials: str, token: str, fields: dict[str, str]
) -> tuple[str, list[tuple[str, str]]]:
    target = template.format(**fields)
    headers = [("Content-Type", "application/json")]
    if credentials in ("token", "both"):
        headers.append(("Authorization", f"Bearer {token}"))
    elif credentials == "unknown":
        headers.append(("Authorization", "Bearer syt_nobody_knows_this_token"))
    elif credentials == "basic":
        headers.append(("Authorization", "Basic YWxpY2U6c2VjcmV0"))
    if credentials == "both":
        target += ("&" if "?" in target else "?") + f"access_token={token}"
    return target, headers


# (what, method, target, body, status, then: (type, room or None, what the homeserver holds))
ACCEPTED: list[tuple[str, str, str, bytes, int, tuple[str, str | None, Any]]] = [
    ("duplicate keys: the last one wins", "PUT", DATA, b'{"a": 1, "a": 2}', 200, (KIND, None, {"a": 2})),
    (
        "an empty object written with whitespace is a delete",
        "PUT",
        user_data("me", kind=EXISTING),
        b" {\n} ",
        200,
        (EXISTING, None, {}),
    ),
    ("a DELETE's body is ignored", "DELETE", DELETE, b"not json at all", 200, (EXISTING, None, {})),
    ("%2F in a type", "PUT", user_data("me", kind="m.a%2Fb"), OBJECT, 200, ("m.a/b", None, {"x": 1})),
    (
        "unicode in a type",
        "PUT",
        user_data("me", kind=quote("m.é✓", safe="")),
        OBJECT,
        200,
        ("m.é✓", None, {"x": 1}),
    ),
    (
        "an invalid UTF-8 escape in a type is U+FFFD, as in Synapse",
        "PUT",
        user_data("me", kind="m.%FF"),
        OBJECT,
        200,
        ("m.\ufffd", None, {"x": 1}),
    ),
    ("an empty type", "PUT", user_data("me", kind=""), OBJECT, 200, ("", None, {"x": 1})),
    ("a 12 KiB type", "PUT", user_data("me", kind="t" * 12288), OBJECT, 200, ("t" * 12288, None, {"x": 1})),
    ("user ID not percent-encoded", "PUT", user_data("me_raw"), OBJECT, 200, (KIND, None, {"x": 1})),
    ("user ID partly percent-encoded", "PUT", user_data("me_partly"), OBJECT, 200, (KIND, None, {"x": 1})),
    ("lower-case percent escapes", "PUT", user_data("me_lower"), OBJECT, 200, (KIND, None, {"x": 1})),
    ("r0 prefix", "PUT", user_data("me", "/_matrix/client/r0"), OBJECT, 200, (KIND, None, {"x": 1})),
    (
        "unstable prefix",
        "PUT",
        user_data("me", "/_matrix/client/unstable"),
        OBJECT,
        200,
        (KIND, None, {"x": 1}),
    ),
    (
        "a room on another server (no membership check, as in Synapse)",
        "PUT",
        room_data("%21r%3Aother.example"),
        OBJECT,
        200,
        (KIND, "!r:other.example", {"x": 1}),
    ),
    (
        "a room ID percent-encoded or not",
        "PUT",
        room_data("!r:localhost"),
        OBJECT,
        200,
        (KIND, "!r:localhost", {"x": 1}),
    ),
]

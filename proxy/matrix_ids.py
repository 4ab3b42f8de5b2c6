"""Matrix identifier checks, with Synapse's exact acceptance rules (pure functions)."""

from __future__ import annotations

import ipaddress
import re

# Synapse's approximation of RFC 1035 host names; \Z, not $, so a trailing newline fails.
_HOST = re.compile(r"\A[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*\Z")
# MSC4291 room IDs: "!" followed by 43 characters of unpadded URL-safe base64.
_DOMAINLESS_ROOM_ID = re.compile(r"^[A-Za-z0-9\-_]{43}$")


def is_valid_server_name(server_name: str) -> bool:
    if server_name.endswith("]"):
        host = server_name
    else:
        host, sep, port = server_name.rpartition(":")
        if not sep:
            host = server_name
        else:
            try:
                int(port)  # Synapse parses the port with int() and checks nothing more
            except ValueError:
                return False
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return False
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return bool(_HOST.match(host))


def is_valid_room_id(room_id: str) -> bool:
    """Synapse's `RoomID.is_valid`: `!localpart:server` or an MSC4291 `!base64` ID."""
    if not room_id.startswith("!"):
        return False
    if ":" in room_id:
        return is_valid_server_name(room_id[1:].split(":", 1)[1])
    return bool(_DOMAINLESS_ROOM_ID.match(room_id[1:]))

"""A minimal simplified sliding sync (MSC4186) connection for the tests: raw JSON in and
out, as Element X and matrix-js-sdk send it (every request carries the whole config)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from tests.matrix import Device, Reply

SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
# The account data extension as Element X's room list connection enables it: every list
# and every subscription (the defaults of `lists` and `rooms`).
ACCOUNT_DATA = {"enabled": True}


def all_rooms(limit: int = 50) -> dict[str, Any]:
    return {"all": {"ranges": [[0, limit]], "required_state": [], "timeline_limit": 0}}


@dataclass
class Connection:
    """One sliding sync connection (`conn_id`) of one device."""

    device: Device
    conn_id: str | None = None
    account_data: dict[str, Any] | None = field(default_factory=lambda: dict(ACCOUNT_DATA))
    lists: dict[str, Any] | None = field(default_factory=all_rooms)
    subscriptions: dict[str, Any] | None = None
    to_device: bool = False
    pos: str | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.conn_id is not None:
            body["conn_id"] = self.conn_id
        if self.lists is not None:
            body["lists"] = self.lists
        if self.subscriptions is not None:
            body["room_subscriptions"] = self.subscriptions
        extensions: dict[str, Any] = {}
        if self.account_data is not None:
            extensions["account_data"] = self.account_data
        if self.to_device:
            extensions["to_device"] = {"enabled": True}
        body["extensions"] = extensions
        return body

    async def request(self, *, pos: str | None = None, first: bool = False, timeout_ms: int = 0) -> Reply:
        query: dict[str, str] = {"timeout": str(timeout_ms)}
        token = None if first else (pos if pos is not None else self.pos)
        if token is not None:
            query["pos"] = token
        return await self.device.request(
            "POST", f"{SLIDING_SYNC}?{urlencode(query)}", raw=json.dumps(self.body()).encode()
        )

    async def sync(
        self, *, pos: str | None = None, first: bool = False, timeout_ms: int = 0, advance: bool = True
    ) -> dict[str, Any]:
        """One request from `pos` (default: the last one; none if `first`); remembers the
        answer's `pos` unless `advance` is False."""
        reply = await self.request(pos=pos, first=first, timeout_ms=timeout_ms)
        assert reply.status == 200, reply.body
        if advance:
            self.pos = reply.body["pos"]
        return reply.body


def account_data(body: dict[str, Any]) -> dict[str, Any]:
    return body.get("extensions", {}).get("account_data", {})


def entries_of(body: dict[str, Any], kind: str, room_id: str | None = None) -> list[dict[str, Any]]:
    found = account_data(body)
    events = found.get("global", []) if room_id is None else found.get("rooms", {}).get(room_id, [])
    return [e for e in events if e.get("type") == kind]


def empty_entries(body: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Every (room, type) with content `{}` anywhere in the extension."""
    found = account_data(body)
    out = [(None, e["type"]) for e in found.get("global", []) if e.get("content") == {}]
    for room_id, events in found.get("rooms", {}).items():
        out += [(room_id, e["type"]) for e in events if e.get("content") == {}]
    return out

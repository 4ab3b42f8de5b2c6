"""Matrix for the tests: the shared IDs and path prefixes, account data paths, one raw
request helper (`request`, `call`), a minimal client (`Device`: one device, raw JSON in
and out) and readers of sync bodies."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from rig.accounts import Account

# The users and room most tests are about (the fake homeserver's and the rig's Synapse's
# server name is `localhost`). Tokens are each test file's own.
ALICE = "@alice:localhost"
BOB = "@bob:localhost"
ROOM = "!room:localhost"

V3 = "/_matrix/client/v3"
MSC3391 = "/_matrix/client/unstable/org.matrix.msc3391"


def quote(value: str) -> str:
    """Percent-encode a Matrix ID, type or other value for one path segment."""
    return urllib.parse.quote(value, safe="")


def account_data_path(prefix: str, user_id: str, kind: str, room_id: str | None = None) -> str:
    path = f"{prefix}/user/{quote(user_id)}"
    if room_id is not None:
        path += f"/rooms/{quote(room_id)}"
    return f"{path}/account_data/{quote(kind)}"


@dataclass
class Reply:
    status: int
    body: Any  # the parsed JSON; None if there was no body or it was not JSON
    raw: bytes
    content_type: str | None = None

    @property
    def errcode(self) -> str | None:
        return self.body.get("errcode") if isinstance(self.body, dict) else None


async def request(
    http: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    token: str | None = None,
    body: Any = None,
    data: bytes | None = None,
) -> Reply:
    """One request: `data` sent as it is, or else `body` as JSON; `token` as a Bearer token.
    `url` as aiohttp takes it: a string is re-quoted (`%40` goes out as `@`), and
    `URL(..., encoded=True)` goes out exactly as written."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if data is None and body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    async with http.request(method, url, data=data, headers=headers) as response:
        content = await response.read()
    try:
        parsed = json.loads(content) if content else None
    except ValueError:
        parsed = None
    return Reply(response.status, parsed, content, response.headers.get("Content-Type"))


async def call(
    http: aiohttp.ClientSession, method: str, url: str | URL, token: str | None = None, body: Any = None
) -> tuple[int, Any]:
    """`request`, answered as (status, JSON body or None if empty); a body that is not
    JSON fails the test."""
    reply = await request(http, method, url, token=token, body=body)
    return reply.status, json.loads(reply.raw) if reply.raw else None


@dataclass
class Device:
    """One logged-in device talking to `base_url` (the proxy or a homeserver)."""

    session: aiohttp.ClientSession
    base_url: str
    account: Account
    next_batch: str | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def user_id(self) -> str:
        return self.account.user_id

    @property
    def device_id(self) -> str:
        return self.account.device_id

    async def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> Reply:
        return await request(
            self.session, method, self.base_url + path, token=self.account.access_token, body=body, data=raw
        )

    async def put(self, kind: str, content: Any, room_id: str | None = None, prefix: str = V3) -> Reply:
        return await self.request("PUT", account_data_path(prefix, self.user_id, kind, room_id), content)

    async def get(self, kind: str, room_id: str | None = None, prefix: str = V3) -> Reply:
        return await self.request("GET", account_data_path(prefix, self.user_id, kind, room_id))

    async def delete(self, kind: str, room_id: str | None = None) -> Reply:
        return await self.request("DELETE", account_data_path(MSC3391, self.user_id, kind, room_id))

    async def create_room(self) -> str:
        reply = await self.request("POST", "/_matrix/client/v3/createRoom", {})
        assert reply.status == 200, reply.body
        return reply.body["room_id"]

    async def sync(
        self,
        *,
        since: str | None = None,
        initial: bool = False,
        full_state: bool = False,
        filter: Any = None,
        timeout_ms: int = 0,
        advance: bool = True,
    ) -> dict[str, Any]:
        """/sync from `since` (default: this device's last next_batch; none if
        `initial`). Remembers next_batch unless `advance` is False."""
        params: dict[str, str] = {"timeout": str(timeout_ms)}
        token = None if initial else (since if since is not None else self.next_batch)
        if token is not None:
            params["since"] = token
        if full_state:
            params["full_state"] = "true"
        if filter is not None:
            params["filter"] = filter if isinstance(filter, str) else json.dumps(filter)
        reply = await self.request("GET", "/_matrix/client/v3/sync?" + urlencode(params))
        assert reply.status == 200, reply.body
        if advance:
            self.next_batch = reply.body["next_batch"]
        return reply.body


def global_entries(body: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in body.get("account_data", {}).get("events", []) if e.get("type") == kind]


def room_entries(body: dict[str, Any], room_id: str, kind: str) -> list[dict[str, Any]]:
    room = body.get("rooms", {}).get("join", {}).get(room_id, {})
    return [e for e in room.get("account_data", {}).get("events", []) if e.get("type") == kind]


def entries_of(body: dict[str, Any], kind: str, room_id: str | None) -> list[dict[str, Any]]:
    return global_entries(body, kind) if room_id is None else room_entries(body, room_id, kind)


def empty_entries(body: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Every (room, type) with content `{}` anywhere in a sync body."""
    found = [
        (None, e["type"]) for e in body.get("account_data", {}).get("events", []) if e.get("content") == {}
    ]
    for section in ("join", "leave"):
        for room_id, room in body.get("rooms", {}).get(section, {}).items():
            found += [
                (room_id, e["type"])
                for e in room.get("account_data", {}).get("events", [])
                if e.get("content") == {}
            ]
    return found


def wait_for_match(read: Callable[[], str], pattern: re.Pattern[str], timeout: float = 10.0) -> str:
    """Poll a log until `pattern` is in it: servers write an access line only after
    the response has gone out, so a client can be faster than the log."""
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if pattern.search(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)

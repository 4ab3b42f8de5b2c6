"""Crash safety of a delete, and every homeserver call of it failing in turn.

A delete is, in order: identify the caller (whoami), list the account's devices (GET
/devices), read the current value (GET account data) while recording the intent in the
store (a pending tombstone and one row per other device), write `{}` (PUT), commit.

First part: the proxy as a real process (`python -m proxy`), killed with SIGKILL while
the fake homeserver holds each call in turn, then restarted on the same store file.
Two of those moments are the interesting ones: the write received but not applied,
and the write applied with its answer never sent. The client of the killed process
sees a dead connection; once the user makes their next request through the new
process, the store must agree with the homeserver (an orphaned intent committed if
the homeserver holds `{}`, removed otherwise). A client that was told 200 before the
kill must find its deletion everywhere: on the homeserver, as a row for every other
device, and in those devices' syncs.

Second part: each call fails instead (connection refused, reset, timeout, 5xx, a
garbage body), in a proxy in this process. The client gets a 502/504 Matrix error or
the homeserver's own error, and the store keeps no trace; an ambiguous write is
settled, so the store ends consistent with what the homeserver holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from proxy.app import CONTEXT
from proxy.server import ProxyServer
from rig.proxy_process import ProxyProcess
from tests import matrix
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver
from tests.matrix import ALICE, MSC3391, V3, account_data_path
from tests.store_check import assert_consistent, snapshot, wait_for_store

DELETER, SECOND, THIRD = "ALICE1", "ALICE2", "ALICE3"
TOKENS = {DELETER: "syt_crash_alice_1", SECOND: "syt_crash_alice_2", THIRD: "syt_crash_alice_3"}
KIND = "org.example.crash"
BEFORE = {"v": 1}
OTHER_KIND, OTHER = "org.example.bystander", {"keep": True}

DATA = account_data_path(V3, ALICE, KIND)
DELETE = account_data_path(MSC3391, ALICE, KIND)
# Patterns for the fake's faults (raw path, no query).
WHOAMI = r"/account/whoami$"
ACCOUNT_DATA = r"/account_data/org\.example\.crash$"
DEVICES = r"/devices$"


@pytest.fixture
def hs(fake_hs: FakeHomeserver) -> FakeHomeserver:
    for device, token in TOKENS.items():
        fake_hs.add_device(ALICE, device, token=token)
    fake_hs.set_account_data(ALICE, KIND, BEFORE)
    fake_hs.set_account_data(ALICE, OTHER_KIND, OTHER)
    return fake_hs


def is_live(hs: FakeHomeserver) -> Callable[[str, str | None, str], bool]:
    return lambda user, room, kind: bool(hs.account_data(user, kind, room))


async def call(
    http: aiohttp.ClientSession, base: str, method: str, path: str, device: str = DELETER
) -> tuple[int, bytes, str | None]:
    reply = await matrix.request(http, method, base + path, token=TOKENS[device])
    return reply.status, reply.raw, reply.content_type


async def sync(http: aiohttp.ClientSession, base: str, device: str, since: str | None) -> dict[str, Any]:
    query = {"timeout": "0", **({"since": since} if since else {})}
    status, body, _ = await call(http, base, "GET", "/_matrix/client/v3/sync?" + urlencode(query), device)
    assert status == 200, body
    return json.loads(body)


def carried(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in body.get("account_data", {}).get("events", []) if e.get("type") == KIND]


async def assert_deleted_everywhere(
    http: aiohttp.ClientSession, base: str, hs: FakeHomeserver, store: Path, since: str
) -> None:
    """The homeserver holds `{}`, every other device has a row and learns of the delete
    through the proxy, and then nothing is left. SECOND syncs from before the delete
    (the homeserver carries it); THIRD from after it, as if the response that carried
    it had been lost: only the proxy's row can tell THIRD."""
    assert hs.account_data(ALICE, KIND) == {}
    assert hs.account_data(ALICE, OTHER_KIND) == OTHER
    state = assert_consistent(store, is_live(hs))
    assert state.tombstones_of(ALICE) == {(None, KIND, "done")}
    assert state.rows_of(ALICE) == {(None, KIND, SECOND), (None, KIND, THIRD)}

    status, body, _ = await call(http, base, "GET", DATA)
    assert (status, json.loads(body)["errcode"]) == (404, "M_NOT_FOUND")
    for device, start in ((SECOND, since), (THIRD, hs.next_batch)):
        first = await sync(http, base, device, start)
        assert carried(first) == [{"type": KIND, "content": {}}], device
        if first["next_batch"] == start:
            # Nothing changed on the homeserver, which handed the same token back: a
            # request with it again proves nothing (a retry looks the same), so the
            # device is told again once the token moves, and that answer is proved.
            hs.set_account_data(ALICE, f"{OTHER_KIND}.{device}", {"moved": True})
            first = await sync(http, base, device, start)
            assert first["next_batch"] != start
            assert carried(first) == [{"type": KIND, "content": {}}], device
        second = await sync(http, base, device, first["next_batch"])  # the proof of receipt
        assert carried(second) == [], device
    assert snapshot(store).empty


def assert_untouched(hs: FakeHomeserver, store: Path) -> None:
    assert hs.account_data(ALICE, KIND) == BEFORE
    assert hs.account_data(ALICE, OTHER_KIND) == OTHER
    state = assert_consistent(store, is_live(hs))
    assert state.empty, state


# --- the proxy as a process, killed -------------------------------------------------------


class Processes:
    """The proxy processes of one test: started, killed, restarted on the same store."""

    def __init__(self, start: Callable[..., ProxyProcess]) -> None:
        self._start = start
        self.restarted: list[ProxyProcess] = []

    async def start(self, upstream_url: str) -> ProxyProcess:
        return await asyncio.to_thread(self._start, upstream_url)

    @staticmethod
    def kill(proxy: ProxyProcess) -> None:
        """SIGKILL, to this process only: nothing is flushed, nothing is closed."""
        assert proxy.process is not None
        proxy.process.kill()
        proxy.process.wait()

    async def restart(self, proxy: ProxyProcess) -> ProxyProcess:
        """A new process with the same configuration: same port, same store file."""
        again = ProxyProcess(
            proxy.directory,
            proxy.config["upstream"]["url"],
            port=proxy.port,
            name=proxy.config_path.stem,
        )
        assert again.config == proxy.config
        self.restarted.append(again)
        await asyncio.to_thread(again.start)
        return again

    def stop_all(self) -> None:
        for proxy in self.restarted:
            proxy.stop()


@pytest.fixture
def processes(proxy_process: Callable[..., ProxyProcess]) -> Iterator[Processes]:
    managed = Processes(proxy_process)
    yield managed
    managed.stop_all()


def store_of(proxy: ProxyProcess) -> Path:
    return Path(proxy.config["store"]["path"])


# (where the proxy is when it dies: the fault that holds it there, whether the write landed)
KILL_POINTS: list[tuple[str, dict[str, Any], bool]] = [
    ("identifying", {"path_regex": WHOAMI, "hang": True}, False),
    ("reading-the-value", {"path_regex": ACCOUNT_DATA, "method": "GET", "hang": True}, False),
    ("listing-devices", {"path_regex": DEVICES, "method": "GET", "hang": True}, False),
    ("write-received-not-applied", {"path_regex": ACCOUNT_DATA, "method": "PUT", "hang": True}, False),
    (
        "write-applied-answer-never-sent",
        {"path_regex": ACCOUNT_DATA, "method": "PUT", "apply": True, "hang": True},
        True,
    ),
]


@pytest.mark.parametrize(("fault", "landed"), [k[1:] for k in KILL_POINTS], ids=[k[0] for k in KILL_POINTS])
async def test_a_delete_killed_mid_way_is_settled_on_the_users_next_request(
    hs: FakeHomeserver, http: aiohttp.ClientSession, processes: Processes, fault: dict[str, Any], landed: bool
) -> None:
    proxy = await processes.start(hs.url)
    store = store_of(proxy)
    since = (await sync(http, proxy.url, SECOND, None))["next_batch"]
    hs.fault(times=1, **fault)

    deleting = asyncio.ensure_future(call(http, proxy.url, "DELETE", DELETE))
    await asyncio.wait_for(hs.hang_started.wait(), 10)
    intent_begun = fault.get("method") == "PUT" or fault["path_regex"] == ACCOUNT_DATA
    if intent_begun:
        # While the value is read, the intent is recorded: killed once it is on disk.
        await wait_for_store(store, lambda state: bool(state.tombstones))
    processes.kill(proxy)
    with pytest.raises(aiohttp.ClientError):
        await deleting  # a dead connection: the client cannot know what happened

    on_disk = snapshot(store)
    if intent_begun:
        # The intent was on disk before the write went out, and nothing settled it.
        assert {(t[3], t[4]) for t in on_disk.tombstones} == {(KIND, "pending")}
        assert on_disk.rows_of(ALICE) == {(None, KIND, SECOND), (None, KIND, THIRD)}
    else:
        assert on_disk.empty
    assert hs.account_data(ALICE, KIND) == ({} if landed else BEFORE)

    proxy = await processes.restart(proxy)
    if not on_disk.empty:
        assert "1 interrupted deletes will be settled on their users' next requests" in proxy.log
    # The user's next request (any owned one) settles what the dead process left.
    status, body, _ = await call(http, proxy.url, "GET", DATA)
    if landed:
        assert (status, json.loads(body)["errcode"]) == (404, "M_NOT_FOUND")
        await assert_deleted_everywhere(http, proxy.url, hs, store, since)
        return
    assert (status, json.loads(body)) == (200, BEFORE)
    assert_untouched(hs, store)
    # The client retries, and this time the delete is whole.
    status, body, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert (status, body) == (200, b"{}")
    await assert_deleted_everywhere(http, proxy.url, hs, store, since)


async def test_a_delete_answered_200_survives_a_kill_right_after(
    hs: FakeHomeserver, http: aiohttp.ClientSession, processes: Processes
) -> None:
    proxy = await processes.start(hs.url)
    since = (await sync(http, proxy.url, SECOND, None))["next_batch"]

    status, body, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert (status, body) == (200, b"{}")
    processes.kill(proxy)

    proxy = await processes.restart(proxy)
    assert "interrupted deletes" not in proxy.log
    await assert_deleted_everywhere(http, proxy.url, hs, store_of(proxy), since)


async def test_an_intent_left_by_a_kill_is_settled_by_any_owned_request_of_the_user(
    hs: FakeHomeserver, http: aiohttp.ClientSession, processes: Processes
) -> None:
    """The settling request need not be the deleting device's, nor about the type:
    another device's sync settles the intent first and then tells that device."""
    proxy = await processes.start(hs.url)
    store = store_of(proxy)
    since = (await sync(http, proxy.url, SECOND, None))["next_batch"]
    hs.fault(ACCOUNT_DATA, method="PUT", apply=True, hang=True, times=1)
    deleting = asyncio.ensure_future(call(http, proxy.url, "DELETE", DELETE))
    await asyncio.wait_for(hs.hang_started.wait(), 10)
    processes.kill(proxy)
    with pytest.raises(aiohttp.ClientError):
        await deleting

    proxy = await processes.restart(proxy)
    body = await sync(http, proxy.url, SECOND, since)

    assert carried(body) == [{"type": KIND, "content": {}}]
    state = assert_consistent(store, is_live(hs))
    assert state.tombstones_of(ALICE) == {(None, KIND, "done")}
    assert state.rows_of(ALICE) == {(None, KIND, SECOND), (None, KIND, THIRD)}


# --- each homeserver call failing, in a proxy in this process --------------------------------

REFUSED = "refused"  # marker: the homeserver stops accepting connections just before the call
# aiohttp's client retries an idempotent request once when its connection is reset
# (RFC 9112 section 9.3.1.1), so a reset is injected twice to reach the proxy.
RESET = {"disconnect": True, "times": 2}
MATRIX_500 = {"errcode": "M_UNKNOWN", "error": "Internal server error"}
HTML_502 = {"status": 502, "body": b"<html>502 Bad Gateway</html>", "content_type": "text/html"}
GARBAGE = {"status": 200, "body": b"\x00\xffnot json", "content_type": "application/octet-stream"}
RELAYED = "relayed"  # marker: the homeserver's own Matrix error, byte for byte

CALLS = {
    "identify": {"path_regex": WHOAMI},
    "read": {"path_regex": ACCOUNT_DATA, "method": "GET"},
    "list-devices": {"path_regex": DEVICES, "method": "GET"},
    "write": {"path_regex": ACCOUNT_DATA, "method": "PUT"},
}
# The call before each, on which a `go_down_after` fault makes the next one refused: the
# device list comes after the identification, the read after the device list (with the
# intent begun meanwhile, and withdrawn when the read fails).
BEFORE_CALL = {"list-devices": "identify", "read": "list-devices"}


def go_down_at_the_write(hs: FakeHomeserver) -> None:
    """The homeserver goes down as the write reaches it, before taking it: the write's
    connection is dropped unanswered and every later one refused. (Refused outright
    only if no connection of the two reads were left open to send the write on.)"""
    hs.fault(disconnect=True, go_down_after=True, times=1, **CALLS["write"])


EVERY_CALL = tuple(CALLS)

# (call, how it fails, the fault (or REFUSED), status answered, errcode (or RELAYED), write landed)
FAILURES: list[tuple[str, str, Any, int, str, bool]] = [
    *[(name, "refused", REFUSED, 502, "M_UNKNOWN", False) for name in EVERY_CALL],
    *[(name, "reset", RESET, 502, "M_UNKNOWN", False) for name in EVERY_CALL],
    *[(name, "timeout", {"hang": True}, 504, "M_UNKNOWN", False) for name in EVERY_CALL],
    *[(name, "500", {"status": 500, "json": MATRIX_500}, 500, RELAYED, False) for name in EVERY_CALL],
    *[(name, "502-html", HTML_502, 502, "M_UNKNOWN", False) for name in EVERY_CALL],
    ("identify", "garbage", GARBAGE, 502, "M_UNKNOWN", False),
    # A 200 from the read says the type exists; its content does not matter to a delete.
    ("read", "garbage", GARBAGE, 200, "", True),
    ("list-devices", "garbage", GARBAGE, 502, "M_UNKNOWN", False),
    # The write landed and its answer was lost or broken: the proxy reads the type back,
    # finds `{}`, and answers 200, as the homeserver would have.
    ("write", "applied-then-reset", {"apply": True, **RESET}, 200, "", True),
    ("write", "applied-then-timeout", {"apply": True, "hang": True}, 200, "", True),
    ("write", "applied-then-500", {"apply": True, "status": 500, "json": MATRIX_500}, 200, "", True),
    ("write", "applied-then-502-html", {"apply": True, **HTML_502}, 200, "", True),
    ("write", "applied-then-garbage", {"apply": True, **GARBAGE}, 200, "", True),
]


@pytest.mark.parametrize(
    ("name", "fault", "status", "errcode", "landed"),
    [f[:1] + f[2:] for f in FAILURES],
    ids=[f"{f[0]}-{f[1]}" for f in FAILURES],
)
async def test_a_failing_homeserver_call_gets_a_matrix_answer_and_leaves_no_trace(
    start_proxy: StartProxy,
    hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    name: str,
    fault: Any,
    status: int,
    errcode: str,
    landed: bool,
) -> None:
    # A short read timeout only where the homeserver hangs: elsewhere a loaded machine
    # must not turn a slow answer into a 504.
    hangs = isinstance(fault, dict) and fault.get("hang", False)
    proxy: ProxyServer = await start_proxy(hs.url, upstream={"read_timeout": 0.5 if hangs else 60})
    store = proxy.config.store.path
    since = hs.next_batch
    if fault is REFUSED and name == "identify":
        await hs.go_down()
    elif fault is REFUSED and name == "write":
        go_down_at_the_write(hs)
    elif fault is REFUSED:
        hs.fault(go_down_after=True, times=1, **CALLS[BEFORE_CALL[name]])
    else:
        hs.fault(**{"times": 1, **CALLS[name], **fault})

    answer, body, content_type = await call(http, proxy.url, "DELETE", DELETE)

    assert answer == status, body
    if errcode == RELAYED:
        assert body == json.dumps(MATRIX_500, separators=(",", ":")).encode()
    elif errcode:
        assert content_type == "application/json"
        error = json.loads(body)
        assert error["errcode"] == errcode and error["error"], error
    else:
        assert body == b"{}"
    assert hs.account_data(ALICE, KIND) == ({} if landed else BEFORE)
    if fault is REFUSED:
        if name == "write":
            # Refused, the write cannot be told apart from one lost on the way back, and
            # the read that would settle it is refused too: the intent waits.
            assert {t[4] for t in snapshot(store).tombstones} == {"pending"}
        await hs.come_up()

    # The user's next request settles anything left open.
    got, body, _ = await call(http, proxy.url, "GET", DATA)
    if landed:
        assert got == 404
        await assert_deleted_everywhere(http, proxy.url, hs, store, since)
    else:
        assert (got, json.loads(body)) == (200, BEFORE)
        assert_untouched(hs, store)


async def test_a_refused_write_is_settled_once_the_homeserver_is_back(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """The orphaned intent of a refused write is settled by the user's next request,
    even one that is not about the type: then the retried delete is whole."""
    proxy = await start_proxy(hs.url)
    store = proxy.config.store.path
    since = hs.next_batch
    go_down_at_the_write(hs)
    status, _, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert status == 502
    pending = snapshot(store)
    assert [(t[3], t[4]) for t in pending.tombstones] == [(KIND, "pending")]
    assert pending.rows_of(ALICE) == {(None, KIND, SECOND), (None, KIND, THIRD)}
    await hs.come_up()

    other = account_data_path(V3, ALICE, OTHER_KIND)
    status, body, _ = await call(http, proxy.url, "GET", other)
    assert (status, json.loads(body)) == (200, OTHER)
    assert_untouched(hs, store)

    status, body, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert (status, body) == (200, b"{}")
    await assert_deleted_everywhere(http, proxy.url, hs, store, since)


async def test_a_client_that_hangs_up_mid_delete_does_not_stop_it(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """Disconnecting is not a failure of the delete: it runs to completion."""
    proxy = await start_proxy(hs.url)
    store = proxy.config.store.path
    since = hs.next_batch
    gate = asyncio.Event()
    hs.fault(ACCOUNT_DATA, method="PUT", gate=gate, times=1)
    deleting = asyncio.ensure_future(call(http, proxy.url, "DELETE", DELETE))
    await asyncio.wait_for(hs.wait_for_requests(ACCOUNT_DATA, method="PUT"), 10)
    deleting.cancel()  # the client goes away while the write is at the homeserver
    with contextlib.suppress(asyncio.CancelledError):
        await deleting
    gate.set()

    # Writes of one type are serialised: a second delete waits for the first, finds
    # `{}` and writes nothing; only the deleting device is told (its own echo).
    status, body, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert (status, body) == (200, b"{}")
    assert len(hs.requests_to(ACCOUNT_DATA, method="PUT")) == 1
    assert (None, KIND, DELETER) in snapshot(store).rows_of(ALICE)
    echoed = await sync(http, proxy.url, DELETER, hs.next_batch)
    assert carried(echoed) == [{"type": KIND, "content": {}}]
    await sync(http, proxy.url, DELETER, echoed["next_batch"])
    await assert_deleted_everywhere(http, proxy.url, hs, store, since)


async def test_an_intent_settled_by_many_requests_at_once_is_committed_once(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """A write that landed but whose outcome the proxy could not learn (the homeserver
    applied it, answered 500, and the read-back failed too) leaves an orphaned intent.
    The user's next requests each settle it: many at once (a client retrying its
    DELETE while its sync loop runs) must commit it once. A second commit used to
    remove the tombstone together with every device's row."""
    proxy = await start_proxy(hs.url)
    store = proxy.config.store.path
    since = hs.next_batch
    hs.fault(ACCOUNT_DATA, method="PUT", apply=True, status=500, json=MATRIX_500, times=1)
    hs.fault(ACCOUNT_DATA, method="GET", times=1)  # the read before the write goes through...
    hs.fault(ACCOUNT_DATA, method="GET", status=500, json=MATRIX_500, times=1)  # ...the read-back fails
    status, _, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert status == 500
    assert hs.account_data(ALICE, KIND) == {}
    assert [(t[3], t[4]) for t in snapshot(store).tombstones] == [(KIND, "pending")]
    reads = len(hs.requests_to(ACCOUNT_DATA, method="GET"))

    # Every settling read-back is slow, so all the requests find the intent pending.
    hs.fault(ACCOUNT_DATA, method="GET", delay=0.3, times=20)
    other = account_data_path(V3, ALICE, OTHER_KIND)
    answers = await asyncio.gather(*(call(http, proxy.url, "GET", other) for _ in range(8)))

    assert [a[0] for a in answers] == [200] * 8
    assert len(hs.requests_to(ACCOUNT_DATA, method="GET")) == reads + 1  # settled once
    state = assert_consistent(store, is_live(hs))
    assert state.tombstones_of(ALICE) == {(None, KIND, "done")}
    assert state.rows_of(ALICE) == {(None, KIND, SECOND), (None, KIND, THIRD)}
    await assert_deleted_everywhere(http, proxy.url, hs, store, since)


# --- a revive (a PUT of content to a deleted type) ------------------------------------------


async def put(http: aiohttp.ClientSession, base: str, content: Any, device: str = DELETER) -> int:
    headers = {"Authorization": f"Bearer {TOKENS[device]}"}
    async with http.put(base + DATA, headers=headers, data=json.dumps(content).encode()) as response:
        await response.read()
        return response.status


async def test_a_revive_whose_client_hangs_up_still_completes(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """The client of a PUT of content to a deleted type goes away while the homeserver
    writes it. The homeserver holds the content: the tombstone and rows must go too,
    or other devices would be told `{}` for a type that is live."""
    proxy = await start_proxy(hs.url)
    store = proxy.config.store.path
    status, _, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert status == 200
    gate = asyncio.Event()
    hs.fault(ACCOUNT_DATA, method="PUT", gate=gate, times=1)
    writing = asyncio.ensure_future(put(http, proxy.url, {"v": 2}))
    await asyncio.wait_for(hs.wait_for_requests(ACCOUNT_DATA, 2, method="PUT"), 10)
    writing.cancel()  # the client hangs up while the write is at the homeserver
    with contextlib.suppress(asyncio.CancelledError):
        await writing
    gate.set()

    state = await wait_for_store(store, lambda s: s.empty)
    assert state.empty, state
    assert hs.account_data(ALICE, KIND) == {"v": 2}
    # THIRD syncs from after the write: nothing may tell it the live type is deleted.
    assert carried(await sync(http, proxy.url, THIRD, hs.next_batch)) == []


async def test_a_revive_the_store_cannot_take_is_answered_200_and_retried(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """The homeserver accepted the content, then the store refused the revive (read-only,
    or busy past `busy_timeout`): the client is told what the homeserver said (200, not
    a 500 for a write that happened), no device is told the type is deleted meanwhile,
    and the revive is made once the store takes writes again, without a restart."""
    proxy = await start_proxy(hs.url)
    store = proxy.config.store.path
    status, _, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert status == 200
    db = proxy.app[CONTEXT].store.db.connection
    await db.execute("PRAGMA query_only = 1")  # every write fails, reads still work

    assert await put(http, proxy.url, {"v": 2}) == 200
    assert hs.account_data(ALICE, KIND) == {"v": 2}
    assert carried(await sync(http, proxy.url, THIRD, hs.next_batch)) == []
    assert snapshot(store).tombstones_of(ALICE) == {(None, KIND, "done")}  # not yet revived

    await db.execute("PRAGMA query_only = 0")
    state = await wait_for_store(store, lambda s: s.empty)
    assert state.empty, state
    assert carried(await sync(http, proxy.url, THIRD, hs.next_batch)) == []


async def test_a_revive_lost_with_its_process_does_not_make_a_live_type_look_deleted(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """The store refused a revive, and the proxy stopped before it took writes again:
    the queued revive went with the process, and the tombstone and its rows outlived
    it, while the homeserver holds the content. The next process must not tell a
    device the type is deleted: it reads the type back first and drops the tombstone."""
    proxy = await start_proxy(hs.url)
    store = proxy.config.store.path
    status, _, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert status == 200
    await proxy.app[CONTEXT].store.db.connection.execute("PRAGMA query_only = 1")
    assert await put(http, proxy.url, {"v": 2}) == 200
    await proxy.stop()
    assert snapshot(store).rows_of(ALICE) == {(None, KIND, SECOND), (None, KIND, THIRD)}

    again = await start_proxy(hs.url, store={"path": str(store)})
    # THIRD syncs from after the write, so the homeserver's answer does not carry the
    # type: only an injection could say anything of it.
    assert carried(await sync(http, again.url, THIRD, hs.next_batch)) == []
    assert hs.account_data(ALICE, KIND) == {"v": 2}
    state = assert_consistent(store, is_live(hs))
    assert state.empty, state
    assert carried(await sync(http, again.url, SECOND, hs.next_batch)) == []


async def test_a_tombstone_an_earlier_process_left_is_told_once_the_homeserver_confirms_it(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """A delete committed by an earlier process is read back before a sync of this one
    tells it: while the homeserver cannot answer that read, the delete waits (the row
    stays); once it answers `{}`, the delete is told, and read back no more. A delete
    this process committed itself is told without a read."""
    proxy = await start_proxy(hs.url)
    store = proxy.config.store.path
    status, _, _ = await call(http, proxy.url, "DELETE", DELETE)
    assert status == 200
    await proxy.stop()

    again = await start_proxy(hs.url, store={"path": str(store)})
    reads = len(hs.requests_to(ACCOUNT_DATA, method="GET"))
    hs.fault(ACCOUNT_DATA, method="GET", status=500, json=MATRIX_500, times=1)
    assert carried(await sync(http, again.url, THIRD, hs.next_batch)) == []
    assert snapshot(store).rows_of(ALICE) == {(None, KIND, SECOND), (None, KIND, THIRD)}
    assert carried(await sync(http, again.url, THIRD, hs.next_batch)) == [{"type": KIND, "content": {}}]
    assert carried(await sync(http, again.url, SECOND, hs.next_batch)) == [{"type": KIND, "content": {}}]
    assert len(hs.requests_to(ACCOUNT_DATA, method="GET")) == reads + 2  # the failed read, one more

    fresh = "org.example.fresh"
    hs.set_account_data(ALICE, fresh, {"v": 1})
    status, _, _ = await call(http, again.url, "DELETE", account_data_path(MSC3391, ALICE, fresh))
    assert status == 200
    fresh_reads = len(hs.requests_to(r"/account_data/org\.example\.fresh$", method="GET"))
    body = await sync(http, again.url, THIRD, hs.next_batch)
    assert {"type": fresh, "content": {}} in body["account_data"]["events"]
    assert len(hs.requests_to(r"/account_data/org\.example\.fresh$", method="GET")) == fresh_reads


async def test_a_delete_whose_commit_the_store_refuses_is_answered_200_and_committed_later(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """The store takes the intent, the homeserver the write, and then the store refuses
    the commit (a full disk): the delete happened, so the client gets 200, and the
    commit is made once the store takes writes again, without a restart."""
    proxy = await start_proxy(hs.url)
    store = proxy.config.store.path
    since = hs.next_batch
    gate = asyncio.Event()
    hs.fault(ACCOUNT_DATA, method="PUT", gate=gate, times=1)
    deleting = asyncio.ensure_future(call(http, proxy.url, "DELETE", DELETE))
    await asyncio.wait_for(hs.wait_for_requests(ACCOUNT_DATA, method="PUT"), 10)
    db = proxy.app[CONTEXT].store.db.connection
    await db.execute("PRAGMA query_only = 1")
    gate.set()

    status, body, _ = await asyncio.wait_for(deleting, 10)
    assert (status, body) == (200, b"{}")
    assert {(t[3], t[4]) for t in snapshot(store).tombstones} == {(KIND, "pending")}

    await db.execute("PRAGMA query_only = 0")
    state = await wait_for_store(store, lambda s: {t[4] for t in s.tombstones} == {"done"})
    assert state.tombstones_of(ALICE) == {(None, KIND, "done")}
    await assert_deleted_everywhere(http, proxy.url, hs, store, since)


@pytest.mark.parametrize("listing", ["listed", "list-fails"])
async def test_a_delete_of_a_type_never_set_tells_only_the_deleting_device(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession, listing: str
) -> None:
    """Nothing to delete: Synapse's 200, the homeserver not written, and no intent left
    (the one begun while the type was read is withdrawn); only the deleting device is
    told, as its client waits for that. A failing device list does not matter then."""
    proxy: ProxyServer = await start_proxy(hs.url)
    never = "org.example.never"
    if listing == "list-fails":
        hs.fault(times=1, status=500, json=MATRIX_500, **CALLS["list-devices"])

    answer, body, _ = await call(http, proxy.url, "DELETE", account_data_path(MSC3391, ALICE, never))

    assert (answer, body) == (200, b"{}")
    assert hs.account_data(ALICE, never) is None
    state = assert_consistent(proxy.config.store.path, is_live(hs))
    assert state.tombstones_of(ALICE) == {(None, never, "done")}
    assert state.rows_of(ALICE) == {(None, never, DELETER)}

"""The proxy's own store failing at run time, and refusing a file it cannot use at start.

The tests run as root, which ignores file modes, so the faults are made in ways root
cannot bypass:
- locked: another connection holds the database's write lock (`BEGIN IMMEDIATE`)
  for longer than the proxy's `store.busy_timeout`, as a backup or a stuck
  `sqlite3` shell would; SQLite answers "database is locked";
- read-only: `PRAGMA query_only` on the proxy's own connection, which makes SQLite
  refuse every write exactly as on a read-only file ("attempt to write a readonly
  database");
- corrupted: the database pages overwritten under the running proxy.

In each case: requests the proxy only forwards still work; owned requests that need
to write the store answer `500 M_UNKNOWN` naming the cause, with no traceback
anywhere; owned requests that only refine the homeserver's answer with the store
(GET, /sync, device removal) still answer; the cause is logged once per burst of
failures, not once per request; and once the fault clears the proxy recovers by
itself. A store from a newer schema is refused at start with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import CONTEXT
from proxy.server import ProxyServer
from proxy.store import SCHEMA_VERSION, sqlite_store
from rig import REPO_ROOT
from tests import matrix
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver
from tests.matrix import ALICE, BOB, MSC3391, V3, account_data_path
from tests.store_check import snapshot, wait_for_store

TOKENS = {"ALICE1": "syt_store_alice_1", "ALICE2": "syt_store_alice_2", "BOB1": "syt_store_bob_1"}
KIND = "org.example.stored"


def data_path(user: str, kind: str = KIND, prefix: str = V3) -> str:
    return account_data_path(prefix, user, kind)


@pytest.fixture
def hs(fake_hs: FakeHomeserver) -> FakeHomeserver:
    fake_hs.add_device(ALICE, "ALICE1", token=TOKENS["ALICE1"])
    fake_hs.add_device(ALICE, "ALICE2", token=TOKENS["ALICE2"])
    fake_hs.add_device(BOB, "BOB1", token=TOKENS["BOB1"])
    fake_hs.uia_required = False
    for n in range(3):
        fake_hs.set_account_data(ALICE, f"{KIND}.{n}", {"n": n})
    fake_hs.set_account_data(BOB, KIND, {"bob": True})
    return fake_hs


@pytest.fixture
async def proxy(start_proxy: StartProxy, hs: FakeHomeserver) -> ProxyServer:
    # A short busy_timeout: a locked store fails in 0.2 s instead of the default 5 s.
    return await start_proxy(hs.url, store={"busy_timeout": 0.2})


async def call(
    http: aiohttp.ClientSession, proxy: ProxyServer, method: str, path: str, device: str, body: Any = None
) -> tuple[int, Any]:
    return await matrix.call(http, method, proxy.url + path, TOKENS[device], body)


# What a client is told of any store fault: the cause is in the log (and /health) only.
UNAVAILABLE = {"errcode": "M_UNKNOWN", "error": "The proxy's deletion store is unavailable"}


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Hold the store's write lock from another connection until the block ends."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


async def delete_with_a_row_for_alice2(http: aiohttp.ClientSession, proxy: ProxyServer, kind: str) -> None:
    status, body = await call(http, proxy, "DELETE", data_path(ALICE, kind, MSC3391), "ALICE1")
    assert (status, body) == (200, {})


def store_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxy.store" and r.levelno >= logging.ERROR]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, f"{record.name}: {record.getMessage()}"
        assert "Traceback" not in record.getMessage()


# --- locked --------------------------------------------------------------------------------


async def test_a_locked_store_fails_deletes_with_500_and_everything_else_still_answers(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await delete_with_a_row_for_alice2(http, proxy, f"{KIND}.0")  # ALICE2 has a row to learn
    store = proxy.config.store.path
    before = snapshot(store)
    puts = len(hs.requests_to(r"/account_data/", method="PUT"))

    with write_lock(store):
        # Owned requests that must write the store: 500, and nothing reaches the homeserver.
        assert await call(http, proxy, "DELETE", data_path(ALICE, f"{KIND}.1", MSC3391), "ALICE1") == (
            500,
            UNAVAILABLE,
        )
        assert await call(http, proxy, "PUT", data_path(ALICE, f"{KIND}.1"), "ALICE1", {}) == (
            500,
            UNAVAILABLE,
        )
        assert len(hs.requests_to(r"/account_data/", method="PUT")) == puts
        # Forwarded requests do not touch the store.
        async with http.post(f"{proxy.url}/_fake/echo/forwarded", data=b"x") as response:
            assert response.status == 200
            assert (await response.json())["body_size"] == 1
        # Owned requests that only read it, or use it as a refinement, still answer.
        assert await call(http, proxy, "GET", data_path(ALICE, f"{KIND}.2"), "ALICE1") == (200, {"n": 2})
        status, _ = await call(http, proxy, "GET", data_path(ALICE, f"{KIND}.0"), "ALICE2")
        assert status == 404  # its acknowledgement could not be stored: the row stays
        assert await call(http, proxy, "PUT", data_path(BOB), "BOB1", {"bob": 2}) == (200, {})
        assert hs.account_data(BOB, KIND) == {"bob": 2}
        status, body = await call(http, proxy, "GET", "/_matrix/client/v3/sync?timeout=0&since=s0", "ALICE2")
        assert status == 200 and {"type": f"{KIND}.0", "content": {}} in body["account_data"]["events"]
        status, body = await call(http, proxy, "GET", "/_matrix/client/versions", "BOB1")
        assert status == 200 and body["unstable_features"]["org.matrix.msc3391"] is True
        assert await call(http, proxy, "POST", "/_matrix/client/v3/logout", "BOB1") == (200, {})

    assert "database is locked" in store_errors(caplog)[0].getMessage()
    assert snapshot(store) == before
    assert_no_traceback(caplog)


async def test_a_store_fault_is_logged_once_per_burst_not_per_request(
    proxy: ProxyServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = proxy.config.store.path
    delete = data_path(ALICE, f"{KIND}.1", MSC3391)

    with write_lock(store):
        for _ in range(5):
            assert (await call(http, proxy, "DELETE", delete, "ALICE1"))[0] == 500
    [logged] = store_errors(caplog)
    assert "database is locked" in logged.getMessage()
    assert str(store) in logged.getMessage()

    assert await call(http, proxy, "DELETE", delete, "ALICE1") == (200, {})
    recovered = [r for r in caplog.records if r.name == "proxy.store" and "recovered" in r.getMessage()]
    assert [r.getMessage() for r in recovered] == ["store recovered after 5 failed operation(s)"]

    # A new burst is a new cause to report.
    another = data_path(ALICE, f"{KIND}.2", MSC3391)
    with write_lock(store):
        for _ in range(3):
            assert (await call(http, proxy, "DELETE", another, "ALICE1"))[0] == 500
    assert len(store_errors(caplog)) == 2
    assert_no_traceback(caplog)


async def test_the_proxy_recovers_by_itself_when_the_lock_is_released(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    store = proxy.config.store.path
    delete = data_path(ALICE, f"{KIND}.1", MSC3391)
    with write_lock(store):
        assert (await call(http, proxy, "DELETE", delete, "ALICE1"))[0] == 500
    assert snapshot(store).empty
    assert hs.account_data(ALICE, f"{KIND}.1") == {"n": 1}

    assert await call(http, proxy, "DELETE", delete, "ALICE1") == (200, {})

    assert hs.account_data(ALICE, f"{KIND}.1") == {}
    state = snapshot(store)
    assert state.tombstones_of(ALICE) == {(None, f"{KIND}.1", "done")}
    assert state.rows_of(ALICE) == {(None, f"{KIND}.1", "ALICE2")}


# --- read-only -------------------------------------------------------------------------------


async def test_a_read_only_store_fails_deletes_with_500_and_recovers_when_writable(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    db = proxy.app[CONTEXT].store.db.connection
    delete = data_path(ALICE, f"{KIND}.1", MSC3391)
    await db.execute("PRAGMA query_only = 1")

    for _ in range(3):
        assert await call(http, proxy, "DELETE", delete, "ALICE1") == (
            500,
            UNAVAILABLE,
        )
    async with http.get(f"{proxy.url}/_fake/echo/forwarded") as response:
        assert response.status == 200
    assert hs.account_data(ALICE, f"{KIND}.1") == {"n": 1}
    [logged] = store_errors(caplog)
    assert "attempt to write a readonly database" in logged.getMessage()

    await db.execute("PRAGMA query_only = 0")
    assert await call(http, proxy, "DELETE", delete, "ALICE1") == (200, {})
    assert snapshot(proxy.config.store.path).rows_of(ALICE) == {(None, f"{KIND}.1", "ALICE2")}
    assert_no_traceback(caplog)


# --- corrupted -------------------------------------------------------------------------------


async def test_a_corrupted_store_fails_deletes_with_500_and_forwarding_goes_on(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for n in range(3):  # enough rows that the tables span several pages
        await delete_with_a_row_for_alice2(http, proxy, f"{KIND}.{n}")
    store = proxy.config.store.path
    other = sqlite3.connect(store, isolation_level=None)
    try:
        # Move everything from the WAL into the main file, then overwrite every page
        # after the header page: the proxy's next read of a table finds garbage.
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = other.execute("PRAGMA page_size").fetchone()[0]
    finally:
        other.close()
    size = store.stat().st_size
    assert size > page_size
    with store.open("r+b") as f:
        f.seek(page_size)
        f.write(os.urandom(size - page_size))

    hs.set_account_data(ALICE, f"{KIND}.new", {"new": True})
    for _ in range(3):
        assert await call(http, proxy, "DELETE", data_path(ALICE, f"{KIND}.new", MSC3391), "ALICE1") == (
            500,
            UNAVAILABLE,
        )
    assert hs.account_data(ALICE, f"{KIND}.new") == {"new": True}
    async with http.get(f"{proxy.url}/_fake/echo/forwarded") as response:
        assert response.status == 200
    # A sync of the device with rows goes on without them.
    status, body = await call(http, proxy, "GET", "/_matrix/client/v3/sync?timeout=0", "ALICE2")
    assert status == 200 and "next_batch" in body
    [logged] = store_errors(caplog)
    assert "database disk image is malformed" in logged.getMessage()
    assert_no_traceback(caplog)


# --- cancelled mid-transaction ----------------------------------------------------------------

# A query that keeps the store's connection busy for a while (aiosqlite runs one
# statement at a time, in order, on its own thread).
_BUSY = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 2000000) SELECT count(*) FROM n"
)


async def test_a_write_cancelled_while_queued_leaves_the_store_writable(tmp_path: Path) -> None:
    """Found by bench/soak.py: a client that hangs up cancels its handler, here while
    the handler's BEGIN waits behind another statement. The BEGIN still runs after the
    cancellation; unless a ROLLBACK follows it, the connection stays inside that
    transaction and every later write fails ("cannot start a transaction within a
    transaction") until the proxy restarts."""
    store = sqlite_store(tmp_path / "store.sqlite3")
    await store.open()
    try:
        stream_id = await store.begin_delete(ALICE, None, KIND, "ALICE1", ["ALICE1", "ALICE2"])
        await store.commit_delete(stream_id)
        busy = asyncio.ensure_future(store.db.connection.execute(_BUSY))
        await asyncio.sleep(0)  # the busy query is queued first
        write = asyncio.ensure_future(store.record_delivery(ALICE, "ALICE2", "s1", [stream_id]))
        await asyncio.sleep(0)  # the write's BEGIN is queued behind it
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        await busy

        await store.record_delivery(ALICE, "ALICE2", "s2", [stream_id])
        assert await store.acknowledge_since(ALICE, "ALICE2", "s2") == 1
        assert not store.db.connection.in_transaction
    finally:
        await store.close()


# --- at start --------------------------------------------------------------------------------


def run_proxy(tmp_path: Path, store: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[listen]\nport = 0\n[upstream]\nurl = "http://127.0.0.1:9"\n'
        f"[store]\npath = {json.dumps(str(store))}\n[experimental_features]\nmsc3391_enabled = true\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_store_from_a_newer_schema_is_refused_at_start_with_one_line(tmp_path: Path) -> None:
    store = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(store)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()

    result = run_proxy(tmp_path, store)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"msc3391-proxy: store error: the store {store} has schema version {SCHEMA_VERSION + 1}, newer than"
        f" this proxy's {SCHEMA_VERSION}; upgrade the proxy or point it at another file"
    ]
    # The file is left as it was.
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    db.close()


def test_a_file_that_is_not_a_database_is_refused_at_start_with_one_line(tmp_path: Path) -> None:
    store = tmp_path / "junk.sqlite3"
    store.write_bytes(b"this is not a database " * 100)

    result = run_proxy(tmp_path, store)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"msc3391-proxy: store error: cannot open the store {store}: file is not a database"
    ]


# --- the file itself gone, replaced or restored ------------------------------------------------


def copy_store(store: Path, to: Path) -> None:
    """A consistent copy of the store, as `sqlite3 STORE ".backup TO"` makes one."""
    source = sqlite3.connect(store)
    target = sqlite3.connect(to)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


async def test_a_store_file_removed_under_the_proxy_refuses_deletes_and_says_so(
    start_proxy: StartProxy, hs: FakeHomeserver, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes to a file deleted under the running proxy would go to an unlinked inode:
    answered 200, gone after a restart. Deletes are refused instead, `/health` and the
    log say why, and the store's gauges stay in `/metrics` (reporting it down)."""
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(hs.url, metrics={"enabled": True, "port": 0})
    await delete_with_a_row_for_alice2(http, proxy, f"{KIND}.0")
    async with http.get(proxy.metrics_url + "/metrics") as response:
        text = await response.text()
    assert "msc3391_proxy_store_up 1.0" in text and "msc3391_proxy_unsynced_deletes_rows 1.0" in text
    store = proxy.config.store.path
    for leftover in (store, store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        leftover.unlink(missing_ok=True)
    puts = len(hs.requests_to(r"/account_data/", method="PUT"))

    gone = f"the store file {store} was removed"
    deleted = await call(http, proxy, "DELETE", data_path(ALICE, f"{KIND}.1", MSC3391), "ALICE1")
    assert deleted == (500, UNAVAILABLE)
    assert await call(http, proxy, "PUT", data_path(ALICE, f"{KIND}.1"), "ALICE1", {}) == (500, UNAVAILABLE)
    assert len(hs.requests_to(r"/account_data/", method="PUT")) == puts
    assert hs.account_data(ALICE, f"{KIND}.1") == {"n": 1}
    async with http.get(proxy.url + "/health") as response:
        assert response.status == 503
        assert await response.json() == {"status": "unavailable", "store": gone}
    async with http.get(proxy.metrics_url + "/metrics") as response:
        text = await response.text()
    assert "msc3391_proxy_store_up 0.0" in text
    assert "msc3391_proxy_unsynced_deletes_rows 1.0" in text  # the last count, not a vanished gauge
    assert any(gone in r.getMessage() for r in store_errors(caplog))
    assert_no_traceback(caplog)


async def test_a_corrupted_store_restored_from_a_backup_works_again_without_a_restart(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    await delete_with_a_row_for_alice2(http, proxy, f"{KIND}.0")
    store = proxy.config.store.path
    backup = store.with_name("backup.sqlite3")
    copy_store(store, backup)
    source = sqlite3.connect(store)
    try:
        source.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = source.execute("PRAGMA page_size").fetchone()[0]
    finally:
        source.close()
    size = store.stat().st_size
    with store.open("r+b") as f:
        f.seek(page_size)
        f.write(os.urandom(size - page_size))
    delete = data_path(ALICE, f"{KIND}.1", MSC3391)
    assert (await call(http, proxy, "DELETE", delete, "ALICE1"))[0] == 500

    shutil.copyfile(backup, store)  # the operator restores the file in place

    assert await call(http, proxy, "DELETE", delete, "ALICE1") == (200, {})
    state = snapshot(store)
    assert state.tombstones_of(ALICE) == {(None, f"{KIND}.0", "done"), (None, f"{KIND}.1", "done")}
    assert state.rows_of(ALICE) == {(None, f"{KIND}.0", "ALICE2"), (None, f"{KIND}.1", "ALICE2")}


async def test_a_store_file_replaced_under_the_proxy_is_opened_afresh(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """A backup moved into place is a new file: the proxy reads it, not the old one."""
    store = proxy.config.store.path
    other = store.with_name("other.sqlite3")
    copy_store(store, other)  # a backup from before any delete
    await delete_with_a_row_for_alice2(http, proxy, f"{KIND}.0")

    os.replace(other, store)

    assert proxy.app[CONTEXT].store.has_pending(ALICE, "ALICE2")  # the old file's index, until used
    await delete_with_a_row_for_alice2(http, proxy, f"{KIND}.1")
    assert snapshot(store).tombstones_of(ALICE) == {(None, f"{KIND}.1", "done")}
    assert [r.account_data_type for r in await proxy.app[CONTEXT].store.unsynced_rows(ALICE)] == [f"{KIND}.1"]


# --- one process per store ---------------------------------------------------------------------


async def test_a_second_process_on_the_same_store_is_refused_with_one_line(
    proxy: ProxyServer, tmp_path: Path
) -> None:
    """Two processes on one SQLite store would disagree: each keeps its own in-memory
    index of who has something to learn."""
    store = proxy.config.store.path

    result = await asyncio.to_thread(run_proxy, tmp_path, store)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"msc3391-proxy: store error: the store {store} is in use by another msc3391-proxy process"
        " (one process per SQLite store; several instances need a PostgreSQL store)"
    ]


# --- device removal while the store fails --------------------------------------------------


@pytest.mark.parametrize("endpoint", ["logout/all", "account/deactivate"])
async def test_rows_of_an_account_emptied_while_the_store_fails_are_swept_once_it_recovers(
    proxy: ProxyServer, hs: FakeHomeserver, http: aiohttp.ClientSession, endpoint: str
) -> None:
    """After logout/all or a deactivation the account has no token left, so no later
    request of it would sweep its rows: the sweep is retried until the store takes it."""
    await delete_with_a_row_for_alice2(http, proxy, f"{KIND}.0")
    store = proxy.config.store.path
    with write_lock(store):
        status, _ = await call(http, proxy, "POST", f"/_matrix/client/v3/{endpoint}", "ALICE1", {})
        assert status == 200
        assert snapshot(store).rows_of(ALICE) == {(None, f"{KIND}.0", "ALICE2")}

    state = await wait_for_store(store, lambda s: not s.rows_of(ALICE))
    assert state.rows_of(ALICE) == set() and state.tombstones_of(ALICE) == set()

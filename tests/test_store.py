"""The store: tombstones, per-device rows, deliveries, migrations. One suite for both
backends: each test that takes `make_store` or `store` runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.store import SCHEMA_VERSION, DeletionStore, PendingDelete, StoreError, open_store, sqlite_store
from tests.matrix import ALICE, BOB, ROOM

MakeStore = Callable[[], DeletionStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> MakeStore:
    """`make_store()`: a new, unopened store on this test's database (the same one each
    time: a second store is the same database opened again)."""
    if request.param == "sqlite":
        return lambda: sqlite_store(tmp_path / "store.sqlite3")
    url = request.getfixturevalue("postgres_url")
    config = parse_config({"upstream": {"url": "http://hs"}, "store": {"url": url}}, tmp_path).store
    return lambda: open_store(config)


@pytest.fixture
async def store(make_store: MakeStore) -> AsyncIterator[DeletionStore]:
    s = make_store()
    await s.open()
    yield s
    await s.close()


async def rows(store: DeletionStore) -> set[tuple[int, str, str | None, str]]:
    return {(r.stream_id, r.account_data_type, r.room_id, r.device_id) for r in await store.unsynced_rows()}


async def test_schema_has_the_briefs_table_and_indexes(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path / "store.sqlite3")
    await store.open()
    await store.close()
    db = sqlite3.connect(store.db.path)
    columns = [r[1] for r in db.execute("PRAGMA table_info(account_data_unsynced_deletes)")]
    assert columns == ["stream_id", "user_id", "account_data_type", "room_id", "device_id"]
    indexes = {r[1]: r[2] for r in db.execute("PRAGMA index_list(account_data_unsynced_deletes)")}
    assert indexes["account_data_unsynced_deletes_stream_id_user_id_device_id"] == 1  # unique
    assert indexes["account_data_unsynced_deletes_user_id_device_id"] == 0
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_delete_for_more_devices_than_one_statement_takes_rows_each_of_them(
    store: DeletionStore,
) -> None:
    devices = [f"D{n:04d}" for n in range(1201)]  # three statements' worth of rows
    sid = await store.begin_delete(ALICE, ROOM, "a", devices[7], [*devices, devices[3]])
    await store.commit_delete(sid)

    told = set(devices) - {devices[7]}
    assert await rows(store) == {(sid, "a", ROOM, device) for device in told}
    assert all(store.has_pending(ALICE, device) for device in told)
    assert not store.has_pending(ALICE, devices[7])


async def test_a_write_planned_on_an_entry_that_changed_meanwhile_reads_the_rows(tmp_path: Path) -> None:
    """A write works out the index's new entry from the old one only if nothing changed
    it since the write was planned (on a shared store: another instance's announcement)."""
    store = sqlite_store(tmp_path / "store.sqlite3")
    await store.open()
    try:
        sid = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2"])
        await store.commit_delete(sid)
        planned = store.index.fresh_token(ALICE)
        async with store.db.transaction() as tx:
            await store._refresh(tx, ALICE, known={"D2", "D9"}, as_of=planned)
        assert store.has_pending(ALICE, "D9")  # trusted: no query, and no row to say otherwise

        planned = store.index.fresh_token(ALICE)
        store.index.invalidate(ALICE)  # announced after the plan
        async with store.db.transaction() as tx:
            await store._refresh(tx, ALICE, known={"D2", "D9"}, as_of=planned)
        assert store.has_pending(ALICE, "D2") and not store.has_pending(ALICE, "D9")
    finally:
        await store.close()


async def test_a_delete_rows_every_other_device_and_is_unsettled_until_committed(
    store: DeletionStore,
) -> None:
    sid = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2", "D3"])
    assert await rows(store) == {(sid, "a", None, "D2"), (sid, "a", None, "D3")}
    assert store.has_pending(ALICE, "D2") and not store.has_pending(ALICE, "D1")
    # Still only an intent: listed (a body carrying it delivers it), but not settled.
    assert await store.pending_for_device(ALICE, "D2") == [PendingDelete(sid, None, "a", settled=False)]
    await store.commit_delete(sid)
    assert await store.pending_for_device(ALICE, "D2") == [PendingDelete(sid, None, "a")]
    assert [t.state for t in await store.tombstones()] == ["done"]


async def test_stream_ids_are_unique_across_global_and_room_deletes(store: DeletionStore) -> None:
    a = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2"])
    b = await store.begin_delete(ALICE, ROOM, "a", "D1", ["D1", "D2"])
    await store.commit_delete(a)
    await store.commit_delete(b)
    assert a != b
    assert {p.stream_id for p in await store.pending_for_device(ALICE, "D2")} == {a, b}


async def test_abort_leaves_no_trace(store: DeletionStore) -> None:
    sid = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2"])
    await store.abort_delete(sid)
    assert await rows(store) == set()
    assert await store.tombstones() == []
    assert not store.has_pending(ALICE, "D2")


async def test_aborting_a_second_delete_keeps_the_first(store: DeletionStore) -> None:
    first = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2"])
    await store.commit_delete(first)
    second = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2"])
    await store.abort_delete(second)
    assert await store.pending_for_device(ALICE, "D2") == [PendingDelete(first, None, "a")]


async def test_a_new_delete_of_the_same_type_replaces_the_old_one(store: DeletionStore) -> None:
    first = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2", "D3"])
    await store.commit_delete(first)
    second = await store.begin_delete(ALICE, None, "a", "D2", ["D1", "D2", "D3"])
    await store.commit_delete(second)
    assert await rows(store) == {(second, "a", None, "D1"), (second, "a", None, "D3")}
    assert [t.stream_id for t in await store.tombstones()] == [second]


async def test_a_single_device_account_keeps_no_tombstone(store: DeletionStore) -> None:
    sid = await store.begin_delete(ALICE, None, "a", "D1", ["D1"])
    await store.commit_delete(sid)
    assert await store.tombstones() == []


async def test_acknowledgement_by_delivery_and_tombstone_cleanup(store: DeletionStore) -> None:
    sid = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2", "D3"])
    await store.commit_delete(sid)
    await store.record_delivery(ALICE, "D2", "s10", [sid])
    assert await store.acknowledge_since(ALICE, "D2", "s9") == 0  # not the token that carried it
    assert await store.acknowledge_since(ALICE, "D3", "s10") == 0  # another device's token
    assert await store.acknowledge_since(ALICE, "D2", "s10") == 1
    assert await rows(store) == {(sid, "a", None, "D3")}
    await store.record_delivery(ALICE, "D3", "t1", [sid])
    assert await store.acknowledge_since(ALICE, "D3", "t1") == 1
    assert await rows(store) == set()
    assert await store.tombstones() == []
    assert not store.has_pending(ALICE, "D3")


async def test_acknowledging_more_stream_ids_than_a_statement_may_bind(store: DeletionStore) -> None:
    """A response may carry thousands of deletes; one statement binds at most 32,767
    parameters in PostgreSQL, and 32,766 in SQLite (250,000 as Debian builds it)."""
    first = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2", "D3"])
    second = await store.begin_delete(ALICE, ROOM, "b", "D1", ["D1", "D2", "D3"])
    for sid in (first, second):
        await store.commit_delete(sid)
    proof = [*range(second + 1, second + 260_000), second, first]
    assert await store.acknowledge_stream_ids(ALICE, "D2", proof) == 2
    assert await rows(store) == {(first, "a", None, "D3"), (second, "b", ROOM, "D3")}
    assert not store.has_pending(ALICE, "D2")


async def test_acknowledgement_by_get(store: DeletionStore) -> None:
    g = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2"])
    r = await store.begin_delete(ALICE, ROOM, "a", "D1", ["D1", "D2"])
    await store.commit_delete(g)
    await store.commit_delete(r)
    assert await store.acknowledge_type(ALICE, "D2", ROOM, "a") == 1
    assert await store.pending_for_device(ALICE, "D2") == [PendingDelete(g, None, "a")]


async def test_a_nudge_is_known_for_its_device_until_its_time_is_up(store: DeletionStore) -> None:
    assert not store.nudged(ALICE, "D1")
    await store.note_nudge(ALICE, "D1", 0.2)
    assert store.nudged(ALICE, "D1")
    assert not store.nudged(ALICE, "D2") and not store.nudged(BOB, "D1")
    await asyncio.sleep(0.25)
    assert not store.nudged(ALICE, "D1")


async def test_revive_drops_tombstone_and_rows(store: DeletionStore) -> None:
    sid = await store.begin_delete(ALICE, ROOM, "a", "D1", ["D1", "D2"])
    await store.commit_delete(sid)
    await store.revive(ALICE, ROOM, "a")
    assert await rows(store) == set()
    assert await store.tombstones() == []


async def test_device_removal(store: DeletionStore) -> None:
    sid = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2", "D3"])
    await store.commit_delete(sid)
    await store.remove_devices(ALICE, ["D2"])
    assert await rows(store) == {(sid, "a", None, "D3")}
    await store.remove_all_devices(ALICE)
    assert await rows(store) == set()
    assert await store.tombstones() == []


async def test_devices_the_homeserver_no_longer_lists_are_dropped(store: DeletionStore) -> None:
    first = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2", "GONE"])
    await store.commit_delete(first)
    second = await store.begin_delete(ALICE, None, "b", "D1", ["D1", "D2"])
    await store.commit_delete(second)
    assert {r[3] for r in await rows(store)} == {"D2"}


async def test_the_index_after_each_write_says_what_a_fresh_read_of_the_rows_says(
    make_store: MakeStore,
) -> None:
    """The in-memory answer a sync's fast path trusts, after deletes that add rows, forget
    devices the homeserver no longer lists and echo to the deleting device, is exactly
    what the store's file holds, as a store opened afresh reads it."""
    s = make_store()
    await s.open()
    devices = ["D1", "D2", "D3", "GONE", "LATER"]
    first = await s.begin_delete(ALICE, None, "a", "D1", ["D1", "D2", "GONE"])
    await s.commit_delete(first)
    second = await s.begin_delete(ALICE, ROOM, "b", "D2", ["D1", "D2", "D3"])  # GONE is gone
    await s.echo_delete(ALICE, None, "never-set", "LATER")
    written = {d: s.has_pending(ALICE, d) for d in devices}
    assert {r.device_id for r in await s.unsynced_rows(ALICE)} == {d for d, has in written.items() if has}
    assert written == {"D1": True, "D2": True, "D3": True, "GONE": False, "LATER": True}
    await s.commit_delete(second)
    # A second delete of a type replaces the first one, and B2's only row goes with it.
    earlier = await s.begin_delete(BOB, None, "x", "B1", ["B1", "B2"])
    await s.commit_delete(earlier)
    await s.commit_delete(await s.begin_delete(BOB, None, "x", "B2", ["B1", "B2"]))
    bob = {d: s.has_pending(BOB, d) for d in ("B1", "B2")}
    assert bob == {"B1": True, "B2": False}
    await s.close()

    fresh = make_store()
    await fresh.open()
    assert {d: fresh.has_pending(ALICE, d) for d in devices} == written
    assert {d: fresh.has_pending(BOB, d) for d in ("B1", "B2")} == bob
    await fresh.close()


async def test_deletes_of_two_types_at_once_leave_every_told_device_pending(store: DeletionStore) -> None:
    """Two types of one user deleted at once from different devices (each type has its
    own lock): whichever transaction runs second must keep the first one's devices."""
    devices = ["D1", "D2", "D3"]
    first, second = await asyncio.gather(
        store.begin_delete(ALICE, None, "a", "D1", devices),
        store.begin_delete(ALICE, None, "b", "D2", devices),
    )
    assert {d: store.has_pending(ALICE, d) for d in devices} == {"D1": True, "D2": True, "D3": True}
    await asyncio.gather(store.commit_delete(first), store.commit_delete(second))
    assert {d: store.has_pending(ALICE, d) for d in devices} == {"D1": True, "D2": True, "D3": True}


async def test_a_durable_transaction_syncs_its_commit_and_the_others_do_not(tmp_path: Path) -> None:
    """synchronous=FULL (2) for a durable transaction, NORMAL (1) otherwise, whatever the
    order: a delete's intent must be on disk before the homeserver is written to."""
    store = sqlite_store(tmp_path / "store.sqlite3")
    await store.open()
    seen = []
    for durable in (True, False, False, True, True, False, True):
        async with store.db.transaction(durable=durable) as tx:
            row = await tx.fetchone("PRAGMA synchronous")
            assert row is not None
            seen.append(row[0])
    await store.close()
    assert seen == [2, 1, 1, 2, 2, 1, 2]


async def test_state_survives_reopening(make_store: MakeStore) -> None:
    s = make_store()
    await s.open()
    sid = await s.begin_delete(ALICE, None, "a", "D1", ["D1", "D2"])
    await s.commit_delete(sid)
    pending = await s.begin_delete(ALICE, None, "b", "D1", ["D1", "D2"])
    await s.close()

    again = make_store()
    await again.open()
    assert again.has_pending(ALICE, "D2")
    assert await again.pending_for_device(ALICE, "D2") == [
        PendingDelete(sid, None, "a"),
        PendingDelete(pending, None, "b", settled=False),
    ]
    # The interrupted delete is remembered for settling on the user's next request.
    assert again.orphaned_intents(ALICE) == [pending]
    await again.close()


async def test_a_store_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    s = sqlite_store(path)
    with pytest.raises(StoreError, match="newer"):
        await s.open()


async def test_a_corrupt_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        await sqlite_store(path).open()


async def test_commit_and_abort_are_idempotent(store: DeletionStore) -> None:
    """Settling may be attempted more than once for one intent: a second commit (or an
    abort after the commit) must leave the committed delete alone."""
    sid = await store.begin_delete(ALICE, None, "a", "D1", ["D1", "D2", "D3"])
    await store.commit_delete(sid)
    await store.commit_delete(sid)
    await store.abort_delete(sid)

    assert [(t.stream_id, t.state) for t in await store.tombstones(ALICE)] == [(sid, "done")]
    assert {r.device_id for r in await store.unsynced_rows(ALICE)} == {"D2", "D3"}

"""Several instances on one PostgreSQL store: what one does, every other knows.

Each test opens two stores on one fresh database, as two proxy processes would: their
in-memory indexes are kept true by the database's announcements, their writes of one
type are serialised by its advisory locks, and the intents of one that dies are
settled by the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from proxy.config import parse_config
from proxy.errors import StoreUnavailable
from proxy.store import DeletionStore, open_store, operations
from proxy.store import postgres as postgres_backend
from rig.postgres import PostgresServer
from tests.matrix import ALICE
from tests.rig_fixtures import POSTGRES_TEST_USER

pytestmark = pytest.mark.postgres

Stores = Callable[[], Awaitable[DeletionStore]]


@pytest.fixture
async def instances(postgres_url: str, tmp_path: Path) -> AsyncIterator[Stores]:
    """`await instances()`: one more store (an instance) opened on the test's database."""
    config = parse_config({"upstream": {"url": "http://hs"}, "store": {"url": postgres_url}}, tmp_path).store
    opened: list[DeletionStore] = []

    async def open_one() -> DeletionStore:
        store = open_store(config)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in reversed(opened):
        await store.close()


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> bool:
    """Poll an in-memory answer that another instance's change reaches asynchronously."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_a_delete_by_one_instance_is_pending_for_the_other_at_once_and_then_known(
    instances: Stores,
) -> None:
    a, b = await instances(), await instances()
    assert not b.has_pending(ALICE, "D2")

    sid = await a.begin_delete(ALICE, None, "t", "D1", ["D1", "D2"])
    await a.commit_delete(sid)

    # The announcement arrives, and with it B's fresh read of Alice's rows.
    assert await eventually(lambda: b.has_pending(ALICE, "D2"))
    assert [p.stream_id for p in await b.pending_for_device(ALICE, "D2")] == [sid]
    assert not b.has_pending(ALICE, "D1")


@pytest.mark.parametrize("conforming", ["on", "off"])
async def test_an_announcement_names_any_user_id_exactly(
    instances: Stores, postgres_url: str, conforming: str
) -> None:
    """Announcements are NOTIFY statements sent with the COMMIT in one trip: the user ID
    is a string constant there, read the same with backslashes taken literally or not."""
    name = postgres_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"ALTER DATABASE {name} SET standard_conforming_strings = {conforming}")
    finally:
        await admin.close()
    odd = "@o'brien\\x\\'y:localhost"  # historical user IDs may hold both
    a, b = await instances(), await instances()

    sid = await a.begin_delete(odd, None, "t", "D1", ["D1", "D2"])
    await a.commit_delete(sid)

    assert await eventually(lambda: b.has_pending(odd, "D2"))
    assert [p.stream_id for p in await b.pending_for_device(odd, "D2")] == [sid]


async def test_a_proof_of_receipt_recorded_by_one_instance_is_honoured_by_the_other(
    instances: Stores,
) -> None:
    a, b = await instances(), await instances()
    sid = await a.begin_delete(ALICE, None, "t", "D1", ["D1", "D2"])
    await a.commit_delete(sid)
    await a.record_delivery(ALICE, "D2", "s42", [sid])
    assert await eventually(lambda: b.has_pending(ALICE, "D2"))

    assert await b.acknowledge_since(ALICE, "D2", "s42") == 1

    assert await a.unsynced_rows() == [] and await a.tombstones() == []
    assert await eventually(lambda: not a.has_pending(ALICE, "D2"))


async def test_a_nudge_noted_by_one_instance_is_known_to_the_other(instances: Stores) -> None:
    a, b = await instances(), await instances()
    assert not a.nudged(ALICE, "D1") and not b.nudged(ALICE, "D1")

    await a.note_nudge(ALICE, "D1", 600.0)

    assert a.nudged(ALICE, "D1")
    assert await eventually(lambda: b.nudged(ALICE, "D1"))
    assert not b.nudged(ALICE, "D2")


async def test_a_nudge_is_forgotten_when_its_time_is_up_on_every_instance(instances: Stores) -> None:
    a, b = await instances(), await instances()
    await a.note_nudge(ALICE, "D1", 0.3)
    assert await eventually(lambda: b.nudged(ALICE, "D1"))

    assert await eventually(lambda: not a.nudged(ALICE, "D1") and not b.nudged(ALICE, "D1"), within=5)


async def test_stream_ids_stay_unique_across_instances(instances: Stores) -> None:
    a, b = await instances(), await instances()
    begun = await asyncio.gather(
        *(store.begin_delete(ALICE, None, f"t{n}", "D1", ["D1", "D2"]) for n in range(20) for store in (a, b))
    )
    assert len(set(begun)) == 40


async def test_writes_of_one_type_are_serialised_across_instances(instances: Stores) -> None:
    a, b = await instances(), await instances()
    key = (ALICE, None, "t")
    order: list[str] = []

    async def write(store: DeletionStore, name: str, started: asyncio.Event | None) -> None:
        async with store.type_locks.hold(key):
            if started is not None:
                started.set()
            order.append(f"{name} in")
            await asyncio.sleep(0.3)  # the homeserver write, held under the lock
            order.append(f"{name} out")

    started = asyncio.Event()
    first = asyncio.ensure_future(write(a, "a", started))
    await started.wait()
    await asyncio.gather(first, write(b, "b", None))

    assert order == ["a in", "a out", "b in", "b out"]
    async with b.type_locks.hold((ALICE, None, "other type")):  # another type is not held up
        pass


async def test_an_intent_left_by_an_instance_that_died_is_settled_by_another(
    instances: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operations, "ORPHAN_CHECK", 0.1)
    a, b = await instances(), await instances()
    in_flight = await a.begin_delete(ALICE, None, "t", "D1", ["D1", "D2"])
    await asyncio.sleep(0.5)
    assert b.orphaned_intents(ALICE) == []  # A is alive: its intent is under way, not orphaned

    await a.close()  # the instance is gone (its connections with it)

    assert await eventually(lambda: b.orphaned_intents(ALICE) == [in_flight])


async def test_a_store_that_cannot_hear_the_others_asks_the_database(
    instances: Stores, postgres_url: str
) -> None:
    """With the announcements lost, a stale "nothing pending" must never be the answer:
    every user is "maybe" until the listening connection is back and the index reread."""
    a, b = await instances(), await instances()
    admin = await asyncpg.connect(postgres_url)
    try:
        # Cut the instances' listening connections (not their pools').
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'msc3391-proxy listener'"
        )
        assert killed == 2
    finally:
        await admin.close()
    # Known when the server closes the connection, not at the next check of it.
    assert await eventually(
        lambda: b.has_pending("@nobody:localhost", "X") and a.has_pending("@x:y", "Z"),
        within=postgres_backend.LISTENER_CHECK / 2,
    )

    sid = await a.begin_delete(ALICE, None, "t", "D1", ["D1", "D2"])
    await a.commit_delete(sid)
    # Back to listening (within the retry), the index is read again: true answers.
    assert await eventually(lambda: not b.has_pending("@nobody:localhost", "X"), within=20)
    assert b.has_pending(ALICE, "D2")


async def test_two_instances_starting_at_once_migrate_the_database_once(
    postgres_url: str, tmp_path: Path
) -> None:
    config = parse_config({"upstream": {"url": "http://hs"}, "store": {"url": postgres_url}}, tmp_path).store
    stores = [open_store(config) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
    finally:
        for s in stores:
            await s.close()
    admin = await asyncpg.connect(postgres_url)
    try:
        versions = [r["version"] for r in await admin.fetch("SELECT version FROM msc3391_proxy_schema")]
    finally:
        await admin.close()
    assert versions == [1]


async def test_a_database_that_turns_connections_away_fails_operations_and_is_used_again_after(
    postgres_url: str, tmp_path: Path
) -> None:
    config = parse_config({"upstream": {"url": "http://hs"}, "store": {"url": postgres_url}}, tmp_path).store
    base, name = postgres_url.rsplit("/", 1)
    store = open_store(config)
    await store.open()
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1", name
        )
        with pytest.raises(StoreUnavailable) as refused:
            await store.begin_delete(ALICE, None, "t", "D1", ["D1", "D2"])
        assert store.problem() is not None
        # PostgreSQL's reason (it may name the database, its host or its user) is the
        # operator's to read, in the log; a client is told only that the store failed.
        assert refused.value.cause and refused.value.cause not in refused.value.response().text
        assert refused.value.response().text == (
            '{"errcode":"M_UNKNOWN","error":"The proxy\'s deletion store is unavailable"}'
        )
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

        # The pool connects again by itself.
        sid = await store.begin_delete(ALICE, None, "t", "D1", ["D1", "D2"])
        await store.commit_delete(sid)
        assert store.problem() is None
    finally:
        await admin.close()
        await store.close()


async def test_a_store_whose_database_was_dropped_still_closes_promptly(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Its listener retries for ever while the database is gone; closing must end that
    (a cancellation alone can be swallowed by a connect failing at the same moment)."""
    url = postgres.create_database("vanishing", owner=POSTGRES_TEST_USER)
    config = parse_config({"upstream": {"url": "http://hs"}, "store": {"url": url}}, tmp_path).store
    store = open_store(config)
    await store.open()
    await asyncio.to_thread(postgres.drop_database, "vanishing")
    await asyncio.sleep(postgres_backend.LISTENER_RETRY * 2)  # let it fail to reconnect a few times
    started = time.monotonic()
    await store.close()
    assert time.monotonic() - started < postgres_backend.LISTENER_CHECK + postgres_backend.LISTENER_RETRY

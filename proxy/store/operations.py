"""The store's operations, in SQL that every backend speaks (the store's domain layer).

A delete is an intent first (`begin_delete`: a 'pending' tombstone and one row per
device that has to learn of it), then either committed once the homeserver holds it
(replacing any earlier delete of the type) or aborted without a trace. Rows go when
their device proves receipt, and a settled tombstone goes with its last row.

Statements use `?` placeholders; a backend translates them if its driver wants others.
Every write refreshes the in-memory index of its user within the same transaction.
Only the intent and a revive are durable transactions (on disk before they return, a
power cut or not): whatever else a power cut loses is an intent left pending (settled
from the homeserver) or a device told a delete once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from ..errors import StoreUnavailable
from ..records import PendingDelete, Tombstone, UnsyncedRow
from . import inspection
from .indexes import IndexedAnswers, PendingIndex

log = logging.getLogger("proxy.store")

# Shared: how often the intents of instances that are gone are looked for.
ORPHAN_CHECK = 10.0

Statement = tuple[str, Sequence[object]]


class TypeLocks(Protocol):
    def hold(self, key: Hashable, *, required: bool = True) -> AbstractAsyncContextManager[None]: ...


class Transaction(Protocol):
    async def announce(self, user_id: str) -> None: ...
    async def execute(self, sql: str, args: Sequence[object] = ()) -> None: ...
    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None: ...
    async def fetchall(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]: ...
    async def fetchone(self, sql: str, args: Sequence[object] = ()) -> tuple[Any, ...] | None: ...


class Database(Protocol):
    # Several instances use it (PostgreSQL): their changes are announced, not known.
    shared: bool
    # This process, as intents name it.
    instance: str
    type_locks: TypeLocks
    # Called (under the database's lock) when the database had to be opened afresh.
    on_reopen: Callable[[Transaction], Awaitable[None]] | None
    # Shared only: another instance changed a user's rows; the announcements were lost
    # (every user is stale); they can be heard again (read everything again).
    on_change: Callable[[str], None] | None
    on_lost: Callable[[], None] | None
    on_resync: Callable[[], Awaitable[None]] | None
    # Shared only: another instance nudged (user, device) for `seconds`.
    on_nudge: Callable[[str, str, float], None] | None

    def transaction(self, *, durable: bool = True) -> AbstractAsyncContextManager[Transaction]: ...
    def reading(self) -> AbstractAsyncContextManager[Transaction]: ...
    async def open(self, *, exclusive: bool = True) -> None: ...
    async def close(self) -> None: ...
    def problem(self) -> str | None: ...
    async def alive(self, tx: Transaction, instance: str | None) -> bool: ...
    async def announce_nudge(self, user_id: str, device_id: str, seconds: float) -> None: ...


_PENDING = "SELECT user_id, stream_id, instance FROM account_data_tombstones WHERE state = 'pending'"
_SAME_TYPE = "user_id = ? AND COALESCE(room_id, '') = COALESCE(?, '') AND account_data_type = ?"
_TOMBSTONE = inspection.TOMBSTONE
# The devices with a row, as one index seek per device (the smallest device_id after
# the last one found), not a scan of every row: a user with 100 devices and thousands of
# unsynced deletes is asked this at every write.
_DEVICES_WITH_ROWS = (
    "WITH RECURSIVE found(device_id) AS ("
    " SELECT MIN(device_id) FROM account_data_unsynced_deletes WHERE user_id = ?"
    " UNION ALL"
    " SELECT (SELECT MIN(device_id) FROM account_data_unsynced_deletes"
    "  WHERE user_id = ? AND device_id > found.device_id)"
    " FROM found WHERE found.device_id IS NOT NULL"
    ") SELECT device_id FROM found WHERE device_id IS NOT NULL"
)
# A pending delete to commit: its type, its state, whether an earlier settled delete of
# the type is there to replace, and whether any device has yet to see it.
_TO_COMMIT = (
    "SELECT t.user_id, t.room_id, t.account_data_type, t.state,"
    " EXISTS (SELECT 1 FROM account_data_tombstones e WHERE e.user_id = t.user_id"
    "  AND COALESCE(e.room_id, '') = COALESCE(t.room_id, '')"
    "  AND e.account_data_type = t.account_data_type AND e.state = 'done'),"
    " EXISTS (SELECT 1 FROM account_data_unsynced_deletes u WHERE u.stream_id = t.stream_id)"
    " FROM account_data_tombstones t WHERE t.stream_id = ?"
)
_INSERT_ROW = (
    "INSERT INTO account_data_unsynced_deletes (stream_id, user_id, account_data_type, room_id, device_id)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)


# A new delete's rows in one statement: PostgreSQL runs a statement per row of an
# executemany (a 100-device delete's rows took 4.7 ms that way, 2.2 ms this way). The
# casts give it the types a bare parameter in a SELECT list lacks. Rows of a stream_id
# just made, for distinct devices, cannot conflict: no ON CONFLICT (it costs PostgreSQL
# a speculative insertion per row).
_ROWS_PER_STATEMENT = 500


def _insert_new_rows(
    stream_id: int, user_id: str, account_data_type: str, room_id: str | None, devices: Sequence[str]
) -> list[Statement]:
    statements: list[Statement] = []
    for start in range(0, len(devices), _ROWS_PER_STATEMENT):
        chunk = tuple(devices[start : start + _ROWS_PER_STATEMENT])
        statements.append(
            (
                "INSERT INTO account_data_unsynced_deletes"
                " (stream_id, user_id, account_data_type, room_id, device_id)"
                " SELECT CAST(? AS BIGINT), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), column1"
                f" FROM (VALUES {', '.join('(?)' for _ in chunk)}) AS told",
                (stream_id, user_id, account_data_type, room_id, *chunk),
            )
        )
    return statements


def _remove_tombstones(where: str, args: Sequence[object]) -> list[Statement]:
    selected = f"SELECT stream_id FROM account_data_tombstones WHERE {where}"
    return [
        (f"DELETE FROM sync_deliveries WHERE stream_id IN ({selected})", args),
        (f"DELETE FROM account_data_unsynced_deletes WHERE stream_id IN ({selected})", args),
        (f"DELETE FROM account_data_tombstones WHERE {where}", args),
    ]


# Well under the bound parameters a statement may have (SQLite 32,766; PostgreSQL 32,767).
_IDS_PER_STATEMENT = 500
_UNSEEN = (
    " AND NOT EXISTS (SELECT 1 FROM account_data_unsynced_deletes u"
    " WHERE u.stream_id = account_data_tombstones.stream_id)"
)


def _drop_seen_tombstones(user_id: str) -> Statement:
    """A settled delete that every device has seen needs no tombstone."""
    return (f"DELETE FROM account_data_tombstones WHERE user_id = ? AND state = 'done'{_UNSEEN}", (user_id,))


def _drop_if_seen(stream_ids: Sequence[int]) -> list[Statement]:
    """The same for these deletes only: the ones whose rows a write just removed (the
    user's other tombstones cannot have become unseen, and a user who never syncs may
    have thousands)."""
    statements: list[Statement] = []
    for start in range(0, len(stream_ids), _IDS_PER_STATEMENT):
        chunk = tuple(stream_ids[start : start + _IDS_PER_STATEMENT])
        where = f"stream_id IN ({', '.join('?' * len(chunk))}) AND state = 'done'{_UNSEEN}"
        statements.append((f"DELETE FROM account_data_tombstones WHERE {where}", chunk))
    return statements


def _forget_devices(user_id: str, device_ids: Iterable[str]) -> list[Statement]:
    statements: list[Statement] = []
    for device in device_ids:
        statements += [
            ("DELETE FROM sync_deliveries WHERE user_id = ? AND device_id = ?", (user_id, device)),
            (
                "DELETE FROM account_data_unsynced_deletes WHERE user_id = ? AND device_id = ?",
                (user_id, device),
            ),
        ]
    return [*statements, _drop_seen_tombstones(user_id)] if statements else []


async def _run(tx: Transaction, statements: Iterable[Statement]) -> None:
    for sql, args in statements:
        await tx.execute(sql, args)


def _now_ms() -> int:
    return int(time.time() * 1000)


class SqlStore(IndexedAnswers):
    """A `DeletionStore` on any `Database` (see `model.DeletionStore` for the contract)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.index = PendingIndex()
        # Writes of one type serialised: in this process, or (shared) across instances.
        self.type_locks = db.type_locks
        db.on_reopen = self._load
        db.on_change = self._changed_elsewhere
        db.on_lost = self.index.invalidate_all
        db.on_nudge = self.index.mark_nudged
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        await self.db.open(exclusive=exclusive)
        async with self.db.reading() as tx:
            await self._load(tx)
        if orphans := self.index.orphan_count():
            log.warning("%d interrupted deletes will be settled on their users' next requests", orphans)
        if self.db.shared and exclusive:
            # From now on a listening connection lost and found again means: read it all again.
            self.db.on_resync = self._resync
            self._start(self._adopt_orphans_every(ORPHAN_CHECK))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.db.close()

    def problem(self) -> str | None:
        return self.db.problem()

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, tx: Transaction) -> None:
        self.index.begin_load()
        rows = await tx.fetchall("SELECT DISTINCT user_id, device_id FROM account_data_unsynced_deletes")
        orphans = await self._orphans(tx)
        self.index.load(rows, orphans)  # type: ignore[arg-type]

    async def _orphans(self, tx: Transaction) -> list[tuple[str, int]]:
        """Intents still pending whose process is gone: an earlier process (SQLite), or
        any instance that no longer holds its lock (PostgreSQL)."""
        found = await tx.fetchall(_PENDING)
        instances = {instance for _, _, instance in found if instance != self.db.instance}
        dead = {instance for instance in instances if not await self.db.alive(tx, instance)}
        return [(user_id, stream_id) for user_id, stream_id, instance in found if instance in dead]

    async def _resync(self) -> None:
        async with self.db.reading() as tx:
            await self._load(tx)

    async def _refresh(
        self, tx: Transaction, user_id: str, *, known: Iterable[str] | None = None, as_of: int | None = None
    ) -> None:
        """Bring the index's entry for `user_id` up to date with the write `tx` made.

        `known`: the devices with rows after a write that only added rows (or forgot
        whole devices), worked out from the index's entry as it stood, fresh, at token
        `as_of` (taken before the write). If the user was not invalidated since, the
        entry plus the write is the truth, and the query is spared (a 100-device delete
        pays it after every write otherwise). On a shared database too: another
        instance's change is announced after its commit, so one announced before
        `as_of` is in the entry, one announced since changed the token (the rows are
        read), and one announced later makes the entry stale when it arrives."""
        if known is not None and as_of is not None and as_of == self.index.token(user_id):
            devices = frozenset(known)
        else:
            devices = frozenset(row[0] for row in await tx.fetchall(_DEVICES_WITH_ROWS, (user_id, user_id)))
        self.index.written(user_id, devices)
        await tx.announce(user_id)

    def _changed_elsewhere(self, user_id: str) -> None:
        """Another instance changed this user's rows: stale until read again."""
        self.index.invalidate(user_id)
        self._start(self._read_again(user_id))

    async def _read_again(self, user_id: str) -> None:
        token = self.index.token(user_id)
        with contextlib.suppress(StoreUnavailable):  # stays stale: the slow path asks the database
            async with self.db.reading() as tx:
                rows = await tx.fetchall(_DEVICES_WITH_ROWS, (user_id, user_id))
            self.index.set_devices(user_id, (row[0] for row in rows), token)

    async def _adopt_orphans_every(self, interval: float) -> None:
        """Intents whose instance died: settled on their users' next requests here, as a
        restart does for SQLite."""
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(StoreUnavailable):
                async with self.db.reading() as tx:
                    found = await self._orphans(tx)
                for user_id, stream_id in found:
                    self.index.mark_orphaned(user_id, stream_id)

    async def note_nudge(self, user_id: str, device_id: str, seconds: float) -> None:
        self.index.mark_nudged(user_id, device_id, seconds)
        if self.db.shared:
            # Told before the nudge is sent, so that it is known wherever the device's
            # woken sync is answered. Lost with the database: that instance then lets a
            # harmless to-device message of the proxy's own through.
            with contextlib.suppress(StoreUnavailable):
                await self.db.announce_nudge(user_id, device_id, seconds)

    # --- deletes and revives --------------------------------------------------------------

    async def begin_delete(
        self,
        user_id: str,
        room_id: str | None,
        account_data_type: str,
        deleting_device: str | None,
        devices: Sequence[str],
    ) -> int:
        told = sorted({device for device in devices if device != deleting_device})
        async with self.db.transaction() as tx:
            # The index as it stands inside the transaction: a delete of another type of
            # this user may have written its rows while this one waited for the store.
            as_of, had_rows = self.index.plan(user_id)
            vanished = sorted(had_rows - set(devices))
            found = await tx.fetchone(
                "INSERT INTO account_data_tombstones"
                " (user_id, room_id, account_data_type, state, created_ts, instance)"
                " VALUES (?, ?, ?, 'pending', ?, ?) RETURNING stream_id",
                (user_id, room_id, account_data_type, _now_ms(), self.db.instance),
            )
            assert found is not None
            stream_id = int(found[0])
            await _run(tx, _insert_new_rows(stream_id, user_id, account_data_type, room_id, told))
            await _run(tx, _forget_devices(user_id, vanished))
            await self._refresh(tx, user_id, known=(had_rows - set(vanished)).union(told), as_of=as_of)
        return stream_id

    async def commit_delete(self, stream_id: int) -> None:
        # Not durable: the intent is. A commit lost with the power leaves it pending,
        # and it is settled from the homeserver's `{}` like any interrupted delete.
        async with self.db.transaction(durable=False) as tx:
            found = await tx.fetchone(_TO_COMMIT, (stream_id,))
            if found is None or found[3] != "pending":
                # Settled already (by a concurrent request, say): a second commit would
                # remove the delete itself as an "earlier" one of its type.
                return
            user_id, room_id, account_data_type, _, earlier, has_rows = found
            as_of, had_rows = self.index.plan(user_id)
            # The statements the query shows would change nothing are spared. No settled
            # delete of the type can appear after it: every write of a type holds the
            # type's lock (across instances, on a shared database).
            if earlier:
                key = (user_id, room_id, account_data_type)
                await _run(tx, _remove_tombstones(_SAME_TYPE + " AND state = 'done'", key))
            await tx.execute(
                "UPDATE account_data_tombstones SET state = 'done' WHERE stream_id = ?", (stream_id,)
            )
            # The rows can go, though, where another instance may acknowledge them
            # meanwhile (acknowledgements take no type lock).
            if not has_rows or self.db.shared:
                await _run(tx, _drop_if_seen([stream_id]))  # no other device to tell
            # Rows went only with an earlier tombstone: otherwise the devices are as they were.
            await self._refresh(tx, user_id, known=None if earlier else had_rows, as_of=as_of)
        self.index.forget_intent(user_id, stream_id)

    async def abort_delete(self, stream_id: int) -> None:
        async with self.db.transaction(durable=False) as tx:
            row = await self._tombstone(tx, stream_id)
            if row is None or row.state != "pending":
                return  # a committed delete is never undone by a late abort
            await _run(tx, _remove_tombstones("stream_id = ?", (stream_id,)))
            await self._refresh(tx, row.user_id)
        self.index.forget_intent(row.user_id, stream_id)

    async def echo_delete(
        self, user_id: str, room_id: str | None, account_data_type: str, device_id: str
    ) -> int:
        key = (user_id, room_id, account_data_type)
        async with self.db.transaction(durable=False) as tx:
            as_of, had_rows = self.index.plan(user_id)
            found = await tx.fetchone(
                f"SELECT stream_id FROM account_data_tombstones WHERE {_SAME_TYPE} AND state = 'done'", key
            )
            if found is None:
                found = await tx.fetchone(
                    "INSERT INTO account_data_tombstones"
                    " (user_id, room_id, account_data_type, state, created_ts)"
                    " VALUES (?, ?, ?, 'done', ?) RETURNING stream_id",
                    (*key, _now_ms()),
                )
                assert found is not None
            stream_id = int(found[0])
            await tx.execute(_INSERT_ROW, (stream_id, user_id, account_data_type, room_id, device_id))
            await self._refresh(tx, user_id, known=had_rows | {device_id}, as_of=as_of)
        return stream_id

    async def revive(self, user_id: str, room_id: str | None, account_data_type: str) -> None:
        async with self.db.transaction() as tx:
            await _run(
                tx,
                _remove_tombstones(_SAME_TYPE + " AND state = 'done'", (user_id, room_id, account_data_type)),
            )
            await self._refresh(tx, user_id)

    async def tombstone(self, stream_id: int) -> Tombstone | None:
        async with self.db.reading() as tx:
            return await self._tombstone(tx, stream_id)

    @staticmethod
    async def _tombstone(tx: Transaction, stream_id: int) -> Tombstone | None:
        row = await tx.fetchone(_TOMBSTONE + " WHERE stream_id = ?", (stream_id,))
        return Tombstone(*row) if row else None

    # --- what a device has to learn, and its proofs of receipt ------------------------------

    async def pending_for_device(self, user_id: str, device_id: str) -> list[PendingDelete]:
        if not self.has_pending(user_id, device_id):
            return []
        async with self.db.reading() as tx:
            rows = await tx.fetchall(
                "SELECT u.stream_id, u.room_id, u.account_data_type, t.state = 'done'"
                " FROM account_data_unsynced_deletes u"
                " JOIN account_data_tombstones t ON t.stream_id = u.stream_id"
                " WHERE u.user_id = ? AND u.device_id = ?"
                " ORDER BY u.stream_id",
                (user_id, device_id),
            )
        return [PendingDelete(s, room, kind, bool(settled)) for s, room, kind, settled in rows]

    async def record_delivery(
        self, user_id: str, device_id: str, next_batch: str, stream_ids: Iterable[int]
    ) -> None:
        # Only deletes the device still waits for: one revived or acknowledged since the
        # response was built has nothing left to acknowledge, and a record of it would
        # never be removed.
        rows = [(user_id, device_id, next_batch, s, user_id, device_id) for s in sorted(set(stream_ids))]
        if not rows:
            return
        async with self.db.transaction(durable=False) as tx:
            await tx.executemany(
                "INSERT INTO sync_deliveries (user_id, device_id, next_batch, stream_id)"
                " SELECT ?, ?, ?, stream_id FROM account_data_unsynced_deletes"
                " WHERE stream_id = ? AND user_id = ? AND device_id = ? ON CONFLICT DO NOTHING",
                rows,
            )

    async def acknowledge_since(self, user_id: str, device_id: str, since: str) -> int:
        if not self.has_pending(user_id, device_id):
            return 0
        delivered = (
            "SELECT stream_id FROM sync_deliveries WHERE user_id = ? AND device_id = ? AND next_batch = ?"
        )
        return await self._acknowledge(
            user_id,
            [
                (
                    f"user_id = ? AND device_id = ? AND stream_id IN ({delivered})",
                    (user_id, device_id, user_id, device_id, since),
                )
            ],
        )

    async def acknowledge_type(
        self, user_id: str, device_id: str, room_id: str | None, account_data_type: str
    ) -> int:
        if not self.has_pending(user_id, device_id):
            return 0
        return await self._acknowledge(
            user_id,
            [
                (
                    "device_id = ? AND " + _SAME_TYPE + " AND stream_id IN"
                    " (SELECT stream_id FROM account_data_tombstones WHERE state = 'done')",
                    (device_id, user_id, room_id, account_data_type),
                )
            ],
        )

    async def acknowledge_stream_ids(self, user_id: str, device_id: str, stream_ids: Sequence[int]) -> int:
        if not stream_ids or not self.has_pending(user_id, device_id):
            return 0
        ids = sorted(set(stream_ids))
        selections = []
        for start in range(0, len(ids), _IDS_PER_STATEMENT):
            chunk = ids[start : start + _IDS_PER_STATEMENT]
            marks = ", ".join("?" * len(chunk))
            where = f"user_id = ? AND device_id = ? AND stream_id IN ({marks})"
            selections.append((where, (user_id, device_id, *chunk)))
        return await self._acknowledge(user_id, selections)

    async def _acknowledge(self, user_id: str, selections: Sequence[Statement]) -> int:
        """Removes the rows each (WHERE clause, arguments) selects, in one transaction."""
        async with self.db.transaction(durable=False) as tx:
            gone = []
            for where, args in selections:
                gone += await tx.fetchall(
                    f"DELETE FROM account_data_unsynced_deletes WHERE {where} RETURNING stream_id, device_id",
                    args,
                )
            await tx.executemany(
                "DELETE FROM sync_deliveries WHERE user_id = ? AND device_id = ? AND stream_id = ?",
                [(user_id, device, stream_id) for stream_id, device in gone],
            )
            await _run(tx, _drop_if_seen(sorted({stream_id for stream_id, _ in gone})))
            await self._refresh(tx, user_id)
        return len(gone)

    # --- devices and accounts that are gone ---------------------------------------------------

    async def remove_devices(self, user_id: str, device_ids: Iterable[str]) -> None:
        statements = _forget_devices(user_id, sorted(set(device_ids)))
        if not statements:
            return
        async with self.db.transaction(durable=False) as tx:
            await _run(tx, statements)
            await self._refresh(tx, user_id)

    async def keep_only_devices(self, user_id: str, device_ids: Iterable[str]) -> None:
        await self.remove_devices(user_id, self.index.devices_of(user_id) - set(device_ids))

    async def remove_all_devices(self, user_id: str) -> None:
        async with self.db.transaction(durable=False) as tx:
            await tx.execute("DELETE FROM sync_deliveries WHERE user_id = ?", (user_id,))
            await tx.execute("DELETE FROM account_data_unsynced_deletes WHERE user_id = ?", (user_id,))
            await _run(tx, [_drop_seen_tombstones(user_id)])
            await self._refresh(tx, user_id)

    # --- inspection -----------------------------------------------------------------------------

    async def counts(self) -> tuple[int, int]:
        async with self.db.reading() as tx:
            return await inspection.counts(tx)

    async def unsynced_rows(self, user_id: str | None = None) -> list[UnsyncedRow]:
        async with self.db.reading() as tx:
            return await inspection.unsynced_rows(tx, user_id)

    async def tombstones(self, user_id: str | None = None) -> list[Tombstone]:
        async with self.db.reading() as tx:
            return await inspection.tombstones(tx, user_id)

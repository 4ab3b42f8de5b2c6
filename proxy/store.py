"""The proxy's own SQLite file: tombstones and per-device deletion state.

Tables (see `MIGRATIONS`):
- `account_data_tombstones`: one row per delete; its `stream_id` is unique across
  global and room account data. `state` is 'pending' while the homeserver write is
  under way (an intent: one a crash leaves behind is settled on its user's next
  request, see `account_data.settle`) and 'done' after.
- `account_data_unsynced_deletes`: the design brief's table, one row per device that
  has not yet seen a delete. The brief's foreign keys point at homeserver tables that
  this file does not have, so they are omitted.
- `sync_deliveries`: which deletes a `/sync` response carried to a device, keyed by
  that response's `next_batch`, so that a later request with `since=next_batch`
  proves receipt.

All access goes through one connection, one transaction at a time (`_locked`,
`_transaction`). An in-memory index of which devices have rows lets `/sync` for
everyone else skip the database. A failing database (full or read-only disk, a lock
held elsewhere, corruption) raises `StoreUnavailable`, is logged once per burst, and
the next operation simply tries again: the store recovers when the fault clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from .errors import StoreUnavailable

log = logging.getLogger(__name__)


class StoreError(Exception):
    """The store cannot be opened (unreadable, newer schema, ...); one line for the operator."""


# Each entry (a tuple of statements) moves the schema from version N-1 to N (N = position
# + 1); applied in order, one transaction each, and recorded in `PRAGMA user_version`.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE account_data_tombstones (
            -- AUTOINCREMENT: a stream_id is never reused, so a stale delivery record
            -- can never acknowledge a newer delete.
            stream_id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id TEXT NOT NULL,
            room_id TEXT,
            account_data_type TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
            created_ts INTEGER NOT NULL
        )
        """,
        # At most one settled tombstone per type; a pending one may stand beside it
        # until its homeserver write succeeds.
        """
        CREATE UNIQUE INDEX account_data_tombstones_done
            ON account_data_tombstones(user_id, COALESCE(room_id, ''), account_data_type)
            WHERE state = 'done'
        """,
        """
        CREATE TABLE account_data_unsynced_deletes (
            -- The stream_id of the delete: unique across global and room account data.
            stream_id BIGINT NOT NULL,
            user_id TEXT NOT NULL,
            account_data_type TEXT NOT NULL,
            -- The room ID if this is room account data.
            room_id TEXT,
            -- A device that has not yet seen this delete.
            device_id TEXT NOT NULL
        )
        """,
        """
        CREATE UNIQUE INDEX account_data_unsynced_deletes_stream_id_user_id_device_id
            ON account_data_unsynced_deletes(stream_id, user_id, device_id)
        """,
        """
        CREATE INDEX account_data_unsynced_deletes_user_id_device_id
            ON account_data_unsynced_deletes(user_id, device_id)
        """,
        """
        CREATE TABLE sync_deliveries (
            user_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            next_batch TEXT NOT NULL,
            stream_id INTEGER NOT NULL,
            PRIMARY KEY (user_id, device_id, next_batch, stream_id)
        ) WITHOUT ROWID
        """,
    ),
    (
        # Commit, abort and revive remove deliveries by stream_id: without this index,
        # each of them scanned the whole table.
        "CREATE INDEX sync_deliveries_stream_id ON sync_deliveries(stream_id)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class PendingDelete:
    """A delete one device has not seen yet."""

    stream_id: int
    room_id: str | None
    account_data_type: str
    # False while its homeserver write is under way: such a delete is never injected,
    # but a body that carries it (the homeserver's own `{}`) still delivers it.
    settled: bool = True


@dataclass(frozen=True)
class UnsyncedRow:
    stream_id: int
    user_id: str
    account_data_type: str
    room_id: str | None
    device_id: str


@dataclass(frozen=True)
class Tombstone:
    stream_id: int
    user_id: str
    room_id: str | None
    account_data_type: str
    state: str


# A burst of store errors is logged once, then again at most this often.
FAULT_LOG_INTERVAL = 60.0


# The SQLite driver logs every statement with its parameters at DEBUG: user IDs and
# account data types. The proxy's DEBUG log must not carry them.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

# SQLite's words for a file whose pages are not a database (any more): after the file
# is restored, a new connection reads it afresh, the old one would keep its bad pages.
_CORRUPTION = ("malformed", "not a database")


class Store:
    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        # One process per store file (see `open`): held for the process's life.
        self._process_lock: int | None = None
        # (st_dev, st_ino) of the file the connection has open.
        self._identity: tuple[int, int] | None = None
        self._reopen = False
        # user_id -> devices that have at least one row (of any tombstone state).
        self._devices_with_rows: dict[str, set[str]] = {}
        # user_id -> stream_ids of deletes whose outcome is unknown (left 'pending' by an
        # earlier process, or by a homeserver write that could not be settled).
        self._orphaned_intents: dict[str, list[int]] = {}
        self._faults = 0
        self._fault_logged_at = 0.0
        self._last_fault = ""

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        """Open (and create or migrate) the store. `exclusive`: this process serves from
        it, and no other may: a second proxy on the same file would miss the first one's
        changes in its in-memory indexes. (`inspect` only reads, beside a running proxy.)"""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if exclusive:
                self._take_process_lock()
            await self._connect()
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise StoreError(f"cannot open the store {self.path}: {e}") from None
        except BaseException:
            await self.close()
            raise

    def _take_process_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"the store {self.path} is in use by another msc3391-proxy process"
                " (one process per SQLite store; several instances need a PostgreSQL store)"
            ) from None
        self._process_lock = fd

    async def _connect(self) -> None:
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        stat = os.stat(self.path)
        self._identity = (stat.st_dev, stat.st_ino)
        await self._db.execute("PRAGMA journal_mode = WAL")
        # FULL: a delete acknowledged with 200 survives a power cut, not just a crash.
        await self._db.execute("PRAGMA synchronous = FULL")
        # A lock held elsewhere (a backup, the inspect command) is waited for this
        # long; then the operation fails with StoreUnavailable.
        await self._db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        await self._migrate()
        await self._load_indexes()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._process_lock is not None:
            os.close(self._process_lock)
            self._process_lock = None

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "Store.open() was not awaited"
        return self._db

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any failure (caller holds the lock).

        The ROLLBACK is sent whatever `in_transaction` says: a request cancelled while
        its BEGIN waits in aiosqlite's queue gets CancelledError before the BEGIN has
        run, and the BEGIN runs anyway. Statements run in order, so the ROLLBACK always
        comes after it; without one the connection would stay inside a transaction and
        every later write would fail."""
        try:
            await self.db.execute("BEGIN IMMEDIATE")
            yield
            await self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # "no transaction is active" is fine
                await self.db.execute("ROLLBACK")
            raise

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Exclusive use of the connection; database errors become `StoreUnavailable`."""
        async with self._lock:
            try:
                await self._check_file()
                yield
            except sqlite3.Error as e:
                if isinstance(e, sqlite3.DatabaseError) and any(w in str(e) for w in _CORRUPTION):
                    self._reopen = True
                self._fault(str(e))
                raise StoreUnavailable(e) from None
            except StoreUnavailable as e:
                self._fault(e.cause)
                raise
            if self._faults:
                log.warning("store recovered after %d failed operation(s)", self._faults)
                self._faults = 0

    async def _check_file(self) -> None:
        """The connection must still be on the file at `path`: writes to a file deleted
        under the running proxy would answer 200 and be gone after a restart. A file
        put in its place (a restored backup) is opened afresh, as is a file that read
        as corrupt."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise StoreUnavailable(f"the store file {self.path} was removed") from None
        if not os.access(self.path, os.R_OK | os.W_OK):
            raise StoreUnavailable(f"the store file {self.path} is not writable")
        replaced = (stat.st_dev, stat.st_ino) != self._identity
        if self._reopen or replaced:
            log.warning("store %s: reopening the file", self.path)
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    if replaced:
                        # The `-wal` file beside the path is still the old file's: empty it
                        # into the old file first, or SQLite would replay it into the new one.
                        await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    await self._db.close()
                self._db = None
            self._reopen = True  # until a connection is open again
            try:
                await self._connect()
            except StoreError as e:
                raise StoreUnavailable(str(e)) from None
            self._reopen = False

    def problem(self) -> str | None:
        """Why the store cannot be used now, or None (for /health): the last operation
        failed, or the file is gone."""
        if not self.path.exists():
            return f"the store file {self.path} was removed"
        return self._last_fault if self._faults else None

    def _fault(self, error: str) -> None:
        self._faults += 1
        self._last_fault = error
        now = time.monotonic()
        if self._faults == 1 or now - self._fault_logged_at >= FAULT_LOG_INTERVAL:
            log.error("store %s failing: %s (%d failed operation(s) so far)", self.path, error, self._faults)
            self._fault_logged_at = now

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.path} has schema version {version}, newer than this "
                f"proxy's {SCHEMA_VERSION}; upgrade the proxy or point it at another file"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            async with self._transaction():
                for statement in MIGRATIONS[number - 1]:
                    await self.db.execute(statement)
                await self.db.execute(f"PRAGMA user_version = {number}")
            log.info("store schema migrated to version %d", number)

    async def _load_indexes(self) -> None:
        self._devices_with_rows.clear()
        async with self.db.execute(
            "SELECT DISTINCT user_id, device_id FROM account_data_unsynced_deletes"
        ) as cur:
            async for user_id, device_id in cur:
                self._devices_with_rows.setdefault(user_id, set()).add(device_id)
        self._orphaned_intents.clear()
        async with self.db.execute(
            "SELECT user_id, stream_id FROM account_data_tombstones WHERE state = 'pending'"
        ) as cur:
            async for user_id, stream_id in cur:
                self._orphaned_intents.setdefault(user_id, []).append(stream_id)
        if self._orphaned_intents:
            count = sum(map(len, self._orphaned_intents.values()))
            log.warning("%d interrupted deletes will be settled on their users' next requests", count)

    async def _execute_all(self, statements: Iterable[tuple[str, Sequence[object]]]) -> None:
        for sql, args in statements:
            await self.db.execute(sql, args)

    async def _refresh_user(self, user_id: str) -> None:
        async with self.db.execute(
            "SELECT DISTINCT device_id FROM account_data_unsynced_deletes WHERE user_id = ?",
            (user_id,),
        ) as cur:
            devices = {row[0] async for row in cur}
        if devices:
            self._devices_with_rows[user_id] = devices
        else:
            self._devices_with_rows.pop(user_id, None)

    # --- fast, in-memory questions -----------------------------------------------------

    def has_pending(self, user_id: str, device_id: str | None) -> bool:
        """Whether this device has any row; answered without touching the database."""
        devices = self._devices_with_rows.get(user_id)
        return devices is not None and device_id in devices

    def devices_pending(self) -> int:
        """How many devices have something to learn (for the metrics)."""
        return sum(map(len, self._devices_with_rows.values()))

    def has_rows(self, user_id: str) -> bool:
        return user_id in self._devices_with_rows

    def orphaned_intents(self, user_id: str) -> list[int]:
        return list(self._orphaned_intents.get(user_id, ()))

    def mark_orphaned(self, user_id: str, stream_id: int) -> None:
        """A delete whose outcome is unknown: settle it on the user's next request."""
        intents = self._orphaned_intents.setdefault(user_id, [])
        if stream_id not in intents:
            intents.append(stream_id)

    def _forget_intent(self, user_id: str, stream_id: int) -> None:
        intents = self._orphaned_intents.get(user_id)
        if intents and stream_id in intents:
            intents.remove(stream_id)
            if not intents:
                del self._orphaned_intents[user_id]

    # --- deletes -----------------------------------------------------------------------

    async def begin_delete(
        self,
        user_id: str,
        room_id: str | None,
        account_data_type: str,
        deleting_device: str | None,
        devices: Sequence[str],
    ) -> int:
        """Record the intent to delete, with a row for every device but the deleting one.

        `devices` is the account's current device list from the homeserver: rows of
        devices no longer in it are dropped at the same time.
        """
        async with self._locked():
            vanished = sorted(self._devices_with_rows.get(user_id, set()) - set(devices))
            async with self._transaction():
                cur = await self.db.execute(
                    "INSERT INTO account_data_tombstones"
                    " (user_id, room_id, account_data_type, state, created_ts)"
                    " VALUES (?, ?, ?, 'pending', ?)",
                    (user_id, room_id, account_data_type, int(time.time() * 1000)),
                )
                stream_id = cur.lastrowid
                assert stream_id is not None
                await self.db.executemany(
                    "INSERT INTO account_data_unsynced_deletes"
                    " (stream_id, user_id, account_data_type, room_id, device_id)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [
                        (stream_id, user_id, account_data_type, room_id, device)
                        for device in sorted(set(devices))
                        if device != deleting_device
                    ],
                )
                await self._execute_all(self._device_rows_sql(user_id, vanished))
            await self._refresh_user(user_id)
            return stream_id

    async def echo_delete(
        self, user_id: str, room_id: str | None, account_data_type: str, device_id: str
    ) -> int:
        """A delete that changed nothing (the type was never set, or is deleted already)
        must still reach the device that asked, once: a row for it, on the type's
        settled tombstone if there is one (its other rows stay as they are), else on a
        new one. Returns the tombstone's stream_id."""
        async with self._locked():
            async with self._transaction():
                async with self.db.execute(
                    "SELECT stream_id FROM account_data_tombstones WHERE user_id = ?"
                    " AND COALESCE(room_id, '') = COALESCE(?, '') AND account_data_type = ?"
                    " AND state = 'done'",
                    (user_id, room_id, account_data_type),
                ) as cur:
                    found = await cur.fetchone()
                if found is not None:
                    stream_id = found[0]
                else:
                    cur = await self.db.execute(
                        "INSERT INTO account_data_tombstones"
                        " (user_id, room_id, account_data_type, state, created_ts)"
                        " VALUES (?, ?, ?, 'done', ?)",
                        (user_id, room_id, account_data_type, int(time.time() * 1000)),
                    )
                    stream_id = cur.lastrowid
                    assert stream_id is not None
                await self.db.execute(
                    "INSERT OR IGNORE INTO account_data_unsynced_deletes"
                    " (stream_id, user_id, account_data_type, room_id, device_id)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (stream_id, user_id, account_data_type, room_id, device_id),
                )
            await self._refresh_user(user_id)
            return stream_id

    async def commit_delete(self, stream_id: int) -> None:
        """The homeserver holds the delete: it replaces any earlier delete of the type."""
        async with self._locked():
            row = await self._tombstone_row(stream_id)
            if row is None or row.state != "pending":
                # Settled already (by a concurrent request, say): a second commit would
                # remove the delete itself as an "earlier" one of its type.
                return
            async with self._transaction():
                await self._execute_all(
                    [
                        *self._remove_tombstones_sql(
                            "user_id = ? AND COALESCE(room_id, '') = COALESCE(?, '')"
                            " AND account_data_type = ? AND state = 'done'",
                            (row.user_id, row.room_id, row.account_data_type),
                        ),
                        (
                            "UPDATE account_data_tombstones SET state = 'done' WHERE stream_id = ?",
                            (stream_id,),
                        ),
                        *self._settled_tombstones_sql(row.user_id),
                    ]
                )
            self._forget_intent(row.user_id, stream_id)
            await self._refresh_user(row.user_id)

    async def abort_delete(self, stream_id: int) -> None:
        """The homeserver refused or never got the delete: leave no trace of it."""
        async with self._locked():
            row = await self._tombstone_row(stream_id)
            if row is None or row.state != "pending":
                return  # a committed delete is never undone by a late abort
            async with self._transaction():
                await self._execute_all(self._remove_tombstones_sql("stream_id = ?", (stream_id,)))
            self._forget_intent(row.user_id, stream_id)
            await self._refresh_user(row.user_id)

    async def revive(self, user_id: str, room_id: str | None, account_data_type: str) -> None:
        """The type has content again: its tombstones and rows go."""
        async with self._locked():
            async with self._transaction():
                await self._execute_all(
                    self._remove_tombstones_sql(
                        "user_id = ? AND COALESCE(room_id, '') = COALESCE(?, '')"
                        " AND account_data_type = ? AND state = 'done'",
                        (user_id, room_id, account_data_type),
                    )
                )
            await self._refresh_user(user_id)

    async def tombstone(self, stream_id: int) -> Tombstone | None:
        async with self._locked():
            return await self._tombstone_row(stream_id)

    async def _tombstone_row(self, stream_id: int) -> Tombstone | None:
        async with self.db.execute(
            "SELECT stream_id, user_id, room_id, account_data_type, state"
            " FROM account_data_tombstones WHERE stream_id = ?",
            (stream_id,),
        ) as cur:
            row = await cur.fetchone()
        return Tombstone(*row) if row else None

    @staticmethod
    def _remove_tombstones_sql(where: str, args: Sequence[object]) -> list[tuple[str, Sequence[object]]]:
        selected = f"SELECT stream_id FROM account_data_tombstones WHERE {where}"
        return [
            (f"DELETE FROM sync_deliveries WHERE stream_id IN ({selected})", args),
            (f"DELETE FROM account_data_unsynced_deletes WHERE stream_id IN ({selected})", args),
            (f"DELETE FROM account_data_tombstones WHERE {where}", args),
        ]

    @staticmethod
    def _settled_tombstones_sql(user_id: str) -> list[tuple[str, Sequence[object]]]:
        """A settled delete that every device has seen needs no tombstone."""
        return [
            (
                "DELETE FROM account_data_tombstones WHERE user_id = ? AND state = 'done'"
                " AND NOT EXISTS (SELECT 1 FROM account_data_unsynced_deletes u"
                " WHERE u.stream_id = account_data_tombstones.stream_id)",
                (user_id,),
            )
        ]

    @classmethod
    def _device_rows_sql(cls, user_id: str, device_ids: Iterable[str]) -> list[tuple[str, Sequence[object]]]:
        """Statements that forget these devices (and tombstones nobody waits on any more)."""
        statements: list[tuple[str, Sequence[object]]] = []
        for device in device_ids:
            statements += [
                ("DELETE FROM sync_deliveries WHERE user_id = ? AND device_id = ?", (user_id, device)),
                (
                    "DELETE FROM account_data_unsynced_deletes WHERE user_id = ? AND device_id = ?",
                    (user_id, device),
                ),
            ]
        return [*statements, *cls._settled_tombstones_sql(user_id)] if statements else []

    # --- what a device has to learn ----------------------------------------------------

    async def pending_for_device(self, user_id: str, device_id: str) -> list[PendingDelete]:
        """Deletes this device has not seen, oldest first, settled or under way."""
        if not self.has_pending(user_id, device_id):
            return []
        async with (
            self._locked(),
            self.db.execute(
                "SELECT u.stream_id, u.room_id, u.account_data_type, t.state = 'done'"
                " FROM account_data_unsynced_deletes u"
                " JOIN account_data_tombstones t ON t.stream_id = u.stream_id"
                " WHERE u.user_id = ? AND u.device_id = ?"
                " ORDER BY u.stream_id",
                (user_id, device_id),
            ) as cur,
        ):
            return [PendingDelete(s, room, kind, bool(settled)) async for s, room, kind, settled in cur]

    async def record_delivery(
        self, user_id: str, device_id: str, next_batch: str, stream_ids: Iterable[int]
    ) -> None:
        """A response with this `next_batch` carried these deletes to the device.

        Only deletes the device still waits for are recorded: one revived or acknowledged
        since the response was built (a concurrent PUT, another request of the device)
        has nothing left to acknowledge, and a record of it would never be removed."""
        rows = [(user_id, device_id, next_batch, s, user_id, device_id) for s in sorted(set(stream_ids))]
        if not rows:
            return
        async with self._locked(), self._transaction():
            await self.db.executemany(
                "INSERT OR IGNORE INTO sync_deliveries (user_id, device_id, next_batch, stream_id)"
                " SELECT ?, ?, ?, stream_id FROM account_data_unsynced_deletes"
                " WHERE stream_id = ? AND user_id = ? AND device_id = ?",
                rows,
            )

    async def acknowledge_since(self, user_id: str, device_id: str, since: str) -> int:
        """The device asks for what follows `since`: it holds that response, so every
        delete the response carried is seen. Returns how many rows went."""
        if not self.has_pending(user_id, device_id):
            return 0
        delivered = (
            "SELECT stream_id FROM sync_deliveries WHERE user_id = ? AND device_id = ? AND next_batch = ?"
        )
        return await self._acknowledge(
            user_id,
            f"user_id = ? AND device_id = ? AND stream_id IN ({delivered})",
            (user_id, device_id, user_id, device_id, since),
        )

    async def acknowledge_type(
        self, user_id: str, device_id: str, room_id: str | None, account_data_type: str
    ) -> int:
        """The device was told the type is gone (its GET answered 404)."""
        if not self.has_pending(user_id, device_id):
            return 0
        return await self._acknowledge(
            user_id,
            "user_id = ? AND device_id = ? AND COALESCE(room_id, '') = COALESCE(?, '')"
            " AND account_data_type = ? AND stream_id IN"
            " (SELECT stream_id FROM account_data_tombstones WHERE state = 'done')",
            (user_id, device_id, room_id, account_data_type),
        )

    async def acknowledge_stream_ids(self, user_id: str, device_id: str, stream_ids: Sequence[int]) -> int:
        """These deletes need not reach the device any more (they cannot)."""
        if not stream_ids or not self.has_pending(user_id, device_id):
            return 0
        marks = ", ".join("?" * len(stream_ids))
        return await self._acknowledge(
            user_id,
            f"user_id = ? AND device_id = ? AND stream_id IN ({marks})",
            (user_id, device_id, *stream_ids),
        )

    async def _acknowledge(self, user_id: str, where: str, args: Sequence[object]) -> int:
        async with self._locked():
            async with self._transaction():
                cur = await self.db.execute(
                    f"DELETE FROM account_data_unsynced_deletes WHERE {where} RETURNING stream_id, device_id",
                    args,
                )
                gone = await cur.fetchall()
                await cur.close()
                await self.db.executemany(
                    "DELETE FROM sync_deliveries WHERE user_id = ? AND device_id = ? AND stream_id = ?",
                    [(user_id, device, stream_id) for stream_id, device in gone],
                )
                await self._execute_all(self._settled_tombstones_sql(user_id))
            await self._refresh_user(user_id)
            return len(gone)

    # --- devices and accounts ----------------------------------------------------------

    async def remove_devices(self, user_id: str, device_ids: Iterable[str]) -> None:
        """These devices are gone: they have nothing left to learn."""
        statements = self._device_rows_sql(user_id, sorted(set(device_ids)))
        if not statements:
            return
        async with self._locked():
            async with self._transaction():
                await self._execute_all(statements)
            await self._refresh_user(user_id)

    async def keep_only_devices(self, user_id: str, device_ids: Iterable[str]) -> None:
        """The homeserver lists exactly these devices: any other device with rows is gone
        (removed through an admin API, say)."""
        vanished = self._devices_with_rows.get(user_id, set()) - set(device_ids)
        await self.remove_devices(user_id, vanished)

    async def remove_all_devices(self, user_id: str) -> None:
        """Every device of the account is gone (logout/all, deactivation)."""
        async with self._locked():
            async with self._transaction():
                await self._execute_all(
                    [
                        ("DELETE FROM sync_deliveries WHERE user_id = ?", (user_id,)),
                        ("DELETE FROM account_data_unsynced_deletes WHERE user_id = ?", (user_id,)),
                        *self._settled_tombstones_sql(user_id),
                    ]
                )
            await self._refresh_user(user_id)

    # --- inspection (tests, the inspect command, metrics) -------------------------------

    async def counts(self) -> tuple[int, int]:
        """(rows in account_data_unsynced_deletes, tombstones)."""
        async with (
            self._locked(),
            self.db.execute(
                "SELECT (SELECT COUNT(*) FROM account_data_unsynced_deletes),"
                " (SELECT COUNT(*) FROM account_data_tombstones)"
            ) as cur,
        ):
            row = await cur.fetchone()
        assert row is not None
        return row[0], row[1]

    async def unsynced_rows(self, user_id: str | None = None) -> list[UnsyncedRow]:
        sql = (
            "SELECT stream_id, user_id, account_data_type, room_id, device_id"
            " FROM account_data_unsynced_deletes"
        )
        args: tuple[object, ...] = ()
        if user_id is not None:
            sql += " WHERE user_id = ?"
            args = (user_id,)
        async with self._locked(), self.db.execute(sql + " ORDER BY stream_id, device_id", args) as cur:
            return [UnsyncedRow(*row) async for row in cur]

    async def tombstones(self, user_id: str | None = None) -> list[Tombstone]:
        sql = "SELECT stream_id, user_id, room_id, account_data_type, state FROM account_data_tombstones"
        args: tuple[object, ...] = ()
        if user_id is not None:
            sql += " WHERE user_id = ?"
            args = (user_id,)
        async with self._locked(), self.db.execute(sql + " ORDER BY stream_id", args) as cur:
            return [Tombstone(*row) async for row in cur]

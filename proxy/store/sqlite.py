"""The SQLite database behind the store: its file, its one connection, its transactions.

All access goes through one aiosqlite connection, one transaction at a time. A failing
database (full or read-only disk, a lock held elsewhere, corruption, the file removed)
raises `StoreUnavailable`, is logged once per burst, and the next operation simply
tries again: the store recovers when the fault clears. The file is checked before
every operation: a file removed under the running proxy is refused (writes to it would
be gone after a restart), a file put in its place (a restored backup) and a file that
read as corrupt are opened afresh. One process per file: a second proxy on the same
store would not see the first one's changes in its in-memory index.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import StoreUnavailable
from ..locks import KeyedLocks
from .faults import FaultLog
from .model import StoreError
from .schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger("proxy.store")

# The SQLite driver logs every statement with its parameters at DEBUG: user IDs and
# account data types. The proxy's DEBUG log must not carry them.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

# SQLite's words for a file whose pages are not a database (any more): after the file
# is restored, a new connection reads it afresh, the old one would keep its bad pages.
_CORRUPTION = ("malformed", "not a database")

Row = tuple[Any, ...]


class Transaction:
    """Statements on the store's connection, inside `SqliteDatabase.transaction()`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, args: Sequence[object] = ()) -> None:
        await self._db.execute(sql, args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self._db.executemany(sql, rows)

    # One trip to the connection's thread per statement (a cursor's execute, fetch and
    # close would be three): the trips, not the statements, are most of a write's time.
    async def fetchall(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return [tuple(row) for row in await self._db.execute_fetchall(sql, args)]

    async def fetchone(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        rows = await self._db.execute_fetchall(sql, args)
        return tuple(rows[0]) if rows else None

    async def announce(self, user_id: str) -> None:
        """Nobody else uses the file: there is no other instance to tell."""


class SqliteDatabase:
    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._process_lock: int | None = None  # held for the process's life
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._reopen = False
        self._synchronous = "FULL"
        self.faults = FaultLog(str(path))
        # One process per file: writes of one type are serialised in it.
        self.shared = False
        self.instance = secrets.token_hex(8)
        self.type_locks = KeyedLocks()
        # Called (inside the lock) after the file was opened afresh: the in-memory index
        # the store keeps must be read again from it.
        self.on_reopen: Callable[[Transaction], Awaitable[None]] | None = None
        # Never called: no other instance shares the file.
        self.on_change: Callable[[str], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_resync: Callable[[], Awaitable[None]] | None = None
        self.on_nudge: Callable[[str, str, float], None] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        """Open (and create or migrate) the database. `exclusive`: this process serves
        from it, and no other may. (`inspect` only reads, beside a running proxy.)"""
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
        # FULL for the durable transactions (see `transaction`), NORMAL for the others.
        await self._db.execute("PRAGMA synchronous = FULL")
        self._synchronous = "FULL"
        # A lock held elsewhere (a backup, the inspect command) is waited for this
        # long; then the operation fails with StoreUnavailable.
        await self._db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        await self._migrate()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._process_lock is not None:
            os.close(self._process_lock)
            self._process_lock = None

    @property
    def connection(self) -> aiosqlite.Connection:
        assert self._db is not None, "SqliteDatabase.open() was not awaited"
        return self._db

    async def _migrate(self) -> None:
        async with self.connection.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.path} has schema version {version}, newer than this "
                f"proxy's {SCHEMA_VERSION}; upgrade the proxy or point it at another file"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            async with self._begin() as tx:
                for statement in MIGRATIONS[number - 1]:
                    await tx.execute(statement)
                await tx.execute(f"PRAGMA user_version = {number}")
            log.info("store schema migrated to version %d", number)

    # --- use ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[Transaction]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT), the connection to itself.

        `durable`: on disk when it returns, power cut or not (synchronous=FULL: the WAL
        is synced at COMMIT). Otherwise it survives a crash of the process but may be
        lost with the machine's power (NORMAL), unless a durable transaction follows:
        the WAL is synced in order, so a later durable commit makes it durable too."""
        async with self._locked():
            wanted = "FULL" if durable else "NORMAL"
            setting = None
            if self._synchronous != wanted:
                setting = f"PRAGMA synchronous = {wanted}"
                self._synchronous = "unknown"  # until it is known to have run
            async with self._begin(setting) as tx:
                self._synchronous = wanted
                yield tx

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Transaction]:
        """Reads, the connection to itself (WAL: they never wait for another process)."""
        async with self._locked():
            yield Transaction(self.connection)

    async def alive(self, tx: Transaction, instance: str | None) -> bool:
        """One process per file: an intent begun by another process was left by it."""
        return False

    async def announce_nudge(self, user_id: str, device_id: str, seconds: float) -> None:
        """Nobody else uses the file: there is no other instance to tell."""

    def problem(self) -> str | None:
        """Why the database cannot be used now, or None: the last operation failed, or
        the file is gone."""
        if not self.path.exists():
            return f"the store file {self.path} was removed"
        return self.faults.last if self.faults.failing else None

    @contextlib.asynccontextmanager
    async def _begin(self, setting: str | None = None) -> AsyncIterator[Transaction]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any failure (caller holds the lock).
        `setting`: a PRAGMA to run first, in the same trip to the connection's thread (a
        delete's durable intent and its commit alternate `synchronous`: the trips, not
        the statements, are most of a write's time).

        The ROLLBACK is sent whatever `in_transaction` says: a request cancelled while
        its BEGIN waits in aiosqlite's queue gets CancelledError before the BEGIN has
        run, and the BEGIN runs anyway. Statements run in order, so the ROLLBACK always
        comes after it; without one the connection would stay inside a transaction and
        every later write would fail."""
        db = self.connection
        try:
            if setting is None:
                await db.execute("BEGIN IMMEDIATE")
            else:
                await db.executescript(f"{setting}; BEGIN IMMEDIATE")
            yield Transaction(db)
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # "no transaction is active" is fine
                await db.execute("ROLLBACK")
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
                self.faults.fault(str(e))
                raise StoreUnavailable(e) from None
            except StoreUnavailable as e:
                self.faults.fault(e.cause)
                raise
            self.faults.success()

    async def _check_file(self) -> None:
        """The connection must still be on the file at `path` (see the module's text)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise StoreUnavailable(f"the store file {self.path} was removed") from None
        if not os.access(self.path, os.R_OK | os.W_OK):
            raise StoreUnavailable(f"the store file {self.path} is not writable")
        replaced = (stat.st_dev, stat.st_ino) != self._identity
        if self._reopen or replaced:
            await self._open_afresh(replaced)

    async def _open_afresh(self, replaced: bool) -> None:
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
        if self.on_reopen is not None:
            await self.on_reopen(Transaction(self.connection))

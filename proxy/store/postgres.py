"""The PostgreSQL database behind the store, shared by several proxy instances.

The same operations as on SQLite (`operations.py`) run here through an asyncpg pool, with
the SQL's `?` placeholders numbered for PostgreSQL. What one instance alone got from its
own memory, several must get from the database:

- every write announces the users it changed (`NOTIFY`, sent at commit); every instance
  `LISTEN`s, and marks those users stale in its in-memory index until it has read their
  rows again, so a stale "nothing pending" can never skip an injection. If the listening
  connection is lost, every user is stale (the database is asked every time) until it
  listens again and has reloaded the index;
- writes of one `(user, room, type)` hold an advisory lock across the homeserver write
  (`PostgresTypeLocks`), so the store follows the order in which the homeserver accepted
  them whichever instance served each;
- an intent left pending by an instance that died is adopted by the others once it is
  older than any delete can take (`operations.ORPHAN_AFTER`).

A database that is down or restarting fails operations with `StoreUnavailable`, like a
failing SQLite file; the pool opens new connections by itself when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any

import asyncpg

from ..config import PostgresURL
from ..errors import StoreUnavailable
from ..locks import KeyedLocks
from .faults import FaultLog
from .model import StoreConfigError, StoreError
from .schema_postgres import MIGRATION_LOCK, MIGRATIONS, SCHEMA_VERSION, VERSION_TABLE

log = logging.getLogger("proxy.store")

CHANNEL = "msc3391_proxy_changes"
# How often the listening connection is checked: a silently dead one must not leave the
# index trusted for long.
LISTENER_CHECK = 5.0
LISTENER_RETRY = 2.0

# What a failing database raises through asyncpg, the network, or a timeout.
_FAULTS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)

Row = tuple[Any, ...]
_PLACEHOLDER = re.compile(r"\?")
_numbered: dict[str, str] = {}


def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...` (the store's SQL has no `?` in a
    string literal)."""
    found = _numbered.get(sql)
    if found is None:
        counter = iter(range(1, 10_000))
        found = _numbered[sql] = _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)
    return found


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _literal(text: str) -> str:
    """`text` as a string constant, read the same whatever `standard_conforming_strings` says."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresTransaction:
    def __init__(self, conn: asyncpg.Connection, instance: str) -> None:
        self._conn = conn
        self._instance = instance
        self._announced: list[str] = []

    async def execute(self, sql: str, args: Sequence[object] = ()) -> None:
        await self._conn.execute(numbered(sql), *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        rows = list(rows)
        if rows:
            await self._conn.executemany(numbered(sql), rows)

    async def fetchall(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return [tuple(row) for row in await self._conn.fetch(numbered(sql), *args)]

    async def fetchone(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        row = await self._conn.fetchrow(numbered(sql), *args)
        return tuple(row) if row is not None else None

    async def announce(self, user_id: str) -> None:
        """Tell the other instances that this user's rows change (sent at commit)."""
        if user_id not in self._announced:
            self._announced.append(user_id)

    def commit(self) -> str:
        """COMMIT, after the announcements: one simple query (no parameters) may hold
        several statements, so they take one round trip."""
        notices = [f"NOTIFY {CHANNEL}, {_literal(json.dumps([self._instance, u]))}" for u in self._announced]
        return "; ".join([*notices, "COMMIT"])


class PostgresDatabase:
    def __init__(self, url: PostgresURL, *, pool_size: int, connect_timeout: float, command_timeout: float):
        self.url = url
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._locks_pool: asyncpg.Pool | None = None
        # Told apart from the other instances in announcements: a change of one's own is
        # in the index already.
        self.instance = secrets.token_hex(8)
        self.faults = FaultLog(str(url))
        self.shared = True
        self.type_locks = PostgresTypeLocks(self)
        # Set by the store: a user another instance changed; all users (after the listening
        # connection was lost and is back: read the index again); unused on PostgreSQL.
        self.on_change: Callable[[str], None] | None = None
        self.on_resync: Callable[[], Awaitable[None]] | None = None
        self.on_reopen: Callable[[Any], Awaitable[None]] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_nudge: Callable[[str, str, float], None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._listening = asyncio.Event()

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        """Connect, migrate, and (serving, not inspecting) listen for other instances."""
        try:
            self._pool = await self._create_pool(self._pool_size)
            await self._migrate()
            if exclusive:
                self._locks_pool = await self._create_pool(self._pool_size)
        except StoreError:
            await self.close()
            raise
        except _FAULTS as e:
            await self.close()
            raise StoreConfigError(f"store.url: cannot use {self.url}: {_reason(e)}") from None
        if exclusive:
            self._listener = asyncio.ensure_future(self._listen())
            # Serving only once listening: an index loaded before would miss changes.
            await asyncio.wait_for(self._listening.wait(), self._connect_timeout)

    async def _create_pool(self, size: int) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            dsn=self.url.dsn,
            min_size=1,
            max_size=size,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            # What an operator sees in pg_stat_activity.
            server_settings={"application_name": "msc3391-proxy"},
        )

    async def close(self) -> None:
        if self._listener is not None:
            # The flag as well as the cancellation: Python 3.11's wait_for (inside
            # asyncpg.connect) can swallow a cancellation that meets a failed connect.
            self._closing = True
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._listener), LISTENER_CHECK + LISTENER_RETRY)
            self._listener = None
        for pool in (self._locks_pool, self._pool):
            if pool is not None:
                with contextlib.suppress(*_FAULTS):
                    await asyncio.wait_for(pool.close(), self._connect_timeout)
        self._pool = self._locks_pool = None

    async def _migrate(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(VERSION_TABLE)
            version = await conn.fetchval("SELECT max(version) FROM msc3391_proxy_schema") or 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store.url: the database {self.url} has schema version {version}, newer than this"
                    f" proxy's {SCHEMA_VERSION}; upgrade the proxy or point it at another database"
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number - 1]:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO msc3391_proxy_schema (version) VALUES ($1)", number)
                log.info("store schema migrated to version %d", number)

    # --- use ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[PostgresTransaction]:
        """`durable`: as for SQLite (`sqlite.SqliteDatabase.transaction`); otherwise
        COMMIT does not wait for the WAL flush, which keeps the order of commits.

        BEGIN goes with that setting and COMMIT with the announcements, in one round
        trip each: the trips, not the statements, are most of a small write's time."""
        async with self._connection() as conn:
            await conn.execute("BEGIN" if durable else "BEGIN; SET LOCAL synchronous_commit = off")
            tx = PostgresTransaction(conn, self.instance)
            try:
                yield tx
                await conn.execute(tx.commit())
            except BaseException:
                # After a failed COMMIT there is no transaction left: PostgreSQL only warns.
                with contextlib.suppress(*_FAULTS):
                    await conn.execute("ROLLBACK")
                raise

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[PostgresTransaction]:
        async with self._connection() as conn:
            yield PostgresTransaction(conn, self.instance)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn
        except _FAULTS as e:
            self.faults.fault(_reason(e))
            raise StoreUnavailable(_reason(e)) from None
        self.faults.success()

    def problem(self) -> str | None:
        return self.faults.last if self.faults.failing else None

    async def alive(self, tx: PostgresTransaction, instance: str | None) -> bool:
        """Whether the instance that began an intent still holds its lock. (One migrated
        from SQLite names none: nobody works on it.)"""
        if instance is None:
            return False
        # Free if nobody holds it (then taken for the length of this statement alone: the
        # store reads outside a transaction).
        free = await tx.fetchone("SELECT pg_try_advisory_xact_lock(?)", (_lock_key(["instance", instance]),))
        return not (free is not None and free[0])

    # --- other instances' changes -------------------------------------------------------------

    async def announce_nudge(self, user_id: str, device_id: str, seconds: float) -> None:
        payload = json.dumps([self.instance, user_id, device_id, seconds])
        async with self._connection() as conn:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    async def _listen(self) -> None:
        """Keep one connection listening; while it is not, every user is stale."""
        while not self._closing:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    dsn=self.url.dsn,
                    timeout=self._connect_timeout,
                    server_settings={"application_name": "msc3391-proxy listener"},
                )
                # Held as long as this connection lives: the others know this instance alive
                # (`alive`), and leave its intents under way alone.
                # (Still held by a session of ours the server has not noticed is gone: not
                # listening until it is ours again, or the others would think us dead.)
                if not await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1)", _lock_key(["instance", self.instance])
                ):
                    raise ConnectionError("this instance's liveness lock is held by an old session")
                await conn.add_listener(CHANNEL, self._notified)
                # A connection the server closes (a restart, an administrator) is known
                # at once, not at the next check: announcements may be missed from then.
                closed = asyncio.Event()
                conn.add_termination_listener(functools.partial(self._listener_closed, closed))
                if self.on_resync is not None:
                    await self.on_resync()
                if not self._listening.is_set():
                    log.info("store: listening for the changes of other instances")
                self._listening.set()
                while not self._closing:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), LISTENER_CHECK)
                    if closed.is_set():
                        raise ConnectionError("the server closed the connection")
                    await conn.fetchval("SELECT 1", timeout=LISTENER_CHECK)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # anything wrong here: lost, until listening again
                if self._listening.is_set():
                    log.warning(
                        "store: lost the changes of other instances (%s); asking the database", _reason(e)
                    )
                self._listening.clear()
                if self.on_lost is not None:
                    self.on_lost()
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), LISTENER_CHECK)
            await asyncio.sleep(LISTENER_RETRY)

    def _listener_closed(self, closed: asyncio.Event, _conn: object) -> None:
        closed.set()
        if self.on_lost is not None:
            self.on_lost()

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        """`[instance, user_id]`: the user's rows changed; `[instance, user_id, device_id,
        seconds]`: that device was nudged."""
        try:
            instance, user_id, *nudged = json.loads(payload)
            if instance == self.instance:
                return
            if not nudged:
                if self.on_change is not None:
                    self.on_change(user_id)
            elif self.on_nudge is not None:
                device_id, seconds = nudged
                self.on_nudge(str(user_id), str(device_id), float(seconds))
        except (ValueError, TypeError):
            return


def _lock_key(key: Hashable) -> int:
    """A signed 64-bit advisory lock key for any type key (a collision only serialises)."""
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresTypeLocks:
    """Writes of one type serialised across every instance: a local lock first (so that
    one instance holds one database connection per type at most), then a session advisory
    lock on a connection of a pool of its own (the store's operations inside use the other
    pool, so the two can never wait on each other)."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db
        self._local = KeyedLocks()

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable, *, required: bool = True) -> AsyncIterator[None]:
        """`required=False`: if the database cannot be reached, hold the local lock only
        (no instance can begin a delete then either)."""
        async with self._local.hold(key):
            held = await self._advisory(_lock_key(key), required)
            try:
                yield
            finally:
                if held is not None:
                    await self._release(*held)

    async def _advisory(self, lock: int, required: bool) -> tuple[asyncpg.Connection, int] | None:
        pool = self._db._locks_pool
        conn: asyncpg.Connection | None = None
        try:
            if pool is None:
                raise StoreUnavailable("the store is not open")
            conn = await pool.acquire(timeout=self._db._connect_timeout)
            await conn.execute("SELECT pg_advisory_lock($1)", lock)
        except (*_FAULTS, StoreUnavailable) as e:
            if conn is not None and pool is not None:
                with contextlib.suppress(*_FAULTS):
                    await pool.release(conn)
            if required:
                raise e if isinstance(e, StoreUnavailable) else StoreUnavailable(_reason(e)) from None
            return None
        return conn, lock

    async def _release(self, conn: asyncpg.Connection, lock: int) -> None:
        # A connection lost meanwhile took its lock with it: nothing left to unlock.
        with contextlib.suppress(*_FAULTS):
            await conn.execute("SELECT pg_advisory_unlock($1)", lock)
        pool = self._db._locks_pool
        if pool is not None:
            with contextlib.suppress(*_FAULTS):
                await pool.release(conn)

"""The store at scale: 1,000,000 rows in `account_data_unsynced_deletes`, on SQLite and
on PostgreSQL.

Each backend's database gets its schema from the proxy's own store (opened once), then
is populated with SQL (SQLite: executemany in one transaction; PostgreSQL:
`generate_series` on the server); then, through the `DeletionStore` API, a delete for a
user with 100 devices (`begin_delete` + `commit_delete`), the in-memory `has_pending`
and the `pending_for_device` query. Finally an in-process proxy on the SQLite store
answers /syncs with an SQLite trace callback installed, to show that a device with
nothing pending costs no database query.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.app import CONTEXT
from proxy.config import parse_config
from proxy.server import ProxyServer
from proxy.store import DeletionStore, open_store
from rig.postgres import PostgresServer

from . import pg
from .harness import median, say
from .passthrough import sync_name
from .settings import Settings

DEVICES_PER_USER = 10
DELETES_PER_USER = 10
HUNDRED_USER = "@hundred:localhost"


def _store(directory: Path, *, path: Path | None = None, url: str | None = None) -> DeletionStore:
    """The proxy's own store for an SQLite file or a PostgreSQL URL, as its config makes it."""
    store: dict[str, Any] = {"path": str(path or directory / "unused.sqlite3")}
    if url is not None:
        store["url"] = url
    config = parse_config({"upstream": {"url": "http://127.0.0.1:1"}, "store": store}, directory)
    return open_store(config.store)


async def _create_schema(store: DeletionStore) -> None:
    await store.open()
    await store.close()


def populate(path: Path, rows: int) -> dict[str, Any]:
    """`rows` rows: users x 10 devices x 10 deletes (half of them room account data),
    each delete with its settled tombstone."""
    users = max(1, rows // (DEVICES_PER_USER * DELETES_PER_USER))
    started = time.monotonic()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    stream_id = 0
    tombstones = []
    unsynced = []
    for u in range(users):
        user = f"@user{u}:localhost"
        for d in range(DELETES_PER_USER):
            stream_id += 1
            room = f"!room{d}:localhost" if d % 2 else None
            kind = f"org.example.type.{d}"
            tombstones.append((stream_id, user, room, kind, "done", 1_760_000_000_000))
            unsynced += [(stream_id, user, kind, room, f"DEV{k}") for k in range(DEVICES_PER_USER)]
        if len(unsynced) >= 100_000:
            _flush(db, tombstones, unsynced)
    _flush(db, tombstones, unsynced)
    db.execute("COMMIT")
    count = db.execute("SELECT COUNT(*) FROM account_data_unsynced_deletes").fetchone()[0]
    db.close()
    return {"rows": count, "users": users, "tombstones": stream_id, "seconds": time.monotonic() - started}


def _flush(
    db: sqlite3.Connection, tombstones: list[tuple[Any, ...]], unsynced: list[tuple[Any, ...]]
) -> None:
    db.executemany(
        "INSERT INTO account_data_tombstones"
        " (stream_id, user_id, room_id, account_data_type, state, created_ts) VALUES (?, ?, ?, ?, ?, ?)",
        tombstones,
    )
    db.executemany(
        "INSERT INTO account_data_unsynced_deletes"
        " (stream_id, user_id, account_data_type, room_id, device_id) VALUES (?, ?, ?, ?, ?)",
        unsynced,
    )
    tombstones.clear()
    unsynced.clear()


async def populate_postgres(url: str, rows: int) -> dict[str, Any]:
    """The same rows as `populate`, made by the server itself (`generate_series`), then
    the identity sequence moved past them and the tables vacuumed and analysed (as
    autovacuum would have done to a table of this size in a running deployment)."""
    import asyncpg

    users = max(1, rows // (DEVICES_PER_USER * DELETES_PER_USER))
    started = time.monotonic()
    conn = await asyncpg.connect(dsn=url)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO account_data_tombstones"
                " (stream_id, user_id, room_id, account_data_type, state, created_ts)"
                " SELECT u * $2::bigint + d + 1, '@user' || u || ':localhost',"
                " CASE WHEN d % 2 = 1 THEN '!room' || d || ':localhost' END,"
                " 'org.example.type.' || d, 'done', 1760000000000"
                " FROM generate_series(0, $1::int - 1) AS u, generate_series(0, $2::int - 1) AS d",
                users,
                DELETES_PER_USER,
            )
            await conn.execute(
                "INSERT INTO account_data_unsynced_deletes"
                " (stream_id, user_id, account_data_type, room_id, device_id)"
                " SELECT t.stream_id, t.user_id, t.account_data_type, t.room_id, 'DEV' || k"
                " FROM account_data_tombstones AS t, generate_series(0, $1::int - 1) AS k",
                DEVICES_PER_USER,
            )
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence('account_data_tombstones', 'stream_id'),"
                " (SELECT max(stream_id) FROM account_data_tombstones))"
            )
        await conn.execute("VACUUM ANALYZE account_data_tombstones")
        await conn.execute("VACUUM ANALYZE account_data_unsynced_deletes")
        count = await conn.fetchval("SELECT count(*) FROM account_data_unsynced_deletes")
        size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    finally:
        await conn.close()
    return {
        "rows": count,
        "users": users,
        "tombstones": users * DELETES_PER_USER,
        "seconds": time.monotonic() - started,
        "database_size": size,
    }


async def postgres_commit_floor_ms(url: str, repeats: int = 30) -> float:
    """One one-row INSERT, committed durably (synchronous_commit on, fsync on): what any
    durable commit costs on this server and disk, whatever the schema."""
    import asyncpg

    conn = await asyncpg.connect(dsn=url)
    try:
        await conn.execute("CREATE TABLE bench_commit_floor (x INTEGER)")
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            await conn.execute("INSERT INTO bench_commit_floor VALUES ($1)", i)
            times.append((time.perf_counter() - t0) * 1000)
        await conn.execute("DROP TABLE bench_commit_floor")
    finally:
        await conn.close()
    return median(times)


def commit_floor_ms(directory: Path, repeats: int = 30) -> float:
    """One one-row transaction in WAL mode with synchronous=FULL (the proxy's settings)
    on this file system: what any durable commit costs here, whatever the schema."""
    path = directory / "commit-floor.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE t (x INTEGER)")
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?)", (i,))
        db.execute("COMMIT")
        times.append((time.perf_counter() - t0) * 1000)
    db.close()
    return median(times)


def _per_call_ns(calls: int, work: Any) -> float:
    started = time.perf_counter_ns()
    for _ in range(calls):
        work()
    return (time.perf_counter_ns() - started) / calls


async def _store_figures(store: DeletionStore, deletes: int) -> dict[str, Any]:
    started = time.monotonic()
    await store.open()
    open_seconds = time.monotonic() - started
    try:
        devices = [f"H{i:03d}" for i in range(100)]
        begin_ms, commit_ms, total_ms = [], [], []
        for i in range(deletes):
            t0 = time.perf_counter()
            stream_id = await store.begin_delete(
                HUNDRED_USER, None, f"bench.hundred.{i}", devices[0], devices
            )
            t1 = time.perf_counter()
            await store.commit_delete(stream_id)
            t2 = time.perf_counter()
            begin_ms.append((t1 - t0) * 1000)
            commit_ms.append((t2 - t1) * 1000)
            total_ms.append((t2 - t0) * 1000)
        # The same type deleted again: the commit also replaces the earlier tombstone.
        again_ms = []
        for _ in range(max(3, deletes // 3)):
            t0 = time.perf_counter()
            stream_id = await store.begin_delete(HUNDRED_USER, None, "bench.hundred.0", devices[0], devices)
            await store.commit_delete(stream_id)
            again_ms.append((time.perf_counter() - t0) * 1000)

        calls = 200_000
        has_pending = {
            "user_without_rows_ns": _per_call_ns(calls, lambda: store.has_pending("@nobody:localhost", "X")),
            "device_without_rows_ns": _per_call_ns(
                calls, lambda: store.has_pending("@user7:localhost", "NOPE")
            ),
            "device_with_rows_ns": _per_call_ns(calls, lambda: store.has_pending("@user7:localhost", "DEV3")),
        }

        async def timed_pending(user: str, device: str, repeats: int) -> tuple[float, int]:
            times, found = [], 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                found = len(await store.pending_for_device(user, device))
                times.append((time.perf_counter() - t0) * 1e6)
            return median(times), found

        nothing_us, _ = await timed_pending("@user7:localhost", "NOPE", 2000)
        ten_us, ten = await timed_pending("@user7:localhost", "DEV3", 300)
        many_us, many = await timed_pending(HUNDRED_USER, devices[1], 100)
        rows = len(await store.unsynced_rows(HUNDRED_USER))
    finally:
        await store.close()
    return {
        "open_seconds": open_seconds,
        "delete_100_devices": {
            "count": deletes,
            "begin_ms": median(begin_ms),
            "commit_ms": median(commit_ms),
            "total_ms": median(total_ms),
            "total_max_ms": max(total_ms),
            "same_type_again_ms": median(again_ms),
            "rows_of_user_after": rows,
        },
        "has_pending": has_pending,
        "pending_for_device": {
            "nothing_pending_us": nothing_us,
            "ten_pending_us": ten_us,
            "ten_pending_found": ten,
            "many_pending_us": many_us,
            "many_pending_found": many,
        },
    }


async def _no_query_check(path: Path, workdir: Path, upstream_url: str, body_size: int) -> dict[str, Any]:
    """Statements the proxy runs on its store while answering /syncs of a device with
    nothing pending (user without rows; then user with rows on another device), and,
    as a control, of a device with a pending delete."""
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "upstream": {"url": upstream_url},
            "store": {"path": str(path)},
            "proxy": {"log_level": "WARNING"},
            "experimental_features": {"msc3391_enabled": True},
        },
        workdir,
    )
    statements: list[str] = []
    server = ProxyServer(config)
    await server.start()
    try:
        ctx = server.app[CONTEXT]
        await ctx.store.db.connection.set_trace_callback(statements.append)
        headers = {"Authorization": "Bearer bench-token"}
        incremental = f"{server.url}/_matrix/client/v3/sync?since=s1&timeout=0&bench={sync_name(body_size)}"
        initial = f"{server.url}/_matrix/client/v3/sync?bench={sync_name(body_size)}"
        out: dict[str, Any] = {}
        async with aiohttp.ClientSession() as session:

            async def count(url: str, times: int) -> int:
                before = len(statements)
                for _ in range(times):
                    async with session.get(url, headers=headers) as r:
                        await r.read()
                        assert r.status == 200, r.status
                await asyncio.sleep(0.2)
                return len(statements) - before

            out["no_rows_incremental"] = await count(incremental, 50)
            out["no_rows_initial"] = await count(initial, 10)
            # The user now has rows, for its other device only.
            stream_id = await ctx.store.begin_delete(
                "@bench:localhost", None, "bench.x", "BENCH", ["BENCH", "OTHER"]
            )
            await ctx.store.commit_delete(stream_id)
            before = len(statements)
            await count(incremental, 1)  # the once-per-interval device sweep may run here
            out["other_device_sweep"] = len(statements) - before
            out["other_device_rows_incremental"] = await count(incremental, 50)
            # Control: this device has a delete to learn.
            stream_id = await ctx.store.begin_delete(
                "@bench:localhost", None, "bench.y", "OTHER", ["BENCH", "OTHER"]
            )
            await ctx.store.commit_delete(stream_id)
            out["pending_incremental_control"] = await count(incremental, 1)
        out["requests"] = {
            "no_rows_incremental": 50,
            "no_rows_initial": 10,
            "other_device_rows_incremental": 50,
        }
        return out
    finally:
        await server.stop()


def run(
    settings: Settings, workdir: Path, upstream_url: str, postgres: PostgresServer | None
) -> dict[str, Any]:
    directory = workdir / "store"
    directory.mkdir(exist_ok=True)
    path = directory / "bench.sqlite3"
    deletes = 10 if settings.quick else 30
    asyncio.run(_create_schema(_store(directory, path=path)))
    say(f"store (SQLite): populating {settings.store_rows:,} rows")
    populated = populate(path, settings.store_rows)
    say(f"store (SQLite): {populated['rows']:,} rows in {populated['seconds']:.1f} s; timing")
    sqlite = {
        "populated": populated,
        **asyncio.run(_store_figures(_store(directory, path=path), deletes)),
        "commit_floor_ms": commit_floor_ms(directory),
        "filesystem": _filesystem(directory),
    }
    say("store: counting database statements of /syncs in an in-process proxy")
    no_query = asyncio.run(_no_query_check(path, directory, upstream_url, settings.sync_sizes[0]))
    backends: dict[str, Any] = {"sqlite": sqlite}
    if postgres is not None:
        url = pg.database(postgres, "bench_store")
        asyncio.run(_create_schema(_store(directory, url=url)))
        say(f"store (PostgreSQL): populating {settings.store_rows:,} rows")
        populated = asyncio.run(populate_postgres(url, settings.store_rows))
        say(f"store (PostgreSQL): {populated['rows']:,} rows in {populated['seconds']:.1f} s; timing")
        backends["postgresql"] = {
            "populated": populated,
            **asyncio.run(_store_figures(_store(directory, url=url), deletes)),
            "commit_floor_ms": asyncio.run(postgres_commit_floor_ms(url)),
            "settings": pg.settings_text(postgres),
            "version": pg.version(postgres),
            "filesystem": _filesystem(postgres.directory),
        }
    return {"backends": backends, "no_query": no_query}


def _filesystem(path: Path) -> str:
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mount, kind = parts[1], parts[2]
        if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
            best = (mount, kind)
    return f"{best[1]} (mounted at {best[0]})"

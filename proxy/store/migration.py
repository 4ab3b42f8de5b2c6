"""`msc3391-proxy migrate-store`: a SQLite store copied into PostgreSQL, so that one
instance can become several without losing a pending deletion.

The copy keeps every `stream_id` (delivery records name them) and moves PostgreSQL's
sequence past the highest SQLite ever handed out, so a new delete never reuses one.
The SQLite file is opened as a serving proxy opens it (no proxy may be running on it
meanwhile); a target that holds anything already is refused, and the copy is one
transaction: all of it or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import PostgresURL
from .model import StoreError
from .postgres import PostgresDatabase
from .sqlite import SqliteDatabase

_TABLES = {
    "account_data_tombstones": "stream_id, user_id, room_id, account_data_type, state, created_ts, instance",
    "account_data_unsynced_deletes": "stream_id, user_id, account_data_type, room_id, device_id",
    "sync_deliveries": "user_id, device_id, next_batch, stream_id",
}


@dataclass(frozen=True)
class Copied:
    tombstones: int
    rows: int
    deliveries: int


async def copy_to_postgres(sqlite_path: Path, url: PostgresURL, *, connect_timeout: float = 10.0) -> Copied:
    source = SqliteDatabase(sqlite_path)
    target = PostgresDatabase(url, pool_size=2, connect_timeout=connect_timeout, command_timeout=600.0)
    await source.open(exclusive=True)
    try:
        await target.open(exclusive=False)
        async with source.reading() as read:
            found = {
                table: await read.fetchall(f"SELECT {columns} FROM {table}")
                for table, columns in _TABLES.items()
            }
            # AUTOINCREMENT: the highest stream_id ever handed out, deleted ones included.
            sequence = await read.fetchone(
                "SELECT seq FROM sqlite_sequence WHERE name = 'account_data_tombstones'"
            )
        async with target.transaction() as write:
            held = await write.fetchone(
                "SELECT (SELECT count(*) FROM account_data_tombstones)"
                " + (SELECT count(*) FROM account_data_unsynced_deletes)"
                " + (SELECT count(*) FROM sync_deliveries)"
            )
            if held is not None and held[0]:
                raise StoreError(f"the database {url} holds a store already: migrate into an empty one")
            for table, columns in _TABLES.items():
                marks = ", ".join("?" * len(columns.split(",")))
                await write.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", found[table])
            highest = max(
                [sequence[0] if sequence else 0, *(row[0] for row in found["account_data_tombstones"])]
            )
            if highest:
                await write.execute(
                    "SELECT setval(pg_get_serial_sequence('account_data_tombstones', 'stream_id'), ?)",
                    (highest,),
                )
    finally:
        await target.close()
        await source.close()
    return Copied(*(len(found[table]) for table in _TABLES))

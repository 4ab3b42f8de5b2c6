"""The proxy's own store: tombstones and per-device deletion state.

- `model.py`: what it holds, and `DeletionStore`, the interface every backend offers;
- `operations.py`: the operations, in SQL every backend speaks, with the in-memory
  index of `indexes.py` that keeps most requests free of queries;
- `sqlite.py` and `schema.py`: the SQLite database (the embedded default) and its
  versioned schema; `postgres.py` and `schema_postgres.py`: PostgreSQL, which several
  instances share; `faults.py`: a failing database, told once per burst.
"""

from __future__ import annotations

from pathlib import Path

from ..config import StoreConfig
from ..records import PendingDelete, Tombstone, UnsyncedRow
from .model import DeletionStore, StoreConfigError, StoreError
from .operations import SqlStore
from .schema import SCHEMA_VERSION
from .sqlite import SqliteDatabase


def sqlite_store(path: Path, *, busy_timeout: float = 5.0) -> SqlStore:
    return SqlStore(SqliteDatabase(path, busy_timeout=busy_timeout))


def open_store(config: StoreConfig) -> DeletionStore:
    """The store the configuration names (not opened yet): PostgreSQL with `store.url`,
    else the SQLite file."""
    if config.url is not None:
        from .postgres import PostgresDatabase  # asyncpg only where PostgreSQL is used

        database = PostgresDatabase(
            config.url,
            pool_size=config.pool_size,
            connect_timeout=config.connect_timeout,
            command_timeout=config.command_timeout,
        )
        return SqlStore(database)
    return sqlite_store(config.path, busy_timeout=config.busy_timeout)


__all__ = [
    "SCHEMA_VERSION",
    "DeletionStore",
    "PendingDelete",
    "SqlStore",
    "StoreConfigError",
    "StoreError",
    "Tombstone",
    "UnsyncedRow",
    "open_store",
    "sqlite_store",
]

"""The proxy's own store: tombstones and per-device deletion state.

- `model.py`: what it holds, and `DeletionStore`, the interface every backend offers;
- `operations.py`: the operations, in SQL every backend speaks, with the in-memory
  index of `indexes.py` that keeps most requests free of queries;
- `sqlite.py` and `schema.py`: the SQLite database (the embedded default) and its
  versioned schema; `faults.py`: a failing database, told once per burst.
"""

from __future__ import annotations

from pathlib import Path

from ..config import StoreConfig
from ..records import PendingDelete, Tombstone, UnsyncedRow
from .model import DeletionStore, StoreError
from .operations import SqlStore
from .schema import SCHEMA_VERSION
from .sqlite import SqliteDatabase


def sqlite_store(path: Path, *, busy_timeout: float = 5.0) -> SqlStore:
    return SqlStore(SqliteDatabase(path, busy_timeout=busy_timeout))


def open_store(config: StoreConfig) -> DeletionStore:
    """The store the configuration names (not opened yet)."""
    return sqlite_store(config.path, busy_timeout=config.busy_timeout)


__all__ = [
    "SCHEMA_VERSION",
    "DeletionStore",
    "PendingDelete",
    "SqlStore",
    "StoreError",
    "Tombstone",
    "UnsyncedRow",
    "open_store",
    "sqlite_store",
]

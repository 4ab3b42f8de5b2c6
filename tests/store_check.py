"""Reading the proxy's store from outside the proxy, and its invariants.

The proxy may be a process of its own or killed a moment ago: the file is opened
with a separate `sqlite3` connection (WAL lets it read while the proxy writes), so
what the tests see is what is on disk, not what a live `Store` object remembers.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

# (user_id, room_id or None, type) -> whether the homeserver holds content for it
# (True), holds `{}` or nothing (False).
IsLive = Callable[[str, str | None, str], bool]


@dataclass(frozen=True)
class Snapshot:
    # (stream_id, user_id, room_id, type, state)
    tombstones: list[tuple[int, str, str | None, str, str]]
    # (stream_id, user_id, room_id, type, device_id)
    rows: list[tuple[int, str, str | None, str, str]]
    # (stream_id, user_id, device_id, next_batch)
    deliveries: list[tuple[int, str, str, str]]

    @property
    def empty(self) -> bool:
        return not (self.tombstones or self.rows or self.deliveries)

    def rows_of(self, user_id: str) -> set[tuple[str | None, str, str]]:
        """(room, type, device) of every row of the user."""
        return {(room, kind, device) for _, user, room, kind, device in self.rows if user == user_id}

    def tombstones_of(self, user_id: str) -> set[tuple[str | None, str, str]]:
        """(room, type, state) of every tombstone of the user."""
        return {(room, kind, state) for _, user, room, kind, state in self.tombstones if user == user_id}


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path, timeout=10)
    try:
        yield db
    finally:
        db.close()


_TOMBSTONES = (
    "SELECT stream_id, user_id, room_id, account_data_type, state"
    " FROM account_data_tombstones ORDER BY stream_id"
)
_ROWS = (
    "SELECT stream_id, user_id, room_id, account_data_type, device_id"
    " FROM account_data_unsynced_deletes ORDER BY stream_id, device_id"
)
_DELIVERIES = "SELECT stream_id, user_id, device_id, next_batch FROM sync_deliveries ORDER BY stream_id"


def snapshot(path: Path) -> Snapshot:
    with _connect(path) as db:
        return Snapshot(
            tombstones=db.execute(_TOMBSTONES).fetchall(),
            rows=db.execute(_ROWS).fetchall(),
            deliveries=db.execute(_DELIVERIES).fetchall(),
        )


async def postgres_snapshot(url: str) -> Snapshot:
    """The same, of a PostgreSQL store (the same tables), on a connection of its own."""
    db = await asyncpg.connect(url)
    try:
        found = [[tuple(r) for r in await db.fetch(sql)] for sql in (_TOMBSTONES, _ROWS, _DELIVERIES)]
    finally:
        await db.close()
    return Snapshot(*found)  # type: ignore[arg-type]


def consistency_problems(state: Snapshot, is_live: IsLive) -> list[str]:
    """Everything that makes the store disagree with itself or with the homeserver.

    - an intent still pending (the proxy settles them all on the user's next request);
    - a row or a delivery record whose tombstone is gone (an orphan), or whose user,
      room or type differs from its tombstone's;
    - a settled tombstone that no device waits for (it should have been dropped);
    - two settled tombstones for one type;
    - a tombstone for a type the homeserver holds content for (a live type).
    """
    problems = []
    by_id = {t[0]: t for t in state.tombstones}
    for stream_id, user, room, kind, tomb_state in state.tombstones:
        if tomb_state != "done":
            problems.append(f"intent {stream_id} ({user} {room} {kind}) still {tomb_state}")
        if is_live(user, room, kind):
            problems.append(f"tombstone {stream_id} for {user} {room} {kind}, which the homeserver holds")
        if not any(r[0] == stream_id for r in state.rows):
            problems.append(f"tombstone {stream_id} ({user} {room} {kind}) with no device waiting")
    for stream_id, user, room, kind, device in state.rows:
        tombstone = by_id.get(stream_id)
        if tombstone is None:
            problems.append(f"orphan row {stream_id} {user} {device}")
        elif tombstone[1:4] != (user, room, kind):
            problems.append(f"row {stream_id} {user} {device} disagrees with its tombstone {tombstone}")
    for stream_id, user, device, _ in state.deliveries:
        if stream_id not in by_id:
            problems.append(f"orphan delivery record {stream_id} {user} {device}")
    settled = [t[1:4] for t in state.tombstones if t[4] == "done"]
    for key in sorted(set(settled), key=str):
        if settled.count(key) > 1:
            problems.append(f"{settled.count(key)} settled tombstones for {key}")
    return problems


def assert_consistent(path: Path, is_live: IsLive) -> Snapshot:
    """The store on disk is consistent with itself and with the homeserver; returns it."""
    state = snapshot(path)
    problems = consistency_problems(state, is_live)
    assert not problems, "\n".join(problems)
    return state


async def wait_for_store(path: Path, done: Callable[[Snapshot], bool], within: float = 10.0) -> Snapshot:
    """Poll the store on disk until `done(snapshot)`, for work the proxy finishes after
    it has answered (a write retried in the background); the last snapshot either way."""
    deadline = time.monotonic() + within
    while True:
        state = snapshot(path)
        if done(state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.05)

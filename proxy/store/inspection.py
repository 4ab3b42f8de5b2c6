"""Reading the store whole: for the inspect command, the metrics and the tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..records import Tombstone, UnsyncedRow

if TYPE_CHECKING:
    from .operations import Transaction

TOMBSTONE = "SELECT stream_id, user_id, room_id, account_data_type, state FROM account_data_tombstones"


def _of_user(user_id: str | None) -> tuple[str, tuple[str, ...]]:
    return (" WHERE user_id = ?", (user_id,)) if user_id is not None else ("", ())


async def counts(tx: Transaction) -> tuple[int, int]:
    """(rows in account_data_unsynced_deletes, tombstones)."""
    row = await tx.fetchone(
        "SELECT (SELECT COUNT(*) FROM account_data_unsynced_deletes),"
        " (SELECT COUNT(*) FROM account_data_tombstones)"
    )
    assert row is not None
    return int(row[0]), int(row[1])


async def unsynced_rows(tx: Transaction, user_id: str | None = None) -> list[UnsyncedRow]:
    where, args = _of_user(user_id)
    rows = await tx.fetchall(
        "SELECT stream_id, user_id, account_data_type, room_id, device_id FROM account_data_unsynced_deletes"
        + where
        + " ORDER BY stream_id, device_id",
        args,
    )
    return [UnsyncedRow(*row) for row in rows]


async def tombstones(tx: Transaction, user_id: str | None = None) -> list[Tombstone]:
    where, args = _of_user(user_id)
    rows = await tx.fetchall(TOMBSTONE + where + " ORDER BY stream_id", args)
    return [Tombstone(*row) for row in rows]

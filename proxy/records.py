"""What the store holds, as plain records: what the rewriters and handlers get from it."""

from __future__ import annotations

from dataclasses import dataclass


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

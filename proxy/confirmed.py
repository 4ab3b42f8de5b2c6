"""The tombstones this process knows the homeserver agrees with.

A settled tombstone says the homeserver holds `{}` for its type. This process knows
that of the deletes it committed itself; of any other (committed before it started,
or by another instance) it knows it only once it has read the type back. Until then a
sync must not tell a device the type is deleted: the tombstone may outlive a revive
that a failing store never recorded before its process stopped (`repairs.py` keeps
such a revive in memory only), and the type would then be live on the homeserver.
"""

from __future__ import annotations

# A full set is emptied rather than pruned: forgetting only costs a read-back each.
KEPT = 100_000


class ConfirmedTombstones:
    def __init__(self) -> None:
        self._stream_ids: set[int] = set()

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._stream_ids

    def add(self, stream_id: int) -> None:
        if len(self._stream_ids) >= KEPT:
            self._stream_ids.clear()
        self._stream_ids.add(stream_id)

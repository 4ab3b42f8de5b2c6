"""The store's in-memory index: what it says of a user while reads and writes of the
user's rows overlap (on a shared store, another instance's change is read again while
this instance writes)."""

from __future__ import annotations

from proxy.store.indexes import PendingIndex
from tests.matrix import ALICE


def fresh_index() -> PendingIndex:
    index = PendingIndex()
    index.begin_load()
    index.load([(ALICE, "D1")], [])
    return index


def test_a_read_begun_before_a_write_of_the_stores_own_cannot_undo_it() -> None:
    index = fresh_index()
    index.invalidate(ALICE)  # another instance's change: read again...
    token = index.token(ALICE)  # ...from here, seeing the rows as they are now

    index.written(ALICE, {"D1", "D2"})  # this instance's delete adds D2's row meanwhile
    index.set_devices(ALICE, {"D1"}, token)  # the read ends with what it saw before

    assert index.has_pending(ALICE, "D2")
    assert index.fresh_token(ALICE) is not None


def test_a_read_begun_after_a_write_is_taken() -> None:
    index = fresh_index()
    index.written(ALICE, {"D1", "D2"})
    index.invalidate(ALICE)
    token = index.token(ALICE)
    index.set_devices(ALICE, {"D2"}, token)  # D1's row went on another instance

    assert not index.has_pending(ALICE, "D1") and index.has_pending(ALICE, "D2")


def test_a_stale_entry_has_no_token_to_plan_a_write_on() -> None:
    index = fresh_index()
    assert index.fresh_token(ALICE) == index.token(ALICE)
    index.invalidate(ALICE)
    assert index.fresh_token(ALICE) is None
    assert index.has_pending(ALICE, "anything")  # unknown: the slow path reads the rows

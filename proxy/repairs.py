"""Store writes that the homeserver has already made true, retried until the store takes them.

When the homeserver accepted a write (a delete's `{}`, a revive's content, a device
removal) and the store then failed (a full disk, a lock held past `busy_timeout`, ...),
the client is answered as the homeserver answered: the write happened. The store's
part is queued here and retried in the background, with a growing pause, until it
succeeds. Every operation queued here is idempotent, so running one twice is harmless.

A repair of one `(user, room, type)` must not overtake a later write of that type: the
account data handlers run `flush(key)` under the type's lock before their own store
write, so a queued repair is either done first or the new write fails with it.
While a revive waits here, its type is live on the homeserver: `reviving()` keeps the
sync rewriter from telling devices it is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable

from .errors import StoreUnavailable
from .store.operations import TypeLocks

log = logging.getLogger(__name__)

TypeKey = tuple[str, str | None, str]  # (user_id, room_id or None, account data type)
Operation = Callable[[], Awaitable[object]]

FIRST_PAUSE = 0.5
LONGEST_PAUSE = 30.0


class Repairs:
    def __init__(self, type_locks: TypeLocks) -> None:
        self._type_locks = type_locks
        # key -> operation; a key is a TypeKey for type writes, anything hashable otherwise.
        self._queued: dict[Hashable, Operation] = {}
        self._typed: set[Hashable] = set()
        self._revives: set[Hashable] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queued)

    def add_type_write(self, key: TypeKey, operation: Operation, *, revive: bool = False) -> None:
        """Queue a write of one type (replacing one queued for it): run under the type's lock."""
        self._queued[key] = operation
        self._typed.add(key)
        if revive:
            self._revives.add(key)
        else:
            self._revives.discard(key)
        self._queue_changed()

    def add(self, key: Hashable, operation: Operation) -> None:
        """Queue a write that no later write can contradict (forgetting removed devices)."""
        self._queued[key] = operation
        self._queue_changed()

    def _queue_changed(self) -> None:
        log.warning("store write queued for retry (%d waiting)", len(self._queued))
        self._wake.set()

    def queued(self, key: Hashable) -> bool:
        return key in self._queued

    async def run_or_queue(self, key: TypeKey, operation: Operation, *, revive: bool = False) -> bool:
        """Run what is queued for this type, then `operation`; the caller holds the
        type's lock. If the store fails, both are queued (in that order) for retry.
        Returns whether they ran now."""
        earlier = self._queued.get(key)

        async def in_order() -> None:
            if earlier is not None:
                await earlier()
            await operation()

        try:
            await in_order()
        except StoreUnavailable:
            self.add_type_write(key, in_order, revive=revive)
            return False
        if earlier is not None:
            self._done(key, earlier)
        return True

    def reviving(self, user_id: str, room_id: str | None, account_data_type: str) -> bool:
        return (user_id, room_id, account_data_type) in self._revives

    async def flush(self, key: TypeKey) -> None:
        """Run the write queued for this type now; the caller holds the type's lock.
        Raises `StoreUnavailable` if the store still fails (the caller's own write
        would fail the same way)."""
        operation = self._queued.get(key)
        if operation is None:
            return
        await operation()
        self._done(key, operation)

    def _done(self, key: Hashable, operation: Operation) -> None:
        if self._queued.get(key) is operation:  # not replaced meanwhile
            del self._queued[key]
            self._typed.discard(key)
            self._revives.discard(key)

    async def run_once(self) -> bool:
        """Try every queued operation once; True if none is left."""
        for key, operation in list(self._queued.items()):
            try:
                if key in self._typed:
                    async with self._type_locks.hold(key):
                        if self._queued.get(key) is operation:  # else flushed while we waited
                            await operation()
                else:
                    await operation()
            except StoreUnavailable:
                return False  # the store still fails: the rest would too (logged by it)
            self._done(key, operation)
        if not self._queued:
            log.info("queued store writes done")
        return not self._queued

    async def _run(self) -> None:
        pause = FIRST_PAUSE
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queued:
                if await self.run_once():
                    pause = FIRST_PAUSE
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
                self._wake.clear()
                pause = min(pause * 2, LONGEST_PAUSE)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queued:
            log.error(
                "%d queued store write(s) could not be made before shutdown; interrupted deletes"
                " among them are settled on their users' next requests",
                len(self._queued),
            )

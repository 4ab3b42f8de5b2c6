"""A deletion reaches each device once, and leaves nothing behind: what `bench/soak.py`
found about it.

A device's `/sync` that starts with nothing pending takes the fast path: it is
forwarded and streamed back without a look. If a delete begins while that long-poll
waits, the homeserver wakes it with the `{}` entry, the proxy passes it on without
recording that it did, and the device's row stays: its next sync gets the entry
injected a second time, although the device provably has it. Every online device
long-polls, so every device online during a delete is told twice. Harmless to a
client (a repeated deletion changes nothing) but not the "once, then acknowledged"
the design promises; the first test below pins it until the fast path is fixed (see
the report of issue 4: decide the fast path once the homeserver answers, and record
deliveries of intents still pending).

The soak also left delivery records behind for deletes that a concurrent PUT had
revived between the building of a sync response and the recording of what it carried:
the second test.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from proxy.rewrite import NUDGE_TYPE
from proxy.server import ProxyServer
from proxy.store import sqlite_store
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver
from tests.matrix import ALICE, MSC3391, account_data_path
from tests.store_check import snapshot

TOKENS = {"A1": "syt_once_alice_1", "A2": "syt_once_alice_2"}
KIND = "org.example.once"


async def sync(
    http: aiohttp.ClientSession, base: str, device: str, since: str | None, timeout_ms: int = 0
) -> dict[str, Any]:
    query = {"timeout": str(timeout_ms), **({"since": since} if since else {})}
    headers = {"Authorization": f"Bearer {TOKENS[device]}"}
    async with http.get(f"{base}/_matrix/client/v3/sync?{urlencode(query)}", headers=headers) as response:
        assert response.status == 200
        return json.loads(await response.read())


def carried(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in body.get("account_data", {}).get("events", []) if e.get("type") == KIND]


async def test_a_deletion_that_wakes_a_waiting_long_poll_is_not_delivered_again(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    for device, token in TOKENS.items():
        fake_hs.add_device(ALICE, device, token=token)
    fake_hs.set_account_data(ALICE, KIND, {"v": 1})
    proxy = await start_proxy(fake_hs.url)
    start = (await sync(http, proxy.url, "A2", None))["next_batch"]

    waiting = asyncio.ensure_future(sync(http, proxy.url, "A2", start, timeout_ms=20_000))
    await asyncio.wait_for(fake_hs.wait_for_requests(r"/sync$", 2), 10)  # the long-poll waits upstream
    path = account_data_path(MSC3391, ALICE, KIND)
    async with http.delete(proxy.url + path, headers={"Authorization": f"Bearer {TOKENS['A1']}"}) as response:
        assert response.status == 200
    first = await asyncio.wait_for(waiting, 10)
    assert carried(first) == [{"type": KIND, "content": {}}]

    # The next sync starts from the answer that carried the deletion: the proof of receipt.
    second = await sync(http, proxy.url, "A2", first["next_batch"])

    assert carried(second) == []
    assert snapshot(proxy.config.store.path).empty


async def test_a_delivery_of_a_delete_revived_meanwhile_leaves_no_record(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path / "store.sqlite3")
    await store.open()
    try:
        stream_id = await store.begin_delete(ALICE, None, KIND, "A1", ["A1", "A2"])
        await store.commit_delete(stream_id)
        [pending] = await store.pending_for_device(ALICE, "A2")  # a sync builds its response...
        await store.revive(ALICE, None, KIND)  # ...while a PUT makes the type live again

        await store.record_delivery(ALICE, "A2", "s9", [pending.stream_id])

        assert snapshot(store.db.path).empty
    finally:
        await store.close()


async def delete_and_start_after(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> tuple[ProxyServer, str]:
    """A1 deletes KIND; A2's next sync starts after the delete (the homeserver will not
    send it, only A2's row can tell it) and nothing else changes on the homeserver."""
    for device, token in TOKENS.items():
        fake_hs.add_device(ALICE, device, token=token)
    fake_hs.set_account_data(ALICE, KIND, {"v": 1})
    proxy = await start_proxy(fake_hs.url)
    path = account_data_path(MSC3391, ALICE, KIND)
    async with http.delete(proxy.url + path, headers={"Authorization": f"Bearer {TOKENS['A1']}"}) as response:
        assert response.status == 200
    return proxy, fake_hs.next_batch


def nudges(body: dict[str, Any]) -> list[Any]:
    return [e for e in body.get("to_device", {}).get("events", []) if e.get("type") == NUDGE_TYPE]


async def test_a_retry_with_an_unchanged_token_is_no_proof_of_receipt(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """When nothing changed, the homeserver answers with the `since` it was given (Synapse
    does). A response that carried an injected deletion with `next_batch == since` can
    be lost like any other; its retry sends the same `since` again, and must not count
    as proof that the deletion arrived. (Here the homeserver refuses the proxy's nudge
    that would move the token, see the next test.)"""
    proxy, after = await delete_and_start_after(start_proxy, fake_hs, http)
    fake_hs.fault(r"/sendToDevice/", status=500, json={"errcode": "M_UNKNOWN", "error": "no"})

    lost = await sync(http, proxy.url, "A2", after)
    assert lost["next_batch"] == after
    assert carried(lost) == [{"type": KIND, "content": {}}]
    retried = await sync(http, proxy.url, "A2", after)  # the same request again: lost has not arrived

    assert carried(retried) == [{"type": KIND, "content": {}}]
    assert snapshot(proxy.config.store.path).rows_of(ALICE) == {(None, KIND, "A2")}
    # Once the token moves, the response that carries the deletion can be proved.
    fake_hs.set_account_data(ALICE, "org.example.other", {"x": 1})
    moved = await sync(http, proxy.url, "A2", after)
    assert moved["next_batch"] != after and carried(moved) == [{"type": KIND, "content": {}}]
    await sync(http, proxy.url, "A2", moved["next_batch"])
    assert snapshot(proxy.config.store.path).empty


async def test_an_unchanged_token_is_moved_so_the_deletion_is_told_once(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """The proxy moves the token itself, with a to-device message from the device to
    itself that no client sees: the answer carrying the deletion has a token of its
    own, its loss is told apart from its arrival, and the device is told exactly once."""
    proxy, after = await delete_and_start_after(start_proxy, fake_hs, http)

    lost = await sync(http, proxy.url, "A2", after)
    assert lost["next_batch"] != after
    assert carried(lost) == [{"type": KIND, "content": {}}] and nudges(lost) == []
    retried = await sync(http, proxy.url, "A2", after)  # lost: the same request again
    assert carried(retried) == [{"type": KIND, "content": {}}] and nudges(retried) == []
    assert snapshot(proxy.config.store.path).rows_of(ALICE) == {(None, KIND, "A2")}
    arrived = await sync(http, proxy.url, "A2", retried["next_batch"])

    assert carried(arrived) == [] and nudges(arrived) == []
    assert snapshot(proxy.config.store.path).empty
    # One nudge: the retry's answer carries it again, and with it the moved token.
    assert [r.raw_path.split("/")[-2] for r in fake_hs.requests_to(r"/sendToDevice/")] == [NUDGE_TYPE]


async def test_a_room_delete_in_a_room_the_user_has_left_does_not_wait_for_ever(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    """Room account data travels only in rooms the user is in, so a row for a room the
    user has since left can never be delivered. It goes when a sync of that device finds
    the user no longer in the room, instead of waiting for ever."""
    for device, token in TOKENS.items():
        fake_hs.add_device(ALICE, device, token=token)
    room = "!left:localhost"
    fake_hs.join(ALICE, room)
    fake_hs.set_account_data(ALICE, KIND, {"v": 1}, room_id=room)
    proxy = await start_proxy(fake_hs.url)
    path = account_data_path(MSC3391, ALICE, KIND, room)
    async with http.delete(proxy.url + path, headers={"Authorization": f"Bearer {TOKENS['A1']}"}) as response:
        assert response.status == 200
    assert snapshot(proxy.config.store.path).rows_of(ALICE) == {(room, KIND, "A2")}
    fake_hs.leave(ALICE, room)

    body = await sync(http, proxy.url, "A2", fake_hs.next_batch)

    assert room not in body.get("rooms", {}).get("join", {})
    assert snapshot(proxy.config.store.path).empty

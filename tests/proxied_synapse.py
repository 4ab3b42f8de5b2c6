"""Fixtures for tests of the proxy in front of the session's real Synapse (its own
MSC3391 flag off), on each store backend: `proxy`, its `store`, `devices` (a new user's
logins through the proxy) and `another_device`; `rows` reads a user's unsynced deletes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.app import CONTEXT
from proxy.server import ProxyServer
from proxy.store import DeletionStore
from rig.synapse import SynapseServer
from tests.matrix import Device

MakeDevices = Callable[[int], Awaitable[list[Device]]]
AnotherDevice = Callable[[Device], Awaitable[Device]]
Rows = set[tuple[str | None, str, str]]


@pytest.fixture
async def proxy(
    store_backend: dict[str, Any], start_proxy: Callable[..., Awaitable[ProxyServer]], synapse: SynapseServer
) -> ProxyServer:
    # The store first: torn down last, after the proxy that uses it has stopped.
    return await start_proxy(synapse.url, **store_backend)


@pytest.fixture
def store(proxy: ProxyServer) -> DeletionStore:
    return proxy.app[CONTEXT].store


@pytest.fixture
def devices(
    synapse: SynapseServer, proxy: ProxyServer, http: aiohttp.ClientSession, unique_name: Callable[[str], str]
) -> MakeDevices:
    """`await devices(n)`: a new user with n devices, each talking to the proxy."""

    async def make(n: int) -> list[Device]:
        name = unique_name("u")
        accounts = [await asyncio.to_thread(synapse.register, name)]
        for _ in range(n - 1):
            accounts.append(await asyncio.to_thread(synapse.login, name))
        return [Device(http, proxy.url, a) for a in accounts]

    return make


@pytest.fixture
def another_device(synapse: SynapseServer) -> AnotherDevice:
    """`await another_device(d)`: a new login of d's user, talking to the same place."""

    async def make(device: Device) -> Device:
        account = await asyncio.to_thread(synapse.login, device.account.localpart)
        return Device(device.session, device.base_url, account)

    return make


async def rows(store: DeletionStore, user_id: str) -> Rows:
    """(room, type, device) of every row of the user in account_data_unsynced_deletes."""
    return {(r.room_id, r.account_data_type, r.device_id) for r in await store.unsynced_rows(user_id)}

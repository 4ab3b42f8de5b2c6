"""Real Matrix client libraries through the proxy (MSC3391 on) in front of real Synapse.

- matrix-js-sdk 37.5.0 on Node.js (`tests/js/msc3391.mjs`, installed by `npm ci` from
  the committed lockfile): it must see `org.matrix.msc3391` in /versions, use the
  unstable DELETE for its own `deleteAccountData`, and a second client's store must
  lose the type when its sync loop receives `{}`.
- mautrix (Python): set, get, delete through the MSC3391 path, and a second device's
  sync, dispatched by mautrix's own syncer, carrying the deletion.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from mautrix.api import Method, Path
from mautrix.client import Client
from mautrix.errors import MNotFound
from mautrix.types import AccountDataEvent, EventType

from tests.matrix_client import MSC3391, account_data_path, wait_for_match
from tests.prerequisites import JS_DIR
from tests.synapse_rig import (
    Account,
    ProxyProcess,
    SynapseServer,
    http_json,
    login,
    register,
)

pytestmark = pytest.mark.synapse

DELETE_LINE = re.compile(
    r"proxy\.access \[\w+\] \S+ DELETE " + re.escape(MSC3391) + r"/user/\{\}/account_data/\{\} 200 "
)


@pytest.fixture
def proxy(synapse: SynapseServer, proxy_process: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_process(synapse.url, msc3391=True)


def two_devices(proxy: ProxyProcess, name: str) -> tuple[Account, Account]:
    """A new user registered through the proxy, and a second login: two devices."""
    return register(proxy.url, name), login(proxy.url, name)


def get_through_proxy(proxy: ProxyProcess, account: Account, kind: str) -> tuple[int, Any]:
    path = account_data_path("/_matrix/client/v3", account.user_id, kind)
    return http_json("GET", proxy.url + path, token=account.access_token)


# --- matrix-js-sdk ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node(require: Callable[[str], str]) -> str:
    """Node.js, with tests/js/node_modules installed from the lockfile."""
    return require("matrix-js-sdk")


def test_matrix_js_sdk_deletes_with_the_unstable_endpoint_and_a_second_client_forgets(
    node: str, proxy: ProxyProcess, unique_name: Callable[[str], str]
) -> None:
    first, second = two_devices(proxy, unique_name("js"))
    kind = "org.example.js_sdk"
    job = {
        "baseUrl": proxy.url,
        "userId": first.user_id,
        "devices": [
            {"accessToken": first.access_token, "deviceId": first.device_id},
            {"accessToken": second.access_token, "deviceId": second.device_id},
        ],
        "type": kind,
        "timeoutMs": 30_000,
    }
    done = subprocess.run(
        [node, "msc3391.mjs"],
        cwd=JS_DIR,
        # In the environment rather than argv: access tokens do not belong in `ps`.
        env={**os.environ, "MSC3391_JS_JOB": json.dumps(job)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"no result from msc3391.mjs (exit {done.returncode}):\n{done.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert done.returncode == 0 and "error" not in result, f"{result}\n{done.stderr[-4000:]}"

    # Support detected from /versions: the SDK picks the unstable prefix from it.
    assert result["supportsUnstableFeature"] is True
    assert result["secondAfterSet"] == {"set_by": "matrix-js-sdk"}
    assert result["firstStoreAfterSet"] == {"set_by": "matrix-js-sdk"}

    # deleteAccountData made exactly one request: the MSC3391 DELETE (not a PUT of {}).
    delete_path = account_data_path(MSC3391, first.user_id, kind)
    account_data_requests = [r for r in result["requests"]["first"] if "/account_data/" in r["path"]]
    assert account_data_requests == [
        {"method": "PUT", "path": account_data_path("/_matrix/client/v3", first.user_id, kind)},
        {"method": "DELETE", "path": delete_path},
    ]
    assert result["deleteResponse"] == {}
    assert DELETE_LINE.search(wait_for_match(lambda: proxy.log, DELETE_LINE)), proxy.log

    # The second client's sync loop got `{}` and dropped the type from its store (37.5.0's
    # MemoryStore deletes an account data event with empty content); the first's too.
    assert result["secondDeletionEvent"] == {}
    assert result["secondPreviousContent"] == {"set_by": "matrix-js-sdk"}
    assert result["secondStoreAfterDelete"] == "undefined"
    assert result["firstStoreAfterDelete"] == "undefined"
    # The second client did not delete anything itself.
    assert not [r for r in result["requests"]["second"] if "/account_data/" in r["path"]]

    assert get_through_proxy(proxy, second, kind) == (
        404,
        {"errcode": "M_NOT_FOUND", "error": "Account data not found"},
    )


# --- mautrix --------------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_mautrix_sets_gets_deletes_and_a_second_device_syncs_the_deletion(
    proxy: ProxyProcess, session: aiohttp.ClientSession, unique_name: Callable[[str], str]
) -> None:
    first_account, second_account = await asyncio.to_thread(two_devices, proxy, unique_name("mautrix"))
    first, second = (
        Client(
            mxid=account.user_id,
            device_id=account.device_id,
            base_url=proxy.url,
            token=account.access_token,
            client_session=session,
        )
        for account in (first_account, second_account)
    )
    kind = "org.example.mautrix"
    event_type = EventType.find(kind, EventType.Class.ACCOUNT_DATA)
    seen: list[AccountDataEvent] = []

    async def on_account_data(event: AccountDataEvent) -> None:
        seen.append(event)

    # wait_sync: handle_sync returns the handler's task instead of running it in the background.
    second.add_event_handler(event_type, on_account_data, wait_sync=True)

    async def sync_second(since: str | None) -> tuple[str, list[Any]]:
        """One /sync of the second device, handed to mautrix's syncer; returns
        next_batch and this type's raw entries."""
        data = await second.sync(since=since, timeout=0)
        await asyncio.gather(*second.handle_sync(data))
        entries = [e for e in data.get("account_data", {}).get("events", []) if e["type"] == kind]
        return data["next_batch"], entries

    versions = await first.versions(no_cache=True)
    assert versions.supports("org.matrix.msc3391") is True

    since, _ = await sync_second(None)
    await first.set_account_data(kind, {"set_by": "mautrix"})
    assert await first.get_account_data(kind) == {"set_by": "mautrix"}
    since, entries = await sync_second(since)
    assert entries == [{"type": kind, "content": {"set_by": "mautrix"}}]

    # mautrix has no delete helper: its request builder with the MSC3391 prefix.
    path = Path.unstable["org.matrix.msc3391"].user[first.mxid].account_data[kind]
    assert "/" + str(path) == account_data_path(MSC3391, first.mxid, kind)
    assert await first.api.request(Method.DELETE, path) == {}
    assert DELETE_LINE.search(wait_for_match(lambda: proxy.log, DELETE_LINE)), proxy.log

    for client in (first, second):
        with pytest.raises(MNotFound) as raised:
            await client.get_account_data(kind)
        assert (raised.value.errcode, raised.value.message) == ("M_NOT_FOUND", "Account data not found")

    _, entries = await sync_second(since)
    assert entries == [{"type": kind, "content": {}}]
    # mautrix's syncer dispatched the set, then the deletion (an event with empty content).
    assert [event.type.t for event in seen] == [kind, kind]
    assert [event.content.serialize() for event in seen] == [{"set_by": "mautrix"}, {}]

    # A fresh initial sync does not carry the deleted type at all.
    _, entries = await sync_second(None)
    assert entries == []

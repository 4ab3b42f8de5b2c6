"""Several instances, one PostgreSQL store: two proxy processes sharing one database in
front of one real Synapse, behind real nginx running what `msc3391-proxy nginx-config
--proxy A --proxy B` generates (round-robin, no stickiness).

Where a test needs a request to reach one instance in particular it talks to that
instance directly; the scenarios go through nginx, as clients do. What the store holds
is read from PostgreSQL itself (`store_check.postgres_snapshot`).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.rewrite import NUDGE_TYPE
from rig.accounts import Account
from rig.nginx import Nginx
from rig.postgres import PostgresServer
from rig.processes import free_port
from rig.proxy_process import ProxyProcess, nginx_config
from rig.synapse import SynapseServer
from tests.matrix import MSC3391, Device, Reply, account_data_path, empty_entries, entries_of, request
from tests.rig_fixtures import POSTGRES_TEST_USER
from tests.sliding_client import Connection
from tests.sliding_client import entries_of as sliding_entries_of
from tests.store_check import Snapshot, consistency_problems, postgres_snapshot
from tests.test_differential_synapse import (
    MAIN_DIFFERENCES,
    SLIDING_DIFFERENCES,
    assert_equivalent,
    main_scenario,
    make_devices,
    sliding_scenario,
)

pytestmark = [pytest.mark.synapse, pytest.mark.postgres]

KIND = "org.example.instances"


@dataclass
class Deployment:
    synapse: SynapseServer
    instances: list[ProxyProcess]
    metrics_ports: list[int]
    nginx: Nginx
    database_url: str

    @property
    def a(self) -> ProxyProcess:
        return self.instances[0]

    @property
    def b(self) -> ProxyProcess:
        return self.instances[1]

    async def owned_requests(self, http: aiohttp.ClientSession, index: int) -> int:
        """Requests the instance answered on the routes it owns, from its own /metrics."""
        async with http.get(f"http://127.0.0.1:{self.metrics_ports[index]}/metrics") as response:
            text = await response.text()
        found = re.findall(r"^msc3391_proxy_requests_total\{[^}]*\} (\S+)$", text, re.M)
        return int(sum(float(n) for n in found))

    async def snapshot(self) -> Snapshot:
        return await postgres_snapshot(self.database_url)

    async def homeserver_holds(self, http: aiohttp.ClientSession, account: Account, kind: str) -> Any:
        """The content Synapse itself holds for a global type (None: none, or `{}`)."""
        reply = await request(
            http,
            "GET",
            self.synapse.url + account_data_path("/_matrix/client/v3", account.user_id, kind),
            token=account.access_token,
        )
        return reply.body if reply.status == 200 and reply.body != {} else None


Deploy = Callable[[str], Awaitable[Deployment]]
Accounts = Callable[[int], Awaitable[list[Account]]]


@pytest.fixture
def deploy(
    synapse: SynapseServer,
    proxy_process: Callable[..., ProxyProcess],
    tmp_path: Path,
    require: Callable[[str], str],
) -> Iterator[Deploy]:
    """`await deploy(database_url)`: two instances on that database, nginx in front."""
    binary = require("nginx")
    started: list[Nginx] = []

    async def start(database_url: str) -> Deployment:
        metrics_ports = [free_port(), free_port()]
        instances = []
        for port in metrics_ports:
            extra = f"[store]\nurl = {json.dumps(database_url)}\n[metrics]\nenabled = true\nport = {port}\n"
            instances.append(await asyncio.to_thread(proxy_process, synapse.url, True, extra))
        listen = free_port()
        proxies = [f"{p.host}:{p.port}" for p in instances]
        text = await asyncio.to_thread(nginx_config, instances[0].config_path, listen, proxies=proxies)
        nginx = Nginx(tmp_path / f"nginx-{len(started)}", text, [listen], binary=binary)
        started.append(nginx)
        await asyncio.to_thread(nginx.start)
        return Deployment(synapse, instances, metrics_ports, nginx, database_url)

    yield start
    for nginx in started:
        nginx.stop()


@pytest.fixture
async def deployment(deploy: Deploy, postgres_url: str) -> Deployment:
    return await deploy(postgres_url)


@pytest.fixture
def accounts(synapse: SynapseServer, unique_name: Callable[[str], str]) -> Accounts:
    """`await accounts(n)`: a new user's first n devices."""

    async def make(n: int) -> list[Account]:
        name = unique_name("multi")
        found = [await asyncio.to_thread(synapse.register, name)]
        for _ in range(n - 1):
            found.append(await asyncio.to_thread(synapse.login, name))
        return found

    return make


def deleted(kind: str) -> list[dict[str, Any]]:
    return [{"type": kind, "content": {}}]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 40.0) -> bool:
    """Poll for work an instance does after it has answered (settling another's intents)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


def is_matrix_error(reply: Reply) -> bool:
    return (
        isinstance(reply.body, dict)
        and isinstance(reply.body.get("errcode"), str)
        and isinstance(reply.body.get("error"), str)
    )


# --- one instance's deletes are every instance's ------------------------------------------


async def test_a_delete_through_one_instance_is_told_through_the_other_which_records_the_proof(
    deployment: Deployment, http: aiohttp.ClientSession, accounts: Accounts
) -> None:
    d = deployment
    first, second = await accounts(2)
    deleter, follower = Device(http, d.a.url, first), Device(http, d.b.url, second)
    assert (await deleter.put(KIND, {"v": 1})).status == 200
    await deleter.sync(initial=True)
    await follower.sync(initial=True)

    assert (await deleter.delete(KIND)).status == 200  # through A

    body = await follower.sync()  # through B
    assert entries_of(body, KIND, None) == deleted(KIND)
    state = await d.snapshot()
    assert state.rows_of(second.user_id) == {(None, KIND, second.device_id)}
    # B knew the device had this to learn: it recorded which answer carried it.
    assert [(dev, token) for _, _, dev, token in state.deliveries] == [
        (second.device_id, follower.next_batch)
    ]
    for instance in d.instances:
        reply = await Device(http, instance.url, first).get(KIND)
        assert (reply.status, reply.errcode) == (404, "M_NOT_FOUND")
        assert empty_entries(await Device(http, instance.url, first).sync(initial=True)) == []

    follower.base_url = d.a.url
    body = await follower.sync()  # through A: the proof of receipt B recorded
    assert empty_entries(body) == []
    state = await d.snapshot()
    assert state.rows == [] and state.tombstones == [] and state.deliveries == []


async def test_an_instance_injects_a_delete_recorded_through_another(
    deployment: Deployment, http: aiohttp.ClientSession, accounts: Accounts
) -> None:
    """Synapse's own answer cannot carry it here (the window that held its `{}` went by
    under a filter hiding the type): only an instance that knows of the delete tells it."""
    d = deployment
    first, second = await accounts(2)
    deleter, follower = Device(http, d.a.url, first), Device(http, d.a.url, second)
    assert (await deleter.put(KIND, {"v": 1})).status == 200
    await follower.sync(initial=True)
    assert (await deleter.delete(KIND)).status == 200  # through A

    hidden = await follower.sync(filter={"account_data": {"not_types": [KIND]}})  # through A
    assert entries_of(hidden, KIND, None) == []

    follower.base_url = d.b.url
    body = await follower.sync()  # through B
    assert entries_of(body, KIND, None) == deleted(KIND)


async def test_a_revive_through_one_instance_is_seen_through_the_other(
    deployment: Deployment, http: aiohttp.ClientSession, accounts: Accounts
) -> None:
    d = deployment
    first, second = await accounts(2)
    writer, follower = Device(http, d.a.url, first), Device(http, d.b.url, second)
    assert (await writer.put(KIND, {"v": 1})).status == 200
    await follower.sync(initial=True)
    assert (await writer.delete(KIND)).status == 200  # through A
    assert entries_of(await follower.sync(), KIND, None) == deleted(KIND)  # through B

    writer.base_url = d.b.url
    assert (await writer.put(KIND, {"v": 2})).status == 200  # the revive, through B

    follower.base_url = d.a.url
    assert entries_of(await follower.sync(), KIND, None) == [{"type": KIND, "content": {"v": 2}}]
    reply = await follower.get(KIND)  # through A
    assert (reply.status, reply.body) == (200, {"v": 2})
    state = await d.snapshot()
    assert state.tombstones_of(first.user_id) == set() and state.rows_of(first.user_id) == set()


@pytest.mark.parametrize("kind", ["sync", "sliding-sync"])
async def test_a_tombstone_the_homeserver_contradicts_is_dropped_not_told_by_another_instance(
    deployment: Deployment, http: aiohttp.ClientSession, accounts: Accounts, kind: str
) -> None:
    """A revive the store never recorded (its instance's store failed, and the instance
    stopped before it recovered) leaves a tombstone for a type that is live on Synapse.
    The instance that did not make the delete reads the type back before it tells it,
    finds the content, and drops the tombstone: no device is told a live type is gone."""
    d = deployment
    first, second = await accounts(2)
    writer, follower = Device(http, d.a.url, first), Device(http, d.b.url, second)
    connection = Connection(follower)
    assert (await writer.put(KIND, {"v": 1})).status == 200

    async def follow() -> list[dict[str, Any]]:  # through B
        if kind == "sync":
            return entries_of(await follower.sync(), KIND, None)
        return sliding_entries_of(await connection.sync(), KIND)

    if kind == "sync":
        await follower.sync(initial=True)
    else:
        await connection.sync(first=True)
    assert (await writer.delete(KIND)).status == 200  # through A
    # What the lost revive leaves: the content on Synapse, the tombstone in the store.
    path = account_data_path("/_matrix/client/v3", first.user_id, KIND)
    revived = await request(http, "PUT", d.synapse.url + path, token=first.access_token, body={"v": 2})
    assert revived.status == 200
    assert (await d.snapshot()).rows_of(first.user_id) == {(None, KIND, second.device_id)}

    # Synapse's own answer carries the content; the next one carries nothing.
    assert await follow() == [{"type": KIND, "content": {"v": 2}}]
    assert await follow() == []
    state = await d.snapshot()
    assert state.tombstones_of(first.user_id) == set() and state.rows_of(first.user_id) == set()
    assert await d.homeserver_holds(http, first, KIND) == {"v": 2}


async def test_an_echo_and_its_nudge_sent_by_one_instance_are_delivered_and_stripped_by_the_other(
    deployment: Deployment, http: aiohttp.ClientSession, accounts: Accounts
) -> None:
    """A delete of a type never set is echoed to the deleting device alone, with a
    to-device nudge of the proxy's own to wake its sync: whichever instance answers
    that sync, the client sees the `{}` and never the nudge. (That every instance knows
    of a nudge even once the device has nothing left to learn: test_store_shared.py.)"""
    d = deployment
    [only] = await accounts(1)
    device = Device(http, d.b.url, only)
    await device.sync(initial=True)

    device.base_url = d.a.url
    assert (await device.delete(KIND)).status == 200  # never set: echoed, and nudged, by A

    def nudges(body: dict[str, Any]) -> list[dict[str, Any]]:
        return [e for e in body.get("to_device", {}).get("events", []) if e.get("type") == NUDGE_TYPE]

    since = device.next_batch
    device.base_url = d.b.url
    body = await device.sync()  # through B
    assert entries_of(body, KIND, None) == deleted(KIND)
    assert nudges(body) == []
    # Synapse's own answer to that request carries it (to-device messages stay until a
    # later token is sent): B took it out.
    native = Device(http, d.synapse.url, only)
    assert len(nudges(await native.sync(since=since, advance=False))) == 1


async def test_the_scenarios_give_synapses_answers_whichever_instance_each_request_reaches(
    deployment: Deployment,
    synapse_msc3391: SynapseServer,
    http: aiohttp.ClientSession,
    unique_name: Callable[[str], str],
) -> None:
    """The differential scenarios (see test_differential_synapse.py), every request
    through nginx, compared with Synapse's own MSC3391: the same answers as one instance."""
    d = deployment
    before = [await d.owned_requests(http, i) for i in range(2)]
    labels = ("A", "B", "C")
    for scenario, differences in ((main_scenario, MAIN_DIFFERENCES), (sliding_scenario, SLIDING_DIFFERENCES)):
        native_devices = await make_devices(
            synapse_msc3391, synapse_msc3391.url, http, unique_name("diff"), labels
        )
        proxied_devices = await make_devices(d.synapse, d.nginx.url, http, unique_name("diff"), labels)
        native, proxied = await asyncio.gather(
            scenario(synapse_msc3391.url, native_devices, None),
            scenario(d.nginx.url, proxied_devices, None),
        )
        assert_equivalent(native, proxied, differences)
    served = [await d.owned_requests(http, i) - before[i] for i in range(2)]
    # Round-robin: each instance answered a fair share, the other's writes in between.
    assert min(served) >= sum(served) / 4, served


# --- writes at once, an instance killed, the database restarted ---------------------------


async def test_concurrent_deletes_and_writes_of_one_type_through_both_instances_end_in_the_last_accepted(
    deployment: Deployment, http: aiohttp.ClientSession, accounts: Accounts
) -> None:
    d = deployment
    first, second, third = await accounts(3)
    watcher = Device(http, d.b.url, third)
    assert (await Device(http, d.a.url, first).put(KIND, {"n": -1})).status == 200
    await watcher.sync(initial=True)
    writers = [Device(http, instance.url, account) for instance in d.instances for account in (first, second)]
    rng = random.Random(3391)
    operations = []
    for n in range(60):
        writer = rng.choice(writers)
        choice = n % 3
        if choice == 0:
            operations.append(writer.delete(KIND))
        elif choice == 1:
            operations.append(writer.put(KIND, {}))
        else:
            operations.append(writer.put(KIND, {"n": n}))
    rng.shuffle(operations)

    replies = await asyncio.gather(*operations)

    assert [r.status for r in replies] == [200] * len(replies), [r.body for r in replies if r.status != 200]
    final = await d.homeserver_holds(http, first, KIND)  # the last write Synapse accepted
    state = await d.snapshot()
    problems = consistency_problems(state, lambda user, room, kind: kind == KIND and final is not None)
    assert problems == []
    for instance in d.instances:
        reply = await Device(http, instance.url, third).get(KIND)
        assert (reply.status, reply.body if final is not None else reply.errcode) == (
            (200, final) if final is not None else (404, "M_NOT_FOUND")
        )
    if final is None:  # deleted: the device that never wrote has yet to learn it
        assert (None, KIND, third.device_id) in state.rows_of(first.user_id)
    watcher.base_url = d.a.url
    assert entries_of(await watcher.sync(), KIND, None) == [{"type": KIND, "content": final or {}}]


async def test_an_instance_killed_in_a_burst_of_deletes_loses_none_it_answered_and_the_other_serves_on(
    deployment: Deployment, http: aiohttp.ClientSession, accounts: Accounts
) -> None:
    d = deployment
    first, second = await accounts(2)
    kinds = [f"{KIND}.{i}" for i in range(40)]
    setter = Device(http, d.b.url, first)
    for kind in kinds:
        assert (await setter.put(kind, {"v": kind})).status == 200
    watcher = Device(http, d.b.url, second)
    await watcher.sync(initial=True)

    answers: dict[str, int | None] = {}  # None: the connection broke
    limit = asyncio.Semaphore(8)

    async def delete(i: int, kind: str) -> None:
        instance = d.instances[i % 2]
        async with limit:
            try:
                reply = await request(
                    http,
                    "DELETE",
                    instance.url + account_data_path(MSC3391, first.user_id, kind),
                    token=first.access_token,
                )
                answers[kind] = reply.status
            except aiohttp.ClientError:
                answers[kind] = None
            if len(answers) == 10 and d.a.running:
                assert d.a.process is not None
                d.a.process.kill()  # SIGKILL, with deletes of its own under way

    await asyncio.gather(*(delete(i, kind) for i, kind in enumerate(kinds)))

    assert not d.a.running
    through_b = [answers[kind] for i, kind in enumerate(kinds) if i % 2 == 1]
    assert through_b == [200] * len(through_b)  # the other instance served on
    assert any(answers[kind] != 200 for i, kind in enumerate(kinds) if i % 2 == 0)

    async def all_settled() -> bool:
        # Any owned request of the user lets B settle the intents A left once it knows A dead.
        await Device(http, d.b.url, first).get(kinds[0])
        return all(state == "done" for *_, state in (await d.snapshot()).tombstones)

    assert await eventually(all_settled)
    live = {kind: await d.homeserver_holds(http, first, kind) for kind in kinds}
    for kind in kinds:
        if answers[kind] == 200:
            assert live[kind] is None, f"{kind}: answered 200, yet the homeserver holds it"
        reply = await Device(http, d.b.url, first).get(kind)
        if live[kind] is None:
            assert (reply.status, reply.errcode) == (404, "M_NOT_FOUND"), kind
        else:
            assert (reply.status, reply.body) == (200, {"v": kind}), kind
    state = await d.snapshot()
    assert consistency_problems(state, lambda user, room, kind: live.get(kind) is not None) == []
    body = await watcher.sync()
    assert {kind for _, kind in empty_entries(body)} == {kind for kind in kinds if live[kind] is None}


async def test_postgresql_restarted_under_load_then_everything_is_consistent(
    deploy: Deploy,
    postgres_factory: Callable[..., PostgresServer],
    http: aiohttp.ClientSession,
    accounts: Accounts,
) -> None:
    server = await asyncio.to_thread(postgres_factory)
    await asyncio.to_thread(server.create_user, POSTGRES_TEST_USER)
    url = await asyncio.to_thread(server.create_database, "msc3391_proxy", POSTGRES_TEST_USER)
    d = await deploy(url)
    first, second, third = await accounts(3)
    kinds = [f"{KIND}.{i}" for i in range(40)]
    setter = Device(http, d.a.url, first)
    for kind in kinds:
        assert (await setter.put(kind, {"v": kind})).status == 200
    # Two other devices of the user, one syncing through each instance.
    watchers = [Device(http, d.a.url, second), Device(http, d.b.url, third)]
    for watcher in watchers:
        await watcher.sync(initial=True)

    answers: dict[str, Reply] = {}
    refused = asyncio.Event()
    under_way = asyncio.Event()  # some deletes are done: the database goes down
    sync_statuses: list[int] = []
    told: list[set[str]] = [set(), set()]  # the types each watcher was told deleted
    stop_syncing = asyncio.Event()

    async def deletes(offset: int) -> None:
        for i in range(offset, len(kinds), 2):
            reply = await Device(http, d.instances[i % 2].url, first).delete(kinds[i])
            answers[kinds[i]] = reply
            if len(answers) == 8:
                under_way.set()
            if reply.status != 200:
                refused.set()
            await asyncio.sleep(0.05)  # load, not a flood: the outage must fall inside it

    async def syncs() -> None:
        while not stop_syncing.is_set():
            for watcher, seen in zip(watchers, told, strict=True):
                reply = await watcher.request(
                    "GET", f"/_matrix/client/v3/sync?timeout=0&since={watcher.next_batch}"
                )
                sync_statuses.append(reply.status)
                if reply.status == 200:
                    watcher.next_batch = reply.body["next_batch"]
                    seen.update(kind for _, kind in empty_entries(reply.body))
            await asyncio.sleep(0.05)

    async def outage() -> None:
        await asyncio.wait_for(under_way.wait(), 60)
        await asyncio.to_thread(server.stop)
        await asyncio.wait_for(refused.wait(), 30)  # a delete met the database down
        await asyncio.to_thread(server.start)

    syncing = asyncio.ensure_future(syncs())
    await asyncio.gather(deletes(0), deletes(1), outage())

    # Both instances back: the pools reconnected by themselves.
    async def healthy() -> bool:
        statuses = [(await request(http, "GET", f"{p.url}/health")).status for p in d.instances]
        return statuses == [200, 200]

    assert await eventually(healthy)
    refusals = [kind for kind, reply in answers.items() if reply.status != 200]
    assert refusals, "no delete met the outage"
    assert all(is_matrix_error(answers[kind]) for kind in refusals), [answers[k].raw for k in refusals]
    assert any(reply.status == 200 for reply in answers.values())
    retried = set()
    for i, instance in enumerate(d.instances):  # deletes work again, through each
        kind = refusals[i % len(refusals)]
        again = await Device(http, instance.url, first).delete(kind)
        assert again.status == 200, again.body
        retried.add(kind)
    stop_syncing.set()
    await syncing

    assert set(sync_statuses) == {200}  # the syncs went on through the outage
    live = {kind: await d.homeserver_holds(http, first, kind) for kind in kinds}
    for kind, reply in answers.items():
        if reply.status == 200 or kind in retried:
            assert live[kind] is None, kind
        else:
            assert live[kind] == {"v": kind}, f"{kind}: refused, yet the homeserver changed"
    state = await d.snapshot()
    assert consistency_problems(state, lambda user, room, kind: live.get(kind) is not None) == []
    for watcher, seen in zip(watchers, told, strict=True):  # each device learns every delete
        seen.update(kind for _, kind in empty_entries(await watcher.sync()))
        assert seen == {kind for kind in kinds if live[kind] is None}

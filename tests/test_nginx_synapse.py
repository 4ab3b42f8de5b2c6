"""nginx running what `msc3391-proxy nginx-config` prints for the proxy's own
configuration file, in front of the proxy (a real process) and a real Synapse.

nginx (the Debian package) runs as this test's own process on a free loopback port,
with its configuration, pid file, logs and temporary directories under tmp_path. The
configuration is the command's output, verbatim, run the way an operator runs it
(`python -m proxy nginx-config --config FILE --listen ...`). nginx's access log names
the upstream of every request (`upstream=$upstream_addr`), so where each went is read
from nginx itself. Clients connect from 127.0.0.2, so the address nginx passes on can
be told apart from nginx's own.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from rig.accounts import login, register
from rig.nginx import Nginx
from rig.processes import free_port
from rig.proxy_process import ProxyProcess, nginx_config
from rig.synapse import SynapseServer
from tests.matrix import MSC3391, Device, account_data_path, global_entries, quote, wait_for_match
from tests.sliding_client import Connection, entries_of

pytestmark = pytest.mark.synapse

CLIENT_ADDRESS = "127.0.0.2"
# An ordinary request the proxy does not own: what a pass-through benchmark should send
# through the generated file (it goes straight to the homeserver).
ORDINARY = "/_matrix/client/v3/capabilities"


@pytest.fixture
def proxy(synapse: SynapseServer, proxy_process: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_process(synapse.url, msc3391=True)


@pytest.fixture(scope="session")
def nginx_binary(require: Callable[[str], str]) -> str:
    return require("nginx")


def generated_config(proxy: ProxyProcess, port: int) -> str:
    """The command's output for the proxy's own configuration file."""
    return nginx_config(proxy.config_path, port, server_name="localhost")


@pytest.fixture
def nginx(nginx_binary: str, proxy: ProxyProcess, tmp_path: Path) -> Iterator[Nginx]:
    port = free_port()
    # As root, the workers would otherwise run as `nobody`, who cannot write the
    # temporary directories under tmp_path (own_user).
    server = Nginx(
        tmp_path / "nginx",
        generated_config(proxy, port),
        [port],
        binary=nginx_binary,
        error_log_level="info",
        log_access=True,
        log_format="upstream=$upstream_addr",
        own_user=True,
    )
    server.start()
    try:
        # In the foreground, the process we started is nginx's master.
        assert server.process is not None and int(server.pid_path.read_text()) == server.process.pid
        yield server
    finally:
        server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """Not the shared `http`: requests from the client's own loopback address (127.0.0.2)."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(CLIENT_ADDRESS, 0)),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:
        yield session


async def devices(
    nginx: Nginx, http: aiohttp.ClientSession, unique_name: Callable[[str], str], n: int
) -> list[Device]:
    """A new user, registered and logged in again through nginx: n devices."""
    name = unique_name("nginx")
    accounts = [await asyncio.to_thread(register, nginx.url, name)]
    for _ in range(n - 1):
        accounts.append(await asyncio.to_thread(login, nginx.url, name))
    return [Device(http, nginx.url, account) for account in accounts]


def served_by(
    method: str, path: str, upstream: str, client: str = re.escape(CLIENT_ADDRESS)
) -> re.Pattern[str]:
    """nginx's access-log line of a request from `client` (a regular expression) to
    `path` (one too; the query string aside) that `upstream` (host:port) answered."""
    return re.compile(
        rf'^{client} .*"{method} {path}(\?\S*)? HTTP/1.1" \d+ .* '
        rf"upstream={re.escape(upstream)}$",
        re.M,
    )


def address(url: str) -> str:
    return url.removeprefix("http://")


def wait_until(done: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll until `done()` (a log that the server writes after answering), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (in clock ticks of 10 ms)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_the_msc3391_scenario_through_the_generated_file(
    nginx: Nginx,
    proxy: ProxyProcess,
    synapse: SynapseServer,
    http: aiohttp.ClientSession,
    unique_name: Callable[[str], str],
) -> None:
    alice, other, on_sliding_sync = await devices(nginx, http, unique_name, 3)
    kind = "org.example.nginx"

    reply = await alice.request("GET", "/_matrix/client/versions")
    assert reply.status == 200 and reply.body["unstable_features"]["org.matrix.msc3391"] is True
    await other.sync(initial=True)
    sliding = Connection(on_sliding_sync)
    await sliding.sync(first=True)

    assert (await alice.put(kind, {"through": "nginx"})).status == 200
    assert global_entries(await other.sync(), kind) == [{"type": kind, "content": {"through": "nginx"}}]
    assert entries_of(await sliding.sync(), kind) == [{"type": kind, "content": {"through": "nginx"}}]

    reply = await alice.delete(kind)
    assert (reply.status, reply.body) == (200, {})
    # The other device's incremental sync, and the sliding sync device's next answer.
    assert global_entries(await other.sync(), kind) == [{"type": kind, "content": {}}]
    assert entries_of(await sliding.sync(), kind) == [{"type": kind, "content": {}}]
    for device in (alice, other):
        got = await device.get(kind)
        assert (got.status, got.body) == (404, {"errcode": "M_NOT_FOUND", "error": "Account data not found"})
    # A device that logs in afterwards: its initial sync has no such entry at all.
    (fresh,) = [Device(http, nginx.url, await asyncio.to_thread(login, nginx.url, alice.account.localpart))]
    assert global_entries(await fresh.sync(initial=True), kind) == []
    # ... while the homeserver, asked directly, still holds `{}` for it (the proxy strips it).
    direct = await Device(http, synapse.url, alice.account).get(kind)
    assert (direct.status, direct.body) == (200, {})

    # nginx sent each owned request to the proxy, and the logins to Synapse directly.
    log = nginx.access_log.read_text
    for method, path in (
        ("GET", "/_matrix/client/versions"),
        ("PUT", rf"/_matrix/client/v3/user/\S+/account_data/{re.escape(kind)}"),
        ("DELETE", rf"{re.escape(MSC3391)}/user/\S+/account_data/{re.escape(kind)}"),
        ("GET", "/_matrix/client/v3/sync"),
        ("POST", re.escape("/_matrix/client/unstable/org.matrix.simplified_msc3575/sync")),
    ):
        line = served_by(method, path, address(proxy.url))
        assert line.search(wait_for_match(log, line)), (method, path, log())
    # (rig.accounts logs in from 127.0.0.1)
    line = served_by("POST", "/_matrix/client/v3/login", address(synapse.url), client=r"\S+")
    assert line.search(wait_for_match(log, line)), log()
    # The proxy names the client nginx saw (nginx is a trusted forwarder), not nginx.
    in_proxy = re.compile(
        r"^\S+ \S+ INFO proxy\.access \[\w+\] "
        + re.escape(CLIENT_ADDRESS)
        + " DELETE "
        + re.escape(MSC3391)
        + r"/user/\{\}/account_data/\{\} 200 ",
        re.M,
    )
    assert in_proxy.search(wait_for_match(lambda: proxy.log, in_proxy)), proxy.log


async def test_ordinary_traffic_never_reaches_the_proxy(
    nginx: Nginx,
    proxy: ProxyProcess,
    synapse: SynapseServer,
    http: aiohttp.ClientSession,
    unique_name: Callable[[str], str],
) -> None:
    """What a pass-through benchmark measures through the generated file: a small GET the
    proxy does not own, many at once, goes to Synapse directly and costs the proxy no
    CPU. (Through the proxy each costs it some 500 µs: 300 of them, 150 ms.)"""
    (alice,) = await devices(nginx, http, unique_name, 1)
    assert proxy.process is not None
    before = cpu_seconds(proxy.process.pid)

    async def ordinary() -> None:
        for _ in range(50):
            reply = await alice.request("GET", ORDINARY)
            assert reply.status == 200, reply.body

    await asyncio.gather(*(ordinary() for _ in range(6)))
    spent = cpu_seconds(proxy.process.pid) - before
    assert spent <= 0.03, f"the proxy spent {spent * 1000:.0f} ms of CPU on 300 requests it never saw"

    # Each of the 300 went to Synapse (nginx's log); a request the proxy owns, sent
    # after them, is in the proxy's log, and none of the 300 is.
    log = nginx.access_log.read_text
    line = served_by("GET", re.escape(ORDINARY), address(synapse.url))
    assert wait_until(lambda: len(line.findall(log())) >= 300)
    assert len(line.findall(log())) == 300
    assert (await alice.request("GET", "/_matrix/client/versions")).status == 200
    versions = re.compile(r"proxy\.access \[\w+\] \S+ GET /_matrix/client/versions 200 ")
    assert versions.search(wait_for_match(lambda: proxy.log, versions)), proxy.log
    assert "capabilities" not in proxy.log


async def test_encoded_slashes_in_a_type_arrive_byte_exact(
    nginx: Nginx,
    proxy: ProxyProcess,
    synapse: SynapseServer,
    http: aiohttp.ClientSession,
    unique_name: Callable[[str], str],
) -> None:
    """`%2F` (and `%2F%2F`, `%25`, `%20`) in a path segment reach Synapse as sent: a
    decoded slash would split the segment and Synapse would not know the path."""
    alice, other = await devices(nginx, http, unique_name, 2)
    kind = "org.example.a/b//c %d"
    encoded = quote(kind)
    assert encoded == "org.example.a%2Fb%2F%2Fc%20%25d"
    await other.sync(initial=True)

    reply = await alice.put(kind, {"slashes": True})
    assert (reply.status, reply.body) == (200, {})
    # Stored under exactly this type: read back on the proxy and on Synapse directly.
    for base_url in (nginx.url, proxy.url, synapse.url):
        got = await Device(http, base_url, alice.account).get(kind)
        assert (got.status, got.body) == (200, {"slashes": True}), base_url
    assert global_entries(await other.sync(), kind) == [{"type": kind, "content": {"slashes": True}}]

    path = account_data_path(MSC3391, alice.user_id, kind)
    assert path.endswith("/account_data/" + encoded)
    reply = await alice.request("DELETE", path)
    assert (reply.status, reply.body) == (200, {})
    assert global_entries(await other.sync(), kind) == [{"type": kind, "content": {}}]
    got = await alice.get(kind)
    assert (got.status, got.errcode) == (404, "M_NOT_FOUND")
    # Synapse holds the deletion as `{}` under the same type.
    direct = await Device(http, synapse.url, alice.account).get(kind)
    assert (direct.status, direct.body) == (200, {})


async def test_synapse_and_the_proxy_record_the_clients_address_not_a_spoofed_one(
    nginx: Nginx,
    proxy: ProxyProcess,
    synapse: SynapseServer,
    http: aiohttp.ClientSession,
    unique_name: Callable[[str], str],
) -> None:
    """nginx tells both upstreams the client's address. Synapse (`x_forwarded: true`)
    records it for a request nginx sends it directly, and the proxy (nginx is a trusted
    forwarder) logs it and passes it on. An X-Forwarded-For sent by the client itself
    must not be believed by either."""
    (alice,) = await devices(nginx, http, unique_name, 1)
    spoofed = {**alice.account.headers, "X-Forwarded-For": "203.0.113.9"}
    whoami = "/_matrix/client/v3/account/whoami"
    async with http.get(nginx.url + whoami, headers=spoofed) as response:
        assert response.status == 200  # straight to Synapse
    reply = await alice.request("GET", f"/_matrix/client/v3/devices/{quote(alice.device_id)}")
    assert reply.status == 200, reply.body  # through the proxy (its path is an owned route's)
    assert reply.body["last_seen_ip"] == CLIENT_ADDRESS, reply.body

    kind_path = account_data_path("/_matrix/client/v3", alice.user_id, "org.example.unset")
    async with http.get(nginx.url + kind_path, headers=spoofed) as response:
        assert response.status == 404
    line = served_by("GET", re.escape(whoami), address(synapse.url))
    assert line.search(wait_for_match(nginx.access_log.read_text, line))
    in_proxy = re.compile(
        r"proxy\.access \[\w+\] "
        + re.escape(CLIENT_ADDRESS)
        + r" GET /_matrix/client/v3/user/\{\}/account_data/\{\} 404 "
    )
    assert in_proxy.search(wait_for_match(lambda: proxy.log, in_proxy)), proxy.log
    assert "203.0.113.9" not in proxy.log

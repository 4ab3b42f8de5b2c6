"""The README's nginx `location` block, verbatim, in front of the proxy and a real Synapse.

nginx (the Debian package) runs as this test's own process on a free loopback port,
with its configuration, pid file, logs and temporary directories under tmp_path. The
configuration is a minimal `server {}` around the ```nginx block copied from README.md,
in which only the proxy's address in `proxy_pass` is replaced by the test proxy's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from rig import REPO_ROOT
from rig.accounts import login, register
from rig.nginx import Nginx
from rig.processes import free_port
from rig.proxy_process import ProxyProcess
from rig.synapse import SynapseServer
from tests.matrix import MSC3391, Device, account_data_path, global_entries, quote, wait_for_match

pytestmark = pytest.mark.synapse

# The proxy's address as the README writes it; the test puts its own proxy's there.
README_PROXY_ADDRESS = "127.0.0.1:8009"
# The client's own loopback address, different from nginx's (127.0.0.1), so that what
# Synapse records can be told apart from the address of a hop in between.
CLIENT_ADDRESS = "127.0.0.2"


def readme_location_block() -> str:
    """The README's ```nginx code block that holds a `location`, exactly as written."""
    blocks = re.findall(r"^```nginx\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), re.M | re.S)
    found = [block for block in blocks if re.search(r"^\s*location\b", block, re.M)]
    assert len(found) == 1, f"expected one ```nginx block with a location in README.md, found {len(found)}"
    return found[0]


@pytest.fixture
def proxy(synapse: SynapseServer, proxy_process: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_process(synapse.url, msc3391=True)


@pytest.fixture(scope="session")
def nginx_binary(require: Callable[[str], str]) -> str:
    return require("nginx")


@pytest.fixture
def nginx(nginx_binary: str, proxy: ProxyProcess, tmp_path: Path) -> Iterator[Nginx]:
    """nginx with the README's location block, proxying to `proxy`."""
    block = readme_location_block()
    assert block.count(README_PROXY_ADDRESS) == 1, block
    port = free_port()
    server_block = (
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        "        server_name localhost;\n"
        f"{block.replace(README_PROXY_ADDRESS, f'127.0.0.1:{proxy.port}')}\n"
        "    }"
    )
    # As root, the workers would otherwise run as `nobody`, who cannot write the
    # temporary directories under tmp_path (own_user).
    server = Nginx(
        tmp_path / "nginx",
        server_block,
        [port],
        binary=nginx_binary,
        error_log_level="info",
        log_access=True,
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
        connector=aiohttp.TCPConnector(local_addr=(CLIENT_ADDRESS, 0))
    ) as session:
        yield session


async def two_devices(
    nginx: Nginx, http: aiohttp.ClientSession, unique_name: Callable[[str], str]
) -> tuple[Device, Device]:
    """A new user, registered and logged in again through nginx: two devices."""
    name = unique_name("nginx")
    first = await asyncio.to_thread(register, nginx.url, name)
    second = await asyncio.to_thread(login, nginx.url, name)
    return Device(http, nginx.url, first), Device(http, nginx.url, second)


async def test_readme_snippet_carries_the_msc3391_scenario(
    nginx: Nginx, proxy: ProxyProcess, http: aiohttp.ClientSession, unique_name: Callable[[str], str]
) -> None:
    alice, other = await two_devices(nginx, http, unique_name)
    kind = "org.example.nginx"

    reply = await alice.request("GET", "/_matrix/client/versions")
    assert reply.status == 200 and reply.body["unstable_features"]["org.matrix.msc3391"] is True
    await other.sync(initial=True)

    assert (await alice.put(kind, {"through": "nginx"})).status == 200
    assert global_entries(await other.sync(), kind) == [{"type": kind, "content": {"through": "nginx"}}]

    reply = await alice.delete(kind)
    assert (reply.status, reply.body) == (200, {})
    assert global_entries(await other.sync(), kind) == [{"type": kind, "content": {}}]
    for device in (alice, other):
        got = await device.get(kind)
        assert (got.status, got.body) == (404, {"errcode": "M_NOT_FOUND", "error": "Account data not found"})

    # The requests went through nginx to the proxy (nginx's and the proxy's access logs).
    in_nginx = re.compile(
        rf"^{re.escape(CLIENT_ADDRESS)} .*\"DELETE {re.escape(MSC3391)}/user/\S+ HTTP/1.1\" 200 ", re.M
    )
    assert in_nginx.search(wait_for_match(nginx.access_log.read_text, in_nginx)), nginx.access_log.read_text()
    in_proxy = re.compile(
        # The client as nginx saw it (trusted X-Forwarded-For), not nginx itself.
        r"^\S+ \S+ INFO proxy\.access \[\w+\] "
        + re.escape(CLIENT_ADDRESS)
        + " DELETE "
        + re.escape(MSC3391)
        + r"/user/\{\}/account_data/\{\} 200 ",
        re.M,
    )
    assert in_proxy.search(wait_for_match(lambda: proxy.log, in_proxy)), proxy.log


async def test_encoded_slashes_in_a_type_arrive_byte_exact(
    nginx: Nginx,
    proxy: ProxyProcess,
    synapse: SynapseServer,
    http: aiohttp.ClientSession,
    unique_name: Callable[[str], str],
) -> None:
    """`%2F` (and `%2F%2F`, `%25`, `%20`) in a path segment reach Synapse as sent: a
    decoded slash would split the segment and Synapse would not know the path."""
    alice, other = await two_devices(nginx, http, unique_name)
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


async def test_synapse_records_the_clients_address_not_a_spoofed_one(
    nginx: Nginx,
    proxy: ProxyProcess,
    http: aiohttp.ClientSession,
    unique_name: Callable[[str], str],
) -> None:
    """nginx tells the proxy the client's address; the proxy (nginx is a trusted
    forwarder) passes it on, and Synapse (`x_forwarded: true`) records it. An
    X-Forwarded-For sent by the client itself must not be believed."""
    alice, _ = await two_devices(nginx, http, unique_name)
    reply = await alice.request("GET", "/_matrix/client/v3/account/whoami")
    assert reply.status == 200
    async with http.get(
        nginx.url + "/_matrix/client/v3/account/whoami",
        headers={**alice.account.headers, "X-Forwarded-For": "203.0.113.9"},
    ) as response:
        assert response.status == 200

    reply = await alice.request("GET", f"/_matrix/client/v3/devices/{quote(alice.device_id)}")
    assert reply.status == 200, reply.body
    assert reply.body["last_seen_ip"] == CLIENT_ADDRESS, reply.body
    # The proxy's access log names the client nginx saw (nginx is a trusted forwarder),
    # not nginx, and not the address the client claimed.
    whoami = re.compile(
        r"proxy\.access \[\w+\] " + re.escape(CLIENT_ADDRESS) + " GET /_matrix/client/v3/account/whoami 200 "
    )
    assert whoami.search(wait_for_match(lambda: proxy.log, whoami)), proxy.log

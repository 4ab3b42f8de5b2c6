"""Shared fixtures: `http` (the tests' HTTP client), `msc3391` (the proxy's feature off
and on), `store_backend` (SQLite and PostgreSQL), `start_proxy` (a proxy in this
process). Loaded as plugins here: the fixtures over the rig in `tests/rig_fixtures.py`
(`synapse`, `synapse_msc3391`, `synapse_factory`, `proxy_process`, `postgres`,
`postgres_url`, `postgres_factory`, `unique_name`, `require`), the fake homeserver's
`fake_hs` in `tests/fake_homeserver.py`, and the proxy in front of the real Synapse
(`proxy`, `store`, `devices`, `another_device`) in `tests/proxied_synapse.py`. Matrix
paths and calls for the tests: `tests/matrix.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import parse_config
from proxy.server import ProxyServer
from rig.proxy_process import merged

pytest_plugins = ["tests.rig_fixtures", "tests.fake_homeserver", "tests.proxied_synapse"]

StartProxy = Callable[..., Awaitable[ProxyServer]]

# Longer than any long-poll or transfer a test makes, short enough that a hung request
# fails its test in reasonable time.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The tests' HTTP client (aiohttp's defaults, a total timeout per request)."""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        yield session


@pytest.fixture(params=[False, True], ids=["msc3391-off", "msc3391-on"])
def msc3391(request: pytest.FixtureRequest) -> bool:
    """The proxy's `experimental_features.msc3391_enabled`: each test that takes it runs
    with the feature off (a pass-through) and on."""
    return request.param


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The proxy's store, for `start_proxy(url, **store_backend)`: each test that takes it
    runs on the SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"store": {"url": request.getfixturevalue("postgres_url")}}


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """`await start_proxy(upstream_url, msc3391=True, proxy={...}, ...)`: a proxy in
    this process on a free loopback port; stopped at the end of the test."""
    servers: list[ProxyServer] = []

    async def start(upstream_url: str, *, msc3391: bool = True, **sections: Any) -> ProxyServer:
        raw = merged(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "upstream": {"url": upstream_url},
                "store": {"path": str(tmp_path / f"proxy-{len(servers)}.sqlite3")},
                "experimental_features": {"msc3391_enabled": msc3391},
            },
            sections,
        )
        server = ProxyServer(parse_config(raw, tmp_path))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.stop()

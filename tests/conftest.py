"""Shared fixtures. The real-Synapse rig lives in `tests/synapse_rig.py`, the fake
homeserver in `tests/fake_homeserver.py`, the `require` fixture for nginx and Node.js
in `tests/prerequisites.py`; all are loaded as plugins here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.server import ProxyServer

pytest_plugins = ["tests.synapse_rig", "tests.fake_homeserver", "tests.prerequisites"]

StartProxy = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """`await start_proxy(upstream_url, msc3391=True, proxy={...}, ...)`: a proxy in
    this process on a free loopback port; stopped at the end of the test."""
    from tests.synapse_rig import merged  # here, not at the top: pytest loads it as a plugin

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

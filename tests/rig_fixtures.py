"""Fixtures over the rig (`rig/`): real Synapse servers, the proxy as a process, the
programs some tests need. Loaded as a plugin by `tests/conftest.py`.

- `synapse`, `synapse_msc3391`: session-wide servers (Synapse's own MSC3391 flag off /
  on), started on first use and stopped at the end of the session.
- `synapse_factory(msc3391=False) -> SynapseServer`: a throwaway server of the test's own.
- `proxy_process(upstream_url, msc3391=True, extra_toml="") -> ProxyProcess`.
- `postgres`: the session-wide PostgreSQL (`rig.postgres.PostgresServer`), started on
  first use and stopped at the end of the session; it has the login role
  `POSTGRES_TEST_USER` (no superuser rights, as a deployment would give the proxy).
  Do not stop or kill it: take `postgres_factory` for that.
- `postgres_url -> str`: a fresh empty database of that server for this test, owned by
  `POSTGRES_TEST_USER`, as its URL with the password
  (`postgresql://msc3391_proxy:PASSWORD@127.0.0.1:PORT/test_...`); dropped afterwards.
- `postgres_factory(**options) -> PostgresServer`: a started PostgreSQL of the test's
  own (to restart, kill, misconfigure), stopped and removed at teardown.
- `unique_name(prefix="user") -> str`: a fresh Matrix localpart.
- `require(what) -> str`: the path of a program (`rig.programs.locate`); if it is
  missing the test fails when the environment variable CI is set (CI must not pass by
  skipping) and is skipped otherwise, with the reason and the fix either way. The
  PostgreSQL fixtures call `require("postgresql")`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rig.postgres import PostgresServer, temporary_directory
from rig.programs import locate
from rig.proxy_process import ProxyProcess
from rig.synapse import SynapseServer

# The role that owns each test's database (`postgres_url`).
POSTGRES_TEST_USER = "msc3391_proxy"


@contextlib.contextmanager
def _running(server: SynapseServer) -> Iterator[SynapseServer]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """The shared Synapse, its own MSC3391 flag off. Use unique user names."""
    with _running(SynapseServer(tmp_path_factory.mktemp("synapse"), msc3391=False)) as server:
        yield server


@pytest.fixture(scope="session")
def synapse_msc3391(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """The shared Synapse with `experimental_features.msc3391_enabled: true`."""
    with _running(SynapseServer(tmp_path_factory.mktemp("synapse-msc3391"), msc3391=True)) as server:
        yield server


@pytest.fixture
def synapse_factory(tmp_path: Path) -> Iterator[Callable[..., SynapseServer]]:
    """`synapse_factory(msc3391=False)`: a started Synapse for this test alone (one it
    may stop or break), stopped at teardown."""
    servers: list[SynapseServer] = []

    def start(*, msc3391: bool = False) -> SynapseServer:
        server = SynapseServer(tmp_path / f"synapse-{len(servers)}", msc3391=msc3391)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """`proxy_process(upstream_url, msc3391=True, extra_toml="")`: the proxy as a real
    process on a free port, answering when returned; killed at teardown. `extra_toml`
    is merged into the generated config (e.g. '[proxy]\\nlog_level = "DEBUG"')."""
    processes: list[ProxyProcess] = []

    def start(upstream_url: str, msc3391: bool = True, extra_toml: str = "") -> ProxyProcess:
        process = ProxyProcess(
            tmp_path, upstream_url, msc3391=msc3391, extra_toml=extra_toml, name=f"proxy-{len(processes)}"
        )
        processes.append(process)
        process.start()
        return process

    yield start
    for process in reversed(processes):
        process.stop()


@contextlib.contextmanager
def _postgres(**options: Any) -> Iterator[PostgresServer]:
    """A started PostgreSQL in a directory of its own under /tmp (pytest's tmp_path is
    closed to the `postgres` user it runs as), stopped and removed at the end."""
    directory = temporary_directory()
    server = PostgresServer(directory, **options)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(require: Callable[[str], str]) -> Iterator[PostgresServer]:
    """The shared PostgreSQL, with the role `POSTGRES_TEST_USER`. Use `postgres_url`
    for a database of your own; never stop or kill this one."""
    require("postgresql")
    with _postgres() as server:
        server.create_user(POSTGRES_TEST_USER)
        yield server


_databases = itertools.count()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A new empty database on the shared server, owned by `POSTGRES_TEST_USER`: its URL
    with that role's password. Dropped after the test, connections or not."""
    name = f"test_{next(_databases)}_{secrets.token_hex(4)}"
    url = postgres.create_database(name, owner=POSTGRES_TEST_USER)
    yield url
    postgres.drop_database(name)


@pytest.fixture
def postgres_factory(require: Callable[[str], str]) -> Iterator[Callable[..., PostgresServer]]:
    """`postgres_factory(**options)`: a started `PostgresServer(directory, **options)` for
    this test alone (one it may restart, kill, or start with other `settings`),
    stopped and its directory removed at teardown."""
    require("postgresql")
    with contextlib.ExitStack() as servers:

        def start(**options: Any) -> PostgresServer:
            return servers.enter_context(_postgres(**options))

        yield start


_names = itertools.count()


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """`unique_name(prefix="user")`: a Matrix localpart no other test uses."""

    def make(prefix: str = "user") -> str:
        return f"{prefix.lower()}-{next(_names)}-{secrets.token_hex(3)}"

    return make


@pytest.fixture(scope="session")
def require() -> Callable[[str], str]:
    """`require("nginx")` / `require("openssl")` / `require("matrix-js-sdk")` /
    `require("matrix-js-sdk-43")` / `require("chromium")` / `require("browser-js")` /
    `require("postgresql")`: the program's path (nginx; openssl; node with
    tests/js/node_modules ready; tests/js43's own Node.js 22 with its node_modules ready;
    Chromium; node with tests/browser/node_modules ready; the directory of PostgreSQL's
    initdb and postgres). If it is missing: the test fails when the environment variable
    CI is set, and is skipped otherwise."""
    found: dict[str, tuple[str | None, str]] = {}

    def check(what: str) -> str:
        if what not in found:
            found[what] = locate(what)
        path, problem = found[what]
        if path is not None:
            return path
        message = f"{problem}; `python3 scripts/test.py` run as root installs it"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs this test to run, but {message}", pytrace=False)
        pytest.skip(message)

    return check

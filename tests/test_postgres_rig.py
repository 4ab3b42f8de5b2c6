"""The PostgreSQL test rig itself (rig/postgres.py and its fixtures): the server starts,
each test gets a database of its own at a URL that works, passwords are checked, a
restart keeps what was committed, a crash is recovered from, and no PostgreSQL process
outlives its server, its test session or the process that started it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from rig import REPO_ROOT
from rig.postgres import PostgresServer, temporary_directory
from rig.processes import port_is_free, process_gone
from rig.programs import debian_packages_to_install, find_postgres_bindir
from tests.rig_fixtures import POSTGRES_TEST_USER

PostgresFactory = Callable[..., PostgresServer]


def wait_until_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """The PIDs still alive after `timeout` seconds (none, once they have all exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(process_gone(pid) for pid in pids):
            return []
        time.sleep(0.02)
    return [pid for pid in pids if not process_gone(pid)]


async def test_a_test_database_answers_at_its_url(postgres: PostgresServer, postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    assert (parts.scheme, parts.hostname, parts.port) == ("postgresql", "127.0.0.1", postgres.port)
    connection = await asyncpg.connect(postgres_url)
    try:
        row = await connection.fetchrow(
            "SELECT current_user, current_database(), rolsuper FROM pg_roles WHERE rolname = current_user"
        )
        assert tuple(row) == (POSTGRES_TEST_USER, parts.path[1:], False)
        # Empty, and its owner may create tables in it, as the backend's migrations will.
        assert await connection.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        await connection.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        assert connection.get_server_version().major >= 15
    finally:
        await connection.close()
    # The blocking helper works from inside a running event loop (it has a thread of its own).
    assert postgres.fetch("SELECT x FROM t", database=parts.path[1:]) == [(1,)]
    names = ["listen_addresses", "max_connections", "fsync", "synchronous_commit"]
    settings = dict(postgres.fetch("SELECT name, setting FROM pg_settings WHERE name = ANY($1)", names))
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "max_connections": "200",
        "fsync": "off",
        "synchronous_commit": "on",
    }


async def test_passwords_are_checked(postgres: PostgresServer, postgres_url: str) -> None:
    database = urlsplit(postgres_url).path[1:]
    bare = postgres.url_for(database, POSTGRES_TEST_USER, with_password=False)
    assert postgres.password_of(POSTGRES_TEST_USER) not in bare
    # The password given apart from the URL, as the proxy's password_file will.
    connection = await asyncpg.connect(bare, password=postgres.password_of(POSTGRES_TEST_USER))
    assert await connection.fetchval("SELECT current_user") == POSTGRES_TEST_USER
    await connection.close()
    for wrong in ("wrong", "", None):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(bare, password=wrong)
    # The superuser too needs its password over TCP.
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres.url_for("postgres", with_password=False), password="wrong")


def test_each_test_gets_a_new_database_dropped_afterwards(
    tmp_path: Path, require: Callable[[str], str]
) -> None:
    """An inner pytest session over the same fixtures: its second test finds the first
    one's database gone; after the session, its server and its files are gone too."""
    require("postgresql")
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.rig_fixtures"]\n')
    record = tmp_path / "record.json"
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            f"""
            import json
            from urllib.parse import urlsplit

            RECORD = {str(record)!r}
            seen = []

            def test_first(postgres, postgres_url):
                seen.append(urlsplit(postgres_url).path[1:])
                json.dump({{"pid": postgres.pid, "backends": postgres.backend_pids(), "port": postgres.port,
                           "directory": str(postgres.directory)}}, open(RECORD, "w"))

            def test_second(postgres, postgres_url):
                name = urlsplit(postgres_url).path[1:]
                assert name != seen[0]
                databases = [n for (n,) in postgres.fetch("SELECT datname FROM pg_database")]
                assert name in databases and seen[0] not in databases
            """
        )
    )
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert inner.returncode == 0, inner.stdout + inner.stderr
    assert "2 passed" in inner.stdout
    server = json.loads(record.read_text())
    assert wait_until_gone([server["pid"], *server["backends"]], timeout=1) == []
    assert port_is_free(server["port"])
    assert not Path(server["directory"]).exists()


async def test_restart_keeps_what_was_committed_and_rolls_back_the_rest(
    postgres_factory: PostgresFactory,
) -> None:
    server = postgres_factory()
    port = server.port
    server.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    connection = await server.connect_async()
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute("INSERT INTO t VALUES (2)")
    server.restart()
    assert server.port == port
    # The open connection was cut by the fast shutdown, its transaction rolled back.
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError)):
        await connection.fetchval("SELECT 1")
    connection.terminate()
    assert await server.fetch_async("SELECT x FROM t") == [(1,)]


def test_kill_then_start_recovers_every_commit(postgres_factory: PostgresFactory) -> None:
    server = postgres_factory()
    server.execute("CREATE TABLE t (x int)")
    for x in range(20):
        server.execute("INSERT INTO t VALUES ($1)", x)
    processes = [server.pid, *server.backend_pids()]
    assert len(processes) >= 5  # the postmaster, checkpointer, background writer, WAL writer, ...
    server.kill()
    assert not server.running
    assert wait_until_gone(processes, timeout=0) == []  # kill() waited for every one of them
    server.start()
    # A crash, recovered from the WAL (fsync is off: the WAL was in the kernel's cache).
    assert "database system was not properly shut down; automatic recovery in progress" in server.log_tail()
    assert server.fetch("SELECT count(*), sum(x) FROM t") == [(20, sum(range(20)))]


def test_stop_leaves_nothing_running(postgres_factory: PostgresFactory) -> None:
    server = postgres_factory()
    processes = [server.pid, *server.backend_pids()]
    server.stop()
    assert wait_until_gone(processes, timeout=0) == []
    assert port_is_free(server.port or 0)
    assert not server.pid_file.exists()  # a clean shutdown removes it
    server.stop()  # a second stop does nothing


def test_the_server_dies_with_the_process_that_started_it(require: Callable[[str], str]) -> None:
    """SIGKILL the process that started PostgreSQL: Linux sends the postmaster SIGINT
    (its fast shutdown), and every PostgreSQL process goes."""
    require("postgresql")
    directory = temporary_directory()
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from rig.postgres import PostgresServer\n"
            "server = PostgresServer(Path(sys.argv[1]))\n"
            "server.start()\n"
            "print(server.pid, *server.backend_pids(), flush=True)\n"
            "time.sleep(120)\n",
            str(directory),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stdout is not None
        pids = [int(pid) for pid in starter.stdout.readline().split()]
        assert len(pids) >= 5, "the starter did not start PostgreSQL"
        starter.send_signal(signal.SIGKILL)
        starter.wait(10)
        assert wait_until_gone(pids) == []
        assert "received fast shutdown request" in (directory / "postgres.log").read_text()
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        shutil.rmtree(directory, ignore_errors=True)


def test_postgresql_is_found_or_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = find_postgres_bindir()
    if bindir is not None:
        assert (bindir / "initdb").exists() and (bindir / "postgres").exists()
        assert "postgresql" not in debian_packages_to_install()
    # A machine without it: scripts/test.py would apt-get install Debian's postgresql.
    monkeypatch.setenv("MSC3391_PROXY_POSTGRES_BINDIR", "/nonexistent")
    assert find_postgres_bindir() is None
    assert "postgresql" in debian_packages_to_install()

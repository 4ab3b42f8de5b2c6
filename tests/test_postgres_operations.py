"""Running on PostgreSQL as an operator does: `store.url` and its mistakes, `inspect`, and
`migrate-store` from an existing SQLite store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from yarl import URL

from proxy.config import parse_config
from proxy.store import open_store, sqlite_store
from rig import REPO_ROOT
from rig.postgres import PostgresServer
from tests.matrix import ALICE
from tests.rig_fixtures import POSTGRES_TEST_USER

pytestmark = pytest.mark.postgres


def run(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args, "--config", str(config)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def write_config(tmp_path: Path, store: str) -> Path:
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[listen]\nport = 0\n[upstream]\nurl = "http://127.0.0.1:9"\n'
        f"[store]\n{store}\n[experimental_features]\nmsc3391_enabled = true\n"
    )
    return config


def test_a_database_that_cannot_be_reached_at_start_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'url = "postgresql://proxy:s3cret@127.0.0.1:9/msc3391"')

    result = run(config=config)

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(
        "msc3391-proxy: config error: store.url: cannot use postgresql://proxy@127.0.0.1:9/"
    )
    assert "s3cret" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ('url = "mysql://u@h/db"', "store.url: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME"),
        ('url = "postgresql://u@h"', "store.url: names no database (postgresql://USER@HOST:PORT/DBNAME)"),
        (
            'url = "postgresql://u:p@h/db"\npassword_file = "pw"',
            "store.password_file: store.url has a password already",
        ),
        ('password_file = "pw"', "store.password_file: only means something with store.url"),
    ],
)
def test_a_store_url_mistake_is_one_line_naming_the_key(tmp_path: Path, store: str, message: str) -> None:
    (tmp_path / "pw").write_text("secret\n")
    result = run(config=write_config(tmp_path, store))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"msc3391-proxy: config error: {message}"]


async def test_the_password_file_is_read_and_never_shown(
    postgres: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    password = postgres.password_of(POSTGRES_TEST_USER)
    (tmp_path / "pw").write_text(password + "\n")
    config = parse_config(
        {
            "upstream": {"url": "http://hs"},
            "store": {
                "url": postgres.url_for(database, POSTGRES_TEST_USER, with_password=False),
                "password_file": "pw",
            },
        },
        tmp_path,
    )
    assert password not in repr(config) and password not in str(config.store.url)
    store = open_store(config.store)
    await store.open()  # the server asks every TCP client for its password: it was sent
    try:
        sid = await store.begin_delete(ALICE, None, "t", "D1", ["D1", "D2"])
        await store.commit_delete(sid)
        assert [t.account_data_type for t in await store.tombstones()] == ["t"]
    finally:
        await store.close()


async def test_migrate_store_copies_every_pending_deletion_and_inspect_reads_it(
    postgres_url: str, tmp_path: Path
) -> None:
    sqlite_path = tmp_path / "proxy.sqlite3"
    source = sqlite_store(sqlite_path)
    await source.open()
    done = await source.begin_delete(ALICE, None, "gone", "D1", ["D1", "D2", "D3"])
    await source.commit_delete(done)
    await source.record_delivery(ALICE, "D2", "s7", [done])
    room = await source.begin_delete(ALICE, "!r:localhost", "room.gone", "D1", ["D1", "D2", "D3"])
    await source.commit_delete(room)
    highest = await source.begin_delete(ALICE, None, "revived", "D1", ["D1", "D2", "D3"])
    await source.abort_delete(highest)  # gone from the tables, but its stream_id was handed out
    before = await source.unsynced_rows(), await source.tombstones()
    await source.close()
    config = write_config(tmp_path, f"path = {json.dumps(str(sqlite_path))}")

    result = await asyncio.to_thread(run, "migrate-store", "--to", postgres_url, config=config)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("copied 2 tombstone(s), 4 row(s) and 1 delivery record(s)")
    target = open_store(
        parse_config({"upstream": {"url": "http://hs"}, "store": {"url": postgres_url}}, tmp_path).store
    )
    await target.open()
    try:
        assert (await target.unsynced_rows(), await target.tombstones()) == before
        assert await target.acknowledge_since(ALICE, "D2", "s7") == 1  # the delivery record came along
        # The sequence is past every stream_id SQLite handed out.
        assert await target.begin_delete(ALICE, None, "new", "D1", ["D1", "D2", "D3"]) > highest
    finally:
        await target.close()

    pg_config = write_config(tmp_path, f'url = "{postgres_url}"')
    report = json.loads((await asyncio.to_thread(run, "inspect", "--json", config=pg_config)).stdout)
    assert sorted(report["users"][ALICE]["devices"]) == ["D2", "D3"]

    # Into a database that holds a store already: refused, nothing changed.
    again = await asyncio.to_thread(run, "migrate-store", "--to", postgres_url, config=config)
    assert again.returncode == 1
    shown = URL(postgres_url).with_password(None)  # the password is never printed
    holds = f"the database {shown} holds a store already: migrate into an empty one"
    assert again.stderr.splitlines() == [f"msc3391-proxy: store error: {holds}"]


async def test_migrate_store_refuses_a_sqlite_store_a_proxy_is_serving_from(
    postgres_url: str, tmp_path: Path
) -> None:
    sqlite_path = tmp_path / "proxy.sqlite3"
    serving = sqlite_store(sqlite_path)
    await serving.open()
    try:
        config = write_config(tmp_path, f"path = {json.dumps(str(sqlite_path))}")
        result = await asyncio.to_thread(run, "migrate-store", "--to", postgres_url, config=config)
    finally:
        await serving.close()
    assert result.returncode == 1
    assert "is in use by another msc3391-proxy process" in result.stderr

"""The run's PostgreSQL (the store of issue 12): one throwaway cluster from the rig.

Started with the durability settings of production, not the rig's test settings
(`rig.postgres.TEST_SETTINGS` turns fsync off): a durable commit here waits for its WAL
to reach the disk, as it would in a deployment, so the store figures cost what they
cost there.
"""

from __future__ import annotations

from pathlib import Path

from rig.postgres import PostgresServer

from .harness import say

# Over the rig's TEST_SETTINGS (which keep listen_addresses, max_connections, lc_messages).
DURABLE = {
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "on",
}
# The role the proxy connects as (no superuser rights, as a deployment would give it).
ROLE = "msc3391"


def start(workdir: Path) -> PostgresServer:
    """initdb and start; `workdir` must be reachable by the `postgres` user (the run's
    working directory, 0755 under /tmp, is)."""
    server = PostgresServer(workdir / "postgres", settings=DURABLE)
    say("PostgreSQL: initdb and start (fsync on)")
    server.start()
    server.create_user(ROLE)
    return server


def database(server: PostgresServer, name: str) -> str:
    """A fresh database owned by the proxy's role; its URL (with the password)."""
    return server.create_database(name, ROLE)


def settings_text(server: PostgresServer) -> str:
    """The settings the server ran with, for the report (its command line's `-c`s)."""
    shown = {k: v for k, v in server.settings.items() if k not in ("listen_addresses", "lc_messages")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) + " (everything else PostgreSQL's defaults)"


def version(server: PostgresServer) -> str:
    rows = server.fetch("SHOW server_version")
    return str(rows[0][0]) if rows else "?"

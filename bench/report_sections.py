# ruff: noqa: RUF001  (the multiplication sign and en dash are printed in the report)
"""The report's detail sections for the generated nginx configuration and the store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .verdicts import BACKEND_NAMES

Table = Callable[[list[str], list[list[str]]], str]
WrkSection = Callable[..., str]


def generated(section: dict[str, Any], table: Table, wrk_section: WrkSection) -> list[str]:
    parts = ["### nginx on the generated configuration", ""]
    bypass = section.get("bypass")
    if bypass:
        parts += [
            "nginx runs the file `python -m proxy nginx-config --config PROXY.toml --listen …"
            " --proxy …` printed for a running proxy process whose upstream is the static nginx:"
            " its homeserver upstream is that nginx, its proxy upstream the proxy. The request is"
            " the 26-byte GET of a path the proxy does not own (`/_matrix/client/v3/capabilities`),"
            " against a plain nginx reverse proxy to the same upstream (the pass-through section's);"
            f" both with {bypass['workers']} worker, the harness's http settings"
            " (keep-alive, sendfile) and their own upstream keep-alive. CPU: the nginx workers';"
            " the proxy process's CPU over the same runs is the side column (it should not see"
            " these requests at all). Checked once before the runs: `/versions` through the"
            " generated config reaches the proxy (it carries `org.matrix.msc3391`):"
            f" {'yes' if bypass['owned_reaches_proxy'] else '**no**'}; the measured path comes back"
            f" as the upstream sent it: {'yes' if bypass['not_owned_unchanged'] else '**no**'}."
            f" The generated file had {bypass['config_lines']} lines.",
            "",
            wrk_section(bypass, "nginx", side="proxy process CPU per run", cpu="nginx workers' CPU µs/req"),
            "",
        ]
    inst = section.get("instances")
    if inst:
        parts += [
            "Several instances (issue 12): two proxy processes, A and B, on one PostgreSQL store"
            " (the run's server, its own database), both running throughout. Target *one*: nginx on"
            " the config generated with `--proxy A`; target *two*: nginx on the config generated"
            " with `--proxy A --proxy B` (round-robin). Both nginx with"
            f" {inst['workers']} workers (`auto` on this machine: one worker would cap both at what"
            " one core proxies). The request: the pass-through section's incremental /sync, nothing"
            " pending (the fast path: no store query). CPU: A's (one) or A's and B's together"
            " (two), per request; side column: B's alone (≈ 0 for *one*, about half for *two*).",
            "",
            wrk_section(inst, "one", side="instance B's CPU per run", cpu="proxy instances' CPU µs/req"),
            "",
        ]
    return parts


def _rows(backends: dict[str, Any]) -> list[list[str]]:
    """One row per figure, one column per backend."""

    def row(label: Callable[[dict[str, Any]], str], value: Callable[[dict[str, Any]], str]) -> list[str]:
        first = next(iter(backends.values()))
        return [label(first), *(value(b) for b in backends.values())]

    def d(b: dict[str, Any]) -> dict[str, Any]:
        return dict(b["delete_100_devices"])

    def pf(b: dict[str, Any]) -> dict[str, Any]:
        return dict(b["pending_for_device"])

    def hp(b: dict[str, Any]) -> dict[str, Any]:
        return dict(b["has_pending"])

    return [
        row(lambda b: "rows inserted (with SQL) in", lambda b: f"{b['populated']['seconds']:.1f} s"),
        row(lambda b: "`open()` (loads the in-memory index)", lambda b: f"{b['open_seconds']:.2f} s"),
        row(
            lambda b: (
                f"delete for a user with 100 devices ({d(b)['count']} deletes):"
                " begin_delete + commit_delete, median / max"
            ),
            lambda b: f"{d(b)['total_ms']:.2f} / {d(b)['total_max_ms']:.2f} ms",
        ),
        row(
            lambda b: "… of which begin_delete / commit_delete",
            lambda b: f"{d(b)['begin_ms']:.2f} / {d(b)['commit_ms']:.2f} ms",
        ),
        row(
            lambda b: "the same type deleted again (replaces the old tombstone)",
            lambda b: f"{d(b)['same_type_again_ms']:.2f} ms",
        ),
        row(
            lambda b: (
                "for scale: one one-row durable commit on this disk"
                " (SQLite: WAL, synchronous=FULL; PostgreSQL: fsync on, synchronous_commit on)"
            ),
            lambda b: f"{b['commit_floor_ms']:.2f} ms",
        ),
        row(
            lambda b: "has_pending: user without rows / device without / device with",
            lambda b: (
                " / ".join(
                    f"{hp(b)[k]:.0f}"
                    for k in ("user_without_rows_ns", "device_without_rows_ns", "device_with_rows_ns")
                )
                + " ns"
            ),
        ),
        row(
            lambda b: "pending_for_device, nothing pending (answered in memory)",
            lambda b: f"{pf(b)['nothing_pending_us']:.1f} µs",
        ),
        row(
            lambda b: f"pending_for_device, {pf(b)['ten_pending_found']} pending (a query)",
            lambda b: f"{pf(b)['ten_pending_us']:.0f} µs",
        ),
        row(
            lambda b: f"pending_for_device, {pf(b)['many_pending_found']} pending (a query)",
            lambda b: f"{pf(b)['many_pending_us']:.0f} µs",
        ),
    ]


def store(st: dict[str, Any], table: Table) -> list[str]:
    backends = st["backends"]
    sqlite = backends["sqlite"]
    populated = sqlite["populated"]
    postgres = backends.get("postgresql")
    text = (
        f"{populated['rows']:,} rows in `account_data_unsynced_deletes` ({populated['users']:,} users"
        " × 10 devices × 10 deletes, half of them room account data, each with its tombstone),"
        " inserted with SQL into a database whose schema the proxy's own store made (opened once),"
        " then timed through the `DeletionStore` API in the benchmark process."
        f" SQLite: a file on {sqlite['filesystem']}, WAL, executemany in one transaction."
    )
    if postgres:
        text += (
            f" PostgreSQL {postgres['version']} on {postgres['filesystem']}, the run's own cluster"
            f" (`rig.postgres.PostgresServer`) with {postgres['settings']}; populated by the server"
            " (`generate_series`), then `VACUUM ANALYZE` (as autovacuum would have left a table of"
            f" that size in a running deployment; database {postgres['populated']['database_size']});"
            " the store connects over TCP on loopback with a password, as a role without superuser"
            " rights."
        )
    else:
        text += " PostgreSQL was not run."
    headers = ["figure", *(BACKEND_NAMES[name] for name in backends)]
    nq = st["no_query"]
    no_query = table(
        ["figure (SQLite, statements seen by a trace callback)", "statements"],
        [
            ["50 incremental /syncs, user without rows", str(nq["no_rows_incremental"])],
            ["10 initial /syncs (rewritten), user without rows", str(nq["no_rows_initial"])],
            ["the first /sync after the user got rows (device sweep)", str(nq["other_device_sweep"])],
            [
                "50 incremental /syncs, rows only on the user's other device",
                str(nq["other_device_rows_incremental"]),
            ],
            ["control: 1 /sync of a device with a pending delete", str(nq["pending_incremental_control"])],
        ],
    )
    return [
        "### Store",
        "",
        text,
        "",
        table(headers, _rows(backends)),
        "",
        "No database query for a device with nothing pending: an in-process proxy on the SQLite"
        " store answers /syncs with an SQLite trace callback installed (the answers come from the"
        " same in-memory index on PostgreSQL).",
        "",
        no_query,
        "",
    ]


__all__ = ["generated", "store"]

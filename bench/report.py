# ruff: noqa: RUF001  (the multiplication sign and en dash are printed in the report)
"""Turns the results of one run into docs/benchmarks.md: the targets of issue 5, met
or missed, then every figure in detail."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import MiB, Settings


@dataclass
class Verdict:
    figure: str
    target: str
    measured: str
    met: bool | None  # None: could not be measured in this run

    @property
    def mark(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _get(results: dict[str, Any], *keys: str) -> Any:
    node: Any = results
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def verdicts(results: dict[str, Any], settings: Settings) -> list[Verdict]:
    out: list[Verdict] = []
    small, large = settings.sync_sizes
    s_label, l_label = settings.size_label(small), settings.size_label(large)
    pt = _get(results, "passthrough", "summary")
    if pt:
        c64 = pt["small_c64"]
        ratio = c64["proxy"]["rps"] / c64["nginx"]["rps"]
        ref = c64.get("aiohttp")
        ref_ratio = f"; minimal aiohttp proxy: {ref['rps'] / c64['nginx']['rps']:.2f}×" if ref else ""
        out.append(
            Verdict(
                "Pass-through 26-byte GET, 64 conns: req/s vs nginx",
                "≥ 0.25×",
                f"{ratio:.2f}× ({_f(c64['proxy']['rps'], 0)} vs {_f(c64['nginx']['rps'], 0)} req/s"
                + ref_ratio
                + ")",
                ratio >= 0.25,
            )
        )
        cpu = c64["proxy"]["cpu_us"]
        ref_cpu = f"; minimal aiohttp proxy: {_f(ref['cpu_us'])} µs" if ref else ""
        out.append(
            Verdict(
                "Pass-through 26-byte GET, 64 conns: proxy CPU per request",
                "≤ 100 µs",
                f"{_f(cpu)} µs (nginx: {_f(c64['nginx']['cpu_us'])} µs{ref_cpu})",
                cpu is not None and cpu <= 100,
            )
        )
        inc = pt["sync_s_inc_c8"]
        ratio = inc["proxy"]["rps"] / inc["nginx"]["rps"]
        out.append(
            Verdict(
                f"{s_label} /sync needing no change (incremental), 8 conns: req/s vs nginx",
                "≥ 0.9×",
                f"{ratio:.2f}× ({_f(inc['proxy']['rps'])} vs {_f(inc['nginx']['rps'])} req/s)",
                ratio >= 0.9,
            )
        )
        for key, size, label in (("sync_s_init_c1", small, s_label), ("sync_l_init_c1", large, l_label)):
            floor = _floor(results, size)
            run = pt[key]
            added = run["proxy"]["p50_ms"] - run["nginx"]["p50_ms"]
            ratio = added / floor if floor else None
            out.append(
                Verdict(
                    f"{label} /sync needing a rewrite (initial), 1 conn: time added over nginx",
                    "≤ 1.3× the orjson loads+dumps floor",
                    f"{ratio:.2f}× (+{added:.1f} ms over nginx's {run['nginx']['p50_ms']:.1f} ms p50;"
                    f" floor {floor:.1f} ms)"
                    if ratio is not None
                    else "–",
                    ratio is not None and ratio <= 1.3,
                )
            )
    syn = _get(results, "synapse", "summary")
    if syn:
        for key, label in (
            ("whoami", "whoami"),
            ("account_data_get", "account data GET"),
            ("sync_incremental", "incremental /sync"),
        ):
            ratio = syn[key]["proxy"]["rps"] / syn[key]["direct"]["rps"]
            out.append(
                Verdict(
                    f"Synapse, 8 conns, {label}: req/s through the proxy vs direct",
                    "≥ 0.9×",
                    f"{ratio:.2f}× ({_f(syn[key]['proxy']['rps'])} vs {_f(syn[key]['direct']['rps'])} req/s)",
                    ratio >= 0.9,
                )
            )
        d = syn["delete_c8"]
        ratio = d["proxy"]["p50_ms"] / d["direct"]["p50_ms"]
        one = syn.get("delete_c1")
        extra = ""
        if one:
            extra = f"; at 1 conn {one['proxy']['p50_ms'] / one['direct']['p50_ms']:.2f}×"
        out.append(
            Verdict(
                "MSC3391 DELETE, 8 conns: p50 latency vs Synapse's own",
                "≤ 2×",
                f"{ratio:.2f}× ({d['proxy']['p50_ms']:.1f} vs {d['direct']['p50_ms']:.1f} ms{extra})",
                ratio <= 2.0,
            )
        )
    held = _get(results, "memory", "held")
    if held:
        per = held["kib_per_connection"]
        n = held["held"]
        note = "" if n == settings.held_connections else f" (at {n:,} held: see the fd limit note)"
        out.append(
            Verdict(
                f"{settings.held_connections:,} idle long-poll /syncs held: proxy RSS per connection",
                "≤ 20 KiB",
                f"{_f(per)} KiB{note}",
                per is not None and per <= 20,
            )
        )
        p99 = held["probe_held"]["p99_ms"]
        out.append(
            Verdict(
                "Small request p99 while they are held (1 conn)",
                "< 50 ms",
                f"{p99:.2f} ms (idle: {held['probe_idle']['p99_ms']:.2f} ms)",
                p99 < 50 and not held["probe_held"]["errors"],
            )
        )
    streamed = _get(results, "memory", "streamed")
    if streamed:
        growth = max(streamed["download"]["growth_kib"], streamed["upload"]["growth_kib"]) / 1024
        complete = streamed["download"]["complete"] and streamed["upload"]["complete"]
        out.append(
            Verdict(
                f"{streamed['bytes'] / MiB:,.0f} MiB streamed through the proxy (down, up): peak RSS growth",
                "≤ 8 MiB",
                f"{growth:.1f} MiB (down {streamed['download']['growth_kib'] / 1024:.1f},"
                f" up {streamed['upload']['growth_kib'] / 1024:.1f})" + ("" if complete else " INCOMPLETE"),
                growth <= 8 and complete,
            )
        )
    store = _get(results, "store")
    if store:
        d = store["delete_100_devices"]
        out.append(
            Verdict(
                f"Store at {store['populated']['rows']:,} rows: delete for a user with 100 devices",
                "≤ 5 ms",
                f"{d['total_ms']:.2f} ms median (max {d['total_max_ms']:.2f})",
                d["total_ms"] <= 5,
            )
        )
        nq = store["no_query"]
        queries = nq["no_rows_incremental"] + nq["no_rows_initial"] + nq["other_device_rows_incremental"]
        out.append(
            Verdict(
                "A /sync for a device with nothing pending: database statements",
                "none",
                f"{queries} in {sum(nq['requests'].values())} syncs"
                f" (control, device with a pending delete: {nq['pending_incremental_control']} in 1)",
                queries == 0 and nq["pending_incremental_control"] > 0,
            )
        )
    return out


def _floor(results: dict[str, Any], size: int) -> float | None:
    """The floor measured beside the proxy's rewrite runs (median of their medians), or
    else the one measured before the pass-through section."""
    beside = _get(results, "passthrough", "floors_in_run", str(size))
    if beside:
        return median_of(beside)
    return _get(results, "floor", str(size), "floor_ms")


def median_of(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _wrk_section(section: dict[str, Any], reference: str, labels: dict[str, str] | None = None) -> str:
    rows = []
    for wk, label in section["workloads"].items():
        per = section["summary"][wk]
        ref = per.get(reference)
        for tk, s in per.items():
            target_label = (labels or {}).get(tk) if wk.startswith("delete") else None
            ratio = s["rps"] / ref["rps"] if ref and ref["rps"] else None
            rows.append(
                [
                    label,
                    target_label or section["targets"][tk],
                    _f(s["rps"]),
                    _f(ratio, 2) + "×" if ratio is not None else "–",
                    _f(s["p50_ms"], 2),
                    _f(s["p99_ms"], 2),
                    _f(s["cpu_us"]),
                    " / ".join(_f(v) for v in s["reps_rps"]),
                    str(s["errors"]) + (f" (wrapped {s['wraps']})" if s["wraps"] else ""),
                ]
            )
    return _table(
        [
            "workload",
            "target",
            "req/s (median)",
            f"ratio to {reference}",
            "p50 ms",
            "p99 ms",
            "CPU µs/req (proxy or nginx)",
            "req/s per repetition",
            "errors",
        ],
        rows,
    )


def render(results: dict[str, Any], settings: Settings, command: str) -> str:
    machine = results["machine"]
    parts = [
        "# Benchmarks (issue 5)",
        "",
        "Produced by `bench/run.py` in one run"
        + (
            " (**--quick smoke run: short durations, small sizes; not the real figures**)"
            if settings.quick
            else ""
        )
        + f", {machine['date']}. Every workload is sent through each target in turn"
        f" (A B C A B C), {settings.reps} repetition{'s' if settings.reps > 1 else ''};"
        " figures are medians over repetitions; ratios are ratios of those medians."
        " How to run it and what each figure means: [bench/README.md](../bench/README.md).",
        "",
        "## Machine",
        "",
        _table(["", ""], [[k, str(v)] for k, v in machine["facts"].items()]),
        "",
        "## Command",
        "",
        "```sh",
        command,
        "```",
        "",
        "## Targets",
        "",
        _table(
            ["figure", "target", "measured", "verdict"],
            [[v.figure, v.target, v.measured, v.mark] for v in verdicts(results, settings)],
        ),
        "",
    ]
    parts += _details(results, settings)
    return "\n".join(parts) + "\n"


def _details(results: dict[str, Any], settings: Settings) -> list[str]:
    parts: list[str] = ["## Details", ""]
    pt = results.get("passthrough")
    if pt:
        parts += [
            "### Pass-through, static upstream",
            "",
            "The upstream is nginx serving fixed files (one worker). Targets: that nginx directly; nginx as a"
            " plain reverse proxy (one worker, `proxy_http_version 1.1`, upstream keepalive,"
            " `proxy_buffering off`); the proxy (`python -m proxy`, msc3391 on, log level WARNING)."
            " For the 26-byte GET also a reference that is no target of the issue:"
            " `bench/minimal_proxy.py`, the least an aiohttp proxy does (one session, body read whole,"
            " nothing else), to separate the framework's cost from the proxy's own."
            " CPU is utime+stime from /proc of the proxy process (or of the nginx proxy's workers)"
            " divided by the requests wrk completed. /sync requests carry a bearer token; the proxy"
            " asks the upstream's whoami once (cached). \"incremental\" has `since=` (the proxy's fast"
            ' path, body passed unchanged); "initial" has none, and the body\'s `{}` account data entries'
            " must be stripped (parse, rewrite, serialise).",
            "",
            _wrk_section(pt, "nginx"),
            "",
        ]
    floor = results.get("floor")
    if floor:
        rows = []
        for size, f in floor.items():
            rows.append(
                [
                    settings.size_label(int(size)) + f" ({f['bytes']:,} bytes)",
                    _f(f["floor_ms"], 2),
                    _f(f["loads_ms"], 2),
                    _f(f["floor_gc_paused_ms"], 2),
                    _f(f["byte_scan_ms"], 3),
                    _f(f["exact_loads_ms"], 2),
                    _f(f["proxy_pipeline_ms"], 2),
                ]
            )
        beside = _get(results, "passthrough", "floors_in_run") or {}
        again = "; ".join(
            f"{settings.size_label(int(size))}: " + ", ".join(f"{v:.1f}" for v in values) + " ms"
            for size, values in beside.items()
            if values
        )
        parts += [
            "### The rewrite floor (in-process, ms, median)",
            "",
            "`orjson.loads` + `orjson.dumps` of the same body is the floor the rewrite targets are measured"
            " against. It is measured before the pass-through runs (the table) and again right after each"
            " repetition of the proxy's initial-sync runs, in the same minutes of this shared machine"
            + (f" ({again})" if again else "")
            + "; the targets use the median of the latter. Beside it in the table: the same with the"
            " cyclic GC paused during the parse (as the proxy parses), the proxy's byte pre-scan"
            " (`rewrite.may_hold_deletions`), its exact parse"
            " (`jsoncodec.loads`), and its whole initial-sync pipeline run in-process (scan, exact parse"
            " with GC paused, `rewrite_sync`, `jsoncodec.dumps`).",
            "",
            _table(
                [
                    "body",
                    "orjson loads+dumps (floor)",
                    "orjson loads",
                    "floor, GC paused",
                    "byte scan",
                    "jsoncodec.loads",
                    "proxy pipeline",
                ],
                rows,
            ),
            "",
        ]
    syn = results.get("synapse")
    if syn:
        parts += [
            "### Real Synapse 1.163.2",
            "",
            "Synapse from `rig/synapse.py` (SQLite, log level WARNING, no rate limits). whoami,"
            " account data GET and incremental sync (`timeout=0`) hit the Synapse with its own MSC3391"
            " flag off, directly, through nginx and through the proxy. The DELETE deletes a different,"
            " existing type on every request (set beforehand, outside the timing): directly and through"
            " nginx on a Synapse with its own flag on (its own implementation, the reference); through"
            " the proxy on the one with it off (whoami from cache, `GET /devices`, store intent, `PUT {}`,"
            " store commit).",
            "",
            _wrk_section(syn, "direct", syn.get("delete_targets")),
            "",
        ]
    mem = results.get("memory")
    if mem:
        h = mem["held"]
        s = mem["streamed"]
        parts += [
            "### Memory",
            "",
            f"Idle long-polls: {h['held']:,} `/sync?since=…&timeout={90_000}` requests, each on its own"
            " connection with its own token (so its own whoami and identity-cache entry), held by an"
            f" upstream (`bench/slow_upstream.py`) that answers none for {h['hold_seconds']:.0f} s."
            f" The proxy's fd limit here is {h['fd_limit']:,} and cannot be raised (no CAP_SYS_RESOURCE):"
            " every held long-poll takes two sockets in the proxy, so at most"
            f" ~{(h['fd_limit'] - h['fds_before'] - 200) // 2:,} fit in one process.",
            "",
            _table(
                ["figure", "value"],
                [
                    [
                        "long-polls held (upstream's count)",
                        f"{h['held']:,} (still {h['held_after_probe']:,} after the probe)",
                    ],
                    ["time to open them", f"{h['ramp_seconds']:.1f} s"],
                    [
                        "proxy RSS before / held / after release",
                        " / ".join(
                            f"{h[k] / 1024:.1f}"
                            for k in ("rss_before_kib", "rss_held_kib", "rss_released_kib")
                        )
                        + " MiB",
                    ],
                    ["RSS per held long-poll", f"{_f(h['kib_per_connection'])} KiB"],
                    ["proxy fds before / held", f"{h['fds_before']} / {h['fds_held']:,}"],
                    [
                        "small GET p50 / p99, idle proxy",
                        f"{h['probe_idle']['p50_ms']:.2f} / {h['probe_idle']['p99_ms']:.2f} ms",
                    ],
                    [
                        "small GET p50 / p99, long-polls held",
                        f"{h['probe_held']['p50_ms']:.2f} / {h['probe_held']['p99_ms']:.2f} ms",
                    ],
                ],
            ),
            "",
            f"Streaming {s['bytes'] / MiB:,.0f} MiB through a fresh proxy process (VmRSS sampled every 5 ms,"
            " VmHWM reset through /proc/PID/clear_refs before each transfer):",
            "",
            _table(
                ["direction", "complete", "seconds", "MiB/s", "RSS before", "peak RSS growth"],
                [
                    [
                        d,
                        "yes"
                        if s[d]["complete"]
                        else f"NO (status {s[d]['status']}, {s[d]['transferred']:,} bytes)",
                        f"{s[d]['seconds']:.1f}",
                        f"{s[d]['mib_per_s']:.0f}",
                        f"{s[d]['rss_before_kib'] / 1024:.1f} MiB",
                        f"{s[d]['growth_kib'] / 1024:.2f} MiB",
                    ]
                    for d in ("download", "upload")
                ],
            ),
            "",
        ]
    st = results.get("store")
    if st:
        d = st["delete_100_devices"]
        hp = st["has_pending"]
        pf = st["pending_for_device"]
        nq = st["no_query"]
        parts += [
            "### Store",
            "",
            f"{st['populated']['rows']:,} rows in `account_data_unsynced_deletes`"
            f" ({st['populated']['users']:,} users × 10 devices × 10 deletes, half of them room account"
            " data, each with its tombstone), inserted with SQL in"
            f" {st['populated']['seconds']:.1f} s into a store whose schema `Store` made;"
            f" file system: {st['filesystem']}. `Store.open()` on it (loads the in-memory index):"
            f" {st['open_seconds']:.2f} s.",
            "",
            _table(
                ["figure", "value"],
                [
                    [
                        f"delete for a user with 100 devices ({d['count']} deletes):"
                        " begin_delete + commit_delete",
                        f"{d['total_ms']:.2f} ms median, {d['total_max_ms']:.2f} ms max",
                    ],
                    [
                        "… of which begin_delete / commit_delete",
                        f"{d['begin_ms']:.2f} / {d['commit_ms']:.2f} ms",
                    ],
                    [
                        "the same type deleted again (replaces the old tombstone)",
                        f"{d['same_type_again_ms']:.2f} ms",
                    ],
                    [
                        "for scale: one one-row durable commit (WAL, synchronous=FULL) on this file system",
                        f"{st['commit_floor_ms']:.2f} ms",
                    ],
                    ["has_pending, user without rows", f"{hp['user_without_rows_ns']:.0f} ns"],
                    ["has_pending, user with rows, device without", f"{hp['device_without_rows_ns']:.0f} ns"],
                    ["has_pending, device with rows", f"{hp['device_with_rows_ns']:.0f} ns"],
                    [
                        "pending_for_device, nothing pending (answered in memory)",
                        f"{pf['nothing_pending_us']:.1f} µs",
                    ],
                    [
                        f"pending_for_device, {pf['ten_pending_found']} pending (a query)",
                        f"{pf['ten_pending_us']:.0f} µs",
                    ],
                    [
                        f"pending_for_device, {pf['many_pending_found']} pending (a query)",
                        f"{pf['many_pending_us']:.0f} µs",
                    ],
                    [
                        "statements for 50 incremental /syncs, user without rows",
                        str(nq["no_rows_incremental"]),
                    ],
                    [
                        "statements for 10 initial /syncs (rewritten), user without rows",
                        str(nq["no_rows_initial"]),
                    ],
                    [
                        "statements for the first /sync after the user got rows (device sweep)",
                        str(nq["other_device_sweep"]),
                    ],
                    [
                        "statements for 50 incremental /syncs, rows only on the user's other device",
                        str(nq["other_device_rows_incremental"]),
                    ],
                    [
                        "control: statements for 1 /sync of a device with a pending delete",
                        str(nq["pending_incremental_control"]),
                    ],
                ],
            ),
            "",
        ]
    bg = results.get("background")
    if bg:
        parts += [
            "### The machine during the run",
            "",
            f"Load average at the start: {bg['loadavg_start']}; at the end: {bg['loadavg_end']}."
            f" CPU used by this run's processes: {bg['own_cpu_s']:.0f} s; by all other processes on the"
            f" machine meanwhile: {bg['other_cpu_s']:.0f} s over {bg['wall_s']:.0f} s of wall time"
            f" ({bg['other_share']:.0%} of the machine's {bg['cores']} cores). This machine is shared;"
            " absolute figures move between runs, ratios within one run much less.",
            "",
        ]
    return parts

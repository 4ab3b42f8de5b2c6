# ruff: noqa: RUF001  (the multiplication sign and en dash are printed in the report)
"""Turns the results of one run into docs/benchmarks.md: the targets (`verdicts.py`), met
or missed, then every figure in detail."""

from __future__ import annotations

from typing import Any

from . import report_sections
from .figures import fmt as _f
from .figures import get as _get
from .settings import MiB, Settings
from .verdicts import verdicts


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _wrk_section(
    section: dict[str, Any],
    reference: str,
    labels: dict[str, str] | None = None,
    side: str | None = None,
    cpu: str = "CPU µs/req (proxy or nginx)",
) -> str:
    """One row per (workload, target); `side`: the header of a column with the side
    processes' CPU (see `harness.Target.side_pids`), when the section measured some."""
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
            if side is not None:
                rows[-1].insert(
                    7,
                    "–"
                    if s.get("side_cpu_s") is None
                    else f"{s['side_cpu_s']:.3f} s ({_f(s['side_cpu_us'], 2)} µs/req)",
                )
    headers = [
        "workload",
        "target",
        "req/s (median)",
        f"ratio to {reference}",
        "p50 ms",
        "p99 ms",
        cpu,
        "req/s per repetition",
        "errors",
    ]
    if side is not None:
        headers.insert(7, side)
    return _table(headers, rows)


def render(results: dict[str, Any], settings: Settings, command: str) -> str:
    machine = results["machine"]
    parts = [
        "# Benchmarks (issues 5, 10, 12, 13)",
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
        "The issue and item each target comes from: 13 (performance by design), 10 (sliding"
        " sync), 12 (several instances on PostgreSQL), 5 (the first benchmark: its targets"
        " where issue 13 did not replace them).",
        "",
        _table(
            ["issue", "figure", "target", "measured", "verdict"],
            [[v.issue, v.figure, v.target, v.measured, v.mark] for v in verdicts(results, settings)],
        ),
        "",
    ]
    parts += _details(results, settings)
    return "\n".join(parts) + "\n"


def _body_label(settings: Settings, key: str) -> str:
    """A floor's body: a /sync size, or the first sliding sync response."""
    if key == "sliding":
        return f"{settings.size_label(settings.sync_sizes[0])} sliding sync (first)"
    return f"{settings.size_label(int(key))} /sync"


def _details(results: dict[str, Any], settings: Settings) -> list[str]:
    parts: list[str] = ["## Details", ""]
    pt = results.get("passthrough")
    if pt:
        parts += [
            "### Pass-through, static upstream",
            "",
            "The upstream is nginx serving fixed files (one worker); a sliding sync is a POST, which"
            " nginx's static module refuses with 405: `error_page 405 =200 $uri` makes it answer the"
            " file instead (an internal redirect as a GET). Targets: that nginx directly; nginx as a"
            " plain reverse proxy (one worker, `proxy_http_version 1.1`, upstream keepalive,"
            " `proxy_buffering off`); the proxy (`python -m proxy`, msc3391 on, log level WARNING);"
            " and, for the workloads it is the yardstick of (and the 26-byte GETs),"
            " `bench/minimal_proxy.py`, the least an aiohttp proxy does (one session, bodies read"
            " whole, nothing else): the framework's cost apart from the proxy's own."
            " CPU is utime+stime from /proc of the proxy process (or of the nginx proxy's workers)"
            " divided by the requests wrk completed. /sync and sliding sync requests carry a bearer"
            ' token; the proxy asks the upstream\'s whoami once (cached). "incremental" has `since=`'
            " (the proxy's fast path, body passed unchanged); \"initial\" has none, and the body's `{}`"
            " account data entries must be stripped (parse, rewrite, serialise). The sliding sync"
            " request is Element X's room list (one list, the account data extension on): with `pos`"
            " it is the fast path; without, the first response's account data extension must lose its"
            " `{}` entries. `/versions` is owned: the proxy parses it and adds `org.matrix.msc3391`;"
            " without a token it answers from that rewrite of the homeserver's answer for 5 s"
            " (`proxy/versions_cache.py`), with one (the `with an access token` rows) it asks"
            " the homeserver every time.",
            "",
            _wrk_section(pt, "nginx"),
            "",
            "Before the runs, one request of each workload through each target was checked (status"
            " 200; the upstream's body unchanged where nothing is to change, `org.matrix.msc3391` in"
            " the proxy's `/versions`, no `{}` account data entry left in the proxy's first answers): "
            + (
                "all as expected."
                if not pt.get("answer_problems")
                else "**" + "; ".join(pt["answer_problems"]) + "**."
            ),
            "",
        ]
    floor = results.get("floor")
    if floor:
        rows = []
        for size, f in floor.items():
            rows.append(
                [
                    _body_label(settings, size) + f" ({f['bytes']:,} bytes)",
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
            f"{_body_label(settings, size)}: " + ", ".join(f"{v:.1f}" for v in values) + " ms"
            for size, values in beside.items()
            if values
        )
        parts += [
            "### The rewrite floor (in-process, ms, median)",
            "",
            "`orjson.loads` + `orjson.dumps` of the same body is the floor the rewrite targets are measured"
            " against. It is measured before the pass-through runs (the table) and again right after each"
            " repetition of the proxy's initial-sync and first sliding sync runs, in the same minutes of"
            " this shared machine"
            + (f" ({again})" if again else "")
            + "; the targets use the median of the latter. Beside it in the table: the same with the"
            " cyclic GC paused during the parse (as the proxy parses), the proxy's byte pre-scan"
            " (`rewrite.may_hold_deletions`), its exact parse"
            " (`jsoncodec.loads`), and its whole pipeline for a first answer run in-process (scan, exact"
            " parse with GC paused, `rewrite_sync` or `rewrite_sliding_sync`, `jsoncodec.dumps`).",
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
    gen = results.get("generated")
    if gen:
        parts += report_sections.generated(gen, _table, _wrk_section)
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
            " the proxy on the one with it off (whoami from cache, `GET /devices`, then the type's GET"
            " with the store intent recorded meanwhile, `PUT {}`, store commit). The `floor:` rows are"
            " the homeserver calls of that delete, each alone at 1 conn on the Synapse behind the"
            " proxy: `GET /devices` and the type's GET, then `PUT {}`; the GET and the PUT are of a new"
            " type each time (a GET of one type again and again would be answered from Synapse's cache; the"
            " DELETE's GET of a type just written is not), none of them set: the GET's errors column"
            " counts its 404s.",
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
                    *(
                        [
                            [
                                "the same long-polls held by the minimal aiohttp proxy: RSS per long-poll",
                                f"{_f(h['minimal']['kib_per_connection'])} KiB"
                                f" ({h['minimal']['held']:,} held)",
                            ]
                        ]
                        if h.get("minimal")
                        else []
                    ),
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
        parts += report_sections.store(st, _table)
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

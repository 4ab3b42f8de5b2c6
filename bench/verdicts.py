# ruff: noqa: RUF001, RUF002  (the multiplication sign and en dash are printed in the report)
"""The report's Targets table: every figure with a target, met or missed, beside it.

Targets come from the issues (13: performance by design; 10: sliding sync; 12: several
instances on PostgreSQL; 5: the first benchmark, where its rows are still meaningful
and not replaced by issue 13's). Rows without a target are marked "report only".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .figures import floor_ms, get, ratio
from .figures import fmt as _f
from .settings import MiB, Settings


@dataclass
class Verdict:
    issue: str
    figure: str
    target: str
    measured: str
    met: bool | None  # None: could not be measured in this run (or no target)
    reference: bool = False  # no target: a figure the issue asks to see

    @property
    def mark(self) -> str:
        if self.reference:
            return "report only"
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _vs_minimal(run: dict[str, Any], issue: str, figure: str) -> Verdict:
    """req/s of the proxy against the minimal aiohttp proxy (≥ 1.0×), nginx's beside."""
    proxy, minimal, nginx = run["proxy"], run.get("aiohttp"), run.get("nginx")
    r = ratio(proxy["rps"], minimal["rps"] if minimal else None)
    to_nginx = ratio(proxy["rps"], nginx["rps"] if nginx else None)
    return Verdict(
        issue,
        figure,
        "≥ 1.0× the minimal aiohttp proxy",
        f"{_x(r)} ({_f(proxy['rps'])} vs {_f(minimal['rps']) if minimal else '–'} req/s;"
        f" vs nginx: {_x(to_nginx)})",
        r is not None and r >= 1.0,
    )


def _added_over_nginx(run: dict[str, Any], floor: float | None, issue: str, figure: str) -> Verdict:
    """p50 time the proxy adds over nginx at 1 connection, against the orjson floor."""
    added = run["proxy"]["p50_ms"] - run["nginx"]["p50_ms"]
    r = added / floor if floor else None
    return Verdict(
        issue,
        figure,
        "≤ 1.3× the orjson loads+dumps floor",
        f"{r:.2f}× (+{added:.1f} ms over nginx's {run['nginx']['p50_ms']:.1f} ms p50; floor {floor:.1f} ms)"
        if r is not None and floor is not None
        else "–",
        r is not None and r <= 1.3,
    )


def _passthrough(results: dict[str, Any], settings: Settings) -> list[Verdict]:
    pt = get(results, "passthrough", "summary")
    if not pt:
        return []
    small, large = settings.sync_sizes
    s_label, l_label = settings.size_label(small), settings.size_label(large)
    out = [
        _vs_minimal(
            pt["sync_s_inc_c8"],
            "13.1",
            f"/sync fast path: {s_label} incremental, nothing pending, 8 conns: req/s",
        )
    ]
    v = pt["versions_c64"]
    cpu, ref = v["proxy"]["cpu_us"], v["aiohttp"]["cpu_us"]
    r = ratio(cpu, ref)
    out.append(
        Verdict(
            "13.2",
            "A small owned request (`GET /versions` without a token: answered from the"
            " homeserver's answer of the last 5 s), 64 conns: proxy CPU per request",
            "≤ 1.0× the minimal aiohttp proxy's",
            f"{_x(r)} ({_f(cpu)} vs {_f(ref)} µs; req/s {_f(v['proxy']['rps'], 0)}"
            f" vs {_f(v['aiohttp']['rps'], 0)})",
            r is not None and r <= 1.0,
        )
    )
    t = pt.get("versions_token_c64")
    if t is not None:
        cpu, ref = t["proxy"]["cpu_us"], t["aiohttp"]["cpu_us"]
        out.append(
            Verdict(
                "13.2",
                "… `GET /versions` with an access token (asked of the homeserver every time,"
                " parsed and rewritten), 64 conns: proxy CPU per request",
                "none (the same request, forwarded: what 13.2's target measured before)",
                f"{_x(ratio(cpu, ref))} the minimal aiohttp proxy's ({_f(cpu)} vs {_f(ref)} µs)",
                None,
                reference=True,
            )
        )
    out.append(
        _vs_minimal(
            pt["sliding_inc_c8"],
            "10.7",
            f"Sliding sync fast path: {s_label}, `pos`, nothing pending, 8 conns: req/s",
        )
    )
    out.append(
        _added_over_nginx(
            pt["sliding_first_c1"],
            floor_ms(results, "sliding"),
            "10.8",
            f"Sliding sync, first response (no `pos`) needing a strip, {s_label}, 1 conn:"
            " time added over nginx",
        )
    )
    for key, size, label in (("sync_s_init_c1", small, s_label), ("sync_l_init_c1", large, l_label)):
        out.append(
            _added_over_nginx(
                pt[key],
                floor_ms(results, str(size)),
                "5",
                f"{label} /sync needing a rewrite (initial), 1 conn: time added over nginx",
            )
        )
    problems = get(results, "passthrough", "answer_problems")
    if problems is not None:
        out.append(
            Verdict(
                "5",
                "Every pass-through workload's answer, checked once per target before the runs",
                "as the workload means (status 200; fast paths unchanged; first answers stripped)",
                "as expected" if not problems else "; ".join(problems),
                not problems,
            )
        )
    c64 = pt["small_c64"]
    out.append(
        Verdict(
            "5",
            "26-byte GET the proxy does not own, straight through the proxy (no nginx in front), 64 conns",
            "none (issue 5's ≥ 0.25× nginx and ≤ 100 µs are replaced by 13.6:"
            " such requests bypass the proxy)",
            f"{_x(ratio(c64['proxy']['rps'], c64['nginx']['rps']))} nginx's req/s;"
            f" CPU {_f(c64['proxy']['cpu_us'])} µs/req"
            f" (minimal aiohttp proxy: {_f(c64['aiohttp']['cpu_us'])})",
            None,
            reference=True,
        )
    )
    return out


def _generated(results: dict[str, Any]) -> list[Verdict]:
    out = []
    bypass = get(results, "generated", "bypass")
    if bypass:
        run = bypass["summary"]["small_c64"]
        gen, plain = run["generated"], run["nginx"]
        r = ratio(gen["rps"], plain["rps"])
        wired = bypass["owned_reaches_proxy"] and bypass["not_owned_unchanged"]
        out.append(
            Verdict(
                "13.6",
                "26-byte GET the proxy does not own, 64 conns, nginx on the generated config: req/s",
                "≥ 0.95× a plain nginx reverse proxy",
                f"{_x(r)} ({_f(gen['rps'], 0)} vs {_f(plain['rps'], 0)} req/s; {bypass['workers']} nginx"
                f" worker each)" + ("" if wired else " WIRING CHECK FAILED"),
                r is not None and r >= 0.95 and wired,
            )
        )
        side = gen["side_cpu_us"]
        out.append(
            Verdict(
                "13.6",
                "… the proxy process's CPU during that run",
                "~0 (≤ 1 µs per request)",
                f"{_f(gen['side_cpu_s'], 3)} s per {gen['seconds']:.0f} s run, {_f(side, 2)} µs per request",
                side is not None and side <= 1.0,
            )
        )
    inst = get(results, "generated", "instances")
    if inst:
        for key, run in inst["summary"].items():
            one, two = run["one"], run["two"]
            out.append(
                Verdict(
                    "12.10",
                    f"{inst['workloads'][key]}: two instances on one PostgreSQL store vs one,"
                    " behind the generated config (round-robin)",
                    "none (2 cores: little gain expected)",
                    f"{_x(ratio(two['rps'], one['rps']))} ({_f(two['rps'])} vs {_f(one['rps'])} req/s;"
                    f" instance B's CPU share {_share(two)})",
                    None,
                    reference=True,
                )
            )
    return out


def _share(summary: dict[str, Any]) -> str:
    side, cpu, n = summary["side_cpu_us"], summary["cpu_us"], summary["requests"]
    return "–" if not side or not cpu or not n else f"{side / cpu:.0%}"


def d_label(key: str) -> str:
    conns = int(key.removeprefix("delete_c"))
    return f"{conns} conn{'s' if conns > 1 else ''}"


def _synapse(results: dict[str, Any]) -> list[Verdict]:
    syn = get(results, "synapse", "summary")
    if not syn:
        return []
    out = []
    for key in ("delete_c1", "delete_c8"):
        d = syn.get(key)
        if not d:
            continue
        r = ratio(d["proxy"]["p50_ms"], d["direct"]["p50_ms"])
        wrapped = sum(t["wraps"] for t in d.values())
        out.append(
            Verdict(
                "13.3",
                f"MSC3391 DELETE, {d_label(key)}: p50 latency vs Synapse's own (flag on)",
                "≤ 1.5×",
                f"{_x(r)} ({d['proxy']['p50_ms']:.1f} vs {d['direct']['p50_ms']:.1f} ms)"
                + (f" (wrapped {wrapped})" if wrapped else ""),
                r is not None and r <= 1.5,
            )
        )
    floor = [
        syn.get(key, {}).get("direct", {}).get("p50_ms")
        for key in ("floor_get", "floor_devices", "floor_put")
    ]
    own = syn.get("delete_c1", {}).get("direct", {}).get("p50_ms")
    if None not in floor and own:
        get_ms, devices_ms, put_ms = floor
        overlapped = max(get_ms, devices_ms) + put_ms
        serial = get_ms + devices_ms + put_ms
        out.append(
            Verdict(
                "13.3",
                "… the least a proxy over a homeserver without MSC3391 can take, 1 conn: Synapse's own"
                " p50s of the delete's calls, the two reads overlapped (max(GET, GET /devices) + PUT {},"
                " as a homeserver with workers could serve them) or one after the other (the sum, as the"
                " proxy sends them: one Synapse process serves them no sooner at once), vs its DELETE",
                "none (the floor under the 1-conn target)",
                f"{_x(overlapped / own)} to {_x(serial / own)} (max({get_ms:.1f}, {devices_ms:.1f})"
                f" + {put_ms:.1f} to {serial:.1f} ms, vs {own:.1f} ms)",
                None,
                reference=True,
            )
        )
    for key, label in (
        ("whoami", "whoami"),
        ("account_data_get", "account data GET"),
        ("sync_incremental", "incremental /sync"),
    ):
        r = ratio(syn[key]["proxy"]["rps"], syn[key]["direct"]["rps"])
        out.append(
            Verdict(
                "5",
                f"Synapse, 8 conns, {label}: req/s through the proxy vs direct",
                "≥ 0.9×",
                f"{_x(r)} ({_f(syn[key]['proxy']['rps'])} vs {_f(syn[key]['direct']['rps'])} req/s)",
                r is not None and r >= 0.9,
            )
        )
    return out


def _memory(results: dict[str, Any], settings: Settings) -> list[Verdict]:
    out = []
    held = get(results, "memory", "held")
    if held:
        per = held["kib_per_connection"]
        n = held["held"]
        note = "" if n == settings.held_connections else f" (at {n:,} held: see the fd limit note)"
        out.append(
            Verdict(
                "13.4",
                f"{settings.held_connections:,} idle long-poll /syncs held: proxy RSS per connection",
                "≤ 20 KiB",
                f"{_f(per)} KiB{note}",
                per is not None and per <= 20,
            )
        )
        minimal = held.get("minimal")
        if minimal is not None:
            floor = minimal["kib_per_connection"]
            out.append(
                Verdict(
                    "13.4",
                    "… the same long-polls held by the minimal aiohttp proxy: RSS per connection",
                    "none (the framework's share, under the 20 KiB target)",
                    f"{_f(floor)} KiB at {minimal['held']:,} held (the proxy: {_f(per)} KiB,"
                    f" {_f(per - floor if per is not None and floor is not None else None)} KiB more)",
                    None,
                    reference=True,
                )
            )
        p99 = held["probe_held"]["p99_ms"]
        out.append(
            Verdict(
                "13.4",
                "… a small request's p99 meanwhile (1 conn)",
                "< 50 ms",
                f"{p99:.2f} ms (idle: {held['probe_idle']['p99_ms']:.2f} ms)",
                p99 < 50 and not held["probe_held"]["errors"],
            )
        )
    streamed = get(results, "memory", "streamed")
    if streamed:
        down, up = streamed["download"], streamed["upload"]
        growth = max(down["growth_kib"], up["growth_kib"]) / 1024
        complete = down["complete"] and up["complete"]
        out.append(
            Verdict(
                "5",
                f"{streamed['bytes'] / MiB:,.0f} MiB streamed through the proxy (down, up): peak RSS growth",
                "≤ 8 MiB",
                f"{growth:.1f} MiB (down {down['growth_kib'] / 1024:.1f}, up {up['growth_kib'] / 1024:.1f})"
                + ("" if complete else " INCOMPLETE"),
                growth <= 8 and complete,
            )
        )
    return out


BACKEND_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def _store(results: dict[str, Any]) -> list[Verdict]:
    store = get(results, "store")
    if not store:
        return []
    out = []
    for backend, figures in store["backends"].items():
        d = figures["delete_100_devices"]
        out.append(
            Verdict(
                "13.5" if backend == "sqlite" else "12.9",
                f"Store ({BACKEND_NAMES[backend]}) at {figures['populated']['rows']:,} rows:"
                " a delete for a user with 100 devices",
                "≤ 5 ms",
                f"{d['total_ms']:.2f} ms median (max {d['total_max_ms']:.2f})",
                d["total_ms"] <= 5,
            )
        )
    for backend, figures in store["backends"].items():
        p = figures["pending_for_device"]
        out.append(
            Verdict(
                "12.9",
                f"Store ({BACKEND_NAMES[backend]}):"
                f" `pending_for_device` with {p['ten_pending_found']} pending",
                "none",
                f"{p['ten_pending_us']:.0f} µs median",
                None,
                reference=True,
            )
        )
    nq = store["no_query"]
    queries = nq["no_rows_incremental"] + nq["no_rows_initial"] + nq["other_device_rows_incremental"]
    out.append(
        Verdict(
            "5",
            "A /sync for a device with nothing pending: database statements (SQLite)",
            "none",
            f"{queries} in {sum(nq['requests'].values())} syncs"
            f" (control, device with a pending delete: {nq['pending_incremental_control']} in 1)",
            queries == 0 and nq["pending_incremental_control"] > 0,
        )
    )
    return out


def verdicts(results: dict[str, Any], settings: Settings) -> list[Verdict]:
    """Every row of the Targets table, issue 13's first (in the issue's order)."""
    rows = (
        _passthrough(results, settings)
        + _generated(results)
        + _synapse(results)
        + _memory(results, settings)
        + _store(results)
    )
    order = {"13": 0, "10": 1, "12": 2, "5": 3}
    return sorted(
        rows,
        key=lambda v: (order[v.issue.split(".")[0]], int(v.issue.split(".")[1]) if "." in v.issue else 0),
    )

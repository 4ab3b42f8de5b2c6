"""Pass-through figures against a fast static upstream (nginx serving fixed files).

Targets: the static nginx directly, nginx as a plain reverse proxy, and the proxy
(`python -m proxy`, msc3391 on). Workloads: a 26-byte GET at 1/8/64 connections, and
a realistic /sync body of two sizes, requested incrementally (`since=`, the proxy's
fast path: no change needed) and as an initial sync (the `{}` entries must go: parse,
rewrite, serialise). Also the in-process floor for the rewrite: orjson loads+dumps.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from proxy import jsoncodec
from proxy.filters import NO_FILTER
from proxy.rewrite import may_hold_deletions, rewrite_sync
from rig.processes import free_port

from .bodies import sync_body
from .harness import (
    Child,
    Nginx,
    Target,
    Workload,
    Wrk,
    bench_nginx,
    median,
    nginx_reverse_proxy_server,
    run_interleaved,
    say,
    summarize,
)
from .settings import Settings

SMALL_BODY = b'{"user_id":"@b:localhost"}'
WHOAMI_BODY = b'{"user_id":"@bench:localhost","device_id":"BENCH"}'
DEVICES_BODY = b'{"devices":[{"device_id":"BENCH"},{"device_id":"OTHER"}]}'
SMALL_PATH = "/_matrix/client/v3/capabilities"
AUTH = "Authorization: Bearer bench-token"


def sync_name(size: int) -> str:
    return f"b{size}"


def write_static_files(root: Path, bodies: dict[int, bytes]) -> None:
    (root / "sync").mkdir(parents=True, exist_ok=True)
    (root / "small.json").write_bytes(SMALL_BODY)
    (root / "whoami.json").write_bytes(WHOAMI_BODY)
    (root / "devices.json").write_bytes(DEVICES_BODY)
    for size, body in bodies.items():
        (root / "sync" / f"{sync_name(size)}.json").write_bytes(body)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # nginx workers run as nobody


def static_upstream(workdir: Path, root: Path) -> Nginx:
    port = free_port()
    server = f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
        default_type application/json;
        location = {SMALL_PATH} {{ alias {root}/small.json; }}
        location = /_matrix/client/v3/account/whoami {{ alias {root}/whoami.json; }}
        location = /_matrix/client/v3/devices {{ alias {root}/devices.json; }}
        location = /_matrix/client/v3/sync {{ try_files /sync/$arg_bench.json =404; }}
        location / {{ return 404; }}
    }}
"""
    return bench_nginx(workdir, "static-upstream", server, [port])


# --- the in-process floor --------------------------------------------------------------


def _timed(repeats: int, work: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return median(times) * 1000


def measure_floor(body: bytes, repeats: int) -> dict[str, float]:
    """Milliseconds (median) for orjson.loads + orjson.dumps of `body`: the least any
    rewrite must cost. Also with the cyclic GC paused (as the proxy parses), and the
    proxy's own pipeline for an initial sync (scan, exact parse, strip, serialise)."""
    gc.collect()
    floor = _timed(repeats, lambda: orjson.dumps(orjson.loads(body)))

    def paused() -> None:
        gc.disable()
        try:
            parsed = orjson.loads(body)
        finally:
            gc.enable()
        orjson.dumps(parsed)

    def pipeline() -> None:
        assert may_hold_deletions(body)
        gc.disable()
        try:
            parsed = jsoncodec.loads(body)
        finally:
            gc.enable()
        result = rewrite_sync(parsed, incremental=False, full_state=False, pending=[], sync_filter=NO_FILTER)
        assert result.changed(parsed)
        jsoncodec.dumps(result.body)

    loads_only = _timed(repeats, lambda: orjson.loads(body))
    return {
        "bytes": len(body),
        "floor_ms": floor,
        "loads_ms": loads_only,
        "floor_gc_paused_ms": _timed(repeats, paused),
        "proxy_pipeline_ms": _timed(repeats, pipeline),
        "byte_scan_ms": _timed(repeats, lambda: may_hold_deletions(body)),
        "exact_loads_ms": _timed(repeats, lambda: jsoncodec.loads(body)),
    }


def make_bodies(settings: Settings) -> dict[int, bytes]:
    """The two /sync bodies (same generator, same seed: the larger holds more rooms)."""
    return {size: sync_body(size) for size in settings.sync_sizes}


def floors(settings: Settings, bodies: dict[int, bytes]) -> dict[str, dict[str, float]]:
    repeats = dict(zip(settings.sync_sizes, settings.floor_repeats, strict=True))
    return {str(size): measure_floor(body, repeats[size]) for size, body in bodies.items()}


# --- the wrk runs ------------------------------------------------------------------------


def run(
    settings: Settings,
    workdir: Path,
    wrk: Wrk,
    upstream: Nginx,
    proxy_pid: int,
    proxy_url: str,
    bodies: dict[int, bytes],
) -> dict[str, Any]:
    up_port = upstream.ports[0]
    upstream_url = f"http://127.0.0.1:{up_port}"
    nginx_port = free_port()
    servers = nginx_reverse_proxy_server(nginx_port, up_port, "static_upstream")
    nginx = bench_nginx(workdir, "nginx-proxy-static", servers, [nginx_port])
    minimal_port = free_port()
    minimal = Child(
        [sys.executable, str(Path(__file__).with_name("minimal_proxy.py")), str(minimal_port), upstream_url],
        workdir / "minimal-proxy.log",
        minimal_port,
        "the minimal aiohttp proxy",
    )
    nginx.start()
    minimal.start()
    try:
        targets = [
            Target("direct", "static nginx directly", upstream_url),
            Target("nginx", "nginx reverse proxy", f"http://127.0.0.1:{nginx_port}", nginx.worker_pids),
            Target("proxy", "msc3391-proxy", proxy_url, lambda: [proxy_pid]),
            # A reference only (26-byte GET): what any aiohttp proxy costs here.
            Target("aiohttp", "minimal aiohttp proxy (reference)", minimal.url, lambda: [minimal.pid]),
        ]
        small, large = settings.sync_sizes
        s_label, l_label = settings.size_label(small), settings.size_label(large)
        secs = settings.sync_seconds

        def sync_path(size: int, incremental: bool) -> str:
            since = "since=s72594_4483&timeout=0&" if incremental else ""
            return f"/_matrix/client/v3/sync?{since}bench={sync_name(size)}"

        workloads = [
            Workload(f"small_c{c}", f"26-byte GET, {c} conn", SMALL_PATH, c, settings.small_seconds)
            for c in (1, 8, 64)
        ]
        workloads += [
            Workload(
                "sync_s_inc_c1", f"{s_label} /sync incremental, 1 conn", sync_path(small, True), 1, secs
            ),
            Workload(
                "sync_s_inc_c8", f"{s_label} /sync incremental, 8 conns", sync_path(small, True), 8, secs
            ),
            Workload("sync_s_init_c1", f"{s_label} /sync initial, 1 conn", sync_path(small, False), 1, secs),
            Workload("sync_s_init_c8", f"{s_label} /sync initial, 8 conns", sync_path(small, False), 8, secs),
            Workload(
                "sync_l_inc_c8", f"{l_label} /sync incremental, 8 conns", sync_path(large, True), 8, secs
            ),
            # Few requests fit in a run at this size: twice the time.
            Workload(
                "sync_l_init_c1", f"{l_label} /sync initial, 1 conn", sync_path(large, False), 1, 2 * secs
            ),
        ]
        # The floor again, right after each repetition of the proxy's rewrite runs: the
        # same minutes of this shared machine as the figure it is compared with.
        floors_in_run: dict[str, list[float]] = {str(small): [], str(large): []}
        repeats = dict(zip(settings.sync_sizes, settings.floor_repeats, strict=True))

        def floor_after(size: int) -> Any:
            def finish(target: Target, result: Any) -> None:
                if target.key == "proxy":
                    body = bodies[size]
                    floors_in_run[str(size)].append(
                        _timed(repeats[size], lambda: orjson.dumps(orjson.loads(body)))
                    )

            return finish

        for w in workloads:
            if w.key.startswith("sync"):
                w.headers = (AUTH,)
                w.targets = ("direct", "nginx", "proxy")
            if w.key == "sync_s_init_c1":
                w.finish = floor_after(small)
            if w.key == "sync_l_init_c1":
                w.finish = floor_after(large)
        say("pass-through: 26-byte GET and /sync bodies, targets interleaved")
        results = run_interleaved(
            wrk, workloads, targets, reps=settings.reps, warmup_seconds=settings.warmup_seconds
        )
    finally:
        minimal.stop()
        nginx.stop()
    return {
        "workloads": {w.key: w.label for w in workloads},
        "targets": {t.key: t.label for t in targets},
        "summary": {wk: {tk: summarize(runs) for tk, runs in per.items()} for wk, per in results.items()},
        "floors_in_run": floors_in_run,
    }

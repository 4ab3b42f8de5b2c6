"""Pass-through figures against a fast static upstream (nginx serving fixed files).

Targets: the static nginx directly, nginx as a plain reverse proxy, the proxy
(`python -m proxy`, msc3391 on) and the minimal aiohttp proxy (`minimal_proxy.py`, the
yardstick of the owned-request targets). Workloads: a 26-byte GET at 1/8/64
connections; `/versions` (owned, rewritten) at 64, without and with a token; a realistic
/sync body of two sizes, requested incrementally (`since=`, the proxy's fast path: no
change needed) and as an initial sync (the `{}` entries must go: parse, rewrite,
serialise); a sliding sync (MSC4186) with a `pos` (fast path) and without (its account
data extension must lose its `{}` entries). Also the in-process floor for the rewrites:
orjson loads+dumps.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from proxy import jsoncodec
from proxy.filters import NO_FILTER
from proxy.rewrite import may_hold_deletions, rewrite_sync
from proxy.sliding_rewrite import Scope, rewrite_sliding_sync
from rig.processes import free_port

from . import answers
from .bodies import sliding_sync_body, sliding_sync_request, sync_body
from .harness import (
    Nginx,
    Target,
    Workload,
    Wrk,
    bench_nginx,
    median,
    minimal_proxy,
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
VERSIONS_PATH = "/_matrix/client/versions"
SLIDING_PATH = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
AUTH = "Authorization: Bearer bench-token"
# The key of the sliding sync body in `bodies` and in the floor results.
SLIDING = "sliding"


def versions_body() -> bytes:
    """What Synapse 1.163 answers to /versions, in shape and size (~1.2 KiB)."""
    versions = [f"r0.{minor}.{patch}" for minor, patch in ((0, 1), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0))]
    versions += [f"v1.{minor}" for minor in range(1, 13)]
    features = {
        f"org.matrix.msc{number}": number % 3 != 0
        for number in (2432, 2666, 2697, 2836, 3026, 3030, 3083, 3266, 3440, 3716, 3720, 3765, 3773)
    }
    features |= {f"org.matrix.msc{number}.stable": True for number in (3827, 3916, 4028, 4133, 4151)}
    features |= {"io.element.e2ee_forced.public": False, "io.element.e2ee_forced.private": False}
    features |= {"org.matrix.label_based_filtering": True, "org.matrix.e2e_cross_signing": True}
    return orjson.dumps({"versions": versions, "unstable_features": features})


def sync_name(size: int) -> str:
    return f"b{size}"


def write_static_files(root: Path, bodies: dict[int, bytes]) -> None:
    (root / "sync").mkdir(parents=True, exist_ok=True)
    (root / "small.json").write_bytes(SMALL_BODY)
    (root / "whoami.json").write_bytes(WHOAMI_BODY)
    (root / "devices.json").write_bytes(DEVICES_BODY)
    (root / "versions.json").write_bytes(versions_body())
    (root / "sliding.json").write_bytes(bodies[SLIDING])
    for size, body in bodies.items():
        if isinstance(size, int):
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
        location = {VERSIONS_PATH} {{ alias {root}/versions.json; }}
        # nginx's static module refuses a POST (405): error_page turns the refusal into an
        # internal redirect to the same URI, as a GET, which it answers with the file
        # (status 200, Content-Length, keep-alive; the request body is discarded).
        location = {SLIDING_PATH} {{
            alias {root}/sliding.json;
            error_page 405 =200 $uri;
        }}
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


def _sync_rewrite(parsed: Any) -> Any:
    return rewrite_sync(parsed, incremental=False, full_state=False, pending=[], sync_filter=NO_FILTER)


def _sliding_rewrite(parsed: Any) -> Any:
    scope = Scope.of(orjson.loads(sliding_sync_request()))
    return rewrite_sliding_sync(parsed, first=True, scope=scope, pending=[])


def measure_floor(
    body: bytes, repeats: int, rewrite: Callable[[Any], Any] = _sync_rewrite
) -> dict[str, float]:
    """Milliseconds (median) for orjson.loads + orjson.dumps of `body`: the least any
    rewrite must cost. Also with the cyclic GC paused (as the proxy parses), and the
    proxy's own pipeline for a first answer (scan, exact parse, strip with `rewrite`,
    serialise)."""
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
        result = rewrite(parsed)
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


Bodies = dict[int | str, bytes]  # /sync bodies by size; the sliding sync body as SLIDING


def make_bodies(settings: Settings) -> Bodies:
    """The two /sync bodies (same generator, same seed: the larger holds more rooms), and
    a first sliding sync response the size of the smaller."""
    bodies: Bodies = {size: sync_body(size) for size in settings.sync_sizes}
    bodies[SLIDING] = sliding_sync_body(settings.sync_sizes[0])
    return bodies


def floors(settings: Settings, bodies: Bodies) -> dict[str, dict[str, float]]:
    repeats = dict(zip(settings.sync_sizes, settings.floor_repeats, strict=True))
    out = {str(size): measure_floor(bodies[size], repeats[size]) for size in settings.sync_sizes}
    out[SLIDING] = measure_floor(bodies[SLIDING], settings.floor_repeats[0], _sliding_rewrite)
    return out


# --- the wrk runs ------------------------------------------------------------------------


def run(
    settings: Settings,
    workdir: Path,
    wrk: Wrk,
    upstream: Nginx,
    proxy_pid: int,
    proxy_url: str,
    bodies: Bodies,
) -> dict[str, Any]:
    up_port = upstream.ports[0]
    upstream_url = f"http://127.0.0.1:{up_port}"
    nginx_port = free_port()
    servers = nginx_reverse_proxy_server(nginx_port, up_port, "static_upstream")
    nginx = bench_nginx(workdir, "nginx-proxy-static", servers, [nginx_port])
    minimal = minimal_proxy(workdir, upstream_url, "minimal-proxy.log")
    nginx.start()
    minimal.start()
    try:
        targets = [
            Target("direct", "static nginx directly", upstream_url),
            Target("nginx", "nginx reverse proxy", f"http://127.0.0.1:{nginx_port}", nginx.worker_pids),
            Target("proxy", "msc3391-proxy", proxy_url, lambda: [proxy_pid]),
            Target("aiohttp", "minimal aiohttp proxy", minimal.url, lambda: [minimal.pid]),
        ]
        workloads = _workloads(settings)
        # The floor again, right after each repetition of the proxy's rewrite runs: the
        # same minutes of this shared machine as the figure it is compared with.
        floors_in_run: dict[str, list[float]] = {str(size): [] for size in settings.sync_sizes}
        floors_in_run[SLIDING] = []
        repeats: dict[int | str, int] = dict(zip(settings.sync_sizes, settings.floor_repeats, strict=True))
        repeats[SLIDING] = settings.floor_repeats[0]

        def floor_after(key: int | str) -> Any:
            def finish(target: Target, result: Any) -> None:
                if target.key == "proxy":
                    body = bodies[key]
                    floors_in_run[str(key)].append(
                        _timed(repeats[key], lambda: orjson.dumps(orjson.loads(body)))
                    )

            return finish

        small, large = settings.sync_sizes
        for w in workloads:
            if w.key == "sync_s_init_c1":
                w.finish = floor_after(small)
            if w.key == "sync_l_init_c1":
                w.finish = floor_after(large)
            if w.key == "sliding_first_c1":
                w.finish = floor_after(SLIDING)
        problems = answers.check(workloads, targets, _upstream_bodies(workloads, settings, bodies))
        for problem in problems:
            say(f"pass-through: WRONG ANSWER: {problem}")
        say("pass-through: 26-byte GET, /versions, /sync and sliding sync bodies, targets interleaved")
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
        "answer_problems": problems,
    }


def _upstream_bodies(workloads: list[Workload], settings: Settings, bodies: Bodies) -> dict[str, bytes]:
    """What the static upstream answers to each workload."""
    small, large = settings.sync_sizes
    out = {}
    for w in workloads:
        if w.key.startswith("small"):
            out[w.key] = SMALL_BODY
        elif w.key.startswith("versions"):
            out[w.key] = versions_body()
        elif w.key.startswith("sync_s"):
            out[w.key] = bodies[small]
        elif w.key.startswith("sync_l"):
            out[w.key] = bodies[large]
        elif w.key.startswith("sliding"):
            out[w.key] = bodies[SLIDING]
    return out


def sync_path(size: int, incremental: bool) -> str:
    since = "since=s72594_4483&timeout=0&" if incremental else ""
    return f"/_matrix/client/v3/sync?{since}bench={sync_name(size)}"


# Only these run through the minimal aiohttp proxy: the workloads it is the yardstick of
# (issue 13 items 1, 2, 7) and the 26-byte GETs (the framework's share of a pass-through).
WITH_MINIMAL = (
    "small_c1",
    "small_c8",
    "small_c64",
    "versions_c64",
    "versions_token_c64",
    "sync_s_inc_c8",
    "sliding_inc_c8",
)
# And the upstream directly only where it shows the upstream's headroom for many
# connections; at one connection (the rewrites) nginx's own figure tells enough.
WITH_DIRECT = (*WITH_MINIMAL, "sync_l_inc_c8")


def _workloads(settings: Settings) -> list[Workload]:
    small, large = settings.sync_sizes
    s_label, l_label = settings.size_label(small), settings.size_label(large)
    secs = settings.sync_seconds
    # At 1 and 8 connections a reference (no target): shorter runs.
    workloads = [
        Workload(
            f"small_c{c}",
            f"26-byte GET, {c} conn{'s' if c > 1 else ''}",
            SMALL_PATH,
            c,
            settings.small_seconds if c == 64 else settings.reference_seconds,
        )
        for c in (1, 8, 64)
    ]
    # Owned and rewritten (the proxy adds org.matrix.msc3391): a small owned request.
    # Without a token the proxy answers from its copy of the homeserver's answer (a few
    # seconds old at most); with one it asks the homeserver every time.
    workloads += [
        Workload("versions_c64", "/versions (owned), 64 conns", VERSIONS_PATH, 64, settings.small_seconds),
        Workload(
            "versions_token_c64",
            "/versions with an access token (owned), 64 conns",
            VERSIONS_PATH,
            64,
            settings.small_seconds,
        ),
    ]
    workloads += [
        Workload("sync_s_inc_c1", f"{s_label} /sync incremental, 1 conn", sync_path(small, True), 1, secs),
        Workload("sync_s_inc_c8", f"{s_label} /sync incremental, 8 conns", sync_path(small, True), 8, secs),
        Workload("sync_s_init_c1", f"{s_label} /sync initial, 1 conn", sync_path(small, False), 1, secs),
        Workload("sync_s_init_c8", f"{s_label} /sync initial, 8 conns", sync_path(small, False), 8, secs),
        Workload("sync_l_inc_c8", f"{l_label} /sync incremental, 8 conns", sync_path(large, True), 8, secs),
        # Few requests fit in a run at this size: twice the time.
        Workload("sync_l_init_c1", f"{l_label} /sync initial, 1 conn", sync_path(large, False), 1, 2 * secs),
    ]
    # Sliding sync: the same request body every time; `pos` makes it incremental.
    request = sliding_sync_request()
    workloads += [
        Workload(
            "sliding_inc_c8",
            f"{s_label} sliding sync with pos, 8 conns",
            f"{SLIDING_PATH}?pos=4186%2Fs72594_4483&timeout=0",
            8,
            secs,
            body=request,
        ),
        Workload(
            "sliding_first_c1",
            f"{s_label} sliding sync, first (no pos), 1 conn",
            f"{SLIDING_PATH}?timeout=0",
            1,
            secs,
            body=request,
        ),
    ]
    for w in workloads:
        if not w.key.startswith("small") and w.key != "versions_c64":
            w.headers = (AUTH,)
        w.targets = tuple(
            t
            for t in ("direct", "nginx", "proxy", "aiohttp")
            if (t != "aiohttp" or w.key in WITH_MINIMAL) and (t != "direct" or w.key in WITH_DIRECT)
        )
    return workloads

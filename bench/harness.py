"""What every section of the benchmark shares: /proc readings, nginx, wrk, processes.

Processes are started by this run and stopped by their own PID (never by name).
Servers (Synapse, the proxy as a process, nginx) and process handling come from the
rig (`rig/`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rig.nginx import Nginx
from rig.processes import free_port, spawn_child, stop_process, wait_for_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# --- /proc ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def status_kib(pid: int, key: str) -> int:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM, ...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class CpuMeter:
    """CPU time consumed by a set of processes between `start()` and `stop()`."""

    def __init__(self, pids: Callable[[], Sequence[int]]) -> None:
        self._pids = pids
        self._before: dict[int, float] = {}

    def start(self) -> None:
        self._before = {pid: cpu_seconds(pid) for pid in self._pids()}

    def stop(self) -> float:
        return sum(cpu_seconds(pid) - self._before.get(pid, 0.0) for pid in self._pids())


class RssSampler:
    """Samples VmRSS of one process on a thread; `peak_kib` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


# --- processes --------------------------------------------------------------------------


class Child:
    """A helper process of the benchmark (the slow upstream); output to a log file."""

    def __init__(self, argv: Sequence[str], log_path: Path, port: int, what: str) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.port = port
        self.what = what
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = spawn_child(self.argv, log)
        try:
            wait_for_port(self.port, self.process, self.what)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"{self.what} failed; log: {self.log_path.read_text()[-2000:]}") from None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=10.0)


def minimal_proxy(workdir: Path, upstream_url: str, log_name: str) -> Child:
    """`bench/minimal_proxy.py` in front of `upstream_url` (not started)."""
    port = free_port()
    return Child(
        [sys.executable, str(Path(__file__).with_name("minimal_proxy.py")), str(port), upstream_url],
        workdir / log_name,
        port,
        "the minimal aiohttp proxy",
    )


# --- nginx ------------------------------------------------------------------------------

# What every nginx of the benchmark shares: many connections, long keep-alive, no
# access log (the rig's default), JSON where a file says so.
# pcre_jit: the generated configuration decides on regexes (README: nginx); no other
# nginx of the run uses any, so it changes nothing for them.
_NGINX_MAIN = "worker_rlimit_nofile 16384;\npcre_jit on;\n"
_NGINX_HTTP = (
    "    keepalive_requests 1000000;\n"
    "    keepalive_timeout 300s;\n"
    "    sendfile on;\n"
    "    tcp_nopush on;\n"
    "    tcp_nodelay on;\n"
    "    types { application/json json; }\n"
    "    default_type application/octet-stream;\n"
)


def bench_nginx(directory: Path, name: str, servers: str, ports: Sequence[int], workers: int = 1) -> Nginx:
    """One nginx (master + `workers` worker processes) with its own config, pid file,
    logs and temp paths in `directory`/`name`; `servers` is the text inside `http { }`."""
    return Nginx(
        directory / name,
        _NGINX_HTTP + servers,
        ports,
        workers=workers,
        worker_connections=8192,
        main_config=_NGINX_MAIN,
        error_log_level="warn",
    )


def nginx_reverse_proxy_server(listen_port: int, upstream_port: int, name: str) -> str:
    """A plain reverse proxy: HTTP/1.1 and keepalive to the upstream, no buffering."""
    return f"""
    upstream {name} {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
"""


# --- wrk --------------------------------------------------------------------------------

_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  local wraps, made = 0, 0
  for _, t in ipairs(threads or {}) do
    wraps = wraps + (t:get("wraps") or 0)
    made = made + (t:get("n") or 0)
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d,"wraps":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max, wraps))
end
"""

# DELETE of a fresh type per request: `bench.del.<thread>.<n>`, n = 1..per_thread (then
# it wraps around and counts it: a repeated delete is cheaper for Synapse, so a run
# that wrapped is flagged in the report).
_DELETE_LUA = r"""
threads = {}
local next_tid = 0
function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
  table.insert(threads, thread)
end
function init(args)
  prefix = args[1]
  per_thread = tonumber(args[2])
  method = args[3] or "DELETE"
  body = nil
  if method == "PUT" then
    wrk.headers["Content-Type"] = "application/json"
    body = "{}"
  end
  n = 0
  wraps = 0
end
function request()
  n = n + 1
  local k = n
  if k > per_thread then
    k = ((n - 1) % per_thread) + 1
    wraps = wraps + 1
  end
  return wrk.format(method, prefix .. tid .. "." .. k, nil, body)
end
"""


def _post_script(body: bytes) -> bytes:
    """wrk setup for a POST of `body` (JSON): the body as a Lua long string, whose
    brackets are chosen so that nothing in the body can close it."""
    level = 0
    while b"]" + b"=" * level + b"]" in body:
        level += 1
    eq = b"=" * level
    return (
        b'wrk.method = "POST"\n'
        b'wrk.headers["Content-Type"] = "application/json"\n'
        b"wrk.body = [" + eq + b"[" + body + b"]" + eq + b"]\n"
    )


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    max_us: float
    errors: dict[str, int]
    wraps: int = 0
    cpu_seconds: float | None = None  # of the measured process(es), when there are some
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_seconds is None or not self.requests:
            return None
        return self.cpu_seconds / self.requests * 1e6

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Wrk:
    def __init__(self, directory: Path) -> None:
        self.binary = shutil.which("wrk") or "/usr/bin/wrk"
        self.report_script = directory / "report.lua"
        self.delete_script = directory / "delete.lua"
        self.report_script.write_text(_REPORT_LUA)
        self.delete_script.write_text(_DELETE_LUA + _REPORT_LUA)
        self._directory = directory
        self._post_scripts: dict[bytes, Path] = {}

    def post_script(self, body: bytes) -> Path:
        """A script that POSTs `body` on every request (one file per distinct body)."""
        if body not in self._post_scripts:
            path = self._directory / f"post-{len(self._post_scripts)}.lua"
            path.write_bytes(_post_script(body) + _REPORT_LUA.encode())
            self._post_scripts[body] = path
        return self._post_scripts[body]

    def run(
        self,
        url: str,
        *,
        connections: int,
        seconds: int,
        headers: Sequence[str] = (),
        delete_prefix: str | None = None,
        delete_per_thread: int = 0,
        delete_method: str = "DELETE",
        threads: int | None = None,
        timeout: int = 60,
        cpu: CpuMeter | None = None,
        side_cpu: CpuMeter | None = None,
        body: bytes | None = None,
    ) -> WrkResult:
        """`body`: POST it (JSON) instead of a GET. `delete_prefix`: each request is a
        `delete_method` (DELETE, PUT {} or GET) of a path of its own, the prefix followed
        by the thread's number and a counter up to `delete_per_thread`. `side_cpu`: other
        processes whose CPU over the run is reported too (`extra["side_cpu_s"]`), e.g.
        one that should idle."""
        threads = threads or (1 if connections < 8 else 2)
        argv = [self.binary, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s"]
        argv += ["--timeout", f"{timeout}s"]
        for header in headers:
            argv += ["-H", header]
        if delete_prefix is not None:
            argv += ["-s", str(self.delete_script), url, "--", delete_prefix, str(delete_per_thread)]
            argv.append(delete_method)
        elif body is not None:
            argv += ["-s", str(self.post_script(body)), url]
        else:
            argv += ["-s", str(self.report_script), url]
        for meter in (cpu, side_cpu):
            if meter is not None:
                meter.start()
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + timeout + 60, check=False
        )
        used = cpu.stop() if cpu is not None else None
        side = side_cpu.stop() if side_cpu is not None else None
        for line in done.stdout.splitlines():
            if line.startswith("WRKJSON "):
                raw = json.loads(line[len("WRKJSON ") :])
                break
        else:
            raise RuntimeError(
                f"wrk gave no result (status {done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return WrkResult(
            requests=raw["requests"],
            seconds=raw["duration_us"] / 1e6,
            p50_us=raw["p50"],
            p90_us=raw["p90"],
            p99_us=raw["p99"],
            mean_us=raw["mean"],
            max_us=raw["max"],
            errors={k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]},
            wraps=raw["wraps"],
            cpu_seconds=used,
            extra={} if side is None else {"side_cpu_s": side},
        )


# --- interleaved runs -------------------------------------------------------------------


@dataclass
class Target:
    """Where a workload is sent, and whose CPU is charged for it."""

    key: str  # "direct", "nginx", "proxy"
    label: str
    base_url: str
    cpu_pids: Callable[[], Sequence[int]] | None = None
    # Processes whose CPU over the same runs is reported apart: one that should not be
    # busy at all (the proxy behind the generated config, for a path it does not own),
    # or one's share of `cpu_pids` (the second of two instances).
    side_pids: Callable[[], Sequence[int]] | None = None


@dataclass
class Workload:
    key: str
    label: str
    path: str  # or a function of the target (e.g. a different user per target)
    connections: int
    seconds: int
    headers: Sequence[str] = ()
    # Called before each measured run; returns extra wrk arguments (the DELETE set-up).
    prepare: Callable[[Target, int], dict[str, Any]] | None = None
    finish: Callable[[Target, WrkResult], None] | None = None  # called after each run
    targets: Sequence[str] | None = None  # a subset of the section's targets
    warmup: bool = True
    body: bytes | None = None  # POST this JSON body instead of a GET


Results = dict[str, dict[str, list[WrkResult]]]  # workload key -> target key -> one per rep


def run_interleaved(
    wrk: Wrk,
    workloads: Sequence[Workload],
    targets: Sequence[Target],
    *,
    reps: int,
    warmup_seconds: int,
    target_for: Callable[[Workload, Target], Target] = lambda w, t: t,
) -> Results:
    """Each repetition runs every workload through every target in turn (A B C A B C):
    slow drift of the shared machine then spreads over all targets alike."""
    results: Results = {
        w.key: {t.key: [] for t in targets if w.targets is None or t.key in w.targets} for w in workloads
    }

    def one(workload: Workload, target: Target, seconds: int, rep: int) -> WrkResult:
        real = target_for(workload, target)
        extra = workload.prepare(real, rep) if workload.prepare else {}
        cpu = CpuMeter(real.cpu_pids) if real.cpu_pids else None
        side = CpuMeter(real.side_pids) if real.side_pids else None
        options: dict[str, Any] = {
            "headers": workload.headers,
            "body": workload.body,
            **extra,
        }
        path = options.pop("path", workload.path)
        result = wrk.run(
            real.base_url + path,
            connections=workload.connections,
            seconds=seconds,
            cpu=cpu,
            side_cpu=side,
            **options,
        )
        if workload.finish:
            workload.finish(real, result)
        return result

    if warmup_seconds:
        for workload in workloads:
            if not workload.warmup:
                continue
            for target in targets:
                if workload.targets is None or target.key in workload.targets:
                    one(workload, target, warmup_seconds, -1)
    for rep in range(reps):
        for workload in workloads:
            for target in targets:
                if workload.targets is not None and target.key not in workload.targets:
                    continue
                result = one(workload, target, workload.seconds, rep)
                results[workload.key][target.key].append(result)
                cpu = result.cpu_us_per_request
                side = result.extra.get("side_cpu_s")
                say(
                    f"  rep {rep + 1}/{reps} {workload.label:<34} {target.label:<22} "
                    f"{result.rps:9.1f} req/s  p50 {result.p50_us / 1000:8.2f} ms  "
                    f"p99 {result.p99_us / 1000:8.2f} ms"
                    + (f"  cpu {cpu:7.1f} us/req" if cpu is not None else "")
                    + (f"  side cpu {side:.2f} s" if side is not None else "")
                    + (f"  ERRORS {result.errors}" if result.errors else "")
                    + (f"  wrapped {result.wraps}" if result.wraps else "")
                )
    return results


def summarize(runs: Sequence[WrkResult]) -> dict[str, Any]:
    """Medians over repetitions (plus each repetition's figures, for the detail table)."""
    cpu = [r.cpu_us_per_request for r in runs if r.cpu_us_per_request is not None]
    side = [(r.extra["side_cpu_s"], r.requests) for r in runs if "side_cpu_s" in r.extra]
    return {
        "rps": median(r.rps for r in runs),
        "p50_ms": median(r.p50_us for r in runs) / 1000,
        "p90_ms": median(r.p90_us for r in runs) / 1000,
        "p99_ms": median(r.p99_us for r in runs) / 1000,
        "cpu_us": median(cpu) if cpu else None,
        "errors": sum(r.error_count for r in runs),
        "requests": sum(r.requests for r in runs),
        "wraps": sum(r.wraps for r in runs),
        "reps_rps": [round(r.rps, 1) for r in runs],
        "reps_p50_ms": [round(r.p50_us / 1000, 3) for r in runs],
        # The side processes' CPU: seconds per run, and per request.
        "side_cpu_s": median(s for s, _ in side) if side else None,
        "side_cpu_us": median(s / n * 1e6 for s, n in side if n) if side else None,
        "seconds": median(r.seconds for r in runs),
    }


__all__ = [
    "CpuMeter",
    "Nginx",
    "RssSampler",
    "Target",
    "Workload",
    "Wrk",
    "WrkResult",
    "bench_nginx",
]

"""nginx running the configuration `python -m proxy nginx-config` generates.

Two interleaved runs against the static upstream (`passthrough.static_upstream`):

- *Bypass* (issue 13): a 26-byte GET the proxy does not own, through nginx on the
  generated file (its homeserver upstream is the static nginx, its proxy upstream a
  running proxy process) against a plain nginx reverse proxy to the same upstream; both
  with one worker. The proxy's CPU meanwhile is measured apart: it should be ~0.
- *Instances* (issue 12): the 1 MiB incremental /sync fast path through nginx on the
  generated file with one proxy instance (`--proxy A`) against the same with two
  (`--proxy A --proxy B`, round-robin); both instances share one PostgreSQL store and
  run all the time (the one-instance target's nginx just never sends to B).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rig.postgres import PostgresServer
from rig.processes import free_port
from rig.proxy_process import ProxyProcess, nginx_config

from . import pg
from .harness import (
    Nginx,
    Target,
    Workload,
    Wrk,
    bench_nginx,
    nginx_reverse_proxy_server,
    run_interleaved,
    say,
    summarize,
)
from .passthrough import AUTH, SMALL_PATH, VERSIONS_PATH, sync_path
from .settings import Settings

ProxyFactory = Callable[..., ProxyProcess]
BYPASS_WORKERS = 1  # both nginx of the bypass run: one worker each, as the pass-through's


def generate(code: Path, config_path: Path, listen_port: int, proxies: Sequence[int]) -> str:
    """`python -m proxy nginx-config` for this proxy config (its upstream: the homeserver),
    run from the run's copy of the proxy's code."""
    addresses = [f"127.0.0.1:{port}" for port in proxies]
    return nginx_config(config_path, listen_port, proxies=addresses, code_dir=code)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return bytes(answer.read())


def _summaries(workloads: Sequence[Workload], targets: Sequence[Target], results: Any) -> dict[str, Any]:
    return {
        "workloads": {w.key: w.label for w in workloads},
        "targets": {t.key: t.label for t in targets},
        "summary": {wk: {tk: summarize(runs) for tk, runs in per.items()} for wk, per in results.items()},
    }


def bypass(
    settings: Settings, workdir: Path, wrk: Wrk, upstream: Nginx, code: Path, proxy_factory: ProxyFactory
) -> dict[str, Any]:
    up_port = upstream.ports[0]
    proxy = proxy_factory(f"http://127.0.0.1:{up_port}", "proxy-generated")
    started: list[Nginx] = []
    try:
        gen_port, plain_port = free_port(), free_port()
        text = generate(code, proxy.config_path, gen_port, [proxy.port])
        generated = bench_nginx(workdir, "nginx-generated", text, [gen_port], workers=BYPASS_WORKERS)
        servers = nginx_reverse_proxy_server(plain_port, up_port, "static_upstream")
        plain = bench_nginx(workdir, "nginx-plain", servers, [plain_port], workers=BYPASS_WORKERS)
        for server in (generated, plain):
            server.start()
            started.append(server)
        # The wiring, checked once: an owned path reaches the proxy (which adds its
        # feature to /versions), the measured one does not.
        owned = b"org.matrix.msc3391" in _get(f"{generated.url}{VERSIONS_PATH}")
        passed = _get(f"{generated.url}{SMALL_PATH}") == _get(f"{upstream.url}{SMALL_PATH}")
        pid = proxy.process.pid if proxy.process is not None else 0
        targets = [
            Target("nginx", "plain nginx reverse proxy", plain.url, plain.worker_pids),
            Target(
                "generated",
                "nginx, generated config",
                generated.url,
                generated.worker_pids,
                side_pids=lambda: [pid],
            ),
        ]
        workloads = [
            Workload("small_c64", "26-byte GET (not owned), 64 conns", SMALL_PATH, 64, settings.small_seconds)
        ]
        say("generated config: a path the proxy does not own, against a plain nginx; interleaved")
        results = run_interleaved(
            wrk, workloads, targets, reps=settings.reps, warmup_seconds=settings.warmup_seconds
        )
    finally:
        for server in reversed(started):
            server.stop()
        proxy.stop()
    return {
        **_summaries(workloads, targets, results),
        "workers": BYPASS_WORKERS,
        "owned_reaches_proxy": owned,
        "not_owned_unchanged": passed,
        "config_lines": len(text.splitlines()),
    }


def instances(
    settings: Settings,
    workdir: Path,
    wrk: Wrk,
    upstream: Nginx,
    code: Path,
    proxy_factory: ProxyFactory,
    postgres: PostgresServer,
) -> dict[str, Any]:
    upstream_url = f"http://127.0.0.1:{upstream.ports[0]}"
    store = f"[store]\nurl = {json.dumps(pg.database(postgres, 'bench_instances'))}\n"
    a = proxy_factory(upstream_url, "proxy-instance-a", store)
    started: list[Any] = [a]
    # As many nginx workers as cores (nginx's `auto`, as a deployment runs it): one
    # worker would cap both targets at what one core proxies, whatever the instances do.
    workers = os.cpu_count() or 1
    try:
        b = proxy_factory(upstream_url, "proxy-instance-b", store)
        started.append(b)
        one_port, two_port = free_port(), free_port()
        one = bench_nginx(
            workdir,
            "nginx-one-instance",
            generate(code, a.config_path, one_port, [a.port]),
            [one_port],
            workers,
        )
        two_text = generate(code, a.config_path, two_port, [a.port, b.port])
        two = bench_nginx(workdir, "nginx-two-instances", two_text, [two_port], workers)
        for server in (one, two):
            server.start()
            started.append(server)
        pid_a = a.process.pid if a.process is not None else 0
        pid_b = b.process.pid if b.process is not None else 0
        targets = [
            Target("one", "1 instance (--proxy A)", one.url, lambda: [pid_a], side_pids=lambda: [pid_b]),
            # Side CPU here: instance B's share, which shows the round-robin at work.
            Target(
                "two",
                "2 instances (--proxy A --proxy B)",
                two.url,
                lambda: [pid_a, pid_b],
                side_pids=lambda: [pid_b],
            ),
        ]
        size = settings.sync_sizes[0]
        label = settings.size_label(size)
        workloads = [
            Workload(
                f"sync_inc_c{c}",
                f"{label} /sync incremental, {c} conns",
                sync_path(size, True),
                c,
                settings.sync_seconds,
                (AUTH,),
            )
            for c in (8, 64)
        ]
        say("instances: /sync through the generated config, one instance against two; interleaved")
        results = run_interleaved(
            wrk, workloads, targets, reps=settings.reps, warmup_seconds=settings.warmup_seconds
        )
    finally:
        for thing in reversed(started):
            thing.stop()
    return {**_summaries(workloads, targets, results), "workers": workers, "store": "PostgreSQL (shared)"}


def run(
    settings: Settings,
    workdir: Path,
    wrk: Wrk,
    upstream: Nginx,
    code: Path,
    proxy_factory: ProxyFactory,
    postgres: PostgresServer | None,
) -> dict[str, Any]:
    out = {"bypass": bypass(settings, workdir, wrk, upstream, code, proxy_factory)}
    if postgres is not None:
        out["instances"] = instances(settings, workdir, wrk, upstream, code, proxy_factory, postgres)
    return out

"""Memory: idle long-polls held through the proxy, and 1 GiB streamed each way.

A fresh proxy process in front of `bench/slow_upstream.py`, whose /sync never answers
within the hold time, then the minimal aiohttp proxy (`minimal_proxy.py`) holding the
same long-polls. RSS comes from /proc/PID/status of the process holding them.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from rig.processes import free_port

from .harness import Child, RssSampler, Wrk, fd_count, minimal_proxy, reset_peak_rss, say, status_kib
from .settings import MiB, Settings

SMALL_PATH = "/_matrix/client/v3/capabilities"
HOLD_SECONDS = 90.0  # the upstream's long-poll; the proxy waits timeout + margin (120 s)
LONG_POLL_MS = 90_000


def _upstream_held(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/stats", timeout=10) as r:
        return int(json.loads(r.read())["held"])


async def _wait_held(port: int, want: int, deadline_s: float) -> tuple[int, float]:
    started = time.monotonic()
    held = -1
    while time.monotonic() - started < deadline_s:
        held = await asyncio.to_thread(_upstream_held, port)
        if held == want:
            break
        await asyncio.sleep(0.25)
    return held, time.monotonic() - started


async def _open_long_polls(port: int, count: int, concurrency: int) -> tuple[list[asyncio.StreamWriter], int]:
    """`count` idle long-poll /syncs, each its own connection and device token."""
    writers: list[asyncio.StreamWriter] = []
    failures = 0
    next_index = 0

    async def opener() -> None:
        nonlocal next_index, failures
        while next_index < count:
            i = next_index
            next_index += 1
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                failures += 1
                continue
            writer.write(
                (
                    f"GET /_matrix/client/v3/sync?since=s1&timeout={LONG_POLL_MS} HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer u{i}\r\n\r\n"
                ).encode()
            )
            await writer.drain()
            writers.append(writer)

    await asyncio.gather(*(opener() for _ in range(concurrency)))
    return writers, failures


async def _held_figures(
    settings: Settings, wrk: Wrk, proxy_pid: int, proxy_port: int, upstream_port: int
) -> dict[str, Any]:
    probe_url = f"http://127.0.0.1:{proxy_port}{SMALL_PATH}"
    seconds = settings.held_probe_seconds
    await asyncio.to_thread(wrk.run, probe_url, connections=1, seconds=1)  # warm-up
    baseline = await asyncio.to_thread(wrk.run, probe_url, connections=1, seconds=seconds)
    await asyncio.sleep(1)
    rss_before = status_kib(proxy_pid, "VmRSS")
    fds_before = fd_count(proxy_pid)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Each held long-poll takes two sockets in the proxy (client side and upstream side).
    fit = (min(soft, hard) - fds_before - 200) // 2
    count = min(settings.held_connections, fit)
    say(f"memory: opening {count} idle long-poll /syncs through the proxy (fd limit {hard})")
    started = time.monotonic()
    writers, failures = await _open_long_polls(proxy_port, count, concurrency=100)
    held, _ = await _wait_held(upstream_port, len(writers), deadline_s=60)
    ramp = time.monotonic() - started
    await asyncio.sleep(2)
    rss_held = status_kib(proxy_pid, "VmRSS")
    fds_held = fd_count(proxy_pid)
    say(f"memory: {held} held after {ramp:.1f} s; RSS {rss_before} -> {rss_held} KiB; probing latency")
    probe = await asyncio.to_thread(wrk.run, probe_url, connections=1, seconds=seconds)
    rss_after_probe = status_kib(proxy_pid, "VmRSS")
    held_after = await asyncio.to_thread(_upstream_held, upstream_port)
    elapsed = time.monotonic() - started
    for writer in writers:
        writer.close()
    released, _ = await _wait_held(upstream_port, 0, deadline_s=60)
    await asyncio.sleep(1)
    rss_released = status_kib(proxy_pid, "VmRSS")
    return {
        "requested": settings.held_connections,
        "opened": len(writers),
        "open_failures": failures,
        "fd_limit": hard,
        "held": held,
        "held_after_probe": held_after,
        "ramp_seconds": ramp,
        "seconds_held_at_end": elapsed,
        "hold_seconds": HOLD_SECONDS,
        "rss_before_kib": rss_before,
        "rss_held_kib": rss_held,
        "rss_after_probe_kib": rss_after_probe,
        "rss_released_kib": rss_released,
        "released_to": released,
        "fds_before": fds_before,
        "fds_held": fds_held,
        "kib_per_connection": (rss_held - rss_before) / held if held > 0 else None,
        "probe_idle": {
            "p50_ms": baseline.p50_us / 1000,
            "p99_ms": baseline.p99_us / 1000,
            "rps": baseline.rps,
        },
        "probe_held": {
            "p50_ms": probe.p50_us / 1000,
            "p99_ms": probe.p99_us / 1000,
            "rps": probe.rps,
            "errors": probe.error_count,
        },
    }


async def _zeros(total: int) -> AsyncIterator[bytes]:
    chunk = bytes(MiB)
    left = total
    while left > 0:
        piece = chunk if left >= len(chunk) else chunk[:left]
        left -= len(piece)
        yield piece


async def _streamed(proxy_url: str, proxy_pid: int, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"bytes": size}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        for direction in ("download", "upload"):
            await asyncio.sleep(0.5)
            can_reset = reset_peak_rss(proxy_pid)
            before = status_kib(proxy_pid, "VmRSS")
            started = time.monotonic()
            with RssSampler(proxy_pid) as sampler:
                if direction == "download":
                    url = f"{proxy_url}/_matrix/client/v1/media/download/localhost/bench?size={size}"
                    got = 0
                    async with session.get(url, headers={"Authorization": "Bearer u-media"}) as r:
                        async for piece in r.content.iter_chunked(MiB):
                            got += len(piece)
                        status = r.status
                else:
                    url = f"{proxy_url}/_matrix/media/v3/upload?filename=bench.bin"
                    headers = {
                        "Authorization": "Bearer u-media",
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    }
                    async with session.post(url, data=_zeros(size), headers=headers) as r:
                        status = r.status
                        got = int((await r.json()).get("received", -1))
            seconds = time.monotonic() - started
            hwm = status_kib(proxy_pid, "VmHWM")
            peak = max(sampler.peak_kib, hwm if can_reset else 0)
            out[direction] = {
                "status": status,
                "transferred": got,
                "complete": status == 200 and got == size,
                "seconds": seconds,
                "mib_per_s": size / MiB / seconds,
                "rss_before_kib": before,
                "peak_rss_kib": peak,
                "growth_kib": peak - before,
                "samples": sampler.samples,
                "hwm_reset": can_reset,
            }
            say(
                f"memory: {direction} of {size // MiB} MiB: {seconds:.1f} s, "
                f"peak RSS growth {(peak - before) / 1024:.1f} MiB"
            )
    return out


def run(settings: Settings, workdir: Path, wrk: Wrk, proxy_factory: Any) -> dict[str, Any]:
    upstream_port = free_port()
    upstream = Child(
        [
            sys.executable,
            str(Path(__file__).with_name("slow_upstream.py")),
            "--port",
            str(upstream_port),
            "--hold",
            str(HOLD_SECONDS),
        ],
        workdir / "slow-upstream.log",
        upstream_port,
        "the slow upstream",
    )
    upstream.start()
    proxy = None
    try:
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        proxy = proxy_factory(upstream_url, "proxy-memory")
        pid = proxy.process.pid
        held = asyncio.run(_held_figures(settings, wrk, pid, proxy.port, upstream_port))
        proxy.stop()
        proxy = None
        # The same long-polls through the least an aiohttp proxy does: the framework's
        # own share of a held long-poll, under the proxy's.
        minimal = minimal_proxy(workdir, upstream_url, "minimal-memory.log")
        minimal.start()
        try:
            held["minimal"] = asyncio.run(
                _held_figures(settings, wrk, minimal.pid, minimal.port, upstream_port)
            )
        finally:
            minimal.stop()
        # A fresh process for the transfers: the one above keeps the memory the long-polls
        # used for reuse, which would hide any growth.
        proxy = proxy_factory(upstream_url, "proxy-streaming")
        streamed = asyncio.run(_streamed(proxy.url, proxy.process.pid, settings.stream_bytes))
        return {"held": held, "streamed": streamed}
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()

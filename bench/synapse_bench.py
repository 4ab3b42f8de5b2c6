"""Real Synapse 1.163.2: the client calls the proxy must not slow down, and the delete.

Two Synapses from the rig (`rig/synapse.py`): one with its own `msc3391_enabled` off (behind
the proxy, as deployed) and one with it on (the reference for the DELETE). Targets:
Synapse directly, nginx as a plain reverse proxy, and the proxy. For the DELETE,
"directly" and "nginx" reach the Synapse with the flag on (its own DELETE), the
proxy reaches the one with it off (whoami, device list, the type's GET, PUT {} and two
store transactions per delete). The DELETE's floor: the homeserver calls that delete
needs (the device list and the type's GET, then the PUT {}), each measured alone at 1
conn on the Synapse behind the proxy, in the same interleaved run.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

from rig.accounts import Account, login, register
from rig.processes import free_port, http_json
from rig.proxy_process import ProxyProcess
from rig.synapse import SynapseServer

from .harness import (
    Nginx,
    Target,
    Workload,
    Wrk,
    WrkResult,
    bench_nginx,
    nginx_reverse_proxy_server,
    run_interleaved,
    say,
    summarize,
)
from .settings import Settings

DELETE_PREFIX = "bench.del."


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def start_synapses(workdir: Path) -> tuple[SynapseServer, SynapseServer]:
    """One after the other, from this (the main) thread: the rig asks Linux to stop a
    server when the thread that started it ends (PR_SET_PDEATHSIG is per thread)."""
    plain = SynapseServer(workdir / "synapse-off", msc3391=False)
    reference = SynapseServer(workdir / "synapse-on", msc3391=True)
    plain.start()
    try:
        reference.start()
    except BaseException:
        plain.stop()
        raise
    return plain, reference


def new_user(base_url: str, prefix: str) -> tuple[Account, Account]:
    """A fresh user with two devices (so a delete has another device to tell)."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    first = register(base_url, name)
    second = login(base_url, name)
    return first, second


async def _put_types(base_url: str, account: Account, names: list[str], concurrency: int = 16) -> None:
    queue = list(names)
    headers = {**account.headers, "Content-Type": "application/json"}
    user = quote(account.user_id)

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            name = queue.pop()
            url = f"{base_url}/_matrix/client/v3/user/{user}/account_data/{quote(name)}"
            async with session.put(url, data=b'{"setting":true,"n":1}', headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"PUT {name}: {r.status} {await r.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def run(settings: Settings, workdir: Path, wrk: Wrk, proxy_factory: Any) -> dict[str, Any]:
    say("Synapse: starting two homeservers (own MSC3391 flag off and on)")
    plain, reference = start_synapses(workdir)
    proxy: ProxyProcess | None = None
    nginx: Nginx | None = None
    try:
        port_plain, port_ref = free_port(), free_port()
        servers = nginx_reverse_proxy_server(port_plain, plain.port or 0, "synapse_off")
        servers += nginx_reverse_proxy_server(port_ref, reference.port or 0, "synapse_on")
        nginx = bench_nginx(workdir, "nginx-proxy-synapse", servers, [port_plain, port_ref])
        nginx.start()
        proxy = proxy_factory(plain.url, "proxy-synapse")
        proxy_pid = proxy.process.pid
        nginx_pids = nginx.worker_pids

        main, _ = new_user(plain.url, "bench")
        user = quote(main.user_id)
        status, _ = http_json(
            "PUT",
            f"{plain.url}/_matrix/client/v3/user/{user}/account_data/bench.get",
            {"theme": "dark", "n": 1},
            token=main.access_token,
        )
        assert status == 200
        status, synced = http_json("GET", f"{plain.url}/_matrix/client/v3/sync", token=main.access_token)
        assert status == 200
        since = synced["next_batch"]
        auth = (f"Authorization: Bearer {main.access_token}",)

        targets = [
            Target("direct", "Synapse directly", plain.url),
            Target("nginx", "nginx reverse proxy", f"http://127.0.0.1:{port_plain}", nginx_pids),
            Target("proxy", "msc3391-proxy", proxy.url, lambda: [proxy_pid]),
        ]
        # The DELETE: Synapse's own (flag on) directly and through nginx; the proxy's.
        delete_targets = {
            "direct": Target("direct", "Synapse (flag on) directly", reference.url),
            "nginx": Target(
                "nginx", "nginx -> Synapse (flag on)", f"http://127.0.0.1:{port_ref}", nginx_pids
            ),
            "proxy": Target("proxy", "msc3391-proxy -> Synapse", proxy.url, lambda: [proxy_pid]),
        }
        upstream_of = {"direct": reference.url, "nginx": reference.url, "proxy": plain.url}
        # Deletes per second seen so far per (workload, target): sizes the next set of types.
        seen_rate: dict[tuple[str, str], float] = {}

        def delete_workload(connections: int, seconds: int) -> Workload:
            key = f"delete_c{connections}"

            def prepare(target: Target, rep: int) -> dict[str, Any]:
                threads = 1 if connections < 8 else 2
                # Enough fresh types for the run: twice the fastest rate any target reached
                # so far in this workload (rates swing on a shared machine), so that no
                # request repeats a delete; a repeat would be flagged as "wrapped".
                seen = [r for (k, _), r in seen_rate.items() if k == key]
                rate = max(seen, default=250.0 if connections > 1 else 200.0)
                per_thread = int(rate * seconds * 2 / threads) + 20
                base = upstream_of[target.key]
                account, _ = new_user(base, f"del{connections}")
                names = [
                    f"{DELETE_PREFIX}{t}.{k}" for t in range(1, threads + 1) for k in range(1, per_thread + 1)
                ]
                asyncio.run(_put_types(base, account, names))
                prefix = (
                    "/_matrix/client/unstable/org.matrix.msc3391/user/"
                    f"{quote(account.user_id)}/account_data/{DELETE_PREFIX}"
                )
                return {
                    "path": "/",
                    "headers": (f"Authorization: Bearer {account.access_token}",),
                    "delete_prefix": prefix,
                    "delete_per_thread": per_thread,
                }

            def finish(target: Target, result: WrkResult) -> None:
                if not result.wraps:  # a wrapped run is faster than it should be
                    old = seen_rate.get((key, target.key), 0.0)
                    seen_rate[(key, target.key)] = max(old, result.rps)

            return Workload(
                key,
                f"MSC3391 DELETE, {connections} conn{'s' if connections > 1 else ''}",
                "/",
                connections,
                seconds,
                prepare=prepare,
                finish=finish,
                warmup=False,
            )

        def floor_workload(key: str, label: str, method: str, seconds: int) -> Workload:
            """`method` of a type of its own on every request, none of them set (a GET then
            misses Synapse's caches, as the DELETE's GET of a type just written does)."""

            def prepare(target: Target, rep: int) -> dict[str, Any]:
                return {
                    "delete_prefix": f"/_matrix/client/v3/user/{user}/account_data/bench.{key}.{rep}.",
                    "delete_method": method,
                    "delete_per_thread": 1_000_000,  # never reached
                }

            return Workload(
                key, label, "/", 1, seconds, auth, prepare=prepare, targets=("direct",), warmup=False
            )

        s = settings.synapse_seconds
        d = settings.delete_seconds
        workloads = [
            Workload("whoami", "whoami, 8 conns", "/_matrix/client/v3/account/whoami", 8, s, auth),
            Workload(
                "account_data_get",
                "account data GET, 8 conns",
                f"/_matrix/client/v3/user/{user}/account_data/bench.get",
                8,
                s,
                auth,
            ),
            Workload(
                "sync_incremental",
                "incremental /sync (timeout=0), 8 conns",
                f"/_matrix/client/v3/sync?since={quote(since)}&timeout=0",
                8,
                s,
                auth,
            ),
            # Both are targets (issue 13): p50 within 1.5x Synapse's own at 1 and at 8.
            delete_workload(8, settings.delete_seconds),
            delete_workload(1, settings.delete_seconds),
            # The floor of a delete through a homeserver without MSC3391: the calls the
            # proxy must make, each alone at 1 conn, on the Synapse behind it.
            floor_workload("floor_get", "floor: GET of a type, 1 conn", "GET", d),
            Workload(
                "floor_devices",
                "floor: GET /devices, 1 conn",
                "/_matrix/client/v3/devices",
                1,
                d,
                auth,
                targets=("direct",),
            ),
            floor_workload("floor_put", "floor: PUT {}, 1 conn", "PUT", d),
        ]

        def target_for(workload: Workload, target: Target) -> Target:
            return delete_targets[target.key] if workload.key.startswith("delete") else target

        say(
            "Synapse: whoami, account data GET, incremental sync, DELETE, the DELETE's floor;"
            " targets interleaved"
        )
        results = run_interleaved(
            wrk,
            workloads,
            targets,
            reps=settings.reps,
            warmup_seconds=settings.warmup_seconds,
            target_for=target_for,
        )
        return {
            "workloads": {w.key: w.label for w in workloads},
            "targets": {t.key: t.label for t in targets},
            "delete_targets": {k: t.label for k, t in delete_targets.items()},
            "summary": {wk: {tk: summarize(runs) for tk, runs in per.items()} for wk, per in results.items()},
        }
    finally:
        if proxy is not None:
            proxy.stop()
        if nginx is not None:
            nginx.stop()
        plain.stop()
        reference.stop()

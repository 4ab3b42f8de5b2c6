"""Running it as an operator does: health, metrics, logs, signals, `inspect`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from proxy.server import ProxyServer
from rig import REPO_ROOT
from rig.proxy_process import ProxyProcess
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver

ALICE = "@alice:fake.test"
DELETE_PATH = (
    "/_matrix/client/unstable/org.matrix.msc3391/user/%40alice%3Afake.test/account_data/org.example.t"
)


async def start_process(
    proxy_process: Callable[..., ProxyProcess], upstream: str, extra_toml: str = "", msc3391: bool = True
) -> ProxyProcess:
    # The fake homeserver lives in this event loop: start the process from a thread.
    return await asyncio.to_thread(proxy_process, upstream, msc3391, extra_toml)


async def wait_for_exit(process: subprocess.Popen[bytes], limit: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), limit)


async def refuses_connections(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/health"):
            return False
    except aiohttp.ClientConnectionError:
        return True


# --- signals ---------------------------------------------------------------------------


async def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(
    fake_hs: FakeHomeserver, proxy_process: Callable[..., ProxyProcess], http: aiohttp.ClientSession
) -> None:
    token = fake_hs.add_device(ALICE, "A")
    release = asyncio.Event()
    fake_hs.fault(r"/sync$", gate=release)
    proxy = await start_process(proxy_process, fake_hs.url, "[proxy]\nshutdown_grace = 20\n")
    assert proxy.process is not None

    in_flight = asyncio.ensure_future(
        http.get(
            # The fake answers as soon as the gate opens (timeout=0: no long-poll of its own).
            f"{proxy.url}/_matrix/client/v3/sync?since=s0&timeout=0",
            headers={"Authorization": f"Bearer {token}"},
        )
    )
    async with asyncio.timeout(10):
        await fake_hs.wait_for_requests(r"/sync$")
    proxy.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        while not await refuses_connections(http, proxy.url):  # noqa: ASYNC110 (polling another process)
            await asyncio.sleep(0.05)
    assert proxy.process.poll() is None  # still finishing the held request

    release.set()
    async with asyncio.timeout(10):
        response = await in_flight
    assert response.status == 200
    assert "next_batch" in await response.json()
    response.release()
    assert await wait_for_exit(proxy.process, 10) == 0


async def test_a_connection_that_arrives_as_shutdown_begins_is_closed_not_held_for_the_grace(
    fake_hs: FakeHomeserver, start_proxy: StartProxy
) -> None:
    """aiohttp closes the connections it knows when shutdown begins; one accepted just
    after that (the listener closes a moment before) waited for a request it would never
    read, and its client hung for the whole grace. The connection handler now ends it."""
    proxy = await start_proxy(fake_hs.url, proxy={"shutdown_grace": 20})
    server = proxy._runner.server  # aiohttp's Server: the connections it knows
    assert server is not None
    server.pre_shutdown()  # as the runner's cleanup does, right after closing the listener
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    async with asyncio.timeout(10):
        while not server.connections:  # noqa: ASYNC110 (aiohttp registers it on its own)
            await asyncio.sleep(0.01)

    async with asyncio.timeout(5):  # the grace is 20 s
        await server.shutdown(proxy.config.proxy.shutdown_grace)
        assert await reader.read() == b""  # closed, nothing answered
    writer.close()


async def test_sigterm_cuts_long_polls_after_the_grace(
    fake_hs: FakeHomeserver, proxy_process: Callable[..., ProxyProcess], http: aiohttp.ClientSession
) -> None:
    token = fake_hs.add_device(ALICE, "A")
    fake_hs.fault(r"/sync$", hang=True)
    proxy = await start_process(proxy_process, fake_hs.url, "[proxy]\nshutdown_grace = 1\n")
    assert proxy.process is not None

    async def long_poll() -> Any:
        async with http.get(
            f"{proxy.url}/_matrix/client/v3/sync?since=s0&timeout=60000",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            return response.status, await response.read()

    held = asyncio.ensure_future(long_poll())
    async with asyncio.timeout(10):
        await fake_hs.wait_for_requests(r"/sync$")
    proxy.process.send_signal(signal.SIGTERM)
    # The client is not left hanging for its 60 s: the connection is closed (or
    # answered) once the grace is over, and the process exits cleanly.
    async with asyncio.timeout(15):
        try:
            status, _ = await held
            assert status >= 500
        except aiohttp.ClientError:
            pass
    assert await wait_for_exit(proxy.process, 15) == 0


async def test_sighup_reopens_the_log_file(
    fake_hs: FakeHomeserver,
    proxy_process: Callable[..., ProxyProcess],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    log_file = tmp_path / "proxy-file.log"
    proxy = await start_process(
        proxy_process, fake_hs.url, f'[proxy]\nlog_file = "{log_file}"\nlog_format = "json"\n'
    )
    assert proxy.process is not None
    async with http.get(proxy.url + "/_matrix/client/versions") as r:
        assert r.status == 200
    rotated = tmp_path / "proxy-file.log.1"
    log_file.rename(rotated)
    proxy.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(10):
        # Until the new file holds a complete access line of a request made after the
        # rotation (a line is written after the file is created).
        while "/_matrix/client/versions" not in _complete_lines(log_file):
            async with http.get(proxy.url + "/_matrix/client/versions") as r:
                assert r.status == 200
            await asyncio.sleep(0.05)
    assert proxy.process.poll() is None  # SIGHUP did not stop it
    for path in (rotated, log_file):
        lines = [json.loads(line) for line in _complete_lines(path).splitlines()]
        assert lines and all({"time", "level", "logger", "request_id", "message"} <= set(e) for e in lines)


def _complete_lines(path: Path) -> str:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    return text[: text.rfind("\n") + 1]


# --- health and metrics -------------------------------------------------------------------


async def test_health_with_and_without_the_upstream(
    fake_hs: FakeHomeserver, start_proxy: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    proxy: ProxyServer = await start_proxy(fake_hs.url, msc3391=False)
    async with http.get(proxy.url + "/health") as r:
        assert (r.status, await r.json()) == (200, {"status": "ok"})
    async with http.get(proxy.url + "/health?upstream=true") as r:
        assert (r.status, await r.json()) == (200, {"status": "ok", "upstream": "ok"})
    await fake_hs.go_down()
    async with http.get(proxy.url + "/health") as r:
        assert r.status == 200  # the proxy itself is fine
    async with http.get(proxy.url + "/health?upstream=true") as r:
        body = await r.json()
        assert r.status == 503
        assert body["status"] == "unavailable"


def metric(text: str, name: str, **labels: str) -> float:
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def test_metrics_count_deletes_acknowledgements_and_requests(
    fake_hs: FakeHomeserver, start_proxy: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    a = fake_hs.add_device(ALICE, "A")
    b = fake_hs.add_device(ALICE, "B")
    fake_hs.set_account_data(ALICE, "org.example.t", {"v": 1})
    proxy: ProxyServer = await start_proxy(fake_hs.url, metrics={"enabled": True, "port": 0})

    async def scrape() -> str:
        async with http.get(proxy.metrics_url + "/metrics") as r:
            assert r.status == 200
            return await r.text()

    before = await scrape()
    assert metric(before, "msc3391_proxy_deletes_total", kind="global") == 0
    async with http.get(
        f"{proxy.url}/_matrix/client/v3/sync?since=s0", headers={"Authorization": f"Bearer {b}"}
    ) as r:
        first = (await r.json())["next_batch"]
    async with http.delete(proxy.url + DELETE_PATH, headers={"Authorization": f"Bearer {a}"}) as r:
        assert r.status == 200
    async with http.get(
        f"{proxy.url}/_matrix/client/v3/sync?since={first}", headers={"Authorization": f"Bearer {b}"}
    ) as r:
        carried = (await r.json())["next_batch"]
    async with http.get(
        f"{proxy.url}/_matrix/client/v3/sync?since={carried}", headers={"Authorization": f"Bearer {b}"}
    ) as r:
        assert r.status == 200

    after = await scrape()
    assert metric(after, "msc3391_proxy_deletes_total", kind="global") == 1
    assert metric(after, "msc3391_proxy_acknowledgements_total", via="sync") == 1
    assert (
        metric(after, "msc3391_proxy_requests_total", route="delete_global_account_data", status="200") == 1
    )
    assert metric(after, "msc3391_proxy_requests_total", route="sync", status="200") == 3
    assert metric(after, "msc3391_proxy_unsynced_deletes_rows") == 0
    assert metric(after, "msc3391_proxy_identity_cache_total", result="hit") >= 1
    assert "alice" not in after and a not in after and b not in after  # no user data in labels
    async with http.get(proxy.metrics_url + "/health") as r:
        assert r.status == 200


# --- inspect -----------------------------------------------------------------------------------


async def test_inspect_lists_pending_deletions_by_user_and_device(
    fake_hs: FakeHomeserver, start_proxy: Callable[..., Any], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = fake_hs.add_device(ALICE, "A")
    fake_hs.add_device(ALICE, "B")
    fake_hs.add_device(ALICE, "C")
    fake_hs.set_account_data(ALICE, "org.example.t", {"v": 1})
    proxy: ProxyServer = await start_proxy(fake_hs.url)
    async with http.delete(proxy.url + DELETE_PATH, headers={"Authorization": f"Bearer {a}"}) as r:
        assert r.status == 200

    config = tmp_path / "inspect.toml"
    config.write_text(f'[upstream]\nurl = "{fake_hs.url}"\n[store]\npath = "{proxy.config.store.path}"\n')

    def inspect(*extra: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "inspect", "--config", str(config), *extra],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        ).stdout

    report = json.loads(await asyncio.to_thread(inspect, "--json"))
    devices = report["users"][ALICE]["devices"]
    assert sorted(devices) == ["B", "C"]
    assert devices["B"] == [{"stream_id": 1, "room_id": None, "type": "org.example.t"}]
    text = await asyncio.to_thread(inspect)
    assert f"{ALICE}: 1 tombstone(s)" in text
    assert 'B has not seen: #1 "org.example.t"' in text

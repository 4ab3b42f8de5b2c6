"""Try the proxy by hand: `python3 scripts/demo.py`.

Starts a real Synapse (its own MSC3391 flag off) on 127.0.0.1:8008 and the proxy
with `msc3391_enabled = true` on 127.0.0.1:8009 in front of it (other free ports if
those are taken), all files in `.demo/` (wiped at each start). Registers `alice`
with two devices and prints ready-to-paste curl commands. Runs until Ctrl-C.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import sys
import time
from typing import Any

from _bootstrap import ROOT, enter_venv, say, use_repository_modules

DEMO_DIR = ROOT / ".demo"
TYPE = "org.example.demo"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def curl(method: str, url: str, token: str, body: Any = None) -> str:
    parts = ["curl", "-sS"]
    if method != "GET":
        parts += ["-X", method]
    parts += [url, "-H", f"Authorization: Bearer {token}"]
    if body is not None:
        parts += ["-H", "Content-Type: application/json", "-d", json.dumps(body, separators=(",", ":"))]
    return shlex.join(parts)


def main() -> int:
    enter_venv()
    use_repository_modules()
    from tests.synapse_rig import (
        SYNAPSE_VERSION,
        ProxyProcess,
        SynapseServer,
        ensure_synapse_venv,
        free_port,
        http_json,
        login,
        port_is_free,
        register,
    )

    # Explicitly: a shell may start a background job with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ensure_synapse_venv(say=say)
    except RuntimeError as e:
        say(f"error: {e}")
        return 1
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir()

    synapse = SynapseServer(DEMO_DIR / "synapse", msc3391=False, port=8008 if port_is_free(8008) else None)
    proxy: ProxyProcess | None = None
    try:
        say(f"starting Synapse {SYNAPSE_VERSION} ...")
        synapse.start()
        proxy = ProxyProcess(
            DEMO_DIR, synapse.url, msc3391=True, port=8009 if port_is_free(8009) else free_port()
        )
        say("starting the proxy ...")
        proxy.start()

        # Through the proxy, as a client would.
        device_a = register(proxy.url, "alice", "password")
        device_b = login(proxy.url, "alice", "password")
        status, synced = http_json(
            "GET", f"{proxy.url}/_matrix/client/v3/sync?timeout=0", token=device_b.access_token
        )
        if status != 200:
            raise RuntimeError(f"device B's first sync failed: {status} {synced}")
        since = synced["next_batch"]

        p, user = proxy.url, device_a.user_id
        data_url = f"{p}/_matrix/client/v3/user/{user}/account_data/{TYPE}"
        delete_url = f"{p}/_matrix/client/unstable/org.matrix.msc3391/user/{user}/account_data/{TYPE}"
        a, b = device_a.access_token, device_b.access_token
        rel = DEMO_DIR.relative_to(ROOT)
        print(
            f"""
Synapse {SYNAPSE_VERSION} (its own MSC3391 flag off): {synapse.url}   log: {rel}/synapse/homeserver.log
msc3391-proxy (msc3391_enabled = true):     {proxy.url}   log: {rel}/{proxy.log_path.name}

Proxy URL: {p}
{user} (password "password")
  device A {device_a.device_id}  access token {a}
  device B {device_b.device_id}  access token {b}

Paste into another terminal:

# 1. Device A sets global account data {TYPE}:
{curl("PUT", data_url, a, {"colour": "blue"})}
# 2. ... and reads it back: {{"colour":"blue"}}
{curl("GET", data_url, a)}
# 3. Device A deletes it (MSC3391): {{}}
{curl("DELETE", delete_url, a)}
# 4. Reading it now gives 404 M_NOT_FOUND:
{curl("GET", data_url, a)}
# 5. Device B's incremental sync (since its last sync, before step 1) shows the deletion
#    in account_data.events: {{"type":"{TYPE}","content":{{}}}}
{curl("GET", f"{p}/_matrix/client/v3/sync?since={since}&timeout=0", b)}

Running; Ctrl-C stops both.
""",
            flush=True,
        )
        while synapse.running and proxy.running:
            time.sleep(0.5)
        say("Synapse exited unexpectedly" if not synapse.running else "the proxy exited unexpectedly")
        print(synapse.log_tail(20) if not synapse.running else proxy.log[-3000:], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
        return 0
    except RuntimeError as e:
        say(f"error: {e}")
        return 1
    finally:
        say("stopping ...")
        if proxy is not None:
            proxy.stop()
        synapse.stop()
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())

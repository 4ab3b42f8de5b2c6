"""Try the proxy by hand: `python3 scripts/demo.py`.

Starts a real Synapse (its own MSC3391 flag off) on 127.0.0.1:8008 and the proxy
with `msc3391_enabled = true` on 127.0.0.1:8009 in front of it (other free ports if
those are taken), metrics on 127.0.0.1:9109, all files in `.demo/` (wiped at each
start). Registers `alice` with four devices and prints, in order, ready-to-paste
commands: device A sets, reads and deletes a type; device B's sync sees the deletion;
device C, offline meanwhile, sees it when it syncs from its old token, and only then
leaves `account_data_unsynced_deletes`; device D sees it over sliding sync (Element X's
sync), once; and the current matrix-js-sdk deletes a live, a never-set and an
already-deleted type, each call returning. Runs until Ctrl-C.

`python3 scripts/demo.py --instances 2`: the deployment of the README's "Several
instances on PostgreSQL" instead of one proxy: a PostgreSQL of its own (the Debian
package, installed as root if missing), two proxy instances sharing it, and nginx
(installed likewise) in front of them on 127.0.0.1:8009, running what
`msc3391-proxy nginx-config` generates: owned paths round-robin to the instances,
everything else straight to Synapse. The same steps, through nginx, give the same
answers whichever instance each request reaches, and after a last step killing one
instance, the other serves on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from _bootstrap import ROOT, enter_venv, say, use_repository_modules

DEMO_DIR = ROOT / ".demo"
TYPE = "org.example.demo"
# Reads a sync body on stdin, prints its global account data entries of the demo type.
_ACCOUNT_DATA_OF_TYPE = (
    "import json,sys; b=json.load(sys.stdin); "
    f'print([e for e in b.get("account_data",{{}}).get("events",[]) if e["type"]=="{TYPE}"])'
)
# The same for a sliding sync answer (its account data extension), with its `pos`.
_SLIDING_ACCOUNT_DATA_OF_TYPE = (
    "import json,sys; b=json.load(sys.stdin); "
    f'print([e for e in b["extensions"].get("account_data",{{}}).get("global",[]) if e["type"]=="{TYPE}"],'
    ' "pos:", b["pos"])'
)
SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
# Element X's room list connection: its lists, and the account data extension on.
SLIDING_BODY = {
    "conn_id": "room-list",
    "lists": {"all": {"ranges": [[0, 20]], "required_state": [], "timeline_limit": 0}},
    "extensions": {"account_data": {"enabled": True}},
}


def _interrupt(signum: int, frame: Any) -> None:
    # Once: a second Ctrl-C (or a signal forwarded twice) must not cut the clean-up short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def curl(method: str, url: str, token: str, body: Any = None) -> str:
    parts = ["curl", "-sS"]
    if method != "GET":
        parts += ["-X", method]
    parts += [url, "-H", f"Authorization: Bearer {token}"]
    if body is not None:
        parts += ["-H", "Content-Type: application/json", "-d", json.dumps(body, separators=(",", ":"))]
    return shlex.join(parts)


def sliding_curl(url: str, token: str, pos: str) -> str:
    return shlex.join(
        [
            "curl", "-sS", "-X", "POST", f"{url}{SLIDING_SYNC}?timeout=0&pos={pos}",
            "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
            "-d", json.dumps(SLIDING_BODY, separators=(",", ":")),
        ]
    )  # fmt: skip


def js_sdk_step(proxy_url: str) -> str:
    """The command of the demo's last step, if matrix-js-sdk 43 and Node.js 22 can be had
    (`npm ci` in tests/js43, which the test suite uses too), else why not."""
    from rig.programs import JS43_DIR, JS43_NODE, ensure_js_packages

    try:
        ensure_js_packages(JS43_DIR, say=say)
    except RuntimeError as e:
        return f"#    (not available here: {str(e).splitlines()[0]})"
    job = json.dumps({"baseUrl": proxy_url, "user": "alice", "password": "password"})
    command = shlex.join([str(JS43_NODE), str(ROOT / "scripts/js_sdk_demo.mjs"), str(JS43_DIR)])
    return f"MSC3391_DEMO={shlex.quote(job)} {command}"


def _parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        metavar="N",
        help="N > 1: N instances on one PostgreSQL, behind nginx (default: 1, SQLite)",
    )
    arguments = parser.parse_args()
    if not 1 <= arguments.instances <= len(INSTANCE_NAMES):
        parser.error("--instances takes 1 to 8")
    return arguments


def _programs_for_instances() -> tuple[str, Path]:
    """nginx's binary and PostgreSQL's bindir, installing their Debian packages if
    they are missing (as the test suite does)."""
    from rig.programs import find_postgres_bindir, find_program, install_debian_packages

    found = {"nginx": find_program("nginx"), "postgresql": find_postgres_bindir()}
    missing = [package for package, where in found.items() if where is None]
    if missing and not install_debian_packages(missing, say=say):
        raise RuntimeError(f"--instances needs {' and '.join(missing)} (apt install {' '.join(missing)})")
    nginx, bindir = find_program("nginx"), find_postgres_bindir()
    if nginx is None or bindir is None:
        raise RuntimeError("nginx or PostgreSQL's server programs are still not found")
    return nginx, bindir


# The instances' names (a, b, ...), as the README's several-instances section has them.
INSTANCE_NAMES = "abcdefgh"
# What the demo started, by name, to watch; each is stopped by the demo's ExitStack.
Running = list[tuple[str, Any]]


def _start_instances(
    count: int, upstream_url: str, running: Running, stack: contextlib.ExitStack
) -> list[Any]:
    """One proxy on its SQLite file, or `count` on a PostgreSQL of their own."""
    from rig.postgres import PostgresServer, temporary_directory
    from rig.processes import free_port, port_is_free
    from rig.proxy_process import ProxyProcess

    store = ""
    if count > 1:
        _, bindir = _programs_for_instances()
        # Under /tmp: the `postgres` user it runs as (when we are root) must reach it.
        directory = temporary_directory("msc3391-demo-postgres-")
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        postgres = PostgresServer(directory, bindir=bindir)
        say("starting PostgreSQL ...")
        stack.callback(postgres.stop)
        postgres.start()
        running.append(("PostgreSQL", postgres))
        postgres.create_user("msc3391_proxy")
        url = postgres.create_database("msc3391_proxy", owner="msc3391_proxy")
        store = f"[store]\nurl = {json.dumps(url)}\n"
    instances = []
    for i in range(count):
        metrics_port = 9109 + i if port_is_free(9109 + i) else free_port()
        # One instance keeps the README's port; several are reached through nginx there.
        port = 8009 if count == 1 and port_is_free(8009) else free_port()
        instance = ProxyProcess(
            DEMO_DIR,
            upstream_url,
            msc3391=True,
            port=port,
            name="proxy" if count == 1 else f"proxy-{INSTANCE_NAMES[i]}",
            extra_toml=f"{store}[metrics]\nenabled = true\nport = {metrics_port}\n",
        )
        say(f"starting the proxy{'' if count == 1 else ' ' + INSTANCE_NAMES[i]} ...")
        stack.callback(instance.stop)
        instance.start()
        running.append((f"the proxy on port {instance.port}", instance))
        instances.append(instance)
    return instances


def _start_nginx(instances: list[Any], running: Running, stack: contextlib.ExitStack) -> str:
    """nginx on 127.0.0.1:8009 (or a free port) running the generated configuration."""
    from rig.nginx import Nginx
    from rig.processes import free_port, port_is_free
    from rig.proxy_process import nginx_config

    binary, _ = _programs_for_instances()
    port = 8009 if port_is_free(8009) else free_port()
    # What the README tells an operator to run: one `--proxy` per instance.
    proxies = [f"{instance.host}:{instance.port}" for instance in instances]
    text = nginx_config(instances[0].config_path, port, proxies=proxies)
    (DEMO_DIR / "nginx-msc3391-proxy.conf").write_text(text)
    nginx = Nginx(DEMO_DIR / "nginx", text, [port], binary=binary)
    say("starting nginx ...")
    stack.callback(nginx.stop)
    nginx.start()
    running.append(("nginx", nginx))
    return f"http://127.0.0.1:{port}"


def _wait_while_running(running: Running, killable: Any) -> int:
    """Until one of them exits (except `killable`: the instance the last step kills)."""
    while True:
        for name, service in running:
            if service is not killable and not service.running:
                say(f"{name} exited unexpectedly")
                log = service.log_tail(20) if hasattr(service, "log_tail") else getattr(service, "log", "")
                print(log[-3000:], file=sys.stderr)
                return 1
        time.sleep(0.5)


def main() -> int:
    arguments = _parse_arguments()
    enter_venv()
    use_repository_modules()
    from rig.accounts import login, register
    from rig.processes import http_json, port_is_free
    from rig.synapse import SYNAPSE_VERSION, SynapseServer, ensure_synapse_venv

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
    running: Running = [("Synapse", synapse)]
    # Started last, stopped first: the front (nginx), the instances, then what they use.
    stack = contextlib.ExitStack()
    try:
        say(f"starting Synapse {SYNAPSE_VERSION} ...")
        stack.callback(synapse.stop)
        synapse.start()
        instances = _start_instances(arguments.instances, synapse.url, running, stack)
        proxy = instances[0]
        front = instances[0].url
        if len(instances) > 1:
            front = _start_nginx(instances, running, stack)

        # Through the proxy, as a client would.
        device_a = register(front, "alice", "password")
        device_b = login(front, "alice", "password")
        device_c = login(front, "alice", "password")
        device_d = login(front, "alice", "password")
        status, first = http_json("POST", front + SLIDING_SYNC, SLIDING_BODY, token=device_d.access_token)
        if status != 200:
            raise RuntimeError(f"device D's first sliding sync failed: {status} {first}")
        d_pos = first["pos"]
        tokens = {}
        for name, device in (("B", device_b), ("C", device_c)):
            status, synced = http_json(
                "GET", f"{front}/_matrix/client/v3/sync?timeout=0", token=device.access_token
            )
            if status != 200:
                raise RuntimeError(f"device {name}'s first sync failed: {status} {synced}")
            tokens[name] = synced["next_batch"]

        p, user = front, device_a.user_id
        data_url = f"{p}/_matrix/client/v3/user/{user}/account_data/{TYPE}"
        delete_url = f"{p}/_matrix/client/unstable/org.matrix.msc3391/user/{user}/account_data/{TYPE}"
        a, b, c = device_a.access_token, device_b.access_token, device_c.access_token
        d = device_d.access_token
        rel = DEMO_DIR.relative_to(ROOT)
        sync_url = f"{p}/_matrix/client/v3/sync?timeout=0&since="
        inspect = shlex.join(
            [str(ROOT / ".venv/bin/msc3391-proxy"), "inspect", "--config", str(proxy.config_path)]
        )
        only_demo = f"python3 -c {shlex.quote(_ACCOUNT_DATA_OF_TYPE)}"
        next_batch = "python3 -c " + shlex.quote('import json,sys; print(json.load(sys.stdin)["next_batch"])')
        pos_of = "python3 -c " + shlex.quote('import json,sys; print(json.load(sys.stdin)["pos"])')
        only_demo_sliding = f"python3 -c {shlex.quote(_SLIDING_ACCOUNT_DATA_OF_TYPE)}"
        js_sdk = js_sdk_step(p)
        services = "\n".join(
            f"msc3391-proxy {'' if len(instances) == 1 else INSTANCE_NAMES[i] + ' '}(msc3391_enabled = true):"
            f"   {instance.url}   log: {rel}/{instance.log_path.name}"
            for i, instance in enumerate(instances)
        )
        metrics = "".join(
            f"curl -sS http://127.0.0.1:{port}/metrics | grep '^msc3391_proxy_[a-z_]*_total'\n"
            for port in (instance.config["metrics"]["port"] for instance in instances)
        )
        last_step = ""
        if len(instances) > 1:
            database = instances[0].config["store"]["url"].partition("@")[2]
            services += (
                f"\nPostgreSQL (the instances' one store):   {database}"
                f"\nnginx (msc3391-proxy nginx-config):  {front}   config: {rel}/nginx-msc3391-proxy.conf"
            )
            last_step = f"""# 12. Every step above went through nginx, round-robin over the instances (step 11
#     shows each one's share). Kill instance a: b serves on, and knows everything:
kill -9 {instances[0].process.pid}; sleep 1; {curl("GET", data_url, a)}
{curl("PUT", data_url, a, {"colour": "green"})}; {curl("DELETE", delete_url, a)}; {curl("GET", data_url, a)}
"""
        # The pos comes from the shell variable: close the quoted URL around it.
        d_next = sliding_curl(p, d, "POS").replace("pos=POS'", 'pos=\'"$POS"')
        print(
            f"""
Synapse {SYNAPSE_VERSION} (its own MSC3391 flag off): {synapse.url}   log: {rel}/synapse/homeserver.log
{services}

Proxy URL: {p}
{user} (password "password")
  device A {device_a.device_id}  access token {a}
  device B {device_b.device_id}  access token {b}
  device C {device_c.device_id}  access token {c}   (offline until step 7)
  device D {device_d.device_id}  access token {d}   (sliding sync; its first pos {d_pos})

Paste into another terminal, in order:

# 1. Device A sets global account data {TYPE}:
{curl("PUT", data_url, a, {"colour": "blue"})}
# 2. ... and reads it back: {{"colour":"blue"}}
{curl("GET", data_url, a)}
# 3. Device A deletes it (MSC3391): {{}}
{curl("DELETE", delete_url, a)}
# 4. Reading it now gives 404 M_NOT_FOUND:
{curl("GET", data_url, a)}
# 5. The proxy knows who has not seen the deletion yet: devices B, C and D.
{inspect}
# 6. Device B's incremental sync (from its token before step 1) carries the deletion:
#    [{{"type":"{TYPE}","content":{{}}}}]
{curl("GET", sync_url + tokens["B"], b)} | {only_demo}
# 7. Device C was offline; it syncs from its old token and sees the deletion too:
{curl("GET", sync_url + tokens["C"], c)} | {only_demo}
#    A device's row goes when it proves it got the response: its next sync uses that
#    response's next_batch (a real client does this by itself). Until then, step 5 still
#    lists it. Do it for C (B's row goes the same way):
NB=$({curl("GET", sync_url + tokens["C"], c)} | {next_batch})
curl -sS "{sync_url}$NB" -H "Authorization: Bearer {c}" > /dev/null; {inspect}
# 8. A fresh initial sync never carries {{}} entries: [] here
{curl("GET", f"{p}/_matrix/client/v3/sync?timeout=0", b)} | {only_demo}
# 9. Device D syncs over sliding sync, as Element X does, from its position before
#    step 1: the deletion, in the account data extension.
{sliding_curl(p, d, d_pos)} | {only_demo_sliding}
#    Its next request, with the pos of that answer, proves it arrived (here the answer is
#    asked for once more, a retry, to keep its pos): D leaves step 5's list, told nothing.
POS=$({sliding_curl(p, d, d_pos)} | {pos_of})
{d_next} | {only_demo_sliding}; {inspect}
#    A new sliding sync connection's first response (no pos) never carries {{}}: []
{sliding_curl(p, d, "").replace("&pos=", "")} | {only_demo_sliding}
# 10. The current matrix-js-sdk (43, Node.js 22) deletes a live type, a type never set,
#     and (from a device that logged in afterwards) a type deleted already; each call
#     returns (it waits for the deletion to come back over its sync, which the proxy sends):
{js_sdk}
# 11. The proxy's metrics (deletes, acknowledgements, requests by route):
{metrics}{last_step}
Running; Ctrl-C stops everything.
""",
            flush=True,
        )
        return _wait_while_running(running, killable=instances[0] if len(instances) > 1 else None)
    except KeyboardInterrupt:
        print()
        return 0
    except RuntimeError as e:
        say(f"error: {e}")
        return 1
    finally:
        say("stopping ...")
        stack.close()
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())

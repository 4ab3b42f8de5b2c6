"""Programs some tests need beyond Python: nginx, and Node.js with matrix-js-sdk.

`scripts/test.py` installs them (Debian packages when run as root, then `npm ci` in
`tests/js`); the tests only look. A test asks with the `require` fixture:
`require("nginx")` returns the nginx binary, `require("matrix-js-sdk")` returns the
`node` binary once `tests/js/node_modules` matches the lockfile. When something is
missing the test fails if `CI` is set (CI must not pass by skipping) and is skipped
otherwise, with the reason and the fix either way.

Plain blocking code, like `tests/synapse_rig.py`, so the scripts can use it too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable

import pytest

from tests.synapse_rig import REPO_ROOT, _file_lock, _say

JS_DIR = REPO_ROOT / "tests" / "js"
# matrix-js-sdk 37.5.0 declares `engines: node >=20`; 37.6 and later need Node 22.
NODE_MIN_MAJOR = 20
# Written into node_modules after a successful `npm ci`: the hash of what it installed.
_JS_STAMP = JS_DIR / "node_modules" / ".msc3391-proxy-installed"
# nginx lives in /usr/sbin, which is not on an ordinary user's PATH.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


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


def debian_packages_to_install() -> list[str]:
    """The Debian packages that would bring what is missing: nginx; nodejs (and npm)
    only when there is no `node` at all, so a Node.js from elsewhere is kept."""
    packages = []
    if find_program("nginx") is None:
        packages.append("nginx")
    if find_program("node") is None:
        packages.append("nodejs")
        if find_program("npm") is None:
            packages.append("npm")
    return packages


def _js_wanted() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((JS_DIR / name).read_bytes())
    return digest.hexdigest()


def js_packages_installed() -> bool:
    try:
        return _JS_STAMP.read_text() == _js_wanted()
    except FileNotFoundError:
        return False


def ensure_js_packages(say: Callable[[str], None] = _say) -> None:
    """`npm ci` in tests/js unless node_modules already matches the lockfile.
    Raises RuntimeError (with npm's output) if npm is missing or fails."""
    if js_packages_installed():
        return
    npm = find_program("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    with _file_lock(JS_DIR / ".npm-ci.lock"):
        if js_packages_installed():  # installed by another process while we waited
            return
        say("npm ci in tests/js (matrix-js-sdk, pinned by package-lock.json) ...")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm ci in {JS_DIR} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        _JS_STAMP.write_text(_js_wanted())


def _nginx_problem() -> tuple[str | None, str]:
    nginx = find_program("nginx")
    if nginx is None:
        return None, "nginx is not installed (Debian: apt-get install nginx)"
    return nginx, ""


def _js_sdk_problem() -> tuple[str | None, str]:
    node = find_program("node")
    if node is None:
        return None, "Node.js is not installed (Debian: apt-get install nodejs npm)"
    major = node_major(node)
    if major is None or major < NODE_MIN_MAJOR:
        return (
            None,
            f"{node} is Node.js {major}; matrix-js-sdk 37.5.0 needs Node.js {NODE_MIN_MAJOR} or newer",
        )
    try:
        ensure_js_packages()
    except RuntimeError as e:
        return None, f"matrix-js-sdk is not installed: {e}"
    return node, ""


_CHECKS: dict[str, Callable[[], tuple[str | None, str]]] = {
    "nginx": _nginx_problem,
    "matrix-js-sdk": _js_sdk_problem,
}


@pytest.fixture(scope="session")
def require() -> Callable[[str], str]:
    """`require("nginx")` / `require("matrix-js-sdk")`: the program's path (nginx,
    or node with tests/js/node_modules ready). If it is missing: the test fails when
    the environment variable CI is set, and is skipped otherwise."""
    found: dict[str, tuple[str | None, str]] = {}

    def check(what: str) -> str:
        if what not in found:
            found[what] = _CHECKS[what]()
        path, problem = found[what]
        if path is not None:
            return path
        message = f"{problem}; `python3 scripts/test.py` run as root installs it"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs this test to run, but {message}", pytrace=False)
        pytest.skip(message)

    return check

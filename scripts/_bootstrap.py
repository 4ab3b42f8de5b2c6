"""The common start of `scripts/test.py` and `scripts/demo.py`.

Needs nothing but Python 3.11+: creates `.venv` in the repository if it is missing,
installs the project with its test tools into it (again only when `pyproject.toml`
changed), then runs the calling script once more inside that venv. Also installs
Debian packages for `scripts/test.py` (`install_debian_packages`), as root only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
# Holds a hash of what was installed; a different pyproject.toml means install again.
STAMP = VENV / ".msc3391-proxy-installed"
# Set in the re-executed process, so the venv is checked once per run.
_IN_VENV = "MSC3391_PROXY_IN_VENV"


def say(message: str) -> None:
    print(f"[{Path(sys.argv[0]).stem}] {message}", flush=True)


def die(message: str) -> NoReturn:
    say(f"error: {message}")
    sys.exit(1)


def _wanted() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_project_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 (this runs under any python3 on PATH)
        die(f"Python 3.11 or newer is needed (this is {sys.version.split()[0]})")
    if not VENV_PYTHON.exists():
        say(f"creating {VENV.relative_to(ROOT)} ...")
        if subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=False).returncode != 0:
            die("could not create the venv (on Debian/Ubuntu: apt install python3-venv)")
    wanted = _wanted()
    try:
        if STAMP.read_text() == wanted:
            return
    except FileNotFoundError:
        pass
    say("installing the project and its test tools into .venv (pip install -e '.[test]') ...")
    installed = subprocess.run(
        [str(VENV_PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", ".[test]"],
        cwd=ROOT,
        check=False,
    )
    if installed.returncode != 0:
        die("pip install failed (if .venv is broken, delete it and run this again)")
    STAMP.write_text(wanted)


def enter_venv() -> None:
    """Return inside the project venv, ready to use; re-executes the script if needed."""
    if os.environ.get(_IN_VENV) == str(VENV):
        return
    ensure_project_venv()
    script = Path(sys.argv[0]).resolve()
    env = {**os.environ, _IN_VENV: str(VENV)}
    os.execve(VENV_PYTHON, [str(VENV_PYTHON), str(script), *sys.argv[1:]], env)


def use_repository_modules() -> None:
    """Make `tests.synapse_rig` importable (the rig lives with the tests)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def install_debian_packages(packages: list[str]) -> bool:
    """`apt-get update` once, then `apt-get install -y --no-install-recommends PACKAGES`.
    Only as root on a machine with apt-get; otherwise says so and returns False."""
    if not packages:
        return True
    wanted = " ".join(packages)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"not installing {wanted}: that needs root and apt-get (the tests needing them are skipped)")
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

"""The common start of `scripts/test.py` and `scripts/demo.py`.

Needs nothing but Python 3.11+: creates `.venv` in the repository if it is missing,
installs the project with its test tools into it (again only when `pyproject.toml`
changed), then runs the calling script once more inside that venv, where
`use_repository_modules()` makes the development rig (`rig/`) importable.
"""

from __future__ import annotations

import hashlib
import os
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
    """Make the repository's own packages importable: `rig` (Synapse, the proxy as a
    process, programs), which is not installed into the venv."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

"""Child processes, ports, and waiting for a server: what every server of the rig shares.

Every child is started in its own session (a Ctrl-C meant for the test run or the demo
does not reach it), asked by Linux to stop when the thread that started it dies, and
stopped by its own PID, never by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from rig import REPO_ROOT


def say(message: str) -> None:
    """The rig's default progress line: to standard error, at once."""
    print(message, file=sys.stderr, flush=True)


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, headed by its name (for error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} is missing)"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two test runs installing at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- ports ---------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# --- child processes -------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the test process dies,
    so a killed test run does not leave servers behind. Bound before forking."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return preexec


def spawn_child(argv: list[str], output: IO[Any] | int, cwd: Path = REPO_ROOT) -> subprocess.Popen[bytes]:
    """Start a helper process (Synapse, the proxy, nginx): output to `output` (a file or
    DEVNULL), no input, in its own session, so a Ctrl-C meant for the test run or the
    demo does not reach it (it is stopped explicitly, by PID), and SIGTERMed if we die."""
    return subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent(),
    )


def stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to this process (by its own PID), SIGKILL if it is still alive after `grace`."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- blocking HTTP ---------------------------------------------------------------------------

# Loopback only: an http_proxy in the environment must not see these requests.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def open_direct(request: urllib.request.Request | str, timeout: float) -> Any:
    """`urlopen`, bypassing any `http_proxy` of the environment (the rig's servers are
    on loopback). HTTP errors raise `urllib.error.HTTPError`, as `urlopen` does."""
    return _direct.open(request, timeout=timeout)


def http_json(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """A blocking JSON request: returns (status, parsed body or None). HTTP errors are
    returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with open_direct(request, timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


# --- waiting for a server ------------------------------------------------------------------


def answers_http(url: str) -> bool:
    """True once anything answers HTTP at `url` (any status)."""
    try:
        with open_direct(url, 2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _wait_for(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], timeout: float, what: str, waiting_for: str
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not {waiting_for} within {timeout:.0f} s")
        time.sleep(0.05)


def _answers_ok(url: str) -> bool:
    try:
        with open_direct(url, 2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_answering(
    url: str, process: subprocess.Popen[bytes], timeout: float, what: str, *, need_ok: bool = True
) -> None:
    """Until `url` answers 200 (or, without `need_ok`, anything at all); RuntimeError if
    `process` exits first or `timeout` seconds pass."""
    ready = (lambda: _answers_ok(url)) if need_ok else (lambda: answers_http(url))
    _wait_for(ready, process, timeout, what, f"answer {url}")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0, host: str = "127.0.0.1"
) -> None:
    """Until something accepts TCP connections on `port`; RuntimeError if `process` exits
    first or `timeout` seconds pass."""
    _wait_for(lambda: _accepts(host, port), process, timeout, what, f"listen on port {port}")

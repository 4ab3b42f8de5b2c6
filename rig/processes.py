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
import os
import pwd
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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


# Below the kernel's range for the local ports of outgoing connections, above the ports
# that services (and the demo's 8008, 8009, 9109) are given by hand.
_LOWEST_PICKED = 15000
_handed_out: set[int] = set()


def outgoing_port_range() -> range:
    """The ports Linux gives to the local end of outgoing connections (and to a bind on
    port 0): `net.ipv4.ip_local_port_range`, or its default where it cannot be read."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now, for a server started soon after.

    Picked outside `outgoing_port_range()`, not left to the OS: the OS's choice comes
    from that range, where any connection made before the server binds can take it as
    its own end (seen: a proxy refused `address already in use` at start-up while its
    store's pool and Synapse were connecting). Outside it, only a listener can hold a
    port, and the bind below finds those. Never the same port twice in one process, so
    two servers asked for before either starts get two."""
    below = range(_LOWEST_PICKED, outgoing_port_range().start)
    for attempt in range(400):
        # Once the ports below the range are all taken (or there are none, on a kernel
        # whose range starts lower): the OS's choice after all.
        port = random.choice(below) if below and attempt < 200 else _os_choice(host)
        if port not in _handed_out and port_is_free(port, host):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port on {host}")


def _os_choice(host: str) -> int:
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


def _die_with_parent(death_signal: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `death_signal` to the child when the thread
    that started it dies, so a killed test run does not leave servers behind. Bound
    before forking. Popen calls it after switching to the `user` and `group` it was
    given, which matters: Linux clears this setting when a process changes its user or
    group IDs."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(death_signal), 0, 0, 0)

    return preexec


@dataclass(frozen=True)
class RunAs:
    """Another system user for a child process (PostgreSQL refuses to run as root):
    its user ID, primary group and supplementary groups (not root's)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def of(cls, name: str) -> RunAs:
        """KeyError if there is no such user."""
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))


def spawn_child(
    argv: list[str],
    output: IO[Any] | int,
    cwd: Path = REPO_ROOT,
    *,
    death_signal: signal.Signals = signal.SIGTERM,
    run_as: RunAs | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a helper process (Synapse, the proxy, nginx, PostgreSQL): output to `output`
    (a file or DEVNULL), no input, in its own session, so a Ctrl-C meant for the test
    run or the demo does not reach it (it is stopped explicitly, by PID), and sent
    `death_signal` if we die. With `run_as` (needs root) it runs as that user."""
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent(death_signal),
        user=None if run_as is None else run_as.uid,
        group=None if run_as is None else run_as.gid,
        extra_groups=None if run_as is None else list(run_as.groups),
    )


def child_pids(pid: int) -> list[int]:
    """The PIDs of a process's children (Linux: /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its parent counts as gone: it
    holds no memory, files or ports any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


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

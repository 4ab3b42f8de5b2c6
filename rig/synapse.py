"""The real homeserver for integration tests, and the proxy as a real process.

`SynapseServer` installs matrix-synapse into a venv of its own (cached across runs,
never the project's), writes a test configuration (loopback, SQLite, open
registration, no rate limits, no federation) and runs Synapse as a subprocess.
`ProxyProcess` runs `python -m proxy --config FILE` the way an operator would.
Both are plain blocking code (subprocess + urllib) so that session-scoped fixtures
work from any test, sync or async; `scripts/test.py` and `scripts/demo.py` use them too.

Fixtures (loaded as a plugin by `tests/conftest.py`):
- `synapse`, `synapse_msc3391`: session-wide servers (Synapse's own MSC3391 flag off /
  on), started on first use and stopped at the end of the session.
- `synapse_factory(msc3391=False) -> SynapseServer`: a throwaway server of the test's own.
- `proxy_process(upstream_url, msc3391=True, extra_toml="") -> ProxyProcess`.
- `unique_name(prefix="user") -> str`: a fresh Matrix localpart.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pytest

SYNAPSE_VERSION = "1.163.2"
SYNAPSE_SPEC = f"matrix-synapse=={SYNAPSE_VERSION}"
SERVER_NAME = "localhost"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Rate limits high enough never to trigger in a test (`per_second` / `burst_count`).
_NO_LIMIT = {"per_second": 1_000_000, "burst_count": 1_000_000}
_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _NO_LIMIT,
    "rc_registration": _NO_LIMIT,
    "rc_registration_token_validity": _NO_LIMIT,
    "rc_login": {"address": _NO_LIMIT, "account": _NO_LIMIT, "failed_attempts": _NO_LIMIT},
    "rc_joins": {"local": _NO_LIMIT, "remote": _NO_LIMIT},
    "rc_joins_per_room": _NO_LIMIT,
    "rc_invites": {"per_room": _NO_LIMIT, "per_user": _NO_LIMIT, "per_issuer": _NO_LIMIT},
    "rc_third_party_invite": _NO_LIMIT,
    "rc_3pid_validation": _NO_LIMIT,
    "rc_media_create": _NO_LIMIT,
    "rc_presence": {"per_user": _NO_LIMIT},
    "rc_delayed_event_mgmt": _NO_LIMIT,
    "rc_room_creation": _NO_LIMIT,
    "rc_reports": _NO_LIMIT,
    "rc_user_directory": _NO_LIMIT,
    "rc_profile": _NO_LIMIT,
    "rc_key_requests": _NO_LIMIT,
    "rc_admin_redaction": _NO_LIMIT,
}

# Run by the Synapse venv's interpreter (it has PyYAML): merge the overrides given as
# JSON on stdin into the generated homeserver.yaml.
_APPLY_OVERRIDES = """
import json, sys, yaml
path = sys.argv[1]
change = json.load(sys.stdin)
with open(path) as f:
    cfg = yaml.safe_load(f) or {}
cfg.update(change["set"])
for key in change["remove"]:
    cfg.pop(key, None)
class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True
with open(path, "w") as f:
    yaml.dump(cfg, f, Dumper=Dumper, sort_keys=False)
"""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the Synapse venv ----------------------------------------------------------------


def synapse_venv_path() -> Path:
    """Where Synapse is installed: `$MSC3391_PROXY_SYNAPSE_VENV`, or a per-user cache."""
    override = os.environ.get("MSC3391_PROXY_SYNAPSE_VENV")
    if override:
        return Path(override).expanduser().absolute()
    return Path.home() / ".cache" / "msc3391-proxy" / f"synapse-{SYNAPSE_VERSION}"


_verified_venvs: set[Path] = set()


def _has_synapse(python: Path) -> bool:
    if python in _verified_venvs:
        return True
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import synapse, yaml"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    if probe.returncode != 0:
        return False
    _verified_venvs.add(python)
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two test runs installing at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_synapse_venv(venv: Path | None = None, say: Callable[[str], None] = _say) -> Path:
    """Install matrix-synapse into `venv` unless it is there already; returns its python."""
    venv = venv or synapse_venv_path()
    python = venv / "bin" / "python"
    if _has_synapse(python):
        return python
    with _file_lock(venv.parent / f".{venv.name}.lock"):
        if _has_synapse(python):  # installed by another process while we waited
            return python
        say(f"installing {SYNAPSE_SPEC} into {venv} (once; takes about a minute) ...")
        started = time.monotonic()
        if not python.exists():
            creator = os.environ.get("MSC3391_PROXY_SYNAPSE_PYTHON") or "python3"
            created = subprocess.run([creator, "-m", "venv", str(venv)], check=False)
            if created.returncode != 0:
                raise RuntimeError(f"could not create a venv at {venv} with {creator} (need python3-venv?)")
        log_path = venv / "pip-install.log"
        with log_path.open("w") as log:
            installed = subprocess.run(
                [str(python), "-m", "pip", "install", "--disable-pip-version-check", SYNAPSE_SPEC],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if installed.returncode != 0 or not _has_synapse(python):
            say(_tail(log_path, 30))
            raise RuntimeError(f"pip install {SYNAPSE_SPEC} failed (full log: {log_path})")
        say(f"installed {SYNAPSE_SPEC} in {time.monotonic() - started:.0f} s")
    return python


# --- small helpers --------------------------------------------------------------------


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


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} is missing)"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


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


def spawn_child(argv: list[str], output: Any, cwd: Path = REPO_ROOT) -> subprocess.Popen[bytes]:
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


def _stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to this process (by its own PID), SIGKILL if it is still alive after `grace`."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# Loopback only: an http_proxy in the environment must not see these requests.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
        with _direct.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def _answers_http(url: str) -> bool:
    """True once anything answers HTTP at `url` (any status)."""
    try:
        with _direct.open(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def _wait_until_answering(
    url: str, process: subprocess.Popen[bytes], timeout: float, what: str, *, need_ok: bool = True
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if need_ok:
            try:
                with _direct.open(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
        elif _answers_http(url):
            return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} during start-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.05)


# --- accounts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """One logged-in device of a user."""

    user_id: str
    access_token: str
    device_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}

    @property
    def localpart(self) -> str:
        return self.user_id[1:].split(":", 1)[0]


def register(base_url: str, username: str, password: str = "password") -> Account:
    """Register `username` (m.login.dummy auth) at `base_url`; the first device."""
    status, body = http_json(
        "POST",
        f"{base_url}/_matrix/client/v3/register",
        {"username": username, "password": password, "auth": {"type": "m.login.dummy"}},
    )
    if status != 200:
        raise RuntimeError(f"registering {username!r} failed: {status} {body}")
    return Account(body["user_id"], body["access_token"], body["device_id"])


def login(base_url: str, username: str, password: str = "password", device_id: str | None = None) -> Account:
    """Log in once more: a new device of the same user (or `device_id`'s)."""
    request: dict[str, Any] = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": username},
        "password": password,
    }
    if device_id is not None:
        request["device_id"] = device_id
    status, body = http_json("POST", f"{base_url}/_matrix/client/v3/login", request)
    if status != 200:
        raise RuntimeError(f"logging in {username!r} failed: {status} {body}")
    return Account(body["user_id"], body["access_token"], body["device_id"])


# --- Synapse -------------------------------------------------------------------------


_templates: dict[Path, Path] = {}


def _generated_config(python: Path) -> Path:
    """A directory with Synapse's own generated homeserver.yaml and signing key, made
    once per process and copied for each server (generating takes seconds)."""
    if python not in _templates:
        directory = Path(tempfile.mkdtemp(prefix="synapse-config-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        generated = subprocess.run(
            [
                str(python),
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                SERVER_NAME,
                "--config-path",
                str(directory / "homeserver.yaml"),
                "--data-directory",
                str(directory),
                "--generate-config",
                "--report-stats=no",
            ],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if generated.returncode != 0:
            raise RuntimeError(f"Synapse config generation failed:\n{generated.stderr[-3000:]}")
        _templates[python] = directory
    return _templates[python]


class SynapseServer:
    """A Synapse homeserver on loopback, its files in `directory`.

    `port=None` takes a free port at `start()`. The configuration is generated once
    per directory (a second start keeps the database and signing key).
    """

    def __init__(
        self,
        directory: Path,
        *,
        msc3391: bool = False,
        host: str = "127.0.0.1",
        port: int | None = None,
        venv: Path | None = None,
        log_level: str = "WARNING",
        ready_timeout: float = 90.0,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.msc3391 = msc3391
        self.host = host
        self.port = port
        self.venv = venv or synapse_venv_path()
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._output: TextIO | None = None
        self.startup_seconds = 0.0

    @property
    def config_path(self) -> Path:
        return self.directory / "homeserver.yaml"

    @property
    def log_path(self) -> Path:
        return self.directory / "homeserver.log"

    @property
    def output_path(self) -> Path:
        return self.directory / "stdout.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("already running")
        python = ensure_synapse_venv(self.venv)
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        self._write_config(python)
        self.log_path.write_text("")
        self._output = self.output_path.open("w")
        started = time.monotonic()
        self.process = spawn_child(
            [str(python), "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            self._output,
            cwd=self.directory,
        )
        try:
            _wait_until_answering(
                f"{self.url}/_matrix/client/versions", self.process, self.ready_timeout, "Synapse"
            )
        except RuntimeError:
            _say(_tail(self.output_path, 20))
            _say(_tail(self.log_path, 40))
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process, grace=20.0)
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> SynapseServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.output_path, lines) + "\n" + _tail(self.log_path, lines)

    def _write_config(self, python: Path) -> None:
        d = self.directory
        if not self.config_path.exists():
            template = _generated_config(python)
            shutil.copyfile(template / "homeserver.yaml", self.config_path)
            shutil.copyfile(template / f"{SERVER_NAME}.signing.key", d / f"{SERVER_NAME}.signing.key")
        overrides: dict[str, Any] = {
            "server_name": SERVER_NAME,
            "pid_file": str(d / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": [self.host],
                    "type": "http",
                    "tls": False,
                    # The proxy sends X-Forwarded-For; Synapse records the client's address.
                    "x_forwarded": True,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(d / "homeserver.db")}},
            "media_store_path": str(d / "media_store"),
            "signing_key_path": str(d / f"{SERVER_NAME}.signing.key"),
            "log_config": str(d / "log.config"),
            "report_stats": False,
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "suppress_key_server_warning": True,
            "trusted_key_servers": [],
            "federation_domain_whitelist": [],
            "presence": {"enabled": False},
            "max_upload_size": "200M",
            # Identical /sync requests would otherwise be answered from a cache.
            "caches": {"sync_response_cache_duration": 0},
            # A fresh database queues dozens of background updates run one per second.
            "background_updates": {"sleep_enabled": False},
            **_RATE_LIMITS,
        }
        remove = []
        if self.msc3391:
            overrides["experimental_features"] = {"msc3391_enabled": True}
        else:
            remove.append("experimental_features")
        applied = subprocess.run(
            [str(python), "-c", _APPLY_OVERRIDES, str(self.config_path)],
            input=json.dumps({"set": overrides, "remove": remove}),
            capture_output=True,
            text=True,
            check=False,
        )
        if applied.returncode != 0:
            raise RuntimeError(f"writing the Synapse config failed:\n{applied.stderr[-3000:]}")
        (d / "log.config").write_text(
            "version: 1\n"
            "formatters:\n"
            "  precise:\n"
            "    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'\n"
            "handlers:\n"
            "  file:\n"
            "    class: logging.FileHandler\n"
            "    formatter: precise\n"
            f"    filename: {json.dumps(str(self.log_path))}\n"
            "    encoding: utf8\n"
            "root:\n"
            f"  level: {self.log_level}\n"
            "  handlers: [file]\n"
            "disable_existing_loggers: false\n"
        )

    # --- accounts on this server ---

    def register(self, username: str, password: str = "password") -> Account:
        return register(self.url, username, password)

    def login(self, username: str, password: str = "password", device_id: str | None = None) -> Account:
        return login(self.url, username, password, device_id)


# --- the proxy as a process -----------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_dumps(document: Mapping[str, Any], _prefix: str = "") -> str:
    """Enough TOML for the proxy's config: tables of scalars and lists."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in document.items() if not isinstance(v, Mapping)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in document.items():
        if isinstance(value, Mapping):
            name = f"{_prefix}{key}"
            out += f"\n[{name}]\n" + toml_dumps(value, f"{name}.")
    return out


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


class ProxyProcess:
    """`python -m proxy --config FILE` in a subprocess; its stderr goes to `log_path`."""

    def __init__(
        self,
        directory: Path,
        upstream_url: str,
        *,
        msc3391: bool = True,
        extra_toml: str = "",
        host: str = "127.0.0.1",
        port: int | None = None,
        name: str = "proxy",
    ) -> None:
        self.directory = Path(directory).absolute()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.config_path = self.directory / f"{name}.toml"
        self.log_path = self.directory / f"{name}.log"
        self.config = merged(
            {
                "listen": {"host": host, "port": self.port},
                "upstream": {"url": upstream_url},
                "store": {"path": str(self.directory / f"{name}.sqlite3")},
                "experimental_features": {"msc3391_enabled": msc3391},
            },
            tomllib.loads(extra_toml),
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log(self) -> str:
        """Everything the proxy wrote to stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml_dumps(self.config))
        with self.log_path.open("wb") as log:
            self.process = spawn_child(
                [sys.executable, "-m", "proxy", "--config", str(self.config_path)], log
            )
        try:
            _wait_until_answering(
                f"{self.url}/_matrix/client/versions", self.process, timeout, "the proxy", need_ok=False
            )
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}; its output:\n{self.log}") from None

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process, grace=10.0)

    def __enter__(self) -> ProxyProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- pytest fixtures ------------------------------------------------------------------


@contextlib.contextmanager
def _running(server: SynapseServer) -> Iterator[SynapseServer]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """The shared Synapse, its own MSC3391 flag off. Use unique user names."""
    with _running(SynapseServer(tmp_path_factory.mktemp("synapse"), msc3391=False)) as server:
        yield server


@pytest.fixture(scope="session")
def synapse_msc3391(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    """The shared Synapse with `experimental_features.msc3391_enabled: true`."""
    with _running(SynapseServer(tmp_path_factory.mktemp("synapse-msc3391"), msc3391=True)) as server:
        yield server


@pytest.fixture
def synapse_factory(tmp_path: Path) -> Iterator[Callable[..., SynapseServer]]:
    """`synapse_factory(msc3391=False)`: a started Synapse for this test alone (one it
    may stop or break), stopped at teardown."""
    servers: list[SynapseServer] = []

    def start(*, msc3391: bool = False) -> SynapseServer:
        server = SynapseServer(tmp_path / f"synapse-{len(servers)}", msc3391=msc3391)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """`proxy_process(upstream_url, msc3391=True, extra_toml="")`: the proxy as a real
    process on a free port, answering when returned; killed at teardown. `extra_toml`
    is merged into the generated config (e.g. '[proxy]\\nlog_level = "DEBUG"')."""
    processes: list[ProxyProcess] = []

    def start(upstream_url: str, msc3391: bool = True, extra_toml: str = "") -> ProxyProcess:
        process = ProxyProcess(
            tmp_path, upstream_url, msc3391=msc3391, extra_toml=extra_toml, name=f"proxy-{len(processes)}"
        )
        processes.append(process)
        process.start()
        return process

    yield start
    for process in reversed(processes):
        process.stop()


_names = itertools.count()


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """`unique_name(prefix="user")`: a Matrix localpart no other test uses."""

    def make(prefix: str = "user") -> str:
        return f"{prefix.lower()}-{next(_names)}-{secrets.token_hex(3)}"

    return make


def quote(value: str) -> str:
    """Percent-encode a Matrix ID or other value for one path segment."""
    return urllib.parse.quote(value, safe="")

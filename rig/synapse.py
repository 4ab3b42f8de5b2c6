"""A real Synapse homeserver on loopback, installed into a venv of its own.

`ensure_synapse_venv` installs matrix-synapse into a cached venv (never the project's);
`SynapseServer` writes a test configuration (loopback, SQLite, open registration, no
rate limits, no federation) and runs Synapse as a subprocess;
`apply_config_overrides` changes a generated `homeserver.yaml`.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from rig.accounts import Account, login, register
from rig.processes import file_lock, free_port, say, spawn_child, stop_process, tail, wait_until_answering

SYNAPSE_VERSION = "1.163.2"
SYNAPSE_SPEC = f"matrix-synapse=={SYNAPSE_VERSION}"
SERVER_NAME = "localhost"

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


def apply_config_overrides(
    python: Path, config_path: Path, overrides: Mapping[str, Any], remove: Iterable[str] = ()
) -> None:
    """Set `overrides` (top-level keys) in the `homeserver.yaml` at `config_path` and drop
    the keys in `remove`, with the Synapse venv's own `python` (it has PyYAML)."""
    applied = subprocess.run(
        [str(python), "-c", _APPLY_OVERRIDES, str(config_path)],
        input=json.dumps({"set": dict(overrides), "remove": list(remove)}),
        capture_output=True,
        text=True,
        check=False,
    )
    if applied.returncode != 0:
        raise RuntimeError(f"writing the Synapse config failed:\n{applied.stderr[-3000:]}")


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


def ensure_synapse_venv(venv: Path | None = None, say: Callable[[str], None] = say) -> Path:
    """Install matrix-synapse into `venv` unless it is there already; returns its python."""
    venv = venv or synapse_venv_path()
    python = venv / "bin" / "python"
    if _has_synapse(python):
        return python
    with file_lock(venv.parent / f".{venv.name}.lock"):
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
            say(tail(log_path, 30))
            raise RuntimeError(f"pip install {SYNAPSE_SPEC} failed (full log: {log_path})")
        say(f"installed {SYNAPSE_SPEC} in {time.monotonic() - started:.0f} s")
    return python


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
    per directory (a second start keeps the database and signing key); `extra_config`
    is set in it last, over the rig's own settings (e.g. `{"bcrypt_rounds": 4}`).
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
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.msc3391 = msc3391
        self.host = host
        self.port = port
        self.venv = venv or synapse_venv_path()
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.extra_config = dict(extra_config or {})
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
            wait_until_answering(
                f"{self.url}/_matrix/client/versions", self.process, self.ready_timeout, "Synapse"
            )
        except RuntimeError:
            say(tail(self.output_path, 20))
            say(tail(self.log_path, 40))
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=20.0)
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> SynapseServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.output_path, lines) + "\n" + tail(self.log_path, lines)

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
        overrides.update(self.extra_config)
        remove = [key for key in remove if key not in overrides]
        apply_config_overrides(python, self.config_path, overrides, remove)
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

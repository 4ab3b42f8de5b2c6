"""The proxy as a real process: `python -m proxy --config FILE`, the way an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rig import REPO_ROOT
from rig.processes import free_port, spawn_child, stop_process, wait_until_answering


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
    """`base` with `extra` merged in, table by table (`extra` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


class ProxyProcess:
    """`python -m proxy --config FILE` in a subprocess; its stderr goes to `log_path`.

    It runs from `code_dir` and imports the `proxy` package found there: the checkout by
    default, a copy of `proxy/` for the benchmark (which must not see later edits)."""

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
        code_dir: Path = REPO_ROOT,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.code_dir = code_dir
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
                [sys.executable, "-m", "proxy", "--config", str(self.config_path)], log, cwd=self.code_dir
            )
        try:
            wait_until_answering(
                f"{self.url}/_matrix/client/versions", self.process, timeout, "the proxy", need_ok=False
            )
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}; its output:\n{self.log}") from None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=10.0)

    def __enter__(self) -> ProxyProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def nginx_config(
    config_path: Path,
    listen_port: int,
    *,
    proxies: Sequence[str] = (),
    server_name: str | None = None,
    code_dir: Path = REPO_ROOT,
) -> str:
    """What an operator runs: `msc3391-proxy nginx-config --config FILE --listen
    127.0.0.1:PORT`, with `--proxy HOST:PORT` per instance (none: the config's own
    listener) and `--server-name`, run from `code_dir`'s `proxy` package. Its output;
    RuntimeError if it fails or writes anything to standard error."""
    argv = [sys.executable, "-m", "proxy", "nginx-config", "--config", str(config_path)]
    argv += ["--listen", f"127.0.0.1:{listen_port}"]
    for proxy in proxies:
        argv += ["--proxy", proxy]
    if server_name is not None:
        argv += ["--server-name", server_name]
    done = subprocess.run(argv, cwd=code_dir, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 or done.stderr:
        raise RuntimeError(f"nginx-config failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout

"""nginx as a process of our own: in the foreground, every file of it in one directory."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from rig.processes import child_pids, spawn_child, stop_process, tail, wait_for_port
from rig.programs import find_program

TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class Nginx:
    """One nginx (`daemon off`, a master and `workers` worker processes) with its own
    config, pid file, logs and temporary paths in `directory`, stopped by its PID
    (SIGTERM to the master is nginx's fast shutdown).

    `http_config` is the text inside `http { }`: server blocks and any http-level
    directives; `main_config` is added at the top level. `ports` are the ports its
    servers listen on, each waited for at `start()`. With `log_access`, requests are
    logged to `access_log`, in nginx's `combined` format with `log_format` after it (for
    instance `upstream=$upstream_addr`: which upstream served each request). Run as
    root, nginx's workers become `nobody`; `own_user=True` keeps them as the caller (to
    write temporary files in a directory only the caller may write).
    """

    def __init__(
        self,
        directory: Path,
        http_config: str,
        ports: Sequence[int],
        *,
        binary: str | None = None,
        workers: int = 1,
        worker_connections: int = 256,
        main_config: str = "",
        error_log_level: str = "warn",
        log_access: bool = False,
        log_format: str = "",
        own_user: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.http_config = http_config
        self.ports = list(ports)
        self.binary = binary
        self.workers = workers
        self.worker_connections = worker_connections
        self.main_config = main_config
        self.error_log_level = error_log_level
        self.log_access = log_access
        self.log_format = log_format
        self.own_user = own_user
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def pid_path(self) -> Path:
        return self.directory / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def output_path(self) -> Path:
        return self.directory / "nginx.out"

    @property
    def url(self) -> str:
        """The first of `ports`, on loopback."""
        return f"http://127.0.0.1:{self.ports[0]}"

    def config_text(self) -> str:
        user = ""
        if self.own_user and os.geteuid() == 0:
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n"
        access_log = f"{self.access_log} rig" if self.log_access else "off"
        # nginx's built-in `combined`, then what the caller wants to see.
        combined = '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
        combined += '"$http_referer" "$http_user_agent"'
        fields = f"{combined} {self.log_format}".rstrip()
        log_format = f"    log_format rig '{fields}';\n"
        temps = "".join(f"    {kind}_temp_path {self.directory / 'tmp' / kind};\n" for kind in TEMP_DIRS)
        return (
            f"{user}"
            "daemon off;\n"
            f"worker_processes {self.workers};\n"
            f"pid {self.pid_path};\n"
            f"error_log {self.error_log} {self.error_log_level};\n"
            f"{self.main_config}"
            f"events {{ worker_connections {self.worker_connections}; }}\n"
            "http {\n"
            f"{log_format}"
            f"    access_log {access_log};\n"
            f"{temps}"
            f"{self.http_config}\n"
            "}\n"
        )

    def start(self) -> None:
        binary = self.binary or find_program("nginx")
        if binary is None:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
        for kind in TEMP_DIRS:
            (self.directory / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        # -e: the error log before the configuration is read (not /var/log/nginx).
        checked = subprocess.run(
            [binary, "-t", "-q", "-e", str(self.error_log), "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if checked.returncode != 0:
            raise RuntimeError(f"nginx in {self.directory}: bad config:\n{checked.stderr}")
        with self.output_path.open("wb") as output:
            self.process = spawn_child(
                [binary, "-p", str(self.directory), "-c", str(self.config_path), "-e", str(self.error_log)],
                output,
            )
        try:
            for port in self.ports:
                wait_for_port(port, self.process, f"nginx in {self.directory}")
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}\n{tail(self.output_path, 20)}\n{tail(self.error_log, 20)}") from None
        deadline = time.monotonic() + 10
        while len(self.worker_pids()) < self.workers and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def worker_pids(self) -> list[int]:
        if self.process is None or self.process.poll() is not None:
            return []
        return child_pids(self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=10.0)

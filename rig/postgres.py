"""A real PostgreSQL on loopback, a throwaway cluster of its own: for the store's
PostgreSQL backend.

`PostgresServer(directory)` runs `initdb` into `directory/data` once, then the server
(`postgres`, the postmaster, in the foreground: our own child, stopped by its own PID)
with the rig's settings on its command line. Run as root (as the tests are), every
PostgreSQL process runs as the `postgres` system user, which PostgreSQL insists on: it
refuses to run as root. `directory` must then be reachable by that user (a fresh
`temporary_directory()` under /tmp is; pytest's `tmp_path`, under a 0700 directory of
root's, is not).

Access: TCP on 127.0.0.1 only, password (SCRAM) for every role, so a wrong password
is refused as in production and the proxy's URL or password file is really checked;
the Unix socket (in `directory/socket`, mode 0700) trusts whoever reaches it, for
debugging by hand: `psql -h DIRECTORY/socket -p PORT -U postgres`.

SQL for assertions: `fetch`, `execute` (blocking, usable from async tests too: they
run on a thread of their own) and `fetch_async`, `execute_async`, over `asyncpg`, the
driver of the proxy's backend (imported only when used).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import secrets
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from rig.processes import RunAs, child_pids, free_port, process_gone, spawn_child, tail
from rig.programs import POSTGRES_SYSTEM_USER, find_postgres_bindir

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")

HOST = "127.0.0.1"
# The bootstrap superuser `initdb` creates (whoever runs it): always this name, so that
# URLs do not depend on which user ran the tests.
SUPERUSER = "postgres"
# How long one of the rig's own SQL statements, or connecting for it, may take.
SQL_TIMEOUT = 30.0

# Given as `-c` options on the postgres command line, they override postgresql.conf and
# ALTER SYSTEM, and `ps` shows them.
TEST_SETTINGS: dict[str, str] = {
    "listen_addresses": HOST,
    # Several proxies with their pools, the rig's own connections, and a margin.
    "max_connections": "200",
    # fsync off: PostgreSQL still write()s a transaction's WAL before it answers COMMIT
    # (synchronous_commit stays on), it only skips asking the disk to persist it. So
    # an acknowledged commit survives what the tests do: a clean restart (`restart()`,
    # a fast shutdown with its checkpoint), a proxy killed at any moment, even every
    # PostgreSQL process SIGKILLed (`kill()`: the next start replays the WAL from the
    # kernel's page cache). Only an OS crash or a power cut would lose it, and no test
    # makes one. It makes CREATE DATABASE and commits cheap on a shared CI disk.
    "fsync": "off",
    # Torn pages happen only in an OS crash too: no full-page images in the WAL.
    "full_page_writes": "off",
    # English messages in the log, whatever the environment's locale.
    "lc_messages": "C",
}


def temporary_directory(prefix: str = "msc3391-postgres-") -> Path:
    """A fresh directory for a `PostgresServer` in the system's temporary directory
    (/tmp, which every user may traverse), owned by whoever runs the server. Remove it
    with `shutil.rmtree` when done."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def run_as() -> RunAs | None:
    """Whom PostgreSQL runs as: the `postgres` user when we are root, else ourselves
    (None). RuntimeError if we are root and there is no such user."""
    if os.geteuid() != 0:
        return None
    try:
        return RunAs.of(POSTGRES_SYSTEM_USER)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL refuses to run as root, and there is no {POSTGRES_SYSTEM_USER!r} user to run it as"
            " (Debian's postgresql package creates it)"
        ) from None


def quote_identifier(name: str) -> str:
    """`name` as an SQL identifier (utility statements such as CREATE DATABASE take no
    parameters)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """`text` as an SQL string literal (standard_conforming_strings is on)."""
    return "'" + text.replace("'", "''") + "'"


def _can_traverse(path: Path, who: RunAs) -> bool:
    """Whether `who` may pass through every directory above `path` (owner, group, other,
    as the kernel decides; ACLs aside)."""
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == who.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == who.gid or st.st_gid in who.groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to its end on a thread with an event loop of its own, so that
    blocking code and async tests (whose loop is running on this thread) can both wait
    for it."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rig-postgres") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _remove_shared_memory(segment_id: int) -> None:
    """IPC_RMID of a System V shared memory segment (a SIGKILLed postmaster leaves its
    small interlock segment behind; a clean shutdown removes it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmctl(segment_id, 0, None)  # 0: IPC_RMID
    except (OSError, AttributeError):
        pass


class PostgresServer:
    """A PostgreSQL cluster in `directory` (made by `initdb` at the first `start()`, kept
    across stops and restarts), served on 127.0.0.1:`port` (`None`: a free port, chosen
    at the first start and kept).

    `password` is the superuser's (`postgres`), generated when not given. `settings`
    are set over `TEST_SETTINGS` (e.g. `{"max_connections": "20"}`). The server's
    standard error goes to `log_path`, appended to across restarts.

    Call `start()` from a thread that lives as long as the server (the test session's
    main thread): Linux sends the postmaster SIGINT, a fast shutdown, when the thread
    that started it dies, so a killed test run leaves no PostgreSQL behind.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        password: str | None = None,
        settings: Mapping[str, str] | None = None,
        bindir: Path | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.port = port
        self.password = password or secrets.token_hex(16)
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        self.bindir = bindir
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0
        self.initdb_seconds = 0.0
        self._passwords = {SUPERUSER: self.password}
        self._log: IO[bytes] | None = None
        # Set by kill(), cleared by start(): a postmaster.pid of ours is stale.
        self._killed = False

    # --- where things are ---

    @property
    def data_directory(self) -> Path:
        return self.directory / "data"

    @property
    def socket_directory(self) -> Path:
        return self.directory / "socket"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def pid_file(self) -> Path:
        return self.data_directory / "postmaster.pid"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return self.process.pid if self.running and self.process is not None else None

    def backend_pids(self) -> list[int]:
        """The postmaster's children now: backends, checkpointer, WAL writer, ..."""
        pid = self.pid
        return [] if pid is None else child_pids(pid)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    # --- starting and stopping ---

    def start(self) -> None:
        """Start the server (running `initdb` first if the cluster is new) and return
        once it accepts connections; RuntimeError, with its log, if it exits or is not
        ready within `ready_timeout`."""
        if self.running:
            raise RuntimeError("already running")
        bindir = self.bindir or find_postgres_bindir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)"
            )
        user = run_as()
        self._prepare_directory(user)
        if not (self.data_directory / "PG_VERSION").exists():
            self._initdb(bindir, user)
        if self.port is None:
            self.port = free_port(HOST)
        settings = {
            **self.settings,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_directory),
        }
        argv = [str(bindir / "postgres"), "-D", str(self.data_directory)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        self._log = self.log_path.open("ab")
        self._killed = False
        started = time.monotonic()
        self.process = spawn_child(
            argv,
            self._log,
            cwd=self.directory,
            # SIGINT is PostgreSQL's fast shutdown: clients cut off, a checkpoint, exit.
            # (SIGTERM would be its smart shutdown, which waits for every client to leave.)
            death_signal=signal.SIGINT,
            run_as=user,
            env=_environment(),
        )
        try:
            self._wait_until_ready(self.process)
        except RuntimeError as e:
            self.kill()
            raise RuntimeError(f"{e}\n{self.log_tail()}") from None
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, by its PID): open transactions roll
        back, committed ones are checkpointed. SIGKILL (`kill()`) after `stop_timeout`."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._killed:
            # Killed and not started again: its interlock segment is still there. Once
            # only: removed, its ID could later name another program's segment.
            self._forget_stale_shared_memory()
            self._killed = False
        self._close_log()

    def restart(self) -> None:
        """A clean restart (`pg_ctl restart -m fast`'s), on the same port: committed data
        stays, every connection is cut."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster and every process it has, without warning.
        Returns when they are all gone; the next `start()` recovers from the WAL."""
        process = self.process
        if process is None or process.poll() is not None:
            self._close_log()
            return
        self._killed = True
        # Stopped, the postmaster forks no new backend while we collect its children, and
        # reaps none of them, so their PIDs cannot be reused before we signal them.
        os.kill(process.pid, signal.SIGSTOP)
        children = child_pids(process.pid)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while not all(process_gone(pid) for pid in children):
            if time.monotonic() > deadline:
                left = [pid for pid in children if not process_gone(pid)]
                raise RuntimeError(f"PostgreSQL processes {left} outlived SIGKILL by 10 s")
            time.sleep(0.01)
        self._close_log()

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- databases, roles, URLs ---

    def url_for(self, database: str, user: str | None = None, *, with_password: bool = True) -> str:
        """`postgresql://USER[:PASSWORD]@127.0.0.1:PORT/DATABASE` (libpq's URL form, what
        asyncpg and psql take), as `user` (default: the superuser), with the password
        the rig set for that role unless `with_password=False` (e.g. to hand the
        password over in a file instead)."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        user = user or SUPERUSER
        credentials = quote(user, safe="")
        if with_password:
            credentials += ":" + quote(self._passwords[user], safe="")
        return f"postgresql://{credentials}@{HOST}:{self.port}/{quote(database, safe='')}"

    def password_of(self, user: str) -> str:
        """The password of a role the rig created (or the superuser's)."""
        return self._passwords[user]

    def create_user(self, name: str, password: str | None = None) -> str:
        """A login role without superuser rights, as a deployment would give the proxy;
        returns its password (generated when not given)."""
        password = password or secrets.token_hex(16)
        self.execute(f"CREATE ROLE {quote_identifier(name)} LOGIN PASSWORD {quote_literal(password)}")
        self._passwords[name] = password
        return password

    def create_database(self, name: str, owner: str | None = None) -> str:
        """A new, empty database owned by `owner` (a role made by `create_user`; default
        the superuser); returns its URL as that owner. In PostgreSQL 15 the owner of a
        database may create tables in its `public` schema."""
        statement = f"CREATE DATABASE {quote_identifier(name)}"
        if owner is not None:
            statement += f" OWNER {quote_identifier(owner)}"
        self.execute(statement)
        return self.url_for(name, owner)

    def drop_database(self, name: str) -> None:
        """Drop it if it exists, cutting off whoever is still connected (a proxy's pool)."""
        self.execute(f"DROP DATABASE IF EXISTS {quote_identifier(name)} WITH (FORCE)")

    # --- SQL for assertions ---

    async def connect_async(self, database: str = "postgres", user: str | None = None) -> asyncpg.Connection:
        """An asyncpg connection over TCP with the role's password; close it yourself."""
        import asyncpg

        if self.port is None:
            # asyncpg would take libpq's default, 5432: somebody else's server.
            raise RuntimeError("the server has not been started")
        user = user or SUPERUSER
        return await asyncpg.connect(
            host=HOST,
            port=self.port,
            user=user,
            password=self._passwords[user],
            database=database,
            timeout=SQL_TIMEOUT,
            command_timeout=SQL_TIMEOUT,
        )

    async def fetch_async(
        self, query: str, *args: Any, database: str = "postgres", user: str | None = None
    ) -> list[tuple[Any, ...]]:
        """The rows of one statement, each a tuple (easy to compare in an assert)."""
        connection = await self.connect_async(database, user)
        try:
            return [tuple(row) for row in await connection.fetch(query, *args)]
        finally:
            await connection.close(timeout=SQL_TIMEOUT)

    async def execute_async(
        self, query: str, *args: Any, database: str = "postgres", user: str | None = None
    ) -> str:
        """Run SQL (several statements if there are no `args`); returns the status of the
        last one, e.g. "INSERT 0 1"."""
        connection = await self.connect_async(database, user)
        try:
            return await connection.execute(query, *args)
        finally:
            await connection.close(timeout=SQL_TIMEOUT)

    def fetch(
        self, query: str, *args: Any, database: str = "postgres", user: str | None = None
    ) -> list[tuple[Any, ...]]:
        """`fetch_async`, blocking (it blocks an async test's event loop meanwhile)."""
        return _blocking(self.fetch_async(query, *args, database=database, user=user))

    def execute(self, query: str, *args: Any, database: str = "postgres", user: str | None = None) -> str:
        """`execute_async`, blocking (it blocks an async test's event loop meanwhile)."""
        return _blocking(self.execute_async(query, *args, database=database, user=user))

    # --- internals ---

    def _prepare_directory(self, user: RunAs | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_directory.mkdir(mode=0o700, exist_ok=True)
        if user is None:
            return
        if not _can_traverse(self.directory, user):
            raise RuntimeError(
                f"the user {user.name!r}, whom PostgreSQL runs as, cannot reach {self.directory}: a directory"
                " above it is closed to others (pytest's tmp_path is); use rig.postgres.temporary_directory()"
            )
        for path in (self.directory, self.socket_directory):
            os.chown(path, user.uid, user.gid)

    def _initdb(self, bindir: Path, user: RunAs | None) -> None:
        # initdb reads the superuser's password from a file, never from argv (`ps`).
        password_file = self.directory / "superuser-password"
        password_file.touch(mode=0o600)
        if user is not None:
            os.chown(password_file, user.uid, user.gid)
        password_file.write_text(self.password + "\n")
        started = time.monotonic()
        try:
            done = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data_directory),
                    f"--username={SUPERUSER}",
                    f"--pwfile={password_file}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    # No fsync of the new cluster's files: the server runs with fsync off too.
                    "--no-sync",
                    "--no-instructions",
                ],
                cwd=self.directory,
                env=_environment(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else list(user.groups),
            )
        finally:
            password_file.unlink(missing_ok=True)
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-3000:]
            raise RuntimeError(f"initdb in {self.data_directory} failed:\n{output}")
        self.initdb_seconds = time.monotonic() - started
        # Replaces initdb's own rules: nothing but these two, first match wins.
        (self.data_directory / "pg_hba.conf").write_text(
            "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
            "# The socket, in this cluster's own 0700 directory: for debugging by hand.\n"
            "local   all       all                 trust\n"
            "# TCP, loopback only (listen_addresses too): a password, as in production.\n"
            f"host    all       all   {HOST}/32  scram-sha-256\n"
        )

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Until postmaster.pid names this process and says "ready": written once the
        server accepts connections (after any crash recovery), as `pg_ctl -w` waits."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with status {process.returncode} during start-up")
            try:
                lines = self.pid_file.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            if len(lines) >= 8 and lines[0].strip() == str(process.pid) and lines[7].strip() == "ready":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL was not ready within {self.ready_timeout:.0f} s")
            time.sleep(0.02)

    def _forget_stale_shared_memory(self) -> None:
        """Remove the System V segment named in a postmaster.pid that a SIGKILLed
        postmaster left (line 7: key and ID). Only after our `kill()`, which waited for
        every process of the old server: none is attached to it."""
        try:
            lines = self.pid_file.read_text().splitlines()
        except FileNotFoundError:
            return
        if len(lines) >= 7 and len(fields := lines[6].split()) == 2 and fields[1].isdigit():
            _remove_shared_memory(int(fields[1]))

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _environment() -> dict[str, str]:
    """Ours, without the libpq variables (PGHOST, PGOPTIONS, ...) that would steer the
    cluster's programs, and with C messages."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    env["LC_ALL"] = "C"
    return env

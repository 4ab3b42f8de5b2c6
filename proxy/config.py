"""The proxy's configuration: one TOML file, validated once at start-up.

Every other module receives a `Config`; none reads the file or the environment itself.
A mistake is reported as `ConfigError` carrying one line that names the key.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """A configuration mistake; `str()` is the one line shown to the operator."""


@dataclass(frozen=True)
class ListenConfig:
    host: str
    port: int


@dataclass(frozen=True)
class UpstreamConfig:
    url: URL
    connect_timeout: float
    read_timeout: float
    sync_timeout_margin: float
    initial_sync_timeout: float
    max_connections: int


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    busy_timeout: float
    # PostgreSQL (several instances share one store): a libpq URL, or None for SQLite.
    url: PostgresURL | None = None
    pool_size: int = 10
    connect_timeout: float = 10.0
    command_timeout: float = 30.0


@dataclass(frozen=True)
class PostgresURL:
    """A libpq URL with its password (from the URL or `store.password_file`) kept apart:
    `str()` and `repr()` never show it, so neither can a log line or a traceback."""

    url: URL  # without the password
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return str(self.url)

    @property
    def dsn(self) -> str:
        """For the driver only: the URL with its password."""
        return str(self.url.with_password(self.password)) if self.password else str(self.url)


@dataclass(frozen=True)
class ProxyConfig:
    trusted_forwarders: tuple[IPNetwork, ...]
    max_body_size: int
    client_timeout: float
    identity_cache_ttl: float
    identity_cache_size: int
    shutdown_grace: float
    log_level: str
    log_format: str
    log_file: str


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool
    host: str
    port: int


@dataclass(frozen=True)
class ExperimentalConfig:
    msc3391_enabled: bool


@dataclass(frozen=True)
class Config:
    listen: ListenConfig
    upstream: UpstreamConfig
    store: StoreConfig
    proxy: ProxyConfig
    metrics: MetricsConfig
    experimental_features: ExperimentalConfig

    @property
    def msc3391_enabled(self) -> bool:
        return self.experimental_features.msc3391_enabled


# --- value checkers: each takes (key, raw value) and returns the typed value or raises ---

_REQUIRED = object()


def _fail(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}")


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(key, f"expected a non-empty string, got {value!r}")
    return value


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"expected true or false, got {value!r}")
    return value


def _integer(minimum: int, maximum: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        # bool is a subclass of int in Python; `port = true` is still a mistake.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(key, f"expected an integer, got {value!r}")
        if not minimum <= value <= maximum:
            raise _fail(key, f"must be between {minimum} and {maximum}, got {value}")
        return value

    return check


def _seconds(key: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _fail(key, f"expected a number of seconds, got {value!r}")
    if value <= 0:
        raise _fail(key, f"must be greater than 0, got {value}")
    return float(value)


def _http_url(key: str, value: Any) -> URL:
    text = _string(key, value)
    try:
        url = URL(text)
    except ValueError as e:
        raise _fail(key, f"not a valid URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise _fail(key, f"expected an http:// or https:// URL with a host, got {text!r}")
    if url.query_string or url.fragment:
        raise _fail(key, "must not have a query string or fragment")
    if url.path not in ("", "/"):
        # Paths are forwarded byte for byte; a base path would have to be re-encoded into them.
        raise _fail(key, f"must not have a path (got {url.path!r}); give scheme, host and port")
    return url.with_path("")


def _optional_string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(key, f"expected a string, got {value!r}")
    return value


def _one_of(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise _fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


def _log_level(key: str, value: Any) -> str:
    text = _string(key, value).upper()
    if text not in LOG_LEVELS:
        raise _fail(key, f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return text


def _networks(key: str, value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise _fail(key, f"expected a list of addresses or CIDR networks, got {value!r}")
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise _fail(key, f"expected an address or CIDR network, got {item!r}")
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _fail(key, f"{item!r} is not an IP address or CIDR network") from None
    return tuple(networks)


# Section -> key -> (checker, default). The single source of truth for key names and defaults.
_SCHEMA: dict[str, dict[str, tuple[Callable[[str, Any], Any], Any]]] = {
    "listen": {
        "host": (_string, "127.0.0.1"),
        "port": (_integer(0, 65535), 8009),
    },
    "upstream": {
        "url": (_http_url, _REQUIRED),
        "connect_timeout": (_seconds, 10.0),
        # Longest silence from the homeserver on an ordinary request before answering 504.
        "read_timeout": (_seconds, 60.0),
        # Added to a /sync long-poll's own `timeout` parameter.
        "sync_timeout_margin": (_seconds, 30.0),
        # Initial syncs of large accounts take minutes on Synapse.
        "initial_sync_timeout": (_seconds, 900.0),
        # 0 means no limit: every held long-poll /sync occupies one upstream connection.
        "max_connections": (_integer(0, 1_000_000), 0),
    },
    "store": {
        "path": (_string, "msc3391-proxy.sqlite3"),
        # How long an operation waits for a lock held by another process before failing.
        "busy_timeout": (_seconds, 5.0),
        # A PostgreSQL libpq URL selects PostgreSQL (several instances share it); empty: SQLite.
        "url": (_optional_string, ""),
        # The PostgreSQL password, read from this file at start-up (not in the URL).
        "password_file": (_optional_string, ""),
        # Connections each instance keeps to PostgreSQL.
        "pool_size": (_integer(1, 1000), 10),
        "connect_timeout": (_seconds, 10.0),
        # Longest a single PostgreSQL statement may take before the operation fails.
        "command_timeout": (_seconds, 30.0),
    },
    "proxy": {
        "trusted_forwarders": (_networks, ["127.0.0.0/8", "::1/128"]),
        # Bodies the proxy reads itself (account data PUTs, delete_devices); others stream.
        "max_body_size": (_integer(1024, 1 << 30), 1024 * 1024),
        # Longest a client may take to send a request's headers or a body the proxy reads
        # itself, and the longest pause within a body it forwards; also how long an idle
        # keep-alive connection is kept. Above nginx's
        # upstream keepalive_timeout (60 s), so nginx never reuses a connection as it closes.
        "client_timeout": (_seconds, 75.0),
        "identity_cache_ttl": (_seconds, 60.0),
        "identity_cache_size": (_integer(1, 10_000_000), 10_000),
        # On SIGTERM: how long in-flight requests may finish before long-polls are cut.
        "shutdown_grace": (_seconds, 10.0),
        "log_level": (_log_level, "INFO"),
        "log_format": (_one_of("text", "json"), "text"),
        # Empty: standard error (journald). A file is reopened on SIGHUP.
        "log_file": (_optional_string, ""),
    },
    "metrics": {
        # Prometheus /metrics (and /health) on a listener of its own.
        "enabled": (_boolean, False),
        "host": (_string, "127.0.0.1"),
        "port": (_integer(0, 65535), 9109),
    },
    "experimental_features": {
        "msc3391_enabled": (_boolean, False),
    },
}


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise _fail(name, f"expected a table [{name}], got {table!r}")
    schema = _SCHEMA[name]
    for key in table:
        if key not in schema:
            raise _fail(f"{name}.{key}", f"unknown key (known: {', '.join(schema)})")
    values = {}
    for key, (check, default) in schema.items():
        if key in table:
            values[key] = check(f"{name}.{key}", table[key])
        elif default is _REQUIRED:
            raise _fail(f"{name}.{key}", "required key is missing")
        else:
            values[key] = check(f"{name}.{key}", default)
    return values


def postgres_url(
    text: str, password_file: str, base_dir: Path, *, key: str = "store.url"
) -> PostgresURL | None:
    """`store.url` (with `store.password_file`) checked; None if empty. `key`: what the
    operator wrote it as, for the error."""
    file_key = "store.password_file" if key == "store.url" else "--password-file"
    if not text:
        if password_file:
            raise _fail(file_key, f"only means something with {key}")
        return None
    try:
        url = URL(text)
    except ValueError as e:
        raise _fail(key, f"not a valid URL ({e})") from None
    if url.scheme not in ("postgresql", "postgres") or not url.host:
        raise _fail(key, "expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME")
    if url.path in ("", "/"):
        raise _fail(key, "names no database (postgresql://USER@HOST:PORT/DBNAME)")
    password = url.password
    if password_file:
        if password is not None:
            raise _fail(file_key, f"{key} has a password already")
        path = _relative_to(base_dir, password_file)
        try:
            password = path.read_text().strip("\n")
        except OSError as e:
            raise _fail(file_key, f"cannot read {path} ({e.strerror})") from None
    return PostgresURL(url.with_password(None), password)


def _relative_to(base_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def parse_config(raw: Mapping[str, Any], base_dir: Path) -> Config:
    """Validate a parsed TOML document; relative paths are taken from `base_dir`."""
    for name in raw:
        if name not in _SCHEMA:
            raise _fail(name, f"unknown section (known: {', '.join(_SCHEMA)})")
    proxy = _section(raw, "proxy")
    store = _section(raw, "store")
    if proxy["log_file"]:
        proxy["log_file"] = str(_relative_to(base_dir, proxy["log_file"]))
    return Config(
        listen=ListenConfig(**_section(raw, "listen")),
        upstream=UpstreamConfig(**_section(raw, "upstream")),
        store=StoreConfig(
            path=_relative_to(base_dir, store["path"]),
            busy_timeout=store["busy_timeout"],
            url=postgres_url(store["url"], store["password_file"], base_dir),
            pool_size=store["pool_size"],
            connect_timeout=store["connect_timeout"],
            command_timeout=store["command_timeout"],
        ),
        proxy=ProxyConfig(**proxy),
        metrics=MetricsConfig(**_section(raw, "metrics")),
        experimental_features=ExperimentalConfig(**_section(raw, "experimental_features")),
    )


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return parse_config(raw, path.resolve().parent)

"""`proxy/config.py`: defaults, the fixed key names, and one readable error per mistake."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy.__main__ import main
from proxy.config import _REQUIRED, _SCHEMA, ConfigError, load_config, parse_config
from rig import REPO_ROOT

UPSTREAM = 'url = "http://127.0.0.1:8008"'


def write(directory: Path, text: str, name: str = "config.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


# --- defaults and names ------------------------------------------------------------------


def test_defaults_with_only_the_upstream_url(tmp_path: Path) -> None:
    config = parse_config({"upstream": {"url": "http://127.0.0.1:8008"}}, tmp_path)

    assert config.listen.host == "127.0.0.1"
    assert config.listen.port == 8009
    assert str(config.upstream.url) == "http://127.0.0.1:8008"
    assert config.upstream.connect_timeout == 10.0
    assert config.upstream.read_timeout == 60.0
    assert config.upstream.sync_timeout_margin == 30.0
    assert config.upstream.initial_sync_timeout == 900.0
    assert config.upstream.max_connections == 0
    assert config.store.path == tmp_path / "msc3391-proxy.sqlite3"
    assert config.proxy.trusted_forwarders == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.proxy.max_body_size == 1024 * 1024
    assert config.proxy.identity_cache_ttl == 60.0
    assert config.proxy.identity_cache_size == 10_000
    assert config.proxy.shutdown_grace == 10.0
    assert config.proxy.log_level == "INFO"
    assert config.proxy.log_format == "text"
    assert config.proxy.log_file == ""
    assert config.metrics.enabled is False
    assert config.metrics.host == "127.0.0.1"
    assert config.metrics.port == 9109
    assert config.experimental_features.msc3391_enabled is False
    assert config.msc3391_enabled is False


def test_fixed_names_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [listen]
        host = "0.0.0.0"
        port = 8448
        [upstream]
        url = "https://matrix.example.org:8443"
        [store]
        path = "/var/lib/msc3391/store.sqlite3"
        [experimental_features]
        msc3391_enabled = true
        """,
    )
    config = load_config(path)

    assert config.listen.host == "0.0.0.0"
    assert config.listen.port == 8448
    assert str(config.upstream.url) == "https://matrix.example.org:8443"
    assert config.store.path == Path("/var/lib/msc3391/store.sqlite3")
    assert config.experimental_features.msc3391_enabled is True
    assert config.msc3391_enabled is True


def test_every_other_key_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [upstream]
        {UPSTREAM}
        connect_timeout = 1
        read_timeout = 2.5
        sync_timeout_margin = 3
        initial_sync_timeout = 4
        max_connections = 5
        [proxy]
        trusted_forwarders = ["10.1.2.3", "192.168.0.0/16", "::1"]
        max_body_size = 2048
        identity_cache_ttl = 0.25
        identity_cache_size = 7
        shutdown_grace = 0.5
        log_level = "debug"
        log_format = "json"
        log_file = "logs/proxy.log"
        [metrics]
        enabled = true
        host = "::1"
        port = 9999
        """,
    )
    config = load_config(path)

    assert (config.upstream.connect_timeout, config.upstream.read_timeout) == (1.0, 2.5)
    assert (config.upstream.sync_timeout_margin, config.upstream.initial_sync_timeout) == (3.0, 4.0)
    assert config.upstream.max_connections == 5
    assert config.proxy.trusted_forwarders == (
        ipaddress.ip_network("10.1.2.3/32"),
        ipaddress.ip_network("192.168.0.0/16"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.proxy.max_body_size == 2048
    assert config.proxy.identity_cache_ttl == 0.25
    assert config.proxy.identity_cache_size == 7
    assert config.proxy.shutdown_grace == 0.5
    assert config.proxy.log_level == "DEBUG"
    assert config.proxy.log_format == "json"
    assert config.proxy.log_file == str(tmp_path.resolve() / "logs" / "proxy.log")
    assert (config.metrics.enabled, config.metrics.host, config.metrics.port) == (True, "::1", 9999)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8008/", "http://[::1]:8008", "https://matrix.example.org", "http://localhost"]
)
def test_upstream_url_without_path_is_accepted(tmp_path: Path, url: str) -> None:
    config = parse_config({"upstream": {"url": url}}, tmp_path)
    assert str(config.upstream.url) == url.rstrip("/")
    assert config.upstream.url.path in ("", "/")


def test_store_path_is_relative_to_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "etc", f'[upstream]\n{UPSTREAM}\n[store]\npath = "data/store.sqlite3"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    expected = (tmp_path / "etc").resolve() / "data" / "store.sqlite3"
    assert load_config(path).store.path == expected
    assert load_config(Path("..") / "etc" / "config.toml").store.path == expected


def test_default_store_path_is_next_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "conf", f"[upstream]\n{UPSTREAM}\n")
    assert load_config(path).store.path == (tmp_path / "conf").resolve() / "msc3391-proxy.sqlite3"


def test_absolute_and_home_store_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = tmp_path / "abs" / "store.sqlite3"
    config = parse_config({"upstream": {"url": "http://h"}, "store": {"path": str(absolute)}}, Path("/x"))
    assert config.store.path == absolute

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = parse_config({"upstream": {"url": "http://h"}, "store": {"path": "~/s.sqlite3"}}, Path("/x"))
    assert config.store.path == tmp_path / "home" / "s.sqlite3"


# --- mistakes ----------------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == f"{missing}: no such file"


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[listen\nport = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid TOML (")
    assert "\n" not in message


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)  # a directory
    assert str(caught.value).startswith(f"{tmp_path}: cannot read")


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        # unknown names
        (f"[upstream]\n{UPSTREAM}\n[listn]\nport = 1", "listn"),
        (f"[upstream]\n{UPSTREAM}\n[listen]\nhots = '::'", "listen.hots"),
        (f"[upstream]\n{UPSTREAM}\nurl_ = 'x'", "upstream.url_"),
        (f"[upstream]\n{UPSTREAM}\n[experimental_features]\nmsc3391 = true", "experimental_features.msc3391"),
        (f"msc3391_enabled = true\n[upstream]\n{UPSTREAM}", "msc3391_enabled"),
        # a section that is not a table
        (f"listen = 5\n[upstream]\n{UPSTREAM}", "listen"),
        # wrong types, including a bool where an int or a number is expected
        (f"[upstream]\n{UPSTREAM}\n[listen]\nport = '8009'", "listen.port"),
        (f"[upstream]\n{UPSTREAM}\n[listen]\nport = true", "listen.port"),
        (f"[upstream]\n{UPSTREAM}\n[listen]\nport = 8009.0", "listen.port"),
        (f"[upstream]\n{UPSTREAM}\n[listen]\nport = 70000", "listen.port"),
        (f"[upstream]\n{UPSTREAM}\n[listen]\nport = -1", "listen.port"),
        (f"[upstream]\n{UPSTREAM}\n[listen]\nhost = 127", "listen.host"),
        (f"[upstream]\n{UPSTREAM}\n[listen]\nhost = ''", "listen.host"),
        (f"[upstream]\n{UPSTREAM}\nread_timeout = '60'", "upstream.read_timeout"),
        (f"[upstream]\n{UPSTREAM}\nread_timeout = true", "upstream.read_timeout"),
        (f"[upstream]\n{UPSTREAM}\nread_timeout = 0", "upstream.read_timeout"),
        (f"[upstream]\n{UPSTREAM}\nconnect_timeout = -1.5", "upstream.connect_timeout"),
        (f"[upstream]\n{UPSTREAM}\nsync_timeout_margin = false", "upstream.sync_timeout_margin"),
        (f"[upstream]\n{UPSTREAM}\ninitial_sync_timeout = [1]", "upstream.initial_sync_timeout"),
        (f"[upstream]\n{UPSTREAM}\nmax_connections = true", "upstream.max_connections"),
        (f"[upstream]\n{UPSTREAM}\nmax_connections = -1", "upstream.max_connections"),
        (f"[upstream]\n{UPSTREAM}\n[store]\npath = 1", "store.path"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\ntrusted_forwarders = '127.0.0.1'", "proxy.trusted_forwarders"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\ntrusted_forwarders = ['nonsense']", "proxy.trusted_forwarders"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\ntrusted_forwarders = [1]", "proxy.trusted_forwarders"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nmax_body_size = 10", "proxy.max_body_size"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nmax_body_size = true", "proxy.max_body_size"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nidentity_cache_ttl = false", "proxy.identity_cache_ttl"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nidentity_cache_size = true", "proxy.identity_cache_size"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nidentity_cache_size = 0", "proxy.identity_cache_size"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nlog_level = 'LOUD'", "proxy.log_level"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nlog_level = 10", "proxy.log_level"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nlog_format = 'xml'", "proxy.log_format"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nlog_format = true", "proxy.log_format"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nlog_file = false", "proxy.log_file"),
        (f"[upstream]\n{UPSTREAM}\n[proxy]\nshutdown_grace = 'soon'", "proxy.shutdown_grace"),
        (f"[upstream]\n{UPSTREAM}\n[metrics]\nenabled = 'yes'", "metrics.enabled"),
        (f"[upstream]\n{UPSTREAM}\n[metrics]\nport = true", "metrics.port"),
        (f"[upstream]\n{UPSTREAM}\n[metrics]\npath = '/metrics'", "metrics.path"),
        (
            f"[upstream]\n{UPSTREAM}\n[experimental_features]\nmsc3391_enabled = 1",
            "experimental_features.msc3391_enabled",
        ),
        (
            f"[upstream]\n{UPSTREAM}\n[experimental_features]\nmsc3391_enabled = 'true'",
            "experimental_features.msc3391_enabled",
        ),
        # the upstream URL: missing, not a URL, not http(s), no host, a path, a query
        ("[listen]\nport = 1", "upstream.url"),
        ("[upstream]\nurl = 8008", "upstream.url"),
        ("[upstream]\nurl = ''", "upstream.url"),
        ("[upstream]\nurl = 'not a url'", "upstream.url"),
        ("[upstream]\nurl = '127.0.0.1:8008'", "upstream.url"),
        ("[upstream]\nurl = 'ftp://127.0.0.1:8008'", "upstream.url"),
        ("[upstream]\nurl = 'http://'", "upstream.url"),
        ("[upstream]\nurl = 'http://127.0.0.1:notaport'", "upstream.url"),
        ("[upstream]\nurl = 'http://127.0.0.1:8008/_matrix'", "upstream.url"),
        ("[upstream]\nurl = 'http://127.0.0.1:8008/synapse/'", "upstream.url"),
        ("[upstream]\nurl = 'http://127.0.0.1:8008/?x=1'", "upstream.url"),
        ("[upstream]\nurl = 'http://127.0.0.1:8008#frag'", "upstream.url"),
    ],
)
def test_each_mistake_names_its_key(tmp_path: Path, toml: str, key: str) -> None:
    message = error_for(tmp_path, toml)
    assert message.startswith(f"{key}: "), message
    assert "\n" not in message


def test_url_with_path_says_so(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[upstream]\nurl = 'http://127.0.0.1:8008/_matrix'")
    assert message.startswith("upstream.url: must not have a path")


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    message = error_for(tmp_path, f"[upstream]\n{UPSTREAM}\n[listen]\nhots = '::'")
    assert "host" in message and "port" in message


def test_command_line_reports_a_config_error_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[upstream]\nurl = 'http://127.0.0.1:8008/x'")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msc3391-proxy: config error: upstream.url: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ('[upstream]\nurl = "http://127.0.0.1:8008"\nurll = "x"\n', "upstream.urll"),
        ('[upstream]\nurl = "http://127.0.0.1:8008"\n[lisen]\nport = 8009\n', "lisen"),
        ('[upstream]\nurl = "ftp://127.0.0.1:8008"\n', "upstream.url"),
        ('[upstream]\nurl = "http://127.0.0.1:8008/base"\n', "upstream.url"),
        ("[listen]\nport = 8009\n", "upstream.url"),
        ('[listen]\nport = "8009"\n[upstream]\nurl = "http://127.0.0.1:8008"\n', "listen.port"),
        ('[upstream]\nurl = "http://127.0.0.1:8008"\n[proxy]\nlog_level = "LOUD"\n', "proxy.log_level"),
        ("[upstream\n", "not valid TOML"),
        (None, "no such file"),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "bad-scheme",
        "url-path",
        "missing-url",
        "port-type",
        "level",
        "toml",
        "no-file",
    ],
)
def test_a_config_mistake_exits_2_with_one_line_naming_it(
    tmp_path: Path, config: str | None, names: str
) -> None:
    path = tmp_path / "proxy.toml"
    if config is not None:
        path.write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("msc3391-proxy: config error: ")
    assert names in lines[0]
    if config is None:
        assert str(path) in lines[0]


# --- the example file --------------------------------------------------------------------


def test_example_config_parses() -> None:
    config = load_config(REPO_ROOT / "config.example.toml")
    assert str(config.upstream.url) == "http://127.0.0.1:8008"
    assert config.store.path == REPO_ROOT / "msc3391-proxy.sqlite3"


def test_example_config_documents_every_key_with_its_default() -> None:
    raw = tomllib.loads((REPO_ROOT / "config.example.toml").read_text())
    assert set(raw) == set(_SCHEMA)
    for section, keys in _SCHEMA.items():
        assert set(raw[section]) == set(keys), section
        for key, (_, default) in keys.items():
            if default is not _REQUIRED:
                assert raw[section][key] == default, f"{section}.{key}"
    assert raw["upstream"]["url"] == "http://127.0.0.1:8008"


def test_example_config_comments_every_key() -> None:
    lines = (REPO_ROOT / "config.example.toml").read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[number - 1].lstrip().startswith("#"), f"no comment above {line!r}"

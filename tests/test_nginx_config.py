"""`proxy/nginx_config.py` without nginx: the map is the route table's patterns and
takes every owned shape and no other, timeouts and upstreams follow the configuration,
the options are checked, and the command prints it. Real nginx runs the output in
`tests/test_nginx_routing.py` and `tests/test_nginx_synapse.py`.

Python's `re` stands in for nginx's PCRE here: the patterns use only literals, `.`,
`[^/]*`, groups, alternatives and anchors, which both read the same way."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import routing
from proxy.__main__ import main
from proxy.config import Config, load_config, parse_config
from proxy.nginx_config import (
    SECTIONS,
    Address,
    NginxConfigError,
    NginxOptions,
    forwarding,
    parse_address,
    parse_listen,
    parse_server_name,
    parse_size,
    render,
    request_uri_pattern,
)
from proxy.routes import ROUTES
from proxy.timeouts import ReadTimeout
from rig import REPO_ROOT
from tests.nginx_shapes import Shape, all_shapes, owned_shapes

EXAMPLE_CONFIG = REPO_ROOT / "config.example.toml"
# What `msc3391-proxy nginx-config --config config.example.toml` prints, kept in the
# repository for operators to read (the README points to it).
GENERATED_EXAMPLE = REPO_ROOT / "contrib" / "nginx-msc3391-proxy.conf"


def config(**sections: dict[str, object]) -> Config:
    raw: dict[str, dict[str, object]] = {"upstream": {"url": "http://127.0.0.1:8008"}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_config(raw, Path("/"))


def generate(cfg: Config | None = None, **options: object) -> str:
    return render(cfg or config(), ROUTES, NginxOptions(**options))  # type: ignore[arg-type]


def route_map(text: str) -> list[tuple[re.Pattern[str], str, list[str]]]:
    """The map's entries: (regular expression, internal location, its routes' names)."""
    found = re.findall(r'^ +"~(.+)" (\S+);  # ([\w, ]+)$', text, re.M)
    return [(re.compile(pattern), location, names.split(", ")) for pattern, location, names in found]


def taken(text: str, target: str) -> str | None:
    """The internal location nginx's map would give `target` (first match), or None."""
    return next((location for pattern, location, _ in route_map(text) if pattern.search(target)), None)


def locations(text: str) -> dict[str, list[str]]:
    """Each `location HEAD { ... }` block's directives (comments dropped), by HEAD."""
    blocks = re.findall(r"^ *location (.+?) \{\n(.*?)^ *\}", text, re.M | re.S)
    return {
        head: [line.split("#")[0].strip() for line in body.splitlines() if line.split("#")[0].strip()]
        for head, body in blocks
    }


def directive(block: list[str], name: str) -> list[str]:
    return [line.removesuffix(";").split(None, 1)[1] for line in block if line.split()[0] == name]


# --- the map ---------------------------------------------------------------------------


def test_the_owned_shapes_cover_the_whole_route_table() -> None:
    # A route added to the table must get shapes in tests/nginx_shapes.py too.
    covered = {
        found.name
        for shape in owned_shapes()
        if (found := routing.match(shape.method, shape.expected_target, ROUTES)) is not None
    }
    assert covered == {route.name for route in ROUTES}


def test_the_map_holds_every_route_in_the_route_tables_order_few_entries_for_nginx_to_try() -> None:
    entries = route_map(generate())
    assert [name for _, _, names in entries for name in names] == [route.name for route in ROUTES]
    by_name = {route.name: route for route in ROUTES}
    for pattern, _, names in entries:
        # One entry per run of routes that go to one location, each route's own pattern
        # an alternative of it.
        alternatives = [request_uri_pattern(by_name[n].pattern.pattern).removeprefix("^") for n in names]
        expected = "^" + alternatives[0] if len(names) == 1 else "^(?:" + "|".join(alternatives) + ")"
        assert pattern.pattern == expected
        # A named capture in nginx would set a variable of that name.
        assert "(?P<" not in pattern.pattern and "(?<" not in pattern.pattern
    locations_in_order = [location for _, location, _ in entries]
    assert all(a != b for a, b in itertools.pairwise(locations_in_order))  # runs merged
    assert len(entries) < len(ROUTES) / 3


@pytest.mark.parametrize("shape", all_shapes(), ids=lambda s: f"{s.method} {s.target[:80]}")
def test_the_shape_lists_are_what_synapse_would_dispatch(shape: Shape) -> None:
    # Owned, by Synapse's patterns, exactly when the proxy must get it (or nginx refuses it).
    assert shape.owned == (shape.destination in ("proxy", "refused"))


@pytest.mark.parametrize("shape", all_shapes(), ids=lambda s: f"{s.method} {s.target[:80]}")
def test_the_map_takes_every_owned_shape_and_no_other(shape: Shape) -> None:
    text = generate()
    location = taken(text, shape.expected_target)
    assert (location is not None) == shape.owned
    if location is not None:
        found = routing.match(shape.method, shape.expected_target, ROUTES)
        assert found is not None
        assert location == "/_msc3391-proxy/" + (
            "default" if found.route.read_timeout is ReadTimeout.DEFAULT else "sync"
        )


# Path segments a client could send: route words, IDs raw and encoded, and what nginx
# decodes or normalises (`%2F`, `..`, `#`, `;`).
SEGMENTS = [
    "_matrix", "client", "r0", "v3", "v4", "unstable", "api", "v1", "V3", "user", "rooms",
    "account_data", "sync", "initialSync", "devices", "delete_devices", "logout", "all",
    "account", "deactivate", "versions", "org.matrix.msc3391", "orgXmatrix_msc3391",
    "org.matrix.simplified_msc3575", "org", "matrix", "msc3391", "simplified_msc3575",
    "%40a%3Ahs", "@a:hs", "!r:hs", "%21r%3Ahs", "m.test", "a%2Fb", "..", ".", "", "%2E%2E",
    "x#y", "#", ";x", "%3F", "%23", "%",
]  # fmt: skip


# Where a path starts, and what follows: the owned routes' shapes with holes, and others.
PATH_STARTS = [
    "/_matrix/client/v3/", "/_matrix/client/r0/", "/_matrix/client/unstable/", "/_matrix/client/api/v1/",
    "/_matrix/client/", "/_matrix/client/unstable/org.matrix.msc3391/",
    "/_matrix/client/unstable/orgXmatrix_msc3391/", "/", "//_matrix/client/v3/", "/_matrix/client/v3//",
]  # fmt: skip
TEMPLATES = [
    "user/{}/account_data/{}", "user/{}/rooms/{}/account_data/{}", "rooms/{}/initialSync", "devices/{}",
    "sync", "initialSync", "logout", "logout/all", "account/deactivate", "delete_devices", "versions",
    "org.matrix.simplified_msc3575/sync", "v4/sync", "{}/sync", "{}", "{}/{}",
]  # fmt: skip
# A hole is mostly one segment, sometimes several (then a `[^/]*` must not take it).
HOLE = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map("/".join)


@st.composite
def paths(draw: st.DrawFn) -> str:
    template = draw(st.sampled_from(TEMPLATES))
    holes = [draw(HOLE) for _ in range(template.count("{}"))]
    return draw(st.sampled_from(PATH_STARTS)) + template.format(*holes)


@settings(max_examples=3000, deadline=None)
@given(path=paths(), query=st.none() | st.text(alphabet="/?#=&.%a", max_size=6))
def test_the_map_takes_a_target_exactly_when_synapse_dispatches_its_path(
    path: str, query: str | None
) -> None:
    text = _GENERATED
    target = path if query is None else f"{path}?{query}"
    owned = any(route.pattern.match(path) for route in ROUTES)  # as Synapse matches its raw path
    if owned:
        assert taken(text, target) is not None, target
    if query is None:
        # Without a query string nothing more is taken: no ordinary traffic reaches the proxy.
        assert (taken(text, target) is not None) == owned, target


_GENERATED = generate()


@pytest.mark.parametrize(
    "pattern",
    [r"^/a/\d+$", r"^/a/[a-z]*$", r"^/a+$", r"(?i)^/a$", r"^/a$/b", r"^/a/(?P<x>.*)$", r"/a^"],
)
def test_a_pattern_the_translation_does_not_know_is_refused(pattern: str) -> None:
    with pytest.raises(NginxConfigError):
        request_uri_pattern(pattern)


def test_the_translation() -> None:
    assert (
        request_uri_pattern(r"^/_matrix/client/(?:r0|v3)/user/(?P<user_id>[^/]*)/x$")
        == r"^/_matrix/client/(?:r0|v3)/user/[^/]*/x(?:\?|$)"
    )
    assert request_uri_pattern(r"/a/b") == r"^/a/b"  # Synapse's re.match anchors the start


# --- where owned requests go, and how long nginx waits -------------------------------


@pytest.mark.parametrize("policy", list(ReadTimeout))
def test_every_read_timeout_policy_has_a_forwarding(policy: ReadTimeout) -> None:
    up = config(upstream={"read_timeout": 20, "sync_timeout_margin": 5, "initial_sync_timeout": 100}).upstream
    how = forwarding(policy, up)
    if policy is ReadTimeout.DEFAULT:
        assert (how.read_timeout, how.buffering) == (25, True)
    else:
        # An initial sync's bound: longer than any long-poll of up to 100 s.
        assert (how.read_timeout, how.buffering) == (105, False)


def test_timeouts_follow_the_configuration() -> None:
    cfg = config(
        upstream={
            "connect_timeout": 3,
            "read_timeout": 20,
            "sync_timeout_margin": 5,
            "initial_sync_timeout": 100,
        }
    )
    blocks = locations(generate(cfg))
    assert set(blocks) == {
        "= /_msc3391-proxy/default",
        "= /_msc3391-proxy/sync",
        "~ ^(/_matrix|/_synapse/client)",
        "/",
    }
    default, sync = blocks["= /_msc3391-proxy/default"], blocks["= /_msc3391-proxy/sync"]
    homeserver = blocks["~ ^(/_matrix|/_synapse/client)"]
    assert directive(default, "proxy_read_timeout") == ["25s"]
    assert directive(sync, "proxy_read_timeout") == ["105s"]
    assert directive(homeserver, "proxy_read_timeout") == ["20s"]  # as the proxy forwards
    for block in (default, sync, homeserver):
        assert directive(block, "proxy_connect_timeout") == ["3s"]
    assert directive(sync, "proxy_buffering") == ["off"]
    assert directive(default, "proxy_buffering") == directive(homeserver, "proxy_buffering") == []
    blocks = locations(generate(config(upstream={"read_timeout": 0.25, "sync_timeout_margin": 0.5})))
    assert directive(blocks["= /_msc3391-proxy/default"], "proxy_read_timeout") == ["750ms"]


def test_every_forwarding_location_passes_the_raw_target_and_the_clients_address() -> None:
    blocks = locations(generate())
    for head, block in blocks.items():
        if head == "/":
            assert block == ["return 404;"]
            continue
        assert directive(block, "proxy_http_version") == ["1.1"]
        assert directive(block, "proxy_set_header") == [
            'Connection ""',
            "Host $host",
            "X-Forwarded-For $remote_addr",
            "X-Forwarded-Proto $scheme",
        ]
        assert directive(block, "client_max_body_size") == ["50M"]
        if head.startswith("= "):
            assert block[0] == "internal;"
            # The rewrite changed $uri; $request_uri is the target as the client sent it.
            assert directive(block, "proxy_pass") == ["http://msc3391_proxy$request_uri"]
        else:
            # No URI after the upstream: nginx passes the target on as the client sent it.
            assert directive(block, "proxy_pass") == ["http://msc3391_homeserver"]


def test_owned_requests_are_rewritten_before_any_location() -> None:
    text = generate(section="locations")
    head = text[: text.index("\nlocation ")]
    assert "if ($msc3391_proxy_route) {\n    rewrite ^ $msc3391_proxy_route last;\n}" in head
    assert "large_client_header_buffers 4 16k;" in head


# --- upstreams -------------------------------------------------------------------------


def upstream_block(text: str, name: str) -> list[str]:
    found = re.search(rf"^upstream {name} \{{\n(.*?)^\}}", text, re.M | re.S)
    assert found is not None, text
    return [line.split("#")[0].strip() for line in found.group(1).splitlines()]


def test_upstreams_from_the_configuration() -> None:
    text = generate()
    proxy, homeserver = upstream_block(text, "msc3391_proxy"), upstream_block(text, "msc3391_homeserver")
    assert directive(proxy, "server") == ["127.0.0.1:8009"]
    assert directive(homeserver, "server") == ["127.0.0.1:8008"]
    for block in (proxy, homeserver):
        assert directive(block, "keepalive") == ["512"]
        assert directive(block, "keepalive_requests") == ["100000"]
    # Closed by nginx before the peer closes an idle connection.
    assert directive(proxy, "keepalive_timeout") == ["60s"]  # proxy.client_timeout: 75 s
    assert directive(homeserver, "keepalive_timeout") == ["50s"]  # Synapse's: 60 s
    text = generate(config(proxy={"client_timeout": 30}))
    assert directive(upstream_block(text, "msc3391_proxy"), "keepalive_timeout") == ["24s"]


@pytest.mark.parametrize(
    ("host", "server"),
    [
        ("0.0.0.0", "127.0.0.1:7000"),
        ("::", "[::1]:7000"),
        ("::1", "[::1]:7000"),
        ("proxy.internal", "proxy.internal:7000"),
    ],
)
def test_the_proxys_address_from_listen(host: str, server: str) -> None:
    text = generate(config(listen={"host": host, "port": 7000}))
    assert directive(upstream_block(text, "msc3391_proxy"), "server") == [server]


def test_several_proxy_instances_share_one_upstream() -> None:
    text = generate(proxies=(Address("10.0.0.1", 8009), Address("10.0.0.2", 8010)))
    assert directive(upstream_block(text, "msc3391_proxy"), "server") == ["10.0.0.1:8009", "10.0.0.2:8010"]
    assert "round-robin" in text


def test_a_proxy_on_a_free_port_needs_its_address() -> None:
    with pytest.raises(NginxConfigError, match="--proxy"):
        generate(config(listen={"port": 0}))
    assert "server 127.0.0.1:9000;" in generate(
        config(listen={"port": 0}), proxies=(Address("127.0.0.1", 9000),)
    )


@pytest.mark.parametrize(
    ("url", "server", "proxy_pass"),
    [
        ("http://[::1]:8008", "[::1]:8008", "http://msc3391_homeserver"),
        ("http://synapse.internal", "synapse.internal:80", "http://msc3391_homeserver"),
        ("https://synapse.internal", "synapse.internal:443", "https://msc3391_homeserver"),
    ],
)
def test_the_homeserver_from_upstream_url(url: str, server: str, proxy_pass: str) -> None:
    text = generate(config(upstream={"url": url}))
    assert directive(upstream_block(text, "msc3391_homeserver"), "server") == [server]
    block = locations(text)["~ ^(/_matrix|/_synapse/client)"]
    assert directive(block, "proxy_pass") == [proxy_pass]
    tls = ["on"] if url.startswith("https") else []
    assert directive(block, "proxy_ssl_server_name") == tls
    assert directive(block, "proxy_ssl_name") == (["synapse.internal"] if tls else [])


# --- sections and options --------------------------------------------------------------


def test_the_sections_are_the_halves_of_the_whole() -> None:
    whole = generate(listen="8443", server_name="matrix.example.org")
    upstreams, inner = generate(section="upstreams"), generate(section="locations")

    def body(text: str) -> str:
        return text.split("\n\n", 1)[1]  # after the header

    assert body(upstreams) in whole
    assert re.search(r"^ *(location |server \{)", upstreams, re.M) is None
    assert re.search(r"^ *(upstream|map) ", inner, re.M) is None
    indented = "".join("    " + line if line.strip() else line for line in body(inner).splitlines(True))
    assert indented in whole
    assert "    listen 8443;\n    server_name matrix.example.org;\n" in whole


LISTEN = (parse_listen, ["8080", "127.0.0.1:8080", "[::1]:8080", "*:80", "matrix.example.org:80"])
BAD_LISTEN = ["", "x", "1:2:3", "0", "70000", "8080; include /etc/passwd", "a b:1"]
SERVER_NAME = (parse_server_name, ["_", "matrix.example.org", "*.example.org"])
BAD_SERVER_NAME = ["", "a b", "a;b", "~^x$", "{}"]
SIZE = (parse_size, ["0", "50M", "512k", "1g"])
BAD_SIZE = ["", "50MB", "-1", "1.5M", "50M;"]


@pytest.mark.parametrize(
    ("parse", "good", "bad"),
    [(*LISTEN, BAD_LISTEN), (*SERVER_NAME, BAD_SERVER_NAME), (*SIZE, BAD_SIZE)],
)
def test_options_are_checked(parse: object, good: list[str], bad: list[str]) -> None:
    assert callable(parse)
    for text in good:
        assert parse(text) == text
    for text in bad:
        with pytest.raises(NginxConfigError):
            parse(text)


def test_proxy_addresses_are_checked() -> None:
    assert parse_address("127.0.0.1:8009") == Address("127.0.0.1", 8009)
    assert parse_address("[::1]:8009") == Address("::1", 8009)
    assert str(parse_address("[::1]:8009")) == "[::1]:8009"
    for bad in ("8009", "127.0.0.1", "127.0.0.1:0", "h:99999", "a b:1", "x:1;"):
        with pytest.raises(NginxConfigError, match="--proxy"):
            parse_address(bad)


# --- the command -----------------------------------------------------------------------


def test_the_command_prints_the_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nginx-config", "--config", str(EXAMPLE_CONFIG)]) == 0
    assert capsys.readouterr().out == render(load_config(EXAMPLE_CONFIG), ROUTES, NginxOptions())
    argv = [
        "nginx-config",
        "--config",
        str(EXAMPLE_CONFIG),
        "--section",
        "locations",
        "--max-body-size",
        "8M",
    ]
    assert main([*argv, "--proxy", "10.0.0.1:1", "--proxy", "10.0.0.2:2"]) == 0
    out = capsys.readouterr().out
    assert out == render(
        load_config(EXAMPLE_CONFIG), ROUTES, NginxOptions(section="locations", max_body_size="8M")
    )
    argv = ["nginx-config", "--config", str(EXAMPLE_CONFIG), "--section", "upstreams"]
    assert main([*argv, "--proxy", "10.0.0.1:1", "--proxy", "[::1]:2"]) == 0
    assert "server 10.0.0.1:1;\n    server [::1]:2;\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "nope"], "msc3391-proxy: --listen: expected [ADDRESS:]PORT, got 'nope'"),
        (["--proxy", "8009"], "msc3391-proxy: --proxy: expected ADDRESS:PORT, got '8009'"),
        (["--server-name", "a;b"], "msc3391-proxy: --server-name: "),
        (["--max-body-size", "lots"], "msc3391-proxy: --max-body-size: "),
    ],
)
def test_a_bad_option_is_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nginx-config", "--config", str(EXAMPLE_CONFIG), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err


def test_a_config_error_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[listen]\nport = "x"\n')
    assert main(["nginx-config", "--config", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("msc3391-proxy: config error: ") and captured.err.count("\n") == 1


def test_the_section_choice_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(SECTIONS) == {"all", "upstreams", "locations"}
    with pytest.raises(SystemExit) as exited:
        main(["nginx-config", "--config", str(EXAMPLE_CONFIG), "--section", "server"])
    assert exited.value.code == 2


def test_the_generated_example_in_contrib_is_current() -> None:
    expected = render(load_config(EXAMPLE_CONFIG), ROUTES, NginxOptions())
    assert GENERATED_EXAMPLE.read_text() == expected, (
        "contrib/nginx-msc3391-proxy.conf is not what the command prints; regenerate it: "
        "python -m proxy nginx-config --config config.example.toml > contrib/nginx-msc3391-proxy.conf"
    )


def test_the_readme_tells_operators_to_generate_it() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### nginx") : readme.index("### As a service")]
    assert "msc3391-proxy nginx-config --config" in section
    assert "--section upstreams" in section and "--section locations" in section
    assert "contrib/nginx-msc3391-proxy.conf" in section
    # No hand-written routing left: the only nginx block includes the generated halves
    # (and tests/test_nginx_routing.py runs it).
    for block in re.findall(r"^```nginx\n(.*?)^```", readme, re.M | re.S):
        assert re.search(r"^\s*(location|proxy_pass|map|upstream)\s", block, re.M) is None, block

"""Real nginx running what `msc3391-proxy nginx-config` generates, in front of two
recording upstreams on loopback that stand in for the proxy and the homeserver: every
owned shape (`tests/nginx_shapes.py`) reaches the proxy byte for byte and never the
homeserver, ordinary traffic reaches the homeserver and never the proxy, also when the
generated halves sit in an operator's own server block that sends everything else to
the homeserver. And: kept-alive upstream connections, the client's address, timeouts
by route policy, several proxy instances, the request-line and body limits.

Each request goes out byte for byte (`tests/raw_http.py`), and each upstream records the
request line exactly as nginx sent it (`tests/recording_upstream.py`), so where a shape
went is asserted exactly: one recorded request, on one side, with the same target."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.nginx_config import Address, NginxOptions, Section, render
from proxy.routes import ROUTES
from rig import REPO_ROOT
from rig.nginx import Nginx
from rig.processes import free_port
from tests.matrix import wait_for_match
from tests.nginx_shapes import CLIMB, Destination, Shape, all_shapes, not_owned_shapes
from tests.raw_http import RawResponse, raw_request
from tests.recording_upstream import Recorded, RecordingUpstream
from tests.test_routing import ALICE

# Another loopback address than nginx's own, so the address nginx passes on is the client's.
CLIENT = "127.0.0.2"


@pytest.fixture(scope="session")
def nginx_binary(require: Callable[[str], str]) -> str:
    return require("nginx")


@dataclass
class Rig:
    nginx: Nginx
    proxies: list[RecordingUpstream]
    homeserver: RecordingUpstream
    tls_server_name: str | None = None  # requests over TLS, with this SNI

    @property
    def proxy(self) -> RecordingUpstream:
        return self.proxies[0]

    def take(self) -> tuple[list[Recorded], list[Recorded]]:
        """What the proxies (together) and the homeserver got since the last call."""
        return [r for proxy in self.proxies for r in proxy.take()], self.homeserver.take()


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(nginx_binary: str, tmp_path: Path) -> AsyncIterator[RigFactory]:
    """`await rig(...)`: recording upstreams and nginx running the generated `all` file for
    a proxy config pointing at them. `upstream` and `proxy` go into that config;
    `instances` proxies (`--proxy`); `delay` for every upstream; `max_body_size`
    (`--max-body-size`); `operator(upstreams, locations, port)` gives an operator's own
    http text that includes the two generated halves instead of the whole file."""
    started: list[tuple[Nginx, list[RecordingUpstream]]] = []

    async def start(
        *,
        instances: int = 1,
        delay: Callable[[Recorded], float] | None = None,
        upstream: dict[str, object] | None = None,
        operator: Callable[[Path, Path, int], str] | None = None,
        max_body_size: str = NginxOptions.max_body_size,
        tls_server_name: str | None = None,
    ) -> Rig:
        proxies = [RecordingUpstream(f"proxy-{i}", delay) for i in range(instances)]
        homeserver = RecordingUpstream("homeserver", delay)
        for server in (*proxies, homeserver):
            await server.start()
        port = free_port()
        config = parse_config(
            {
                "listen": {"port": proxies[0].port},
                "upstream": {"url": f"http://{homeserver.address}", **(upstream or {})},
            },
            tmp_path,
        )
        addresses = tuple(Address("127.0.0.1", p.port) for p in proxies) if instances > 1 else ()

        def generated(section: Section) -> str:
            options = NginxOptions(
                listen=f"127.0.0.1:{port}", section=section, proxies=addresses, max_body_size=max_body_size
            )
            return render(config, ROUTES, options)

        if operator is None:
            http_config = generated("all")
        else:
            halves = tmp_path / "upstreams.conf", tmp_path / "locations.conf"
            halves[0].write_text(generated("upstreams"))
            halves[1].write_text(generated("locations"))
            http_config = operator(*halves, port)
        nginx = Nginx(
            tmp_path / f"nginx-{len(started)}",
            http_config,
            [port],
            binary=nginx_binary,
            log_access=True,
            log_format="upstream=$upstream_addr",
            own_user=True,
        )
        started.append((nginx, [*proxies, homeserver]))
        nginx.start()
        return Rig(nginx, proxies, homeserver, tls_server_name)

    yield start
    for nginx, servers in reversed(started):
        nginx.stop()
        for server in servers:
            await server.close()


def _body(method: str) -> bytes:
    return b"{}" if method in ("PUT", "POST", "PATCH") else b""


async def send(rig: Rig, method: str, target: str, headers: Iterable[tuple[str, str]] = ()) -> RawResponse:
    headers = list(headers)
    if rig.tls_server_name is not None and not any(k.lower() == "host" for k, _ in headers):
        headers.append(("Host", rig.tls_server_name))  # nginx picks the server by it too
    return await raw_request(
        rig.nginx.url,
        method,
        target,
        headers,
        _body(method),
        local_host=CLIENT,
        tls_server_name=rig.tls_server_name,
    )


async def misrouted(rig: Rig, shapes: Iterable[Shape], nowhere: Destination = "nowhere") -> list[str]:
    """Each shape sent in turn; what went elsewhere than it should (empty: all well).
    `nowhere` is where the shapes nginx itself answers 404 to go instead."""
    problems = []
    rig.take()
    for shape in shapes:
        response = await send(rig, shape.method, shape.target)
        at_proxy, at_homeserver = rig.take()
        destination = nowhere if shape.destination == "nowhere" else shape.destination
        expected_status = {"refused": 400, "nowhere": 404}.get(destination, 200)
        sent = [(shape.method, shape.expected_target)]
        expected = {"proxy": (sent, []), "homeserver": ([], sent)}.get(destination, ([], []))
        got = ([(r.method, r.target) for r in at_proxy], [(r.method, r.target) for r in at_homeserver])
        if (response.status, got) != (expected_status, expected):
            problems.append(
                f"{shape.method} {shape.target[:120]}: expected {destination} ({expected_status}), "
                f"got {response.status}, at the proxy {got[0]}, at the homeserver {got[1]}"
            )
    return problems


# --- where each shape goes -------------------------------------------------------------


async def test_every_owned_shape_reaches_the_proxy_and_nothing_else_does(rig: RigFactory) -> None:
    running = await rig()
    shapes = all_shapes()
    assert sum(s.destination == "proxy" for s in shapes) > 150
    assert await misrouted(running, shapes) == []


async def test_in_an_operators_server_block_that_sends_the_rest_to_the_homeserver(rig: RigFactory) -> None:
    """The halves included in an operator's own server block whose other locations send
    everything to the homeserver (the common single-location setup): a shape whose
    decoded path is `/x` or `/_matrix/media/...` would reach those locations, but owned
    requests are rewritten before any location is chosen."""

    def operator(upstreams: Path, locations: Path, port: int) -> str:
        return f"""
    include {upstreams};
    server {{
        listen 127.0.0.1:{port};
        server_name matrix.example.org;
        include {locations};
        location / {{
            proxy_pass http://msc3391_homeserver;
        }}
        location ^~ /_matrix/media/ {{
            proxy_pass http://msc3391_homeserver;
        }}
    }}
"""

    running = await rig(operator=operator)
    # The operator's `location /` takes what the generated file answers 404 itself.
    assert await misrouted(running, all_shapes(), nowhere="homeserver") == []


README_UPSTREAMS = "/etc/nginx/msc3391-proxy/upstreams.conf"
README_LOCATIONS = "/etc/nginx/msc3391-proxy/locations.conf"
README_CERTIFICATE = "/etc/letsencrypt/live/matrix.example.org/fullchain.pem"
README_KEY = "/etc/letsencrypt/live/matrix.example.org/privkey.pem"


def readme_include_example() -> str:
    """The README's ```nginx block: the generated halves included in a TLS server block."""
    blocks = re.findall(r"^```nginx\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), re.M | re.S)
    assert len(blocks) == 1, f"expected one ```nginx block in README.md, found {len(blocks)}"
    return blocks[0]


def replaced(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, (old, text)
        text = text.replace(old, new)
    return text


@pytest.fixture
def certificate(require: Callable[[str], str], tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for matrix.example.org and its key."""
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=matrix.example.org", "-keyout", str(key), "-out", str(certificate)]
    subprocess.run(
        [require("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", *subject],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return certificate, key


async def test_the_readme_include_example_over_tls(rig: RigFactory, certificate: tuple[Path, Path]) -> None:
    """The README's example, run as written but for its paths and port, behind another
    TLS server that is the default one of the address (so SNI must pick the README's
    block, with its 16 KiB request lines): every shape goes where it must, and the
    upstreams are told the scheme was https."""
    certificate, key = certificate

    def operator(upstreams: Path, locations: Path, port: int) -> str:
        example = replaced(
            readme_include_example(),
            {
                README_UPSTREAMS: str(upstreams),
                README_LOCATIONS: str(locations),
                README_CERTIFICATE: str(certificate),
                README_KEY: str(key),
                "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
            },
        )
        default = (
            f"server {{ listen 127.0.0.1:{port} ssl default_server; server_name other.example.org;\n"
            f"    ssl_certificate {certificate}; ssl_certificate_key {key}; return 421; }}\n"
        )
        return default + example

    running = await rig(operator=operator, tls_server_name="matrix.example.org")
    absolute = [shape for shape in all_shapes() if shape.target.startswith("http://")]
    assert absolute and all(shape.destination == "proxy" for shape in absolute)
    assert await misrouted(running, [shape for shape in all_shapes() if shape not in absolute]) == []
    # An absolute-form target names its own host, which picks the server: here the
    # default one (421), so it reaches nobody.
    for shape in absolute:
        assert (await send(running, shape.method, shape.target)).status == 421
    assert running.take() == ([], [])
    assert (await send(running, "GET", "/_matrix/client/v3/sync")).status == 200
    assert (await send(running, "GET", "/_matrix/client/v3/capabilities")).status == 200
    at_proxy, at_homeserver = running.take()
    for request in (*at_proxy, *at_homeserver):
        assert request.headers.getall("X-Forwarded-Proto") == ["https"]


async def test_the_decision_is_not_made_on_what_location_sees(rig: RigFactory, tmp_path: Path) -> None:
    """Why the map reads $request_uri: nginx's decoded, normalised $uri of some owned
    shapes (what `location` matches) is another path, or outside /_matrix altogether."""
    port = free_port()
    nginx = Nginx(
        tmp_path / "echo",
        f'server {{ listen 127.0.0.1:{port}; location / {{ return 200 "$uri"; }} }}',
        [port],
        own_user=True,
    )
    nginx.start()
    try:
        seen = {}
        for target in (
            f"/_matrix/client/v3/user/{ALICE}/account_data/{CLIMB}x",
            f"/_matrix/client/unstable/org#matrix.msc3391/user/{ALICE}/account_data/m.test",
            "/_matrix/client/v3/user/%40a%2Fb%3Ahs/account_data/m.test",
            "/_matrix/client/v3//user/../sync",
        ):
            response = await raw_request(nginx.url, "GET", target)
            assert response.status == 200
            seen[target] = response.body.decode()
    finally:
        nginx.stop()
    assert list(seen.values()) == [
        "/x",  # `%2F` decoded, then each `..` removes a segment
        "/_matrix/client/unstable/org",  # `#` ends the path
        "/_matrix/client/v3/user/@a/b:hs/account_data/m.test",
        "/_matrix/client/v3/sync",  # `//` merged, `..` applied
    ]


async def test_the_internal_locations_are_not_reachable_from_outside(rig: RigFactory) -> None:
    running = await rig()
    for target in ("/_msc3391-proxy/default", "/_msc3391-proxy/sync", "/_msc3391-proxy/sync?x"):
        response = await send(running, "GET", target)
        assert response.status == 404, target
    assert running.take() == ([], [])


# --- how requests are passed on --------------------------------------------------------


async def test_upstream_connections_are_kept_alive(rig: RigFactory) -> None:
    running = await rig()
    for _ in range(20):
        for method, target in (
            ("GET", "/_matrix/client/v3/sync"),
            ("GET", "/_matrix/client/v3/capabilities"),
        ):
            assert (await send(running, method, target)).status == 200
    at_proxy, at_homeserver = running.take()
    assert len(at_proxy) == len(at_homeserver) == 20
    # One nginx worker, requests one after the other: one connection to each upstream.
    assert len({r.peer_port for r in at_proxy}) == 1
    assert len({r.peer_port for r in at_homeserver}) == 1
    for request in (*at_proxy, *at_homeserver):
        assert "Connection" not in request.headers  # `Connection ""`: not `close`


async def test_the_clients_address_and_scheme_are_passed_on_never_the_clients_claim(rig: RigFactory) -> None:
    running = await rig()
    spoofed = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("Host", "matrix.example.org"),
    ]
    for target in ("/_matrix/client/v3/sync", "/_matrix/client/v3/capabilities"):
        assert (await send(running, "GET", target, spoofed)).status == 200
    at_proxy, at_homeserver = running.take()
    for request in (*at_proxy, *at_homeserver):
        assert request.headers.getall("X-Forwarded-For") == [CLIENT]
        assert request.headers.getall("X-Forwarded-Proto") == ["http"]
        assert request.headers.getall("Host") == ["matrix.example.org"]
    # nginx's own log names the upstream that served each request (written once the
    # response has gone out, so it may come a moment after the client has it).
    for target, upstream in (
        ("/_matrix/client/v3/sync", running.proxy),
        ("/_matrix/client/v3/capabilities", running.homeserver),
    ):
        line = re.compile(rf'"GET {re.escape(target)} HTTP/1.1" 200 .* upstream={upstream.address}$', re.M)
        assert line.search(wait_for_match(running.nginx.access_log.read_text, line))


async def test_timeouts_follow_the_route_policy(rig: RigFactory) -> None:
    """Generated for read_timeout 0.5 s, margin 0.5 s, initial syncs 2 s: nginx waits 1 s
    for an ordinary owned route, 2.5 s for a sync, 0.5 s for the homeserver directly.
    Every upstream answers after 1.5 s."""
    running = await rig(
        upstream={"read_timeout": 0.5, "sync_timeout_margin": 0.5, "initial_sync_timeout": 2},
        delay=lambda _: 1.5,
    )
    for target, status in (
        ("/_matrix/client/v3/sync?since=s1&timeout=1000", 200),
        ("/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=1", 200),
        (f"/_matrix/client/v3/user/{ALICE}/account_data/m.test", 504),
        ("/_matrix/client/v3/capabilities", 504),
    ):
        method = "POST" if "msc3575" in target else "GET"
        response = await send(running, method, target)
        assert response.status == status, (target, response.status)
        if status == 200:
            assert json.loads(response.body) == {"upstream": "proxy-0"}


async def test_several_proxy_instances_take_turns(rig: RigFactory) -> None:
    running = await rig(instances=2)
    for _ in range(3):
        for target in ("/_matrix/client/v3/sync", f"/_matrix/client/v3/user/{ALICE}/account_data/m.test"):
            assert (await send(running, "GET", target)).status == 200
    assert [len(proxy.take()) for proxy in running.proxies] == [3, 3]
    assert await misrouted(running, not_owned_shapes()) == []


async def test_request_lines_up_to_16_kib(rig: RigFactory) -> None:
    running = await rig()
    target = f"/_matrix/client/v3/user/{ALICE}/account_data/"
    fits = target + "t" * (16 * 1024 - len(f"PUT {target} HTTP/1.1\r\n") - 1)
    assert (await send(running, "PUT", fits)).status == 200
    assert (await send(running, "PUT", fits + "tt")).status == 414
    at_proxy, at_homeserver = running.take()
    assert [r.target for r in at_proxy] == [fits] and at_homeserver == []


async def test_bodies_over_the_limit_reach_nobody(rig: RigFactory) -> None:
    running = await rig(max_body_size="1k")
    owned, ordinary = f"/_matrix/client/v3/user/{ALICE}/account_data/m.test", "/_matrix/media/v3/upload"
    for target in (owned, ordinary):
        for size, status in ((1024, 200), (1025, 413)):
            body = b"x" * size
            response = await raw_request(running.nginx.url, "PUT", target, body=body)
            assert response.status == status, (target, size)
    at_proxy, at_homeserver = running.take()
    assert [(r.target, len(r.body)) for r in at_proxy] == [(owned, 1024)]
    assert [(r.target, len(r.body)) for r in at_homeserver] == [(ordinary, 1024)]

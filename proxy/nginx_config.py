"""nginx in front of the proxy, generated from the route table: `msc3391-proxy nginx-config`.

Pure functions: the routes and a `Config` in, nginx configuration text out.

Owned requests go to the proxy, everything else straight to the homeserver. The
decision is made on `$request_uri`, the request target as the client sent it, which is
exactly what nginx passes on and what Synapse matches its patterns against. It is never
made on nginx's `$uri` (what `location` matches), which is decoded and normalised: `%2F`
in an ID becomes a separator, `..` (or `..%2F..`) removes the segments before it, `//`
collapses and a `#` ends the path. A request that the homeserver would serve as an owned
endpoint can look like anything there, even like a path outside `/_matrix` that an
operator's own `location /` sends to the homeserver. So a `map` of Synapse's own
patterns over `$request_uri` names an internal location, a server-level `rewrite` (run
before any `location` is chosen) sends the request there, and that location passes
`$request_uri` on unchanged to the proxy with the timeouts of the route's policy.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .config import Config, UpstreamConfig
from .routing import Route
from .timeouts import ReadTimeout, read_timeout

Section = Literal["all", "upstreams", "locations"]
SECTIONS: tuple[Section, ...] = ("all", "upstreams", "locations")

PROXY_UPSTREAM = "msc3391_proxy"
HOMESERVER_UPSTREAM = "msc3391_homeserver"
ROUTE_VARIABLE = "$msc3391_proxy_route"
# The internal locations' prefix: a client asking for one gets 404 (`internal`).
INTERNAL_PREFIX = "/_msc3391-proxy/"

# Idle upstream connections each nginx worker keeps per upstream block: enough for the
# bursts of many concurrent clients (a busy room wakes every held /sync at once) to find
# an open connection; an idle connection costs the peer little more than a socket.
KEEPALIVE_CONNECTIONS = 512
# nginx's default (1000) closes a busy upstream connection every thousand requests.
KEEPALIVE_REQUESTS = 100_000
# nginx must close an idle upstream connection before the peer does, or it may send a
# request on a connection that is being closed (a 502 for a POST, which is not retried).
# The homeserver: Synapse's Twisted closes idle connections after 60 s.
HOMESERVER_KEEPALIVE_TIMEOUT = 50.0
NGINX_KEEPALIVE_TIMEOUT = 60.0  # nginx's own default
# Synapse and the proxy accept request lines of 16 KiB, nginx 8 KiB by default (414).
HEADER_BUFFERS = "4 16k"


class NginxConfigError(Exception):
    """A bad option, or a configuration nginx cannot be generated for: one line."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NginxOptions:
    listen: str = "127.0.0.1:8080"
    server_name: str = "_"
    section: Section = "all"
    # The proxy instances, round-robin; empty: the config's listen.host and listen.port.
    proxies: tuple[Address, ...] = ()
    # nginx's limit on request bodies: the homeserver's max_upload_size.
    max_body_size: str = "50M"


# --- options ------------------------------------------------------------------------

_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
_LISTEN = re.compile(rf"(?:(?P<host>{_HOST}|\*):)?(?P<port>[0-9]{{1,5}})")
_ADDRESS = re.compile(rf"(?P<host>{_HOST}):(?P<port>[0-9]{{1,5}})")
_SERVER_NAME = re.compile(r"[A-Za-z0-9_*.-]+")
_SIZE = re.compile(r"[0-9]+[kKmMgG]?")


def _port(option: str, text: str, digits: str) -> int:
    port = int(digits)
    if not 1 <= port <= 65535:
        raise NginxConfigError(f"{option}: port must be between 1 and 65535, got {text!r}")
    return port


def parse_listen(text: str) -> str:
    """`--listen [ADDRESS:]PORT`, as nginx's `listen` takes it."""
    found = _LISTEN.fullmatch(text)
    if found is None:
        raise NginxConfigError(f"--listen: expected [ADDRESS:]PORT, got {text!r}")
    _port("--listen", text, found["port"])
    return text


def parse_address(text: str) -> Address:
    """`--proxy ADDRESS:PORT`: one proxy instance."""
    found = _ADDRESS.fullmatch(text)
    if found is None:
        raise NginxConfigError(f"--proxy: expected ADDRESS:PORT, got {text!r}")
    return Address(found["host"].strip("[]"), _port("--proxy", text, found["port"]))


def parse_server_name(text: str) -> str:
    if _SERVER_NAME.fullmatch(text) is None:
        raise NginxConfigError(
            f"--server-name: expected a host name (letters, digits, . - _ *), got {text!r}"
        )
    return text


def parse_size(text: str) -> str:
    if _SIZE.fullmatch(text) is None:
        raise NginxConfigError(
            f"--max-body-size: expected a size such as 50M, 512k or 0 (no limit), got {text!r}"
        )
    return text


# --- the owned routes as nginx sees them ------------------------------------------

# Everything the route table's patterns are made of. The translation refuses anything
# else rather than guess what PCRE would make of it.
_PATTERN_TOKEN = re.compile(
    r"(?P<named>\(\?P<\w+>)|(?P<group>\(\?:)|(?P<close>\))|(?P<alternative>\|)"
    r"|(?P<segment>\[\^/\]\*)|(?P<any>\.)|(?P<literal>[A-Za-z0-9_/-]+)|(?P<start>\^)|(?P<end>\$)"
)


def request_uri_pattern(pattern: str) -> str:
    """A Synapse route pattern (Python, matched with `re.match` against the raw path) as
    a PCRE for `$request_uri` (the raw path and, after a `?`, the query string).

    The same regular expression, but for three changes: named groups become plain
    groups (in nginx a named capture would set a variable of that name); the start is
    anchored (`re.match` anchors it, nginx searches); the final `$` also allows a `?`
    after it. A path Synapse matches contains no `?` (its path ends at the first one),
    so every target whose path Synapse matches is matched; the only extra matches are
    targets whose path Synapse's pattern does not take, such as a `?` where the
    MSC3391 prefix has an unescaped dot: the proxy forwards those."""
    out = [] if pattern.startswith("^") else ["^"]
    position = 0
    while position < len(pattern):
        token = _PATTERN_TOKEN.match(pattern, position)
        if token is None:
            raise NginxConfigError(
                f"cannot translate {pattern[position:]!r} of the route pattern {pattern!r} for nginx"
            )
        kind, text = token.lastgroup, token.group()
        if kind == "named":
            text = "(?:"
        elif kind == "start" and position != 0:
            raise NginxConfigError(f"'^' inside the route pattern {pattern!r}")
        elif kind == "end":
            if token.end() != len(pattern):
                raise NginxConfigError(f"'$' inside the route pattern {pattern!r}")
            text = r"(?:\?|$)"
        out.append(text)
        position = token.end()
    # A captured segment is just a segment once it captures nothing.
    return "".join(out).replace("(?:[^/]*)", "[^/]*")


@dataclass(frozen=True)
class Forwarding:
    """How nginx waits for the proxy on the routes of one read-timeout policy."""

    read_timeout: float
    buffering: bool


def forwarding(policy: ReadTimeout, upstream: UpstreamConfig) -> Forwarding:
    """nginx waits for the proxy longer than the proxy waits for the homeserver (its
    policy's bound, `read_timeout` otherwise, plus `sync_timeout_margin`), so that the
    proxy's own 504 reaches the client rather than nginx's. Long-polls and initial syncs
    get the bound of an initial sync (a long-poll's `timeout` up to that is covered) and
    are not buffered: the proxy streams them and nginx passes each byte on as it comes."""
    bound = read_timeout(policy, upstream, {})
    return Forwarding(
        read_timeout=(upstream.read_timeout if bound is None else bound) + upstream.sync_timeout_margin,
        buffering=bound is None,
    )


def internal_locations(
    routes: Sequence[Route], upstream: UpstreamConfig
) -> dict[str, tuple[Forwarding, list[Route]]]:
    """The internal locations by their URI, each with how it forwards and its routes:
    one per distinct `Forwarding`, named after the first policy that has it."""
    found: dict[Forwarding, tuple[str, list[Route]]] = {}
    for route in routes:
        how = forwarding(route.read_timeout, upstream)
        found.setdefault(how, (INTERNAL_PREFIX + route.read_timeout.value, []))[1].append(route)
    return {uri: (how, members) for how, (uri, members) in found.items()}


# --- text ---------------------------------------------------------------------------


def _duration(seconds: float, *, round_up: bool) -> str:
    """nginx's time syntax, to the millisecond."""
    ms = math.ceil(seconds * 1000) if round_up else math.floor(seconds * 1000)
    ms = max(ms, 1)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _indent(text: str, levels: int = 1) -> str:
    pad = "    " * levels
    return "".join(pad + line if line.strip() else line for line in text.splitlines(keepends=True))


def _proxy_addresses(config: Config, options: NginxOptions) -> tuple[Address, ...]:
    if options.proxies:
        return options.proxies
    if config.listen.port == 0:
        raise NginxConfigError("listen.port is 0 (a free port picked at start): give --proxy ADDRESS:PORT")
    # A proxy listening on every address is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.listen.host, config.listen.host)
    return (Address(host, config.listen.port),)


def _upstream_block(
    name: str, what: str, servers: Sequence[Address], keepalive_timeout: str, why: str
) -> str:
    lines = [f"# {what}", f"upstream {name} {{"]
    lines += [f"    server {address};" for address in servers]
    lines += [
        f"    keepalive {KEEPALIVE_CONNECTIONS};",
        f"    keepalive_requests {KEEPALIVE_REQUESTS};",
        f"    keepalive_timeout {keepalive_timeout};  # {why}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def upstreams(config: Config, routes: Sequence[Route], options: NginxOptions) -> str:
    """The half for nginx's `http` context: the upstream blocks and the route map."""
    proxies = _proxy_addresses(config, options)
    url = config.upstream.url
    homeserver = Address(url.raw_host or "", url.port or (443 if url.scheme == "https" else 80))
    proxy_idle = min(NGINX_KEEPALIVE_TIMEOUT, config.proxy.client_timeout * 0.8)
    several = " (round-robin)" if len(proxies) > 1 else ""
    parts = [
        _upstream_block(
            PROXY_UPSTREAM,
            f"msc3391-proxy{several}: the routes it owns.",
            proxies,
            _duration(proxy_idle, round_up=False),
            f"below proxy.client_timeout ({config.proxy.client_timeout:g} s), the proxy's idle limit",
        ),
        _upstream_block(
            HOMESERVER_UPSTREAM,
            "The homeserver: everything else.",
            [homeserver],
            _duration(HOMESERVER_KEEPALIVE_TIMEOUT, round_up=False),
            "below Synapse's idle limit (60 s)",
        ),
        _route_map(config.upstream, routes),
    ]
    return "\n".join(parts)


def _route_map(upstream: UpstreamConfig, routes: Sequence[Route]) -> str:
    lines = [
        "# The routes msc3391-proxy owns, as Synapse matches them: its own patterns (the",
        "# proxy's route table) against the raw request target, the query string allowed",
        "# after them. Decided on $request_uri, which nginx passes on unchanged, never on",
        "# the decoded $uri (where %2F, .. and # change the path). The value is the",
        "# internal location that forwards the request to the proxy. Consecutive routes",
        "# of one location share an entry, their patterns its alternatives: nginx tries",
        "# every entry on every request it does not hand to the proxy.",
        f"map $request_uri {ROUTE_VARIABLE} {{",
        '    default "";',
    ]
    location_of = {
        route.name: uri
        for uri, (_, members) in internal_locations(routes, upstream).items()
        for route in members
    }
    # Runs of the table's order, so the first match is still the table's first match.
    runs: list[tuple[str, list[Route]]] = []
    for route in routes:
        location = location_of[route.name]
        if runs and runs[-1][0] == location:
            runs[-1][1].append(route)
        else:
            runs.append((location, [route]))
    for location, members in runs:
        alternatives = [request_uri_pattern(route.pattern.pattern).removeprefix("^") for route in members]
        pattern = "^" + alternatives[0] if len(alternatives) == 1 else "^(?:" + "|".join(alternatives) + ")"
        lines.append(f'    "~{pattern}" {location};  # {", ".join(route.name for route in members)}')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _headers(options: NginxOptions, connect_timeout: float, read_timeout: float) -> list[str]:
    return [
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";  # upstream keep-alive',
        "proxy_set_header Host $host;",
        "# The address nginx sees, never one the client sent (the edge sets it).",
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        f"client_max_body_size {options.max_body_size};  # the homeserver's max_upload_size",
        f"proxy_connect_timeout {_duration(connect_timeout, round_up=True)};",
        f"proxy_read_timeout {_duration(read_timeout, round_up=True)};",
    ]


def _location(head: str, body: list[str]) -> str:
    return f"location {head} {{\n" + "".join(f"    {line}\n" for line in body) + "}\n"


def locations(config: Config, routes: Sequence[Route], options: NginxOptions) -> str:
    """The half for inside a `server` block: the request-line limit, the rewrite of owned
    requests, one internal location per distinct `Forwarding`, the homeserver location."""
    up = config.upstream
    parts = [
        "# Synapse and the proxy accept request lines of up to 16 KiB (nginx: 8 KiB, then 414).",
        f"large_client_header_buffers {HEADER_BUFFERS};",
        "",
        "# Owned requests, found by the map on the raw target before any location is chosen,",
        "# go to the internal location of their route's timeouts. No location of this server",
        "# sees them, so none can send them to the homeserver.",
        f"if ({ROUTE_VARIABLE}) {{",
        f"    rewrite ^ {ROUTE_VARIABLE} last;",
        "}",
        "",
    ]
    for uri, (how, members) in internal_locations(routes, up).items():
        body = [
            "internal;",
            "# $request_uri: the target as the client sent it (the rewrite changed $uri).",
            f"proxy_pass http://{PROXY_UPSTREAM}$request_uri;",
            *_headers(options, up.connect_timeout, how.read_timeout),
        ]
        if not how.buffering:
            body.append("proxy_buffering off;")
        names = textwrap.wrap(", ".join(route.name for route in members), 86)
        parts.append("".join(f"# {line}\n" for line in names) + _location(f"= {uri}", body))
    scheme = up.url.scheme
    body = [
        "# No URI after the upstream's name: the target goes on as the client sent it.",
        f"proxy_pass {scheme}://{HOMESERVER_UPSTREAM};",
        *_headers(options, up.connect_timeout, up.read_timeout),
    ]
    if scheme == "https":
        body += ["proxy_ssl_server_name on;", f"proxy_ssl_name {up.url.raw_host};"]
    everything_else = _location("~ ^(/_matrix|/_synapse/client)", body)
    parts.append("# Everything else of the client, media and federation APIs.\n" + everything_else)
    return "\n".join(parts)


_HEADER = (
    "# Generated by `msc3391-proxy nginx-config` from the proxy's route table and its\n"
    "# configuration: generate it again after upgrading the proxy or changing its configuration.\n"
)


def render(config: Config, routes: Sequence[Route], options: NginxOptions) -> str:
    """The configuration for `options.section`: `all` is a complete file for nginx's `http`
    context, the others its halves for an operator's own TLS `server` block."""
    if options.section == "upstreams":
        return _HEADER + "# For nginx's http context.\n\n" + upstreams(config, routes, options)
    if options.section == "locations":
        return (
            _HEADER
            + "# For inside the server block of the homeserver's name.\n\n"
            + locations(config, routes, options)
        )
    server = [
        "server {",
        f"    listen {options.listen};",
        f"    server_name {options.server_name};",
        "",
        _indent(locations(config, routes, options)).rstrip("\n"),
        "",
        "    location / {",
        "        return 404;",
        "    }",
        "}",
    ]
    return (
        _HEADER
        + "# For nginx's http context (e.g. /etc/nginx/conf.d/msc3391-proxy.conf).\n\n"
        + upstreams(config, routes, options)
        + "\n"
        + "\n".join(server)
        + "\n"
    )

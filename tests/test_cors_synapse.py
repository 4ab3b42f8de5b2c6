"""CORS: a browser client on another origin (Element Web on its own domain) must be
able to read every answer the proxy builds itself, as it reads the homeserver's.

Synapse sends `Access-Control-Allow-Origin: *` and its companions on every client-API
response, `Cache-Control` on its JSON, and answers `OPTIONS` preflights with 204. The
proxy mirrors what the homeserver actually sends: each case below is asked of Synapse
1.163.2 with its own MSC3391 flag on (the reference) and of the proxy in front of
Synapse with it off, and the CORS headers must be the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from proxy.server import ProxyServer
from rig.synapse import SynapseServer
from tests.conftest import StartProxy
from tests.matrix import MSC3391, V3
from tests.raw_http import RawResponse, raw_request

pytestmark = pytest.mark.synapse

ORIGIN = "https://app.element.example"
KIND = "org.example.cors"
MIRRORED = (
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-expose-headers",
    "cache-control",
)


@dataclass
class Side:
    url: str
    user_id: str
    token: str


@pytest.fixture
async def sides(
    start_proxy: StartProxy,
    synapse: SynapseServer,
    synapse_msc3391: SynapseServer,
    unique_name: Callable[[str], str],
) -> tuple[Side, Side]:
    proxy: ProxyServer = await start_proxy(synapse.url)
    name = unique_name("cors")
    behind = await asyncio.to_thread(synapse.register, name)
    reference = await asyncio.to_thread(synapse_msc3391.register, name)
    return (
        Side(synapse_msc3391.url, reference.user_id, reference.access_token),
        Side(proxy.url, behind.user_id, behind.access_token),
    )


def cors(response: RawResponse) -> dict[str, list[str]]:
    return {name: response.headers.getall(name, []) for name in MIRRORED}


async def ask(side: Side, method: str, path: str, body: bytes = b"", token: str | None = "") -> RawResponse:
    headers = [("Origin", ORIGIN)]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token or side.token}"))
    return await raw_request(side.url, method, path.format(me=quote(side.user_id, safe="")), headers, body)


# (what, method, path, body, token: "" = the user's own, None = none, else that token)
CASES: list[tuple[str, str, str, bytes, str | None]] = [
    ("set", "PUT", V3 + "/user/{me}/account_data/" + KIND, b'{"v": 1}', ""),
    ("read live", "GET", V3 + "/user/{me}/account_data/" + KIND, b"", ""),
    ("delete", "DELETE", MSC3391 + "/user/{me}/account_data/" + KIND, b"", ""),
    ("read deleted", "GET", V3 + "/user/{me}/account_data/" + KIND, b"", ""),
    ("head deleted", "HEAD", V3 + "/user/{me}/account_data/" + KIND, b"", ""),
    ("put {}", "PUT", V3 + "/user/{me}/account_data/" + KIND, b"{}", ""),
    ("another user's", "DELETE", MSC3391 + "/user/%40someone%3Aelse/account_data/" + KIND, b"", ""),
    ("bad room", "PUT", V3 + "/user/{me}/rooms/notaroom/account_data/" + KIND, b"{}", ""),
    ("not json", "PUT", V3 + "/user/{me}/account_data/" + KIND, b"{nope", ""),
    ("push rules", "DELETE", MSC3391 + "/user/{me}/account_data/m.push_rules", b"", ""),
    ("no token", "GET", V3 + "/user/{me}/account_data/" + KIND, b"", None),
    ("unknown token on /sync", "GET", V3 + "/sync?timeout=0", b"", "syt_nobody_has_this"),
]


async def test_every_answer_the_proxy_builds_carries_the_homeservers_cors_headers(
    sides: tuple[Side, Side],
) -> None:
    reference, proxied = sides
    for what, method, path, body, token in CASES:
        direct = await ask(reference, method, path, body, token)
        through = await ask(proxied, method, path, body, token)

        assert through.status == direct.status, what
        assert direct.headers["access-control-allow-origin"] == "*", what  # what a browser needs
        assert cors(through) == cors(direct), what


@pytest.mark.parametrize(("method", "target"), [("CONNECT", "internal:80"), ("OPTIONS", "*")])
async def test_a_target_no_route_can_match_is_answered_with_the_homeservers_cors_headers(
    sides: tuple[Side, Side], method: str, target: str
) -> None:
    """aiohttp's router answers these before any handler runs (Synapse: an HTML 404, or
    a dropped connection): the proxy's Matrix 404 still carries the headers it learnt."""
    _, proxied = sides
    learnt = await ask(proxied, "GET", V3 + "/user/{me}/account_data/" + KIND)  # any call of its own

    through = await raw_request(proxied.url, method, target, [("Origin", ORIGIN)])

    assert learnt.headers["access-control-allow-origin"] == "*"
    assert through.status == 404
    assert through.json()["errcode"] == "M_UNKNOWN"
    assert cors(through) == cors(learnt)


@pytest.mark.parametrize(
    "path",
    [MSC3391 + "/user/{me}/account_data/" + KIND, V3 + "/user/{me}/account_data/" + KIND, V3 + "/sync"],
    ids=["msc3391-delete", "account-data", "sync"],
)
async def test_a_preflight_on_an_owned_path_is_answered_as_the_homeserver_answers_it(
    sides: tuple[Side, Side], path: str
) -> None:
    reference, proxied = sides
    answers = []
    for side in (reference, proxied):
        headers = [
            ("Origin", ORIGIN),
            ("Access-Control-Request-Method", "DELETE"),
            ("Access-Control-Request-Headers", "authorization, content-type"),
        ]
        answers.append(
            await raw_request(side.url, "OPTIONS", path.format(me=quote(side.user_id, safe="")), headers)
        )
    direct, through = answers

    assert direct.status == 204
    assert (through.status, through.body) == (direct.status, direct.body)
    assert cors(through) == cors(direct)

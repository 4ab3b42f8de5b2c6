"""`/versions` through the proxy: the homeserver's answer with `org.matrix.msc3391` added,
asked of the homeserver once per few seconds for callers without credentials, every
time for callers with them (their answer may hold per-user features)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from proxy import versions_cache
from tests.conftest import StartProxy
from tests.fake_homeserver import FakeHomeserver

VERSIONS = "/_matrix/client/versions"
UPSTREAM = r"^/_matrix/client/versions$"


def advertised(versions: dict[str, Any]) -> dict[str, Any]:
    return {**versions, "unstable_features": {**versions["unstable_features"], "org.matrix.msc3391": True}}


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    async with http.get(url, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def test_without_credentials_the_homeserver_is_asked_once_while_its_answer_is_fresh(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fake_hs.url)
    answers = [await get(http, proxy.url + VERSIONS) for _ in range(3)]

    assert len(fake_hs.requests_to(UPSTREAM)) == 1
    for status, body, headers in answers:
        assert status == 200
        assert body == advertised(fake_hs.versions)
        assert headers["Content-Type"].startswith("application/json")
        assert int(headers["Content-Length"]) > 0
        assert "Date" in headers


async def test_with_credentials_every_request_reaches_the_homeserver(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fake_hs.url)
    await get(http, proxy.url + VERSIONS)  # a kept answer exists: it must not be used below
    fake_hs.versions["unstable_features"]["org.example.per_user"] = True

    by_header = await get(http, proxy.url + VERSIONS, headers={"Authorization": "Bearer some-token"})
    by_query = await get(http, proxy.url + VERSIONS + "?access_token=some-token")

    arrived = fake_hs.requests_to(UPSTREAM)
    assert len(arrived) == 3
    assert arrived[1].headers["Authorization"] == "Bearer some-token"
    assert arrived[2].query.getall("access_token") == ["some-token"]
    for status, body, _ in (by_header, by_query):
        assert status == 200
        assert body == advertised(fake_hs.versions)
        assert body["unstable_features"]["org.example.per_user"] is True


async def test_a_stale_answer_is_asked_for_again_and_a_changed_one_shows(
    start_proxy: StartProxy,
    fake_hs: FakeHomeserver,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(versions_cache, "FRESH_FOR", 0.0)  # every kept answer is stale at once
    proxy = await start_proxy(fake_hs.url)
    first = await get(http, proxy.url + VERSIONS)
    fake_hs.versions["versions"] = [*fake_hs.versions["versions"], "v1.99"]
    second = await get(http, proxy.url + VERSIONS)

    assert len(fake_hs.requests_to(UPSTREAM)) == 2
    assert "v1.99" not in first[1]["versions"]
    assert second[1] == advertised(fake_hs.versions)


async def test_an_error_is_passed_on_and_not_kept(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fake_hs.url)
    fake_hs.fault(UPSTREAM, status=503, json={"errcode": "M_UNKNOWN", "error": "busy"}, times=1)

    failed = await get(http, proxy.url + VERSIONS)
    answers = [await get(http, proxy.url + VERSIONS) for _ in range(2)]

    assert failed[:2] == (503, {"errcode": "M_UNKNOWN", "error": "busy"})
    assert len(fake_hs.requests_to(UPSTREAM)) == 2  # the error, then one answer kept
    assert [status for status, _, _ in answers] == [200, 200]


async def test_with_the_feature_off_every_request_is_forwarded_untouched(
    start_proxy: StartProxy, fake_hs: FakeHomeserver, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(fake_hs.url, msc3391=False)
    answers = [await get(http, proxy.url + VERSIONS) for _ in range(2)]

    assert len(fake_hs.requests_to(UPSTREAM)) == 2
    assert [body for _, body, _ in answers] == [fake_hs.versions] * 2

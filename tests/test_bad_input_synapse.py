"""The bad input matrix (`tests/bad_input_cases.py`) against a real Synapse: each row
asked of Synapse 1.163.2 with its own MSC3391 flag on, directly, and of the proxy in
front of Synapse with it off; both must answer the same bytes, and store the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from proxy.server import ProxyServer
from rig.synapse import SynapseServer
from tests.bad_input_cases import (
    ACCEPTED,
    EXISTING,
    KIND,
    MATRIX_ERRORS,
    PROXY_ONLY,
    request_for,
    user_data,
    user_ids,
)
from tests.conftest import StartProxy
from tests.matrix import MSC3391, V3, account_data_path
from tests.raw_http import raw_request
from tests.store_check import snapshot

pytestmark = pytest.mark.synapse


@dataclass
class SynapseSide:
    """One user on two Synapses: the reference (its own MSC3391 flag on, asked directly)
    and the one behind the proxy (flag off), so that both answer every route."""

    reference: SynapseServer
    proxy: ProxyServer
    behind: SynapseServer
    user_id: str
    reference_token: str
    token: str


@pytest.fixture
async def side(
    start_proxy: StartProxy,
    synapse: SynapseServer,
    synapse_msc3391: SynapseServer,
    unique_name: Callable[[str], str],
) -> SynapseSide:
    proxy = await start_proxy(synapse.url)
    name = unique_name("bad")
    account = await asyncio.to_thread(synapse.register, name)
    await asyncio.to_thread(synapse.login, name)  # a second device, so deletes have rows
    reference = await asyncio.to_thread(synapse_msc3391.register, name)
    assert reference.user_id == account.user_id
    return SynapseSide(
        synapse_msc3391, proxy, synapse, account.user_id, reference.access_token, account.access_token
    )


async def synapse_holds(side: SynapseSide, kind: str, room: str | None) -> Any:
    """What the Synapse behind the proxy stores for the type (None: nothing)."""
    headers = [("Authorization", f"Bearer {side.token}")]
    path = account_data_path(V3, side.user_id, kind, room)
    response = await raw_request(side.behind.url, "GET", path, headers)
    return response.json() if response.status == 200 else None


async def seed(side: SynapseSide) -> None:
    fields = user_ids(side.user_id)
    for url, token in ((side.reference.url, side.reference_token), (side.proxy.url, side.token)):
        for kind, content in ((KIND, {"before": True}), (EXISTING, {"old": 1})):
            target, headers = request_for(user_data("me", kind=kind), "token", token, fields)
            response = await raw_request(url, "PUT", target, headers, json.dumps(content).encode())
            assert response.status == 200


async def test_every_matrix_error_row_is_answered_as_synapse_answers_it(side: SynapseSide) -> None:
    await seed(side)
    fields = user_ids(side.user_id)
    for what, method, template, credentials, body, status, errcode in MATRIX_ERRORS:
        if what in PROXY_ONLY:
            continue
        target, headers = request_for(template, credentials, side.reference_token, fields)
        direct = await raw_request(side.reference.url, method, target, headers, body or b"")
        target, headers = request_for(template, credentials, side.token, fields)
        proxied = await raw_request(side.proxy.url, method, target, headers, body or b"")

        assert (direct.status, direct.json()["errcode"]) == (status, errcode), what
        assert (proxied.status, proxied.body) == (direct.status, direct.body), what

    assert await synapse_holds(side, KIND, None) == {"before": True}
    assert await synapse_holds(side, EXISTING, None) == {"old": 1}
    assert snapshot(side.proxy.config.store.path).empty


async def test_odd_but_valid_input_is_stored_by_synapse_as_expected(side: SynapseSide) -> None:
    fields = user_ids(side.user_id)
    for what, method, template, body, status, (kind, room, content) in ACCEPTED:
        target, headers = request_for(user_data("me", kind=EXISTING), "token", side.token, fields)
        assert (await raw_request(side.proxy.url, "PUT", target, headers, b'{"old": 1}')).status == 200
        target, headers = request_for(template, "token", side.token, fields)

        response = await raw_request(side.proxy.url, method, target, headers, body)

        assert (response.status, response.json()) == (status, {}), what
        assert await synapse_holds(side, kind, room) == content, what


async def test_head_of_a_deleted_type_is_404_as_synapse_answers_it(side: SynapseSide) -> None:
    """Synapse serves HEAD with its GET servlet: a deleted type is 404 for both."""
    await seed(side)
    answers = []
    for url, token in ((side.reference.url, side.reference_token), (side.proxy.url, side.token)):
        headers = [("Authorization", f"Bearer {token}")]
        path = f"{V3}/user/{quote(side.user_id, safe='')}/account_data/{KIND}"
        assert (await raw_request(url, "HEAD", path, headers)).status == 200
        delete = f"{MSC3391}/user/{quote(side.user_id, safe='')}/account_data/{KIND}"
        assert (await raw_request(url, "DELETE", delete, headers)).status == 200
        head = await raw_request(url, "HEAD", path, headers)
        get = await raw_request(url, "GET", path, headers)
        answers.append((head.status, head.body, get.status))
    reference, proxied = answers
    assert reference == (404, b"", 404)
    assert proxied == reference


async def test_a_very_long_type_is_set_read_and_deleted_alike(side: SynapseSide) -> None:
    """A type of 5,400 `:` fits Synapse's 16 KiB request line as the client sends it;
    the proxy's own write of the delete must not grow it past that (`%3A` is three
    characters): what can be set and read can be deleted."""
    kind = ":" * 5400
    headers = [("Authorization", f"Bearer {side.token}")]
    path = f"{V3}/user/{side.user_id}/account_data/{kind}"

    assert (await raw_request(side.proxy.url, "PUT", path, headers, b'{"long": true}')).status == 200
    got = await raw_request(side.proxy.url, "GET", path, headers)
    assert (got.status, got.json()) == (200, {"long": True})
    delete = f"{MSC3391}/user/{side.user_id}/account_data/{kind}"
    deleted = await raw_request(side.proxy.url, "DELETE", delete, headers)
    assert (deleted.status, deleted.json()) == (200, {})

    assert (await raw_request(side.proxy.url, "GET", path, headers)).status == 404
    assert await synapse_holds(side, kind, None) == {}
    rows = snapshot(side.proxy.config.store.path).rows_of(side.user_id)
    assert [(room, k) for room, k, _ in rows] == [(None, kind)]  # the second device's row

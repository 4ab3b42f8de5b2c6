"""Hostile and odd requests (issue 14): request targets, content codings, malformed HTTP,
user data in log templates, trickled bodies.

Each behaviour mirrors what Synapse 1.163.2 does with the same bytes where Synapse
answers at all; where it is the proxy's own (an absolute-form target must never pick the
upstream host), the answer is a Matrix error and nothing reaches any upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from tests.conftest import StartProxy
from tests.raw_http import raw_request
from tests.store_check import snapshot
from tests.synapse_rig import SynapseServer

V3 = "/_matrix/client/v3"
MSC3391 = "/_matrix/client/unstable/org.matrix.msc3391"


@dataclass
class Someone:
    user_id: str
    token: str
    second_token: str

    @property
    def auth(self) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {self.token}"), ("Content-Type", "application/json")]

    def data(self, kind: str, prefix: str = V3) -> str:
        """The account data target of `kind`, exactly as given (not encoded)."""
        return f"{prefix}/user/{quote(self.user_id, safe='')}/account_data/{kind}"


async def someone_on(synapse: SynapseServer, name: str) -> Someone:
    account = await asyncio.to_thread(synapse.register, name)
    second = await asyncio.to_thread(synapse.login, name)  # a second device: deletes get rows
    return Someone(account.user_id, account.access_token, second.access_token)


# --- A: a fragment in the request target -------------------------------------------------------


@pytest.mark.synapse
async def test_a_hash_in_the_type_reaches_synapse_as_part_of_the_type(
    start_proxy: StartProxy, synapse: SynapseServer, unique_name: Callable[[str], str]
) -> None:
    """Twisted keeps `#x` in the path (only `?` splits a target), so Synapse stores the
    type `T#x`; the proxy routes on `T#x` too and must send that very target upstream,
    not `T` (yarl reads `#x` as a fragment and drops it when sending)."""
    proxy = await start_proxy(synapse.url)
    me = await someone_on(synapse, unique_name("hash"))

    # T is live; T#x is written through the proxy, with a query after the `#`.
    assert (await raw_request(proxy.url, "PUT", me.data("org.example.t"), me.auth, b'{"t": 1}')).status == 200
    written = await raw_request(
        proxy.url, "PUT", me.data("org.example.t#x") + "?dummy=1", me.auth, b'{"hash": 1}'
    )
    assert written.status == 200, written.body

    direct = await raw_request(synapse.url, "GET", me.data("org.example.t%23x"), me.auth)
    assert (direct.status, direct.json()) == (200, {"hash": 1})
    direct = await raw_request(synapse.url, "GET", me.data("org.example.t"), me.auth)
    assert (direct.status, direct.json()) == (200, {"t": 1})
    # Read back through the proxy, raw `#` and all: the same type.
    through = await raw_request(proxy.url, "GET", me.data("org.example.t#x"), me.auth)
    assert (through.status, through.json()) == (200, {"hash": 1})

    # A delete of T#x (the MSC3391 DELETE, with the raw `#`) deletes T#x and leaves T alone.
    deleted = await raw_request(proxy.url, "DELETE", me.data("org.example.t#x", MSC3391), me.auth)
    assert (deleted.status, deleted.json()) == (200, {})
    direct = await raw_request(synapse.url, "GET", me.data("org.example.t%23x"), me.auth)
    assert (direct.status, direct.json()) == (200, {})
    direct = await raw_request(synapse.url, "GET", me.data("org.example.t"), me.auth)
    assert (direct.status, direct.json()) == (200, {"t": 1})
    through = await raw_request(proxy.url, "GET", me.data("org.example.t"), me.auth)
    assert (through.status, through.json()) == (200, {"t": 1})
    through = await raw_request(proxy.url, "GET", me.data("org.example.t#x"), me.auth)
    assert through.status == 404
    assert snapshot(proxy.config.store.path).tombstones_of(me.user_id) == {(None, "org.example.t#x", "done")}

"""Hostile and odd requests (issue 14) against a real Synapse: a `#` in the request
target, and owned writes whose body carries a Content-Encoding. The rest, in front of
the fake homeserver, is in `tests/test_hostile_requests.py`.

Each behaviour mirrors what Synapse 1.163.2 does with the same bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from rig.synapse import SynapseServer
from tests.conftest import StartProxy
from tests.matrix import MSC3391, V3
from tests.raw_http import raw_request
from tests.store_check import snapshot

pytestmark = pytest.mark.synapse


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


# --- C: request bodies with a Content-Encoding -----------------------------------------------------


# (what, Content-Encoding, body): owned writes whose body is not what it says it is.
ENCODED_WRITES = [
    ("gzip {}", "gzip", gzip.compress(b"{}", mtime=0)),
    ("gzip of an object", "gzip", gzip.compress(b'{"a": 1}', mtime=0)),
    ("gzip declared over plain {}", "gzip", b"{}"),
    ("gzip declared over a plain object", "gzip", b'{"plain": 1}'),
    ("deflate declared over a plain object", "deflate", b'{"plain": 2}'),
    ("br declared over plain {}", "br", b"{}"),
]


async def test_an_owned_write_with_a_content_encoding_is_answered_as_synapse_answers_it(
    start_proxy: StartProxy,
    synapse: SynapseServer,
    synapse_msc3391: SynapseServer,
    unique_name: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Synapse reads the body as it came: gzip bytes are `400 M_NOT_JSON` (so a
    compressed `{}` deletes nothing), a plain body under any Content-Encoding is plain
    JSON. The proxy read the decoded body (a compressed `{}` deleted the type) or failed
    to decode a plain one (500, with a traceback in its log)."""
    caplog.set_level(logging.INFO)
    proxy = await start_proxy(synapse.url)
    name = unique_name("coding")
    me = await someone_on(synapse, name)
    reference = await someone_on(synapse_msc3391, name)
    for what, coding, body in ENCODED_WRITES:
        kind = f"org.example.coded.{ENCODED_WRITES.index((what, coding, body))}"
        for base, who in ((synapse_msc3391.url, reference), (proxy.url, me)):
            seeded = await raw_request(base, "PUT", who.data(kind), who.auth, b'{"before": 1}')
            assert seeded.status == 200
        headers = [("Content-Encoding", coding)]

        direct = await raw_request(
            synapse_msc3391.url, "PUT", reference.data(kind), reference.auth + headers, body
        )
        proxied = await raw_request(proxy.url, "PUT", me.data(kind), me.auth + headers, body)

        assert (proxied.status, proxied.body) == (direct.status, direct.body), what
        # What the type holds now, as a client of each sees it (the homeserver behind the
        # proxy stores `{}` for a deleted type; the proxy answers 404 for it, as Synapse does).
        stored = await raw_request(proxy.url, "GET", me.data(kind), me.auth)
        reference_stored = await raw_request(synapse_msc3391.url, "GET", reference.data(kind), reference.auth)
        assert (stored.status, stored.body) == (reference_stored.status, reference_stored.body), what
    # What Synapse answered, for the record: gzip bytes are not JSON, plain bytes are.
    assert direct.status == 200
    assert snapshot(proxy.config.store.path).tombstones_of(me.user_id) == {
        (None, "org.example.coded.2", "done"),
        (None, "org.example.coded.5", "done"),
    }
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text

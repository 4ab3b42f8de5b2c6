"""The differential test: one scripted scenario, run twice, compared step by step.

(a) `native`: real Synapse 1.163.2 with its own `experimental_features.msc3391_enabled`,
    the devices talking to it directly (no proxy);
(b) `proxied`: the proxy (in process, MSC3391 on) in front of Synapse with the flag off.

A scenario is one function `scenario(base_url, devices, probe=None)` returning the list
of observations `(step, normalized result)`: status code and JSON body of every request,
and for every sync what it says about the account data types the scenario uses (global
and per room, `{}` entries included; room IDs replaced by scenario-local names; tokens,
event IDs and types the scenario never touches, such as `m.push_rules`, left out).

Both lists must be equal, except where a `Difference` in `MAIN_DIFFERENCES` /
`LEFT_ROOM_DIFFERENCES` says otherwise: each names the steps it affects, says why, and
is an edit that turns the proxied observation into the native one. An edit that no
longer changes anything fails the test, so the list cannot go stale. Three entries are
the deliberate differences README.md documents. The proxy's own per-device state, which
Synapse does not have, is checked separately through `probe` (the store's
`account_data_unsynced_deletes` rows after each step).
"""

from __future__ import annotations

import asyncio
import json
import pprint
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from proxy.app import CONTEXT
from proxy.server import ProxyServer
from proxy.store import DeletionStore
from rig.synapse import SynapseServer
from tests.matrix import MSC3391, Device, Reply, account_data_path
from tests.sliding_client import Connection

pytestmark = pytest.mark.synapse

# The account data types the scenarios use; every other type in a sync is ignored.
DELETED = "org.example.diff.deleted"  # global, removed with DELETE, later set again
EMPTIED = "org.example.diff.emptied"  # global, removed with PUT {}, later DELETEd once more
KEPT = "org.example.diff.kept"  # global, never removed
NEVER = "org.example.diff.never"  # global, never set, DELETEd
FILTERED = "org.example.diff.filtered"  # global, DELETEd while B's sync filter hides it
ROOM_DELETED = "org.example.diff.room_deleted"  # room, removed with DELETE
ROOM_EMPTIED = "org.example.diff.room_emptied"  # room, removed with PUT {}
ROOM_KEPT = "org.example.diff.room_kept"  # room, never removed
LEFT_DELETED = "org.example.diff.left_deleted"  # room left by the user, removed with DELETE
LEFT_EMPTIED = "org.example.diff.left_emptied"  # room left by the user, removed with PUT {}
TYPES = frozenset(
    {
        DELETED,
        EMPTIED,
        KEPT,
        NEVER,
        FILTERED,
        ROOM_DELETED,
        ROOM_EMPTIED,
        ROOM_KEPT,
        LEFT_DELETED,
        LEFT_EMPTIED,
    }
)

OTHER_USER = "@someone-else:localhost"
ROOM_SECTIONS = ("join", "leave")

Observation = tuple[str, Any]
Probe = Callable[[str, "Recorder"], Awaitable[None]]
Scenario = Callable[[str, dict[str, Device], Probe | None], Awaitable[list[Observation]]]


# --- normalizing what a step returned ---------------------------------------------------


def _entry_order(entry: tuple[str, Any]) -> tuple[str, str]:
    return entry[0], json.dumps(entry[1], sort_keys=True)


def _sorted_entries(events: Iterable[Any]) -> list[tuple[str, Any]]:
    """`(type, content)` of the scenario's types, in a fixed order (a homeserver's order
    of account data entries means nothing)."""
    picked = [(e["type"], e.get("content")) for e in events if isinstance(e, dict) and e.get("type") in TYPES]
    return sorted(picked, key=_entry_order)


def _events(container: Any) -> list[Any]:
    account_data = container.get("account_data") if isinstance(container, dict) else None
    events = account_data.get("events") if isinstance(account_data, dict) else None
    return events if isinstance(events, list) else []


@dataclass
class Recorder:
    """Runs a scenario's requests and keeps what they returned, normalized."""

    base_url: str
    devices: dict[str, Device]
    probe: Probe | None = None
    observations: list[Observation] = field(default_factory=list)
    rooms: dict[str, str] = field(default_factory=dict)

    @property
    def user_id(self) -> str:
        return next(iter(self.devices.values())).user_id

    def room_name(self, room_id: str) -> str:
        """The scenario's name of a room: the one given at creation, or `unknown-N`."""
        return self.rooms.setdefault(room_id, f"unknown-{len(self.rooms)}")

    def device_name(self, device_id: str) -> str:
        return next((name for name, d in self.devices.items() if d.device_id == device_id), device_id)

    async def note(self, step: str, value: Any) -> None:
        assert step not in {s for s, _ in self.observations}, f"step names must be unique: {step!r}"
        self.observations.append((step, value))
        if self.probe is not None:
            await self.probe(step, self)

    # --- steps ---

    async def reply(self, step: str, request: Awaitable[Reply]) -> Reply:
        reply = await request
        await self.note(step, {"status": reply.status, "body": reply.body})
        return reply

    async def create_room(self, step: str, device: Device, name: str) -> str:
        reply = await device.request("POST", "/_matrix/client/v3/createRoom", {})
        assert reply.status == 200, reply.body
        self.rooms[reply.body["room_id"]] = name
        await self.note(step, {"status": reply.status})
        return reply.body["room_id"]

    async def sync(self, step: str, device: Device, **options: Any) -> dict[str, Any]:
        """An incremental sync (an initial one with `initial=True`): the scenario's
        account data entries, by place."""
        body = await device.sync(**options)
        view = self.account_data(body)
        if options.get("initial"):
            view = {
                "account_data": view,
                "account_data.events is a list": isinstance(body.get("account_data", {}).get("events"), list),
                "{} entries of any type": self.empty_entries(body),
            }
        await self.note(step, view)
        return body

    def account_data(self, body: dict[str, Any]) -> dict[str, list[tuple[str, Any]]]:
        view: dict[str, list[tuple[str, Any]]] = {}
        if entries := _sorted_entries(_events(body)):
            view["global"] = entries
        for section in ROOM_SECTIONS:
            for room_id, room in body.get("rooms", {}).get(section, {}).items():
                if entries := _sorted_entries(_events(room)):
                    view[f"{section} {self.room_name(room_id)}"] = entries
        return view

    def empty_entries(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        found = [("global", e.get("type")) for e in _events(body) if e.get("content") == {}]
        for section in ROOM_SECTIONS:
            for room_id, room in body.get("rooms", {}).get(section, {}).items():
                place = f"{section} {self.room_name(room_id)}"
                found += [(place, e.get("type")) for e in _events(room) if e.get("content") == {}]
        return sorted(found)

    async def legacy_initial_sync(self, step: str, device: Device, room_id: str | None = None) -> None:
        """`GET /initialSync` or `/rooms/{roomId}/initialSync`: account data lists hold
        the events directly (`account_data`, `rooms[i].account_data`)."""
        path = "/_matrix/client/v3" + (f"/rooms/{room_id}" if room_id is not None else "") + "/initialSync"
        reply = await device.request("GET", path)
        assert reply.status == 200, reply.body
        body = reply.body
        view: dict[str, list[tuple[str, Any]]] = {}
        rooms = [body] if room_id is not None else body.get("rooms", [])
        if room_id is None and (entries := _sorted_entries(body.get("account_data", []))):
            view["global"] = entries
        for room in rooms:
            if entries := _sorted_entries(room.get("account_data", [])):
                view[f"room {self.room_name(room['room_id'])}"] = entries
        await self.note(step, view)

    async def sliding(self, step: str, connection: Connection, **options: Any) -> dict[str, Any]:
        """A sliding sync request of `connection`: the scenario's entries in its account
        data extension, by place (`{}` entries of any type, for a first response)."""
        body = await connection.sync(**options)
        extension = body.get("extensions", {}).get("account_data", {})
        view: dict[str, Any] = {}
        if entries := _sorted_entries(extension.get("global", [])):
            view["global"] = entries
        for room_id, events in extension.get("rooms", {}).items():
            if entries := _sorted_entries(events):
                view[f"room {self.room_name(room_id)}"] = entries
        if options.get("first"):
            view["{} entries of any type"] = sorted(
                (place, e.get("type"))
                for place, events in [("global", extension.get("global", []))]
                + [(f"room {self.room_name(r)}", ev) for r, ev in extension.get("rooms", {}).items()]
                for e in events
                if e.get("content") == {}
            )
        await self.note(step, view)
        return body

    async def versions(self, step: str) -> None:
        session = next(iter(self.devices.values())).session
        async with session.get(self.base_url + "/_matrix/client/versions") as response:
            await self.note(step, {"status": response.status, "body": await response.json()})


def _other_user_path(kind: str, room_id: str | None = None, prefix: str = MSC3391) -> str:
    return account_data_path(prefix, OTHER_USER, kind, room_id)


# --- the scenarios ----------------------------------------------------------------------


async def main_scenario(
    base_url: str, devices: dict[str, Device], probe: Probe | None = None
) -> list[Observation]:
    """One user, devices A, B and C. B syncs regularly; C is offline until late."""
    r = Recorder(base_url, devices, probe)
    a, b, c = devices["A"], devices["B"], devices["C"]

    for name, device in devices.items():
        await r.sync(f"{name}: initial sync", device, initial=True)
    room = await r.create_room("A: creates room1", a, "room1")

    for kind in (DELETED, EMPTIED, KEPT, FILTERED):
        await r.reply(f"A: PUT {kind}", a.put(kind, {"v": 1, "kind": kind}))
    for kind in (ROOM_DELETED, ROOM_EMPTIED, ROOM_KEPT):
        await r.reply(f"A: PUT room1 {kind}", a.put(kind, {"v": 1, "kind": kind}, room))
    await r.sync("A: sync after setting", a)
    await r.sync("B: sync after setting", b)
    for kind in (DELETED, EMPTIED, KEPT):
        await r.reply(f"B: GET {kind} while set", b.get(kind))
    for kind in (ROOM_DELETED, ROOM_EMPTIED, ROOM_KEPT):
        await r.reply(f"B: GET room1 {kind} while set", b.get(kind, room))

    await r.reply(f"A: DELETE {DELETED}", a.delete(DELETED))
    await r.reply(f"A: PUT {{}} {EMPTIED}", a.put(EMPTIED, {}))
    await r.reply(f"A: DELETE room1 {ROOM_DELETED}", a.delete(ROOM_DELETED, room))
    await r.reply(f"A: PUT {{}} room1 {ROOM_EMPTIED}", a.put(ROOM_EMPTIED, {}, room))
    await r.sync("A: sync after deleting", a)
    # A sync whose response B then drops (its token is not kept), with a room filter.
    room_filter = {"room": {"rooms": [room]}}
    await r.sync("B: sync with a room.rooms filter, dropped", b, filter=room_filter, advance=False)
    await r.sync("B: sync after deleting", b)
    for kind in (DELETED, EMPTIED, KEPT):
        await r.reply(f"B: GET {kind} after deleting", b.get(kind))
    for kind in (ROOM_DELETED, ROOM_EMPTIED, ROOM_KEPT):
        await r.reply(f"B: GET room1 {kind} after deleting", b.get(kind, room))

    await r.reply(f"A: DELETE never-set {NEVER}", a.delete(NEVER))
    await r.reply(f"A: DELETE room1 never-set {NEVER}", a.delete(NEVER, room))
    await r.reply(f"B: GET never-set {NEVER}", b.get(NEVER))
    await r.reply("A: DELETE m.fully_read", a.delete("m.fully_read"))
    await r.reply("A: DELETE m.push_rules", a.delete("m.push_rules"))
    await r.reply("A: DELETE room1 m.fully_read", a.delete("m.fully_read", room))
    await r.reply("A: DELETE room1 m.push_rules", a.delete("m.push_rules", room))
    await r.reply("A: DELETE for another user", a.request("DELETE", _other_user_path(KEPT)))
    await r.reply("A: DELETE room1 for another user", a.request("DELETE", _other_user_path(KEPT, room)))
    await r.reply(
        "A: DELETE in an invalid room ID",
        a.request("DELETE", account_data_path(MSC3391, a.user_id, KEPT, "notaroom")),
    )
    await r.reply(
        "A: PUT {} for another user",
        a.request("PUT", _other_user_path(KEPT, prefix="/_matrix/client/v3"), {}),
    )
    await r.reply("A: PUT {} m.push_rules", a.put("m.push_rules", {}))
    await r.reply(
        "A: GET for another user", a.request("GET", _other_user_path(KEPT, prefix="/_matrix/client/v3"))
    )
    await r.reply(f"A: DELETE already-deleted {EMPTIED}", a.delete(EMPTIED))
    await r.sync("A: sync after deleting nothing", a)
    await r.sync("A: next sync", a)

    await r.reply(f"A: PUT {DELETED} again", a.put(DELETED, {"v": 2, "kind": DELETED}))
    await r.sync("B: sync after setting again", b)
    await r.reply(f"B: GET {DELETED} set again", b.get(DELETED))

    # B's filter hides a type while it is deleted; then B drops the filter.
    await r.reply(f"A: DELETE {FILTERED}", a.delete(FILTERED))
    hide = {"account_data": {"not_types": [FILTERED]}}
    await r.sync(f"B: sync with a filter hiding {FILTERED}", b, filter=hide)
    await r.sync("B: sync without that filter", b)
    await r.sync("B: quiet sync", b)

    await r.sync("C: sync from its old token", c)
    await r.sync("C: next sync", c)

    for name, device in devices.items():
        await r.sync(f"{name}: fresh initial sync", device, initial=True)
    await r.legacy_initial_sync("A: legacy /initialSync", a)
    await r.legacy_initial_sync("A: legacy /rooms/room1/initialSync", a, room)
    await r.versions("/versions without a token")
    await r.reply("A: /versions with a token", a.request("GET", "/_matrix/client/versions"))
    return r.observations


async def left_room_scenario(
    base_url: str, devices: dict[str, Device], probe: Probe | None = None
) -> list[Observation]:
    """Room account data of a room the user has left: no membership check on writes."""
    r = Recorder(base_url, devices, probe)
    a, b = devices["A"], devices["B"]

    for name, device in devices.items():
        await r.sync(f"{name}: initial sync", device, initial=True)
    room = await r.create_room("A: creates room1", a, "room1")
    for kind in (LEFT_DELETED, LEFT_EMPTIED):
        await r.reply(f"A: PUT room1 {kind}", a.put(kind, {"v": 1}, room))
    await r.sync("B: sync after setting", b)
    await r.reply("A: leaves room1", a.request("POST", f"/_matrix/client/v3/rooms/{room}/leave", {}))
    await r.sync("B: sync after leaving", b)

    await r.reply(f"A: DELETE room1 {LEFT_DELETED}", a.delete(LEFT_DELETED, room))
    await r.reply(f"A: PUT {{}} room1 {LEFT_EMPTIED}", a.put(LEFT_EMPTIED, {}, room))
    await r.sync("B: sync after deleting", b)
    await r.reply(f"B: GET room1 {LEFT_DELETED}", b.get(LEFT_DELETED, room))
    include_leave = {"room": {"include_leave": True}}
    await r.sync("B: fresh initial sync with include_leave", b, initial=True, filter=include_leave)
    await r.reply(f"B: GET room1 {LEFT_EMPTIED}", b.get(LEFT_EMPTIED, room))

    await r.reply(f"A: PUT room1 {LEFT_DELETED} again", a.put(LEFT_DELETED, {"v": 2}, room))
    await r.reply(f"B: GET room1 {LEFT_DELETED} set again", b.get(LEFT_DELETED, room))
    await r.sync("B: sync after setting again", b)
    await r.sync("A: fresh initial sync with include_leave", a, initial=True, filter=include_leave)
    return r.observations


async def sliding_scenario(
    base_url: str, devices: dict[str, Device], probe: Probe | None = None
) -> list[Observation]:
    """One user: A writes (over /sync), B follows over sliding sync, C's sliding sync
    connection is offline through the deletes, and B later opens a fresh connection."""
    r = Recorder(base_url, devices, probe)
    a = devices["A"]
    b, c = Connection(devices["B"]), Connection(devices["C"])
    await r.sliding("B: first response", b, first=True)
    await r.sliding("C: first response", c, first=True)
    room = await r.create_room("A: creates room1", a, "room1")
    for kind in (DELETED, EMPTIED, KEPT):
        await r.reply(f"A: PUT {kind}", a.put(kind, {"v": 1, "kind": kind}))
    for kind in (ROOM_DELETED, ROOM_EMPTIED, ROOM_KEPT):
        await r.reply(f"A: PUT room1 {kind}", a.put(kind, {"v": 1, "kind": kind}, room))
    await r.sliding("B: after setting", b)
    await r.reply(f"A: DELETE {DELETED}", a.delete(DELETED))
    await r.reply(f"A: PUT {{}} {EMPTIED}", a.put(EMPTIED, {}))
    await r.reply(f"A: DELETE room1 {ROOM_DELETED}", a.delete(ROOM_DELETED, room))
    await r.reply(f"A: PUT {{}} room1 {ROOM_EMPTIED}", a.put(ROOM_EMPTIED, {}, room))
    await r.sliding("B: after deleting", b)
    await r.sliding("B: next", b)
    await r.sliding("C: from its old position", c)
    await r.sliding("C: next", c)
    await r.sliding(
        "B: a fresh connection's first response", Connection(devices["B"], conn_id="fresh"), first=True
    )
    await r.reply(f"B: GET room1 {ROOM_DELETED}", devices["B"].get(ROOM_DELETED, room))
    return r.observations


# --- deliberate differences -------------------------------------------------------------

Edit = Callable[[Any], Any]


@dataclass(frozen=True)
class Difference:
    """Where the proxied run differs from the native one on purpose: for each affected
    step, an edit that turns the proxied observation into the native one."""

    name: str
    reason: str
    edits: dict[str, Edit]


Entry = tuple[str, str, Any]  # (place, type, content)


def edit_entries(*, drop: Iterable[Entry] = (), add: Iterable[Entry] = ()) -> Edit:
    """Remove entries from / add entries to an account data view (place -> entries).
    Every entry dropped must be there, every entry added must be missing."""

    def edit(view: dict[str, list[tuple[str, Any]]]) -> dict[str, list[tuple[str, Any]]]:
        out = {place: list(items) for place, items in view.items()}
        for place, kind, content in drop:
            assert (kind, content) in out.get(place, []), f"{(place, kind, content)} not in {view}"
            out[place].remove((kind, content))
            if not out[place]:
                del out[place]
        for place, kind, content in add:
            assert (kind, content) not in out.get(place, []), f"{(place, kind, content)} already in {view}"
            out[place] = sorted([*out.get(place, []), (kind, content)], key=_entry_order)
        return out

    return edit


# README, "Behaviour, and where it differs from Synapse's own MSC3391": documented.
PER_DEVICE_DELIVERY = Difference(
    "per-device delivery tracking",
    "Synapse relies on the since token: a delete that happened while the device's filter "
    "hid the type is never sent. The proxy keeps a row until the device has provably "
    "seen the delete and injects {} into the first sync that lets the type through.",
    {"B: sync without that filter": edit_entries(drop=[("global", FILTERED, {})])},
)
ROOM_FILTER_INJECTION = Difference(
    "room filters on injected entries",
    "Synapse drops all room account data from a sync whose filter sets room.rooms; the "
    "proxy injects the device's pending room deletes into the rooms the filter allows.",
    {
        "B: sync with a room.rooms filter, dropped": edit_entries(
            drop=[("join room1", ROOM_DELETED, {}), ("join room1", ROOM_EMPTIED, {})]
        )
    },
)
LEGACY_ROOM_INITIAL_SYNC = Difference(
    "/rooms/{roomId}/initialSync",
    "Synapse leaks {} entries there (it reads the room's account data unfiltered); the "
    "proxy applies the initial-sync rule of MSC3391 and strips them.",
    {
        "A: legacy /rooms/room1/initialSync": edit_entries(
            add=[("room room1", ROOM_DELETED, {}), ("room room1", ROOM_EMPTIED, {})]
        )
    },
)

DELETING_DEVICE_ECHO = Difference(
    "a delete that changes nothing is answered on the deleting device's sync",
    "Synapse writes nothing for a type never set or deleted already, so a client that "
    "waits for its deletion to come back over /sync (matrix-js-sdk 43) waits for ever; "
    "the proxy tells the deleting device, once, and no other device again.",
    {
        "A: sync after deleting nothing": edit_entries(
            drop=[("global", NEVER, {}), ("join room1", NEVER, {}), ("global", EMPTIED, {})]
        )
    },
)

MAIN_DIFFERENCES = (
    PER_DEVICE_DELIVERY,
    ROOM_FILTER_INJECTION,
    LEGACY_ROOM_INITIAL_SYNC,
    DELETING_DEVICE_ECHO,
)
LEFT_ROOM_DIFFERENCES: tuple[Difference, ...] = ()

SLIDING_FIRST_RESPONSE = Difference(
    "a sliding sync connection's first response carries no deletion",
    "Synapse (its own flag on) filters global {} entries from a new connection's first "
    "response but sends the room ones: its extension reads a room's account data "
    "unfiltered when it sends the room for the first time. The proxy strips them.",
    {
        "B: a fresh connection's first response": lambda view: {
            **view,
            "room room1": sorted(
                [*view.get("room room1", []), (ROOM_DELETED, {}), (ROOM_EMPTIED, {})], key=_entry_order
            ),
            "{} entries of any type": [("room room1", ROOM_DELETED), ("room room1", ROOM_EMPTIED)],
        }
    },
)
SLIDING_DIFFERENCES = (SLIDING_FIRST_RESPONSE,)


def assert_equivalent(
    native: list[Observation], proxied: list[Observation], differences: Iterable[Difference]
) -> None:
    assert [s for s, _ in proxied] == [s for s, _ in native], "both runs must take the same steps"
    adjusted = dict(proxied)
    for difference in differences:
        for step, edit in difference.edits.items():
            assert step in adjusted, f"{difference.name}: no step {step!r}"
            edited = edit(adjusted[step])
            assert edited != adjusted[step], f"{difference.name}: step {step!r} no longer differs"
            adjusted[step] = edited
    mismatches = [
        f"step {step!r}\n  native:  {pprint.pformat(value)}\n  proxied: {pprint.pformat(adjusted[step])}"
        for step, value in native
        if adjusted[step] != value
    ]
    assert not mismatches, "the proxy differs from Synapse's own MSC3391:\n" + "\n".join(mismatches)


# --- running a scenario on both setups -----------------------------------------------------


async def make_devices(
    server: SynapseServer, base_url: str, http: aiohttp.ClientSession, name: str, names: Iterable[str]
) -> dict[str, Device]:
    """A new user on `server`, one device per name (registered and logged in at the
    homeserver itself), each talking to `base_url`."""
    devices: dict[str, Device] = {}
    for label in names:
        login = server.register if not devices else server.login
        account = await asyncio.to_thread(login, name)
        devices[label] = Device(http, base_url, account)
    return devices


@dataclass
class RowProbe:
    """After every step of the proxied run: the store's unsynced rows, as
    (room name or None, type, device name)."""

    store: DeletionStore
    rows: dict[str, set[tuple[str | None, str, str]]] = field(default_factory=dict)

    async def __call__(self, step: str, recorder: Recorder) -> None:
        self.rows[step] = {
            (
                None if row.room_id is None else recorder.room_name(row.room_id),
                row.account_data_type,
                recorder.device_name(row.device_id),
            )
            for row in await self.store.unsynced_rows(recorder.user_id)
        }


@pytest.fixture
async def proxy(start_proxy: Callable[..., Awaitable[ProxyServer]], synapse: SynapseServer) -> ProxyServer:
    return await start_proxy(synapse.url, msc3391=True)


Runs = tuple[list[Observation], list[Observation], RowProbe]
RunBoth = Callable[[Scenario, tuple[str, ...]], Awaitable[Runs]]


@pytest.fixture
def run_both(
    synapse: SynapseServer,
    synapse_msc3391: SynapseServer,
    proxy: ProxyServer,
    http: aiohttp.ClientSession,
    unique_name: Callable[[str], str],
) -> RunBoth:
    """`await run_both(scenario, device_labels)`: the scenario with a new user on each
    setup, both at once; returns (native, proxied, the proxied run's row probe)."""

    async def run(scenario: Scenario, labels: tuple[str, ...]) -> Runs:
        native_devices = await make_devices(
            synapse_msc3391, synapse_msc3391.url, http, unique_name("diff"), labels
        )
        proxied_devices = await make_devices(synapse, proxy.url, http, unique_name("diff"), labels)
        probe = RowProbe(proxy.app[CONTEXT].store)
        native, proxied = await asyncio.gather(
            scenario(synapse_msc3391.url, native_devices, None),
            scenario(proxy.url, proxied_devices, probe),
        )
        return native, proxied, probe

    return run


# --- the tests ---------------------------------------------------------------------------


async def test_main_scenario_matches_synapse(run_both: RunBoth) -> None:
    native, proxied, probe = await run_both(main_scenario, ("A", "B", "C"))
    assert_equivalent(native, proxied, MAIN_DIFFERENCES)

    # A few fixed points of the native run, so that "equal" cannot mean "equally broken".
    observed = dict(native)
    assert observed["B: sync after deleting"] == {
        "global": [(DELETED, {}), (EMPTIED, {})],
        "join room1": [(ROOM_DELETED, {}), (ROOM_EMPTIED, {})],
    }
    assert observed[f"B: GET {DELETED} after deleting"] == {
        "status": 404,
        "body": {"errcode": "M_NOT_FOUND", "error": "Account data not found"},
    }
    assert observed["B: fresh initial sync"]["{} entries of any type"] == []
    assert observed["B: fresh initial sync"]["account_data.events is a list"] is True
    for step in ("/versions without a token", "A: /versions with a token"):
        assert observed[step]["body"]["unstable_features"]["org.matrix.msc3391"] is True

    # The proxy's own state: who has not seen which delete, step by step.
    rows = probe.rows
    deleted = {(None, DELETED), (None, EMPTIED), ("room1", ROOM_DELETED), ("room1", ROOM_EMPTIED)}
    assert rows[f"A: PUT {{}} room1 {ROOM_EMPTIED}"] == {(r, t, d) for r, t in deleted for d in "BC"}
    # B's sync carried them; only B's next request acknowledges (here: its GETs' 404s).
    assert rows["B: sync after deleting"] == {(r, t, d) for r, t in deleted for d in "BC"}
    assert rows[f"B: GET room1 {ROOM_KEPT} after deleting"] == {(r, t, "C") for r, t in deleted}
    # A delete that deletes nothing (never set, or deleted already) tells no other
    # device again, as in Synapse; the deleting device gets a row of its own, which its
    # next sync delivers and the one after proves.
    before = rows[f"B: GET room1 {ROOM_KEPT} after deleting"]
    assert rows[f"A: DELETE never-set {NEVER}"] == before | {(None, NEVER, "A")}
    echoes = {(None, NEVER, "A"), ("room1", NEVER, "A"), (None, EMPTIED, "A")}
    assert rows[f"A: DELETE already-deleted {EMPTIED}"] == before | echoes
    assert rows["A: sync after deleting nothing"] == before | echoes
    assert rows["A: next sync"] == before
    # Setting a type again drops its rows.
    assert not any(t == DELETED for _, t, _ in rows[f"A: PUT {DELETED} again"])
    assert (None, FILTERED, "B") in rows[f"B: sync with a filter hiding {FILTERED}"]
    assert (None, FILTERED, "B") in rows["B: sync without that filter"]
    assert {d for _, _, d in rows["B: quiet sync"]} == {"C"}
    assert rows["C: next sync"] == set()


async def test_left_room_scenario_matches_synapse(run_both: RunBoth) -> None:
    native, proxied, probe = await run_both(left_room_scenario, ("A", "B"))
    assert_equivalent(native, proxied, LEFT_ROOM_DIFFERENCES)

    rows = probe.rows
    # Deletes in a room the user left: B is told nothing by sync (Synapse sends room
    # account data only for rooms in the response), and never can be. B's next sync
    # finds the user out of the room, and B's rows go there and then rather than
    # waiting for a GET or an initial sync that may never come.
    assert rows[f"A: PUT {{}} room1 {LEFT_EMPTIED}"] == {
        ("room1", LEFT_DELETED, "B"),
        ("room1", LEFT_EMPTIED, "B"),
    }
    assert rows["B: sync after deleting"] == set()
    assert rows[f"B: GET room1 {LEFT_EMPTIED}"] == set()


async def test_sliding_scenario_matches_synapse(run_both: RunBoth) -> None:
    native, proxied, probe = await run_both(sliding_scenario, ("A", "B", "C"))
    assert_equivalent(native, proxied, SLIDING_DIFFERENCES)

    observed = dict(native)
    assert observed["B: after deleting"] == {
        "global": [(DELETED, {}), (EMPTIED, {})],
        "room room1": [(ROOM_DELETED, {}), (ROOM_EMPTIED, {})],
    }
    # Synapse's own leak, which the proxy does not copy (the difference above).
    assert ("room room1", ROOM_DELETED) in observed["B: a fresh connection's first response"][
        "{} entries of any type"
    ]
    assert dict(proxied)["B: a fresh connection's first response"]["{} entries of any type"] == []

    rows = probe.rows
    deleted = {(None, DELETED), (None, EMPTIED), ("room1", ROOM_DELETED), ("room1", ROOM_EMPTIED)}
    assert rows[f"A: PUT {{}} room1 {ROOM_EMPTIED}"] == {(r, t, d) for r, t in deleted for d in "BC"}
    assert rows["B: after deleting"] == rows[f"A: PUT {{}} room1 {ROOM_EMPTIED}"]  # told, not yet proved
    assert rows["B: next"] == {(r, t, "C") for r, t in deleted}  # B's proof of receipt
    assert rows["C: from its old position"] == {(r, t, "C") for r, t in deleted}
    assert rows["C: next"] == set()

"""Realistic `/sync` bodies of a chosen size, written as Synapse writes them (compact JSON).

Joined rooms with timelines (messages, a few redacted ones whose content is `{}`),
state (members, name, topic, power levels), ephemeral receipts and room account
data; global account data with push rules and direct rooms. Some account data
entries are deletions (`"content": {}`): an initial sync must lose them, so the
proxy has to parse and rewrite the body; an incremental sync passes them unchanged.
"""

from __future__ import annotations

import json
import random
import string
from typing import Any

SERVER = "localhost"
TS = 1_760_000_000_000


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class _Maker:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.users = [f"@user{i}:{SERVER}" for i in range(400)]
        self.words = [
            "".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(2, 9))) for _ in range(600)
        ]
        self.serial = 0

    def event_id(self) -> str:
        self.serial += 1
        return "$" + "".join(self.rng.choices(string.ascii_letters + string.digits + "-_", k=43))

    def sentence(self, low: int, high: int) -> str:
        return " ".join(self.rng.choices(self.words, k=self.rng.randint(low, high))).capitalize() + "."

    def message(self) -> dict[str, Any]:
        self.serial += 1
        sender = self.rng.choice(self.users)
        event: dict[str, Any] = {
            "type": "m.room.message",
            "sender": sender,
            "content": {"msgtype": "m.text", "body": self.sentence(3, 40)},
            "origin_server_ts": TS + self.serial * 997,
            "unsigned": {"membership": "join", "age": self.rng.randint(100, 9_000_000)},
            "event_id": self.event_id(),
        }
        if self.rng.random() < 0.04:
            # A redacted event: its content is `{}` as well (not account data).
            event["content"] = {}
            event["unsigned"]["redacted_because"] = {
                "type": "m.room.redaction",
                "sender": sender,
                "content": {},
                "redacts": event["event_id"],
                "origin_server_ts": TS + self.serial * 997 + 5,
                "event_id": self.event_id(),
            }
        return event

    def member(self, user: str) -> dict[str, Any]:
        return {
            "type": "m.room.member",
            "state_key": user,
            "sender": user,
            "content": {"membership": "join", "displayname": user[1:].split(":")[0].title()},
            "origin_server_ts": TS - self.rng.randint(0, 10**9),
            "unsigned": {"age": self.rng.randint(10**6, 10**9)},
            "event_id": self.event_id(),
        }

    def room(self, index: int, deletions: bool) -> tuple[str, dict[str, Any]]:
        room_id = "!" + "".join(self.rng.choices(string.ascii_letters, k=18)) + f":{SERVER}"
        members = self.rng.sample(self.users, self.rng.randint(2, 12))
        state = [self.member(u) for u in members]
        state.append(
            {
                "type": "m.room.name",
                "state_key": "",
                "sender": members[0],
                "content": {"name": self.sentence(1, 4)},
                "origin_server_ts": TS - 10**8,
                "unsigned": {"age": 10**8},
                "event_id": self.event_id(),
            }
        )
        state.append(
            {
                "type": "m.room.power_levels",
                "state_key": "",
                "sender": members[0],
                "content": {"users": {members[0]: 100}, "users_default": 0, "events_default": 0, "ban": 50},
                "origin_server_ts": TS - 10**8,
                "unsigned": {"age": 10**8},
                "event_id": self.event_id(),
            }
        )
        timeline = [self.message() for _ in range(self.rng.randint(5, 20))]
        account_data = [
            {"type": "m.fully_read", "content": {"event_id": timeline[-1]["event_id"]}},
            {"type": "m.tag", "content": {"tags": {"m.favourite": {"order": 0.5}} if index % 7 == 0 else {}}},
        ]
        if deletions and index % 4 == 0:
            account_data.append({"type": f"org.example.room.setting.{index % 13}", "content": {}})
        receipts = {timeline[-1]["event_id"]: {"m.read": {u: {"ts": TS + index} for u in members[:3]}}}
        return room_id, {
            "timeline": {"events": timeline, "limited": True, "prev_batch": f"t{index}-{self.serial}_0_0"},
            "state": {"events": state},
            "ephemeral": {"events": [{"type": "m.receipt", "content": receipts}]},
            "account_data": {"events": account_data},
            "unread_notifications": {"highlight_count": 0, "notification_count": self.rng.randint(0, 30)},
            "summary": {"m.joined_member_count": len(members), "m.invited_member_count": 0},
        }


def sync_body(size: int, *, seed: int = 3391, deletions: bool = True) -> bytes:
    """A /sync body of at most `size` bytes (and within 1% of it)."""
    maker = _Maker(seed)
    global_data: list[dict[str, Any]] = [
        {"type": "m.push_rules", "content": {"global": {"override": [], "underride": [], "content": []}}},
        {"type": "m.direct", "content": {u: [f"!dm{i}:{SERVER}"] for i, u in enumerate(maker.users[:20])}},
        {"type": "im.vector.setting.breadcrumbs", "content": {"recent_rooms": []}},
    ]
    if deletions:
        global_data += [{"type": f"org.example.deleted.{i}", "content": {}} for i in range(5)]
    body: dict[str, Any] = {
        "next_batch": "s72594_4483_1934_1072_1_112_1_8_0_1_1",
        "account_data": {"events": global_data},
        "to_device": {"events": []},
        "device_lists": {"changed": [], "left": []},
        "device_one_time_keys_count": {"signed_curve25519": 50},
        "org.matrix.msc2732.device_unused_fallback_key_types": ["signed_curve25519"],
        "device_unused_fallback_key_types": ["signed_curve25519"],
        "presence": {"events": []},
        "rooms": {"join": {}, "invite": {}, "leave": {}, "knock": {}},
    }
    joined = body["rooms"]["join"]
    used = len(_compact(body))
    index = 0
    while True:
        room_id, room = maker.room(index, deletions)
        cost = len(_compact({room_id: room})) - 1  # its share of the joined-rooms object
        if used + cost > size:
            break
        joined[room_id] = room
        used += cost
        index += 1
    raw = _compact(body)
    # Fill the last gap with a harmless global entry so the size is close to `size`.
    gap = size - len(raw) - len(_compact({"type": "org.example.padding", "content": {"p": ""}})) - 1
    if gap > 0:
        body["account_data"]["events"].append({"type": "org.example.padding", "content": {"p": "x" * gap}})
        raw = _compact(body)
    assert len(raw) <= size and len(raw) > size * 0.99, (len(raw), size)
    return raw


def _sliding_room(room: dict[str, Any], index: int) -> dict[str, Any]:
    """A room of a first sliding sync response, from a /sync room of `_Maker.room`."""
    state = room["state"]["events"]
    name = next(e["content"]["name"] for e in state if e["type"] == "m.room.name")
    timeline = room["timeline"]["events"]
    return {
        "name": name,
        "initial": True,
        "required_state": state,
        "timeline": timeline,
        "prev_batch": room["timeline"]["prev_batch"],
        "limited": True,
        "joined_count": room["summary"]["m.joined_member_count"],
        "invited_count": 0,
        "notification_count": room["unread_notifications"]["notification_count"],
        "highlight_count": 0,
        "num_live": 0,
        "bump_stamp": 100_000 - index,
    }


def sliding_sync_body(size: int, *, seed: int = 4186) -> bytes:
    """A simplified sliding sync (MSC4186) response of at most `size` bytes (within 1%),
    compact as Synapse writes it: one list whose window holds every room, each room sent
    for the first time (`initial`) with its required state and timeline, and the account
    data extension (`global`, `rooms`) holding some `{}` entries, which a first response
    (no `pos`) must lose."""
    maker = _Maker(seed)
    global_data: list[dict[str, Any]] = [
        {"type": "m.push_rules", "content": {"global": {"override": [], "underride": [], "content": []}}},
        {"type": "m.direct", "content": {u: [f"!dm{i}:{SERVER}"] for i, u in enumerate(maker.users[:20])}},
    ]
    global_data += [{"type": f"org.example.deleted.{i}", "content": {}} for i in range(5)]
    room_ids: list[str] = []
    rooms: dict[str, Any] = {}
    room_data: dict[str, Any] = {}
    body: dict[str, Any] = {
        "pos": "4186/s72594_4483",
        "lists": {"all_rooms": {"count": 0, "ops": [{"op": "SYNC", "range": [0, 0], "room_ids": room_ids}]}},
        "rooms": rooms,
        "extensions": {
            "account_data": {"global": global_data, "rooms": room_data},
            "to_device": {"next_batch": "1", "events": []},
        },
    }
    used = len(_compact(body))
    index = 0
    while True:
        room_id, room = maker.room(index, deletions=True)
        sliding = _sliding_room(room, index)
        entries = room["account_data"]["events"]
        # Its shares of the rooms, the extension's rooms and the list's window.
        cost = len(_compact({room_id: sliding})) + len(_compact({room_id: entries})) + len(room_id) + 3
        if used + cost > size:
            break
        rooms[room_id], room_data[room_id] = sliding, entries
        room_ids.append(room_id)
        used += cost
        index += 1
    body["lists"]["all_rooms"]["count"] = len(room_ids)
    body["lists"]["all_rooms"]["ops"][0]["range"] = [0, max(0, len(room_ids) - 1)]
    raw = _compact(body)
    while len(raw) > size:  # the estimate was short: one room fewer
        dropped = room_ids.pop()
        del rooms[dropped], room_data[dropped]
        raw = _compact(body)
    gap = size - len(raw) - len(_compact({"type": "org.example.padding", "content": {"p": ""}})) - 1
    if gap > 0:
        global_data.append({"type": "org.example.padding", "content": {"p": "x" * gap}})
        raw = _compact(body)
    assert len(raw) <= size and len(raw) > size * 0.99, (len(raw), size)
    return raw


def sliding_sync_request() -> bytes:
    """A room-list sliding sync request as Element X sends it (every request carries the
    whole configuration): one list, the account data extension enabled."""
    request = {
        "conn_id": "room-list",
        "lists": {
            "all_rooms": {
                "ranges": [[0, 19]],
                "required_state": [
                    ["m.room.encryption", ""],
                    ["m.room.member", "$LAZY"],
                    ["m.room.member", "$ME"],
                    ["m.room.name", ""],
                    ["m.room.power_levels", ""],
                ],
                "timeline_limit": 1,
            }
        },
        "extensions": {
            "account_data": {"enabled": True},
            "to_device": {"enabled": True},
            "e2ee": {"enabled": True},
            "receipts": {"enabled": True, "rooms": ["*"]},
            "typing": {"enabled": True},
        },
    }
    return _compact(request)

"""`msc3391-proxy inspect`: the pending deletions in the store, by user and device."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from .store import DeletionStore


async def pending_report(store: DeletionStore) -> dict[str, Any]:
    """{"users": {user: {"tombstones": [...], "devices": {device: [deletes]}}}}"""
    users: dict[str, dict[str, Any]] = defaultdict(lambda: {"tombstones": [], "devices": defaultdict(list)})
    for t in await store.tombstones():
        users[t.user_id]["tombstones"].append(
            {"stream_id": t.stream_id, "room_id": t.room_id, "type": t.account_data_type, "state": t.state}
        )
    for r in await store.unsynced_rows():
        users[r.user_id]["devices"][r.device_id].append(
            {"stream_id": r.stream_id, "room_id": r.room_id, "type": r.account_data_type}
        )
    return {
        "users": {u: {"tombstones": v["tombstones"], "devices": dict(v["devices"])} for u, v in users.items()}
    }


def render_text(report: dict[str, Any]) -> str:
    users = report["users"]
    if not users:
        return "no pending deletions"
    lines = []
    for user_id, data in sorted(users.items()):
        lines.append(f"{user_id}: {len(data['tombstones'])} tombstone(s)")
        for device_id, deletes in sorted(data["devices"].items()):
            items = ", ".join(
                f"#{d['stream_id']} {json.dumps(d['type'])}" + (f" in {d['room_id']}" if d["room_id"] else "")
                for d in deletes
            )
            lines.append(f"  {device_id} has not seen: {items}")
    return "\n".join(lines)


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)

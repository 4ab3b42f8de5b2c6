"""One request of each pass-through workload through each target, checked before the runs:
wrk counts answers, not what they hold, so a target answering the wrong body fast (a
404 page, an unstripped first response, a fast path that rewrote) would go unnoticed."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson

from .harness import Target, Workload


def _fetch(url: str, headers: Sequence[str], body: bytes | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    for header in headers:
        name, value = header.split(":", 1)
        request.add_header(name.strip(), value.strip())
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, bytes(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _empty_account_data(body: Any) -> int:
    """`{}` account data entries in a /sync or sliding sync body (global and rooms)."""

    def count(events: Any) -> int:
        events = events if isinstance(events, list) else []
        return sum(1 for e in events if isinstance(e, dict) and e.get("content") == {})

    found = count(body.get("account_data", {}).get("events"))
    for room in body.get("rooms", {}).get("join", {}).values():
        found += count(room.get("account_data", {}).get("events"))
    extension = body.get("extensions", {}).get("account_data", {})
    found += count(extension.get("global"))
    for events in extension.get("rooms", {}).values():
        found += count(events)
    return found


def check(workloads: Sequence[Workload], targets: Sequence[Target], files: dict[str, bytes]) -> list[str]:
    """Problems found (none: every answer is what its workload means). `files`: the
    upstream's body for each workload key that has one."""
    problems = []
    for workload in workloads:
        for target in targets:
            if workload.targets is not None and target.key not in workload.targets:
                continue
            where = f"{workload.label} via {target.label}"
            status, got = _fetch(target.base_url + workload.path, workload.headers, workload.body)
            if status != 200:
                problems.append(f"{where}: status {status}")
                continue
            sent = files.get(workload.key)
            rewritten = target.key == "proxy" and workload.key.startswith(
                ("sync_s_init", "sync_l_init", "sliding_first")
            )
            if workload.key.startswith("versions") and target.key == "proxy":
                if b"org.matrix.msc3391" not in got:
                    problems.append(f"{where}: org.matrix.msc3391 not advertised")
            elif rewritten:
                left = _empty_account_data(orjson.loads(got))
                if left:
                    problems.append(f"{where}: {left} `{{}}` account data entries left")
            elif sent is not None and got != sent:
                problems.append(
                    f"{where}: body differs from the upstream's ({len(got):,} vs {len(sent):,} bytes)"
                )
    return problems

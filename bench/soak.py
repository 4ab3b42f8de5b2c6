#!/usr/bin/env python3
"""A bounded soak: many devices long-polling /sync through the proxy while deletes and
writes run, then a check that no deletion was lost or delivered twice.

    .venv/bin/python bench/soak.py [--duration 60] [--devices 200] [--users 20]

Starts its own real Synapse 1.163.2 and the proxy in front of it as `python -m proxy`
(both from the rig, `rig/`, on loopback, in a temporary directory), registers
`--users` users with `--devices` devices between them, and for `--duration` seconds:

- every device long-polls `GET /sync` through the proxy, from its last `next_batch`;
- one writer per user sets and deletes a few account data types in turn (DELETE or
  PUT `{}`, from a random device of the user), and now and then a device reads a type
  (a 404 read is an acknowledgement too).

Then the writers stop, the long-polls are cut off mid-flight (their answers are lost,
as when a client goes away), and every device syncs twice more. Checks, per device:

- no loss: every sync answer that started after a delete finished, and ended before
  the type was written again, leaves the device seeing the type as deleted; and at the
  end every device's view of every type equals what the homeserver holds;
- no duplicate: once a device has acknowledged a deletion (its next sync started from
  the answer that carried it), no later answer carries it again unless the type was
  deleted anew;
- the store has no rows left for the devices that synced after the last delete (all
  of them), and no tombstones.

Prints requests served, errors, the proxy's counters and its peak memory (VmHWM).
Exits 0 if every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from rig.accounts import Account, login, register  # noqa: E402
from rig.processes import free_port, http_json, open_direct  # noqa: E402
from rig.proxy_process import ProxyProcess  # noqa: E402
from rig.synapse import SynapseServer  # noqa: E402

MSC3391 = "/_matrix/client/unstable/org.matrix.msc3391"
PREFIX = "org.soak."


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Cheap password hashing: hundreds of logins in seconds, not minutes.
FAST_LOGIN = {"bcrypt_rounds": 4}


# --- what happened ----------------------------------------------------------------------


@dataclass
class Op:
    """One write of a user's type, as the writer saw it."""

    user_id: str
    kind: str
    action: str  # "put" (content), "delete" (DELETE) or "put{}" (PUT of {})
    started: float
    ended: float
    status: int

    @property
    def deletes(self) -> bool:
        return self.action != "put"


@dataclass
class Answer:
    """One /sync answer a device received: when, from which token, and the soak types
    it carried (type -> content; `{}` is a deletion)."""

    started: float
    ended: float
    since: str | None
    next_batch: str
    entries: dict[str, Any]


@dataclass
class SoakDevice:
    account: Account
    next_batch: str | None = None
    answers: list[Answer] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.account.access_token}"}


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def count(self, what: str, status: int | None, error: str | None = None) -> None:
        self.requests[what] += 1
        if status not in (200, 404) or error:
            self.errors[f"{what}: {error or status}"] += 1


def soak_entries(body: dict[str, Any]) -> dict[str, Any]:
    events = body.get("account_data", {}).get("events", [])
    return {e["type"]: e.get("content") for e in events if str(e.get("type", "")).startswith(PREFIX)}


# --- the load -----------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, proxy_url: str, synapse_url: str) -> None:
        self.args = args
        self.proxy_url = proxy_url
        self.synapse_url = synapse_url
        self.rng = random.Random(args.seed)
        self.kinds = [f"{PREFIX}t{i}" for i in range(args.types)]
        self.devices: dict[str, list[SoakDevice]] = {}
        self.ops: list[Op] = []
        self.tally = Tally()
        self.stop_writing = asyncio.Event()
        self.session: aiohttp.ClientSession
        self.t0 = time.monotonic()
        self.quiet_since = float("inf")
        # Counted by the checks: (device, delete) pairs that had to show the deletion,
        # and deletions a device provably received and acknowledged.
        self.due = 0
        self.acknowledged = 0
        # Duplicates, by when the answer that first carried the deletion was made.
        self.duplicates: Counter[str] = Counter()
        self.store_left = (0, 0, 0)

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def request(self, what: str, device: SoakDevice, method: str, path: str, body: Any = None) -> Any:
        """One request through the proxy; returns (status, parsed body) or (None, None)."""
        data = None if body is None else json.dumps(body).encode()
        try:
            async with self.session.request(
                method, self.proxy_url + path, headers=device.headers, data=data
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            self.tally.count(what, None, type(e).__name__)
            return None, None
        self.tally.count(what, status)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, None

    async def sync(self, what: str, device: SoakDevice, timeout_ms: int) -> bool:
        query = {"timeout": str(timeout_ms)}
        if device.next_batch is not None:
            query["since"] = device.next_batch
        started = self.now()
        status, body = await self.request(what, device, "GET", "/_matrix/client/v3/sync?" + urlencode(query))
        if status != 200 or not isinstance(body, dict):
            return False
        device.answers.append(
            Answer(started, self.now(), device.next_batch, body["next_batch"], soak_entries(body))
        )
        device.next_batch = body["next_batch"]
        return True

    async def long_poll(self, device: SoakDevice) -> None:
        while True:
            if not await self.sync("sync (long-poll)", device, self.args.poll_timeout_ms):
                await asyncio.sleep(0.5)  # an error: retry from the same token

    async def writer(self, user_id: str) -> None:
        devices = self.devices[user_id]
        live: dict[str, bool] = dict.fromkeys(self.kinds, False)
        n = 0
        while not self.stop_writing.is_set():
            await asyncio.sleep(self.rng.expovariate(1 / self.args.op_interval))
            kind = self.rng.choice(self.kinds)
            device = self.rng.choice(devices)
            data = f"/_matrix/client/v3/user/{quote(user_id, safe='')}/account_data/{kind}"
            if self.rng.random() < self.args.read_ratio:
                await self.request("GET account data", self.rng.choice(devices), "GET", data)
                continue
            started = self.now()
            if live[kind] is False:
                n += 1
                action, status = (
                    "put",
                    (await self.request("PUT account data", device, "PUT", data, {"n": n}))[0],
                )
            elif self.rng.random() < 0.5:
                delete = f"{MSC3391}/user/{quote(user_id, safe='')}/account_data/{kind}"
                action, status = (
                    "delete",
                    (await self.request("DELETE account data", device, "DELETE", delete))[0],
                )
            else:
                action, status = (
                    "put{}",
                    (await self.request("PUT {} account data", device, "PUT", data, {}))[0],
                )
            self.ops.append(Op(user_id, kind, action, started, self.now(), status or 0))
            if status == 200:
                live[kind] = action == "put"
            else:  # the outcome is unknown: ask
                got, body = await self.request("GET account data", device, "GET", data)
                live[kind] = got == 200 and body != {}

    async def setup(self) -> None:
        args = self.args
        per_user = [
            args.devices // args.users + (1 if i < args.devices % args.users else 0)
            for i in range(args.users)
        ]
        stamp = f"{int(time.time()) % 100000}"
        accounts: dict[str, list[Account]] = {}
        gate = asyncio.Semaphore(8)

        async def make_user(i: int, count: int) -> None:
            name = f"soak{stamp}u{i}"
            async with gate:
                first = await asyncio.to_thread(register, self.synapse_url, name)
            accounts[first.user_id] = [first]
            for _ in range(count - 1):
                async with gate:
                    accounts[first.user_id].append(await asyncio.to_thread(login, self.synapse_url, name))

        await asyncio.gather(*(make_user(i, c) for i, c in enumerate(per_user) if c > 0))
        self.devices = {user: [SoakDevice(a) for a in accs] for user, accs in accounts.items()}
        say(f"{len(self.devices)} users, {sum(map(len, self.devices.values()))} devices registered")
        every = [d for ds in self.devices.values() for d in ds]
        await self.bounded(every, lambda d: self.sync("sync (initial)", d, 0))

    async def bounded(self, devices: list[SoakDevice], work: Any, width: int = 50) -> None:
        gate = asyncio.Semaphore(width)

        async def one(device: SoakDevice) -> None:
            async with gate:
                await work(device)

        await asyncio.gather(*(one(d) for d in devices))

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=self.args.poll_timeout_ms / 1000 + 60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as self.session:
            await self.setup()
            every = [d for ds in self.devices.values() for d in ds]
            polls = [asyncio.ensure_future(self.long_poll(d)) for d in every]
            writers = [asyncio.ensure_future(self.writer(u)) for u in self.devices]
            say(f"load running for {self.args.duration:.0f} s")
            await asyncio.sleep(self.args.duration)
            self.stop_writing.set()
            await asyncio.gather(*writers)
            self.quiet_since = self.now()
            for poll in polls:
                poll.cancel()  # answers in flight are lost, as when a client goes away
            await asyncio.gather(*polls, return_exceptions=True)
            say("load stopped; every device syncs twice more")
            for _ in range(2):
                await self.bounded(every, lambda d: self.sync("sync (final)", d, 0))

    # --- checks -----------------------------------------------------------------------

    def final_state(self) -> dict[tuple[str, str], Any]:
        """(user, type) -> the content the homeserver holds ({} for deleted, None if never set)."""
        state: dict[tuple[str, str], Any] = {}
        for user_id, devices in self.devices.items():
            token = devices[0].account.access_token
            for kind in self.kinds:
                url = (
                    f"{self.synapse_url}/_matrix/client/v3/user/{quote(user_id, safe='')}/account_data/{kind}"
                )
                status, body = http_json("GET", url, token=token)
                if status == 200:
                    state[(user_id, kind)] = body
                else:
                    state[(user_id, kind)] = None if status == 404 else f"HTTP {status}"
        return state

    def check(self, store_path: Path) -> list[str]:
        problems: list[str] = []
        ops_by_key: dict[tuple[str, str], list[Op]] = {}
        for op in self.ops:
            if op.status == 200:
                ops_by_key.setdefault((op.user_id, op.kind), []).append(op)
        final = self.final_state()

        for user_id, devices in self.devices.items():
            for device in devices:
                problems += self._check_device(user_id, device, ops_by_key, final)

        db = sqlite3.connect(store_path)
        try:
            rows = db.execute(
                "SELECT user_id, device_id, account_data_type FROM account_data_unsynced_deletes"
            ).fetchall()
            tombstones = db.execute(
                "SELECT user_id, account_data_type, state FROM account_data_tombstones"
            ).fetchall()
            deliveries = db.execute("SELECT COUNT(*) FROM sync_deliveries").fetchone()[0]
            orphans = db.execute(
                "SELECT COUNT(*) FROM sync_deliveries"
                " WHERE stream_id NOT IN (SELECT stream_id FROM account_data_tombstones)"
            ).fetchone()[0]
        finally:
            db.close()
        synced_after_last_delete = {
            (u, d.account.device_id)
            for u, ds in self.devices.items()
            for d in ds
            if any(a.started > self.quiet_since for a in d.answers)
        }
        left = [r for r in rows if (r[0], r[1]) in synced_after_last_delete]
        if left:
            problems.append(
                f"{len(left)} rows left for devices that synced after the last delete: {left[:5]}"
            )
        if tombstones:
            problems.append(f"{len(tombstones)} tombstones left: {tombstones[:5]}")
        if orphans:
            problems.append(f"{orphans} delivery records left for deletes that no longer exist")
        self.store_left = (len(rows), len(tombstones), deliveries)
        return problems

    def _check_device(
        self,
        user_id: str,
        device: SoakDevice,
        ops_by_key: dict[tuple[str, str], list[Op]],
        final: dict[tuple[str, str], Any],
    ) -> list[str]:
        problems: list[str] = []
        name = f"{user_id}/{device.account.device_id}"
        # The device's view after each answer.
        views: list[dict[str, Any]] = []
        view: dict[str, Any] = {}
        for answer in device.answers:
            view = {**view, **answer.entries}
            views.append(view)

        for kind in self.kinds:
            ops = ops_by_key.get((user_id, kind), [])
            # No loss: an answer requested after a delete ended, and finished before the
            # next write began, leaves the type deleted (or never seen) in the view.
            for i, op in enumerate(ops):
                if not op.deletes:
                    continue
                next_write = next((o.started for o in ops[i + 1 :] if not o.deletes), float("inf"))
                due = [
                    (answer, seen)
                    for answer, seen in zip(device.answers, views, strict=True)
                    if answer.started > op.ended and answer.ended < next_write
                ]
                self.due += bool(due)
                lost = next(((a, seen) for a, seen in due if seen.get(kind) not in (None, {})), None)
                if lost is not None:
                    answer, seen = lost
                    problems.append(
                        f"LOST {name} {kind}: deleted at {op.ended:.2f}s, still {seen.get(kind)}"
                        f" after the answer of {answer.started:.2f}-{answer.ended:.2f}s"
                    )
            # No duplicate after acknowledgement: once an answer carried the deletion and
            # the next request started from it, a later `{}` is new only if the type was
            # written again after that answer began (writes are all this soak's own, and
            # it deletes only live types).
            writes_ended = [o.ended for o in ops if not o.deletes]
            for j, carried in enumerate(device.answers):
                if carried.entries.get(kind) != {}:
                    continue
                acked_by = device.answers[j + 1] if j + 1 < len(device.answers) else None
                if acked_by is None or acked_by.since != carried.next_batch:
                    continue
                self.acknowledged += 1
                revived = any(ended > carried.started for ended in writes_ended)
                again = next((a for a in device.answers[j + 1 :] if a.entries.get(kind) == {}), None)
                if again is not None and not revived:
                    # The delete the carrying answer showed: the last one begun before it ended.
                    shown = max(
                        (o for o in ops if o.deletes and o.started < carried.ended), key=lambda o: o.started
                    )
                    if carried.started < shown.started:
                        why = "waiting"  # a long-poll already waiting when the delete began
                    elif carried.started < shown.ended:
                        why = "during"  # a sync that began while the delete was under way
                    else:
                        why = "after"  # began once the delete was answered
                    self.duplicates[why] += 1
                    problems.append(
                        f"DUPLICATE ({why}) {name} {kind}: deleted {shown.started:.2f}-{shown.ended:.2f}s,"
                        f" carried by the answer of {carried.started:.2f}-{carried.ended:.2f}s,"
                        f" acknowledged at {acked_by.started:.2f}s, carried again at {again.started:.2f}s"
                    )
            # The end: the device sees what the homeserver holds.
            holds = final[(user_id, kind)]
            sees = view.get(kind)
            if (holds in (None, {})) != (sees in (None, {})) or (holds not in (None, {}) and holds != sees):
                problems.append(f"FINAL {name} {kind}: the homeserver holds {holds}, the device sees {sees}")
        return problems


# --- main ------------------------------------------------------------------------------------


def proxy_counters(metrics_url: str) -> dict[str, float]:
    with open_direct(metrics_url + "/metrics", 10) as response:
        text = response.read().decode()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("msc3391_proxy_") and not line.startswith(("msc3391_proxy_upstream", "#")):
            name, _, value = line.rpartition(" ")
            if "_created" not in name:
                counters[name] = float(value)
    return counters


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--devices", type=int, default=200, help="devices in all (default 200)")
    parser.add_argument("--users", type=int, default=20, help="users sharing them (default 20)")
    parser.add_argument("--types", type=int, default=4, help="account data types per user (default 4)")
    parser.add_argument("--op-interval", type=float, default=1.0, help="mean seconds between a user's writes")
    parser.add_argument("--read-ratio", type=float, default=0.1, help="share of a writer's turns that read")
    parser.add_argument("--poll-timeout-ms", type=int, default=10_000, help="the /sync long-poll timeout")
    parser.add_argument("--seed", type=int, default=3391)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, store)")
    args = parser.parse_args()
    if not 1 <= args.users <= args.devices:
        parser.error("need 1 <= --users <= --devices")

    directory = Path(tempfile.mkdtemp(prefix="msc3391-soak-"))
    synapse = SynapseServer(directory / "synapse", extra_config=FAST_LOGIN)
    metrics_port = free_port()
    proxy: ProxyProcess | None = None
    started = time.monotonic()
    try:
        say(f"starting Synapse and the proxy in {directory}")
        synapse.start()
        proxy = ProxyProcess(
            directory,
            synapse.url,
            extra_toml=f'[proxy]\nlog_level = "WARNING"\n[metrics]\nenabled = true\nport = {metrics_port}\n',
            name="soak-proxy",
        )
        proxy.start()
        assert proxy.process is not None
        soak = Soak(args, proxy.url, synapse.url)
        asyncio.run(soak.run())
        memory = memory_kib(proxy.process.pid)
        counters = proxy_counters(f"http://127.0.0.1:{metrics_port}")
        problems = soak.check(Path(proxy.config["store"]["path"]))
    finally:
        log = ""
        if proxy is not None:
            proxy.stop()
            log = proxy.log
        synapse.stop()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    # The proxy logs at WARNING: anything there is worth seeing (request ids stripped).
    logged = Counter(line.split("] ", 1)[-1] for line in log.splitlines() if line.strip())

    ops = Counter(op.action for op in soak.ops)
    answers = sum(len(d.answers) for ds in soak.devices.values() for d in ds)
    deletions_seen = sum(
        1
        for ds in soak.devices.values()
        for d in ds
        for a in d.answers
        for c in a.entries.values()
        if c == {}
    )
    print(f"soak: {args.duration:.0f} s of load, {len(soak.devices)} users, {args.devices} devices")
    print(
        f"writes: {ops['put']} PUT of content, {ops['delete']} DELETE, {ops['put{}']} PUT {{}}"
        f" ({sum(1 for op in soak.ops if op.status != 200)} not answered 200)"
    )
    print(f"requests served: {sum(soak.tally.requests.values())}")
    for what, n in sorted(soak.tally.requests.items()):
        print(f"  {what}: {n}")
    print(f"errors: {sum(soak.tally.errors.values())}")
    for what, n in sorted(soak.tally.errors.items()):
        print(f"  {what}: {n}")
    print(f"sync answers received: {answers}; deletion entries among them: {deletions_seen}")
    print(
        f"checked: {soak.due} (device, delete) pairs that had to show the deletion;"
        f" {soak.acknowledged} deletions received and acknowledged, watched for repeats"
    )
    print("proxy counters:")
    for name, value in sorted(counters.items()):
        print(f"  {name} {value:g}")
    rows, tombstones, deliveries = soak.store_left
    print(f"store at the end: {rows} rows, {tombstones} tombstones, {deliveries} delivery records")
    peak, end = memory["VmHWM"] / 1024, memory["VmRSS"] / 1024
    print(f"proxy memory: peak (VmHWM) {peak:.1f} MiB, at the end (VmRSS) {end:.1f} MiB")
    print(f"proxy log (WARNING and above): {sum(logged.values())} lines")
    for message, n in logged.most_common(10):
        print(f"  {n} x {message}")
    print(f"wall time: {time.monotonic() - started:.0f} s")
    if soak.duplicates:
        print(
            "deletions delivered again after acknowledgement, by when the sync that first carried"
            " them began:\n"
            f"  {soak.duplicates['waiting']} before the delete began (a waiting long-poll)\n"
            f"  {soak.duplicates['during']} while the delete was under way\n"
            f"  {soak.duplicates['after']} after the delete was answered\n"
            "  (the first two: the fast path of a sync is chosen when it starts, before the intent"
            " exists or is committed; see README, Limits)"
        )
    if problems:
        print(f"FAILED: {len(problems)} problem(s)")
        for problem in problems[:50]:
            print(f"  {problem}")
        return 1
    print("OK: no deletion lost, none delivered twice after acknowledgement, no rows left")
    return 0


if __name__ == "__main__":
    sys.exit(main())

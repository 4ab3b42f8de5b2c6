"""Durations and sizes of a full run and of `--quick`."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    warmup_seconds: int
    small_seconds: int  # 26-byte GET and /versions at 64 connections, each run
    reference_seconds: int  # 26-byte GET at 1 and 8 connections (no target), each run
    sync_seconds: int  # /sync bodies from the static upstream, each run
    synapse_seconds: int  # whoami, account data GET, incremental sync on Synapse
    delete_seconds: int  # MSC3391 DELETE on Synapse
    sync_sizes: tuple[int, int]  # the "1 MiB" and "10 MiB" bodies
    held_connections: int
    held_probe_seconds: int
    stream_bytes: int
    store_rows: int
    floor_repeats: tuple[int, int]  # orjson floor: repetitions for each body size

    def size_label(self, size: int) -> str:
        return f"{size // MiB} MiB" if size % MiB == 0 else f"{size // 1024} KiB"


FULL = Settings(
    quick=False,
    reps=3,
    warmup_seconds=1,
    small_seconds=5,
    reference_seconds=3,
    sync_seconds=4,
    synapse_seconds=5,
    delete_seconds=5,
    sync_sizes=(1 * MiB, 10 * MiB),
    held_connections=10_000,
    held_probe_seconds=5,
    stream_bytes=1 * GiB,
    store_rows=1_000_000,
    floor_repeats=(60, 12),
)

QUICK = Settings(
    quick=True,
    reps=1,
    warmup_seconds=0,
    small_seconds=1,
    reference_seconds=1,
    sync_seconds=1,
    synapse_seconds=1,
    delete_seconds=1,
    sync_sizes=(256 * 1024, 2 * MiB),
    held_connections=1_000,
    held_probe_seconds=1,
    stream_bytes=64 * MiB,
    store_rows=100_000,
    floor_repeats=(10, 4),
)

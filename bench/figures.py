# ruff: noqa: RUF001  (the en dash is printed in the report)
"""Reading the results of a run: what the report and its Targets table share."""

from __future__ import annotations

from typing import Any


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def get(results: Any, *keys: str) -> Any:
    """results[k1][k2]..., or None where a key is missing (a section that did not run)."""
    node: Any = results
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def median_of(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def floor_ms(results: dict[str, Any], key: str) -> float | None:
    """The orjson loads+dumps floor of a body (a /sync size, or "sliding") measured beside
    the proxy's rewrite runs (median of their medians), or else the one measured before
    the pass-through section."""
    beside = get(results, "passthrough", "floors_in_run", key)
    if beside:
        return median_of(beside)
    value = get(results, "floor", key, "floor_ms")
    return float(value) if value is not None else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None

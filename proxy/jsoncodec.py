"""JSON for sync bodies: orjson where it is exact, the standard library where it is not.

orjson is ~4x faster, but it reads integers beyond 64 bits as floats (silently
changing account data content) and refuses escaped lone surrogates (`"\\ud800"`),
both of which Synapse may send. Bodies that could hold either take the slow, exact
path; nothing is ever altered to make it fit.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# 19 digits in a row may be an integer outside orjson's 64-bit range (false positives,
# such as long digit runs inside strings, only cost speed). Every digit becomes "0" and
# everything else a space, then one substring search: ~20x cheaper than a regex.
_DIGITS_AS_ZERO = bytes(ord("0") if chr(i).isdigit() and i < 128 else ord(" ") for i in range(256))
_LONG_RUN = b"0" * 19


def _may_hold_big_integers(raw: bytes) -> bool:
    return _LONG_RUN in raw.translate(_DIGITS_AS_ZERO)


def loads(raw: bytes) -> Any:
    """Parse exactly; raises ValueError if `raw` is not JSON (NaN and numbers beyond a
    double's range included)."""
    if not _may_hold_big_integers(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # perhaps a lone surrogate: the standard library decides
    return json.loads(raw, parse_float=_finite, parse_constant=_no_constant)


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"not JSON: {name}")


def dumps(value: Any) -> bytes:
    """Serialise compactly. `loads` never yields NaN or infinity, which orjson would
    write as null."""
    try:
        return orjson.dumps(value)
    except TypeError:
        # Big integers or lone surrogates, read by the standard library: write them
        # back the same way (escaped, so the bytes are valid UTF-8).
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()

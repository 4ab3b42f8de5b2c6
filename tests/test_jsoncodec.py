"""Sync bodies are re-serialised exactly: nothing the homeserver sent may change."""

from __future__ import annotations

import pytest

from proxy import jsoncodec


@pytest.mark.parametrize(
    "raw",
    [
        b'{"content":{"big":123456789012345678901234567890,"neg":-9223372036854775809}}',
        b'{"content":{"s":"\\ud800 lone surrogate"}}',
        b'{"content":{"u":"caf\\u00e9 \\ud83d\\ude00","f":2.5,"n":null,"t":true}}',
    ],
)
def test_values_survive_a_round_trip(raw: bytes) -> None:
    value = jsoncodec.loads(raw)
    assert jsoncodec.loads(jsoncodec.dumps(value)) == value


def test_big_integers_stay_integers() -> None:
    value = jsoncodec.loads(b'{"k":123456789012345678901234567890}')
    assert value["k"] == 123456789012345678901234567890
    assert b"123456789012345678901234567890" in jsoncodec.dumps(value)


def test_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        jsoncodec.loads(b"{nope")
    for raw in (b'{"x":NaN}', b'{"x":Infinity}', b'{"x":1e400}', b'{"x":-1e400}'):
        with pytest.raises(ValueError):
            jsoncodec.loads(raw)

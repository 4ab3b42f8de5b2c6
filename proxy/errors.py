"""Matrix errors, built in one place.

Handlers raise `MatrixError`; the error middleware in `app.py` turns it into
`{"errcode": ..., "error": ...}` with the status Synapse would use. `RelayedResponse`
carries a homeserver answer that must reach the client exactly as it came
(a 401 from whoami, a failed upstream write).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .cors import built

M_FORBIDDEN = "M_FORBIDDEN"
M_NOT_FOUND = "M_NOT_FOUND"
M_BAD_JSON = "M_BAD_JSON"
M_NOT_JSON = "M_NOT_JSON"
M_INVALID_PARAM = "M_INVALID_PARAM"
M_UNRECOGNIZED = "M_UNRECOGNIZED"
M_UNKNOWN = "M_UNKNOWN"
M_TOO_LARGE = "M_TOO_LARGE"
M_MISSING_TOKEN = "M_MISSING_TOKEN"


class MatrixError(Exception):
    def __init__(self, status: int, errcode: str, message: str) -> None:
        super().__init__(f"{status} {errcode}: {message}")
        self.status = status
        self.errcode = errcode
        self.message = message

    def response(self) -> web.Response:
        return error_response(self.status, self.errcode, self.message)


class RelayedResponse(Exception):
    """A homeserver response to hand back to the client unchanged (with its own
    end-to-end headers: CORS and Cache-Control as the homeserver set them)."""

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        super().__init__(f"relayed upstream {status}")
        self.status = status
        self.body = body
        self.headers = headers

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


class StoreUnavailable(MatrixError):
    """A store operation failed at run time (read-only or full disk, locked, corrupt,
    the file gone): the request that needed it gets a 500 Matrix error; forwarding
    goes on."""

    def __init__(self, cause: object) -> None:
        super().__init__(500, M_UNKNOWN, f"The proxy's deletion store is unavailable: {cause}")
        self.cause = str(cause)


def error_response(status: int, errcode: str, message: str) -> web.Response:
    return json_response({"errcode": errcode, "error": message}, status=status)


def json_response(body: Any, *, status: int = 200) -> web.Response:
    """An answer the proxy builds itself (it gets the homeserver's CORS headers)."""
    return built(
        web.Response(
            status=status,
            # Compact, as Synapse writes it: clients and tests may compare bodies byte for byte.
            body=json.dumps(body, separators=(",", ":")).encode(),
            content_type="application/json",
        )
    )


def is_matrix_error(body: bytes) -> bool:
    """Whether a body is a Matrix error (`{"errcode": "...", ...}`)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("errcode"), str)


def upstream_refusal(status: int, body: bytes, headers: Mapping[str, str], what: str) -> Exception:
    """What to answer when the homeserver refused one of the proxy's own calls: its
    Matrix error as it came, or, for anything else (an HTML page from a gateway, an
    empty body), a Matrix 502: never a plain-text body. `headers`: the end-to-end
    headers of its answer."""
    if is_matrix_error(body):
        return RelayedResponse(status, body, headers)
    return bad_gateway(f"The homeserver answered {what} with HTTP {status}")


def bad_gateway(message: str = "The homeserver could not be reached") -> MatrixError:
    return MatrixError(502, M_UNKNOWN, message)


def gateway_timeout(message: str = "The homeserver took too long to answer") -> MatrixError:
    return MatrixError(504, M_UNKNOWN, message)


def unrecognized(status: int = 404) -> MatrixError:
    return MatrixError(status, M_UNRECOGNIZED, "Unrecognized request")

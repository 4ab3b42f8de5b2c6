"""Every error that becomes an answer, in one place.

Handlers raise a `ResponseError`; `app.answering` answers with its
`response()`. A `MatrixError` is `{"errcode": ..., "error": ...}` with the status Synapse
would use; a `RelayedResponse` is a homeserver answer that must reach the client exactly
as it came (a 401 from whoami, a refused write). Answers built here are marked as the
proxy's own, so that they get the homeserver's CORS headers (`cors.py`).
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


class ResponseError(Exception):
    """An error that ends a request with an answer of its own."""

    def response(self) -> web.Response:
        raise NotImplementedError


class MatrixError(ResponseError):
    def __init__(self, status: int, errcode: str, message: str) -> None:
        super().__init__(f"{status} {errcode}: {message}")
        self.status = status
        self.errcode = errcode
        self.message = message

    def response(self) -> web.Response:
        return error_response(self.status, self.errcode, self.message)


class ClientTooSlow(MatrixError):
    """The client did not send its body in time (`proxy.client_timeout`): answered 408,
    and the connection is closed rather than kept for a client in that state."""

    def __init__(self) -> None:
        super().__init__(408, M_UNKNOWN, "The request body did not arrive in time")

    def response(self) -> web.Response:
        response = super().response()
        response.force_close()
        return response


class StoreUnavailable(MatrixError):
    """A store operation failed at run time (read-only or full disk, locked, corrupt,
    the file gone, the database unreachable): the request that needed it gets a 500
    Matrix error; forwarding goes on. The cause is the operator's (the store's log and
    `/health` name it): a client is told no more than Synapse tells it of its own
    database, since the cause may name a file, a host or a database user."""

    def __init__(self, cause: object) -> None:
        super().__init__(500, M_UNKNOWN, "The proxy's deletion store is unavailable")
        self.cause = str(cause)


class RelayedResponse(ResponseError):
    """A homeserver response to hand back to the client unchanged (with its own
    end-to-end headers: CORS and Cache-Control as the homeserver set them)."""

    def __init__(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        super().__init__(f"relayed upstream {status}")
        self.status = status
        self.body = body
        self.headers = headers

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


def error_response(status: int, errcode: str, message: str) -> web.Response:
    return json_response({"errcode": errcode, "error": message}, status=status)


def http_error_response(e: web.HTTPException) -> web.Response:
    """One of aiohttp's own HTTP errors (a body over `proxy.max_body_size`, the router's
    404) as a Matrix error."""
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return error_response(413, M_TOO_LARGE, "Request content is too large")
    return error_response(e.status, M_UNKNOWN, e.reason)


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


def upstream_refusal(status: int, body: bytes, headers: Mapping[str, str], what: str) -> ResponseError:
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

"""Matrix accounts on any client-server base URL: a real Synapse, the proxy, nginx in front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rig.processes import http_json


@dataclass(frozen=True)
class Account:
    """One logged-in device of a user."""

    user_id: str
    access_token: str
    device_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}

    @property
    def localpart(self) -> str:
        return self.user_id[1:].split(":", 1)[0]


def register(base_url: str, username: str, password: str = "password") -> Account:
    """Register `username` (m.login.dummy auth) at `base_url`; the first device."""
    status, body = http_json(
        "POST",
        f"{base_url}/_matrix/client/v3/register",
        {"username": username, "password": password, "auth": {"type": "m.login.dummy"}},
    )
    if status != 200:
        raise RuntimeError(f"registering {username!r} failed: {status} {body}")
    return Account(body["user_id"], body["access_token"], body["device_id"])


def login(base_url: str, username: str, password: str = "password", device_id: str | None = None) -> Account:
    """Log in once more: a new device of the same user (or `device_id`'s)."""
    request: dict[str, Any] = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": username},
        "password": password,
    }
    if device_id is not None:
        request["device_id"] = device_id
    status, body = http_json("POST", f"{base_url}/_matrix/client/v3/login", request)
    if status != 200:
        raise RuntimeError(f"logging in {username!r} failed: {status} {body}")
    return Account(body["user_id"], body["access_token"], body["device_id"])

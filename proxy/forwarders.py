"""Who the client is, when a forwarder (nginx) speaks for it.

Only a trusted forwarder (by default nginx on this host) may say which address it saw
the client at; from anyone else an incoming `X-Forwarded-For`/`-Proto` is a spoof. The
homeserver records the address per device, and the access log names it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import hdrs, web

from .config import IPNetwork

# Trust decisions are cached by peer address, bounded: direct clients have many.
_CACHE_SIZE = 4096


class TrustedForwarders:
    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self._networks = tuple(networks)
        self._trusted_peers: dict[str, bool] = {}

    def is_trusted(self, peer: str) -> bool:
        trusted = self._trusted_peers.get(peer)
        if trusted is None:
            try:
                address = ipaddress.ip_address(peer)
                trusted = any(address in net for net in self._networks)
            except ValueError:
                trusted = False
            if len(self._trusted_peers) >= _CACHE_SIZE:
                self._trusted_peers.clear()
            self._trusted_peers[peer] = trusted
        return trusted

    def headers(self, request: web.BaseRequest) -> dict[str, str]:
        """X-Forwarded-For/-Proto as the homeserver should see them: appended to what a
        trusted forwarder said, or the peer alone."""
        peer = request.remote or ""
        headers = request.headers
        if self.is_trusted(peer):
            chain = ", ".join(headers.getall(hdrs.X_FORWARDED_FOR, ()))
            xff = f"{chain}, {peer}" if chain else peer
            proto = headers.get(hdrs.X_FORWARDED_PROTO, request.scheme)
        else:
            xff, proto = peer, request.scheme
        return {hdrs.X_FORWARDED_FOR: xff, hdrs.X_FORWARDED_PROTO: proto}

    def client_address(self, request: web.BaseRequest) -> str:
        """Who is on the other end: the peer, or the address a trusted forwarder saw
        (the last hop of its X-Forwarded-For), for the access log."""
        peer = request.remote or "-"
        forwarded = request.headers.getall(hdrs.X_FORWARDED_FOR, ())
        if forwarded and self.is_trusted(peer):
            return forwarded[-1].rsplit(",", 1)[-1].strip() or peer
        return peer

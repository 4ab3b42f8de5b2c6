"""Log-safe path templates: the shape of an endpoint, never what a user chose.

Access-log lines and error messages name a path by its template. For a route the
proxy owns, the route table knows which segments are data (`routes.py`); for the rest,
the rules below decide.
"""

from __future__ import annotations

import re

from .routing import split_raw_path

# A template keeps the shape of an endpoint for operators and hides everything a user
# chose: a segment is kept only if it is one of the words Matrix and Synapse name their
# endpoints with (below), a version, or an unstable MSC prefix, AND it does not stand
# where data stands (the segments after `user`, `rooms`, `account_data`, `send`, ...).
# Anything else, a lowercase word included (account data types, state keys, tags, device
# IDs, transaction IDs, push rule IDs, server names, media IDs), is `{}`. Over-masking is
# the safe direction: an endpoint word missing here costs readability, never privacy.

_ENDPOINT_WORDS = frozenset(
    """
    _matrix _synapse .well-known matrix client server support federation key media app push identity
    api unstable admin
    3pid account account_data account_details actions add aliases all appservice auth auth_issuer
    auth_metadata authn_response available avatar_url backchannel_logout backfill ban bind callback
    cancel capabilities changes check claim config context create createRoom deactivate delayed_events
    delete delete_devices dehydrated_device destinations device_signing devices directory displayname
    download email enabled event event_auth event_reports events exchange_third_party_invite fallback
    filter forget get_missing_events get_token global hierarchy initialSync invite jwks join
    joined_members joined_rooms keys kick knock leave list location login logout make_join make_knock
    make_leave members messages msisdn mutual_rooms new_user_consent notifications notify oidc openid
    password password_reset pick_idp pick_username ping presence preview_url profile protect protocol
    protocols publicRooms public_rooms purge_history pushers pushrules query query_auth quarantine
    read_markers receipt redact redirect refresh register registration_tokens relations rendezvous
    report request_token requestToken restart room room_keys room_summary rooms saml2 search send
    sendToDevice send_join send_knock send_leave server_version set signatures sso sso_register
    state state_ids status submit_token summary sync tags thirdparty threads thumbnail
    timestamp_to_event token transactions turnServer typing unban unbind unprotect unsubscribe upgrade
    upload user user_directory userinfo users validity version versions voip web whoami whois
    """.split()
)
_VERSION_OR_PREFIX = re.compile(r"v\d+|r0|org\.matrix\.(?:simplified_)?msc\d+(?:\.v\d+)?")

# How many segments after an endpoint word are data (`/rooms/{roomId}`,
# `/state/{eventType}/{stateKey}`, `/pushrules/{scope}/{kind}/{ruleId}`, ...).
_DATA_AFTER: dict[str, int] = {
    "user": 1, "users": 1, "rooms": 1, "room": 1, "account_data": 1, "tags": 1, "devices": 1,
    "filter": 1, "state": 2, "send": 2, "sendToDevice": 2, "pushrules": 3, "download": 3,
    "thumbnail": 2, "upload": 2, "event": 1, "events": 1, "context": 1, "relations": 3, "receipt": 2,
    "typing": 1, "join": 1, "knock": 1, "redact": 2, "profile": 1, "presence": 1, "report": 1,
    "protocol": 1, "location": 1, "auth": 1, "redirect": 1, "whois": 1, "appservice": 1, "version": 1,
    "invite": 2, "make_join": 2, "make_leave": 2, "make_knock": 2, "send_join": 2, "send_leave": 2,
    "send_knock": 2, "backfill": 1, "get_missing_events": 1, "event_auth": 2, "query_auth": 2,
    "state_ids": 1, "query": 2, "server": 1, "transactions": 1, "exchange_third_party_invite": 1,
    "delayed_events": 1, "room_summary": 1, "timestamp_to_event": 1, "hierarchy": 1,
    "dehydrated_device": 1, "rendezvous": 1,
}  # fmt: skip
# ...where the word before decides: `/room_keys/keys/{roomId}/{sessionId}` (but
# `/keys/upload`), `/directory/list/appservice/{networkId}/{roomId}`.
_DATA_AFTER_PAIR: dict[tuple[str, str], int] = {("room_keys", "keys"): 2, ("list", "appservice"): 2}
# ...and in Synapse's admin API, which names media by `/media/{serverName}/{mediaId}`.
_DATA_AFTER_ADMIN: dict[str, int] = {
    "media": 2, "registration_tokens": 1, "event_reports": 1, "destinations": 1, "purge_history": 2,
    "protect": 1, "unprotect": 1,
}  # fmt: skip


def _is_endpoint_word(segment: str) -> bool:
    return segment in _ENDPOINT_WORDS or _VERSION_OR_PREFIX.fullmatch(segment) is not None


def template(raw_path: str) -> str:
    """The request path with every user-supplied segment replaced by `{}`, and no query:
    the only form of a path that reaches a log line (or, as a route name, a metric)."""
    path, _ = split_raw_path(raw_path)
    admin = path.startswith("/_synapse/admin/")
    out: list[str] = []
    data = 0  # how many of the coming segments stand where data stands
    previous = ""
    for segment in path.split("/"):
        if data:
            data -= 1
            out.append("{}" if segment else "")
            previous = ""
        elif not segment:
            out.append("")
            previous = ""
        elif _is_endpoint_word(segment):
            out.append(segment)
            data = (
                _DATA_AFTER_PAIR.get((previous, segment))
                or (_DATA_AFTER_ADMIN.get(segment, 0) if admin else 0)
                or _DATA_AFTER.get(segment, 0)
            )
            previous = segment
        else:
            out.append("{}")
            previous = ""
    return "/".join(out)

# -*- test-case-name: tests.test_pusher_auth -*-
"""
Pusher's signatures, pure (no I/O, the time passed in).

  - Channel authorisation (C{private-}, C{presence-}): the app's auth
    endpoint answers C{auth = "<key>:<hex HMAC-SHA256(secret,
    "<socket_id>:<channel>[:<channel_data>]")>"}.
  - User sign-in (C{pusher:signin}): C{"<key>:<hex HMAC-SHA256(secret,
    "<socket_id>::user::<user_data>")>"}.
  - HTTP API requests: C{auth_signature} is the hex HMAC-SHA256 of
    C{"<METHOD>\\n<path>\\n<query>"}, the query being every parameter but
    C{auth_signature}, keys sorted, written C{k=v} joined by C{&} with
    nothing escaped; C{auth_timestamp} within L{TIMESTAMP_WINDOW} seconds,
    C{auth_version=1.0}, C{body_md5} the hex MD5 of the body (required
    when there is one).
  - Webhooks: C{X-Pusher-Signature} is the hex HMAC-SHA256 of the body.

Every comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Mapping

__all__ = [
    "TIMESTAMP_WINDOW",
    "PusherAuthError",
    "channel_signature",
    "check_channel_auth",
    "check_request",
    "check_user_auth",
    "request_signature",
    "string_to_sign",
    "user_signature",
    "webhook_signature",
]

#: seconds an HTTP API request's C{auth_timestamp} may be off, past or future
TIMESTAMP_WINDOW = 600


class PusherAuthError(ValueError):
    """A signature that does not verify: C{str()} says why (the message answered to the client)."""


def _hmac_hex(secret: str, text: str) -> str:
    return hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()


def channel_signature(key: str, secret: str, socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """The C{auth} value that authorises C{socket_id} on C{channel} (as Pusher's libraries compute it)."""
    text = f"{socket_id}:{channel}" if channel_data is None else f"{socket_id}:{channel}:{channel_data}"
    return f"{key}:{_hmac_hex(secret, text)}"


def user_signature(key: str, secret: str, socket_id: str, user_data: str) -> str:
    """The C{auth} value of a C{pusher:signin} for C{user_data} (a JSON text)."""
    return f"{key}:{_hmac_hex(secret, f'{socket_id}::user::{user_data}')}"


def _check_auth(key: str, auth: object, expected: str, what: str) -> None:
    if not isinstance(auth, str) or ":" not in auth:
        raise PusherAuthError(f"{what}: 'auth' must be '<key>:<signature>'")
    given_key = auth.split(":", 1)[0]
    # compare both parts in constant time (the key is public, the signature is not)
    if not hmac.compare_digest(auth.encode("utf-8", "replace"), expected.encode("utf-8")):
        if not hmac.compare_digest(given_key.encode("utf-8", "replace"), key.encode("utf-8")):
            raise PusherAuthError(f"{what}: the auth key is not this app's key")
        raise PusherAuthError(f"{what}: invalid signature")


def check_channel_auth(
    key: str, secret: str, socket_id: str, channel: str, auth: object, channel_data: str | None = None
) -> None:
    """@raise PusherAuthError: C{auth} does not authorise C{socket_id} on C{channel} (with C{channel_data})."""
    _check_auth(key, auth, channel_signature(key, secret, socket_id, channel, channel_data),
                f"subscription to {channel!r}")


def check_user_auth(key: str, secret: str, socket_id: str, user_data: str, auth: object) -> None:
    """@raise PusherAuthError: C{auth} does not sign C{user_data} for C{socket_id}."""
    _check_auth(key, auth, user_signature(key, secret, socket_id, user_data), "sign-in")


def string_to_sign(method: str, path: str, params: Mapping[str, str]) -> str:
    """C{"<METHOD>\\n<path>\\n<sorted k=v&...>"}, every parameter but C{auth_signature}."""
    query = "&".join(f"{k}={params[k]}" for k in sorted(params) if k != "auth_signature")
    return f"{method.upper()}\n{path}\n{query}"


def request_signature(secret: str, method: str, path: str, params: Mapping[str, str]) -> str:
    """The C{auth_signature} of an HTTP API request."""
    return _hmac_hex(secret, string_to_sign(method, path, params))


def check_request(
    key: str,
    secret: str,
    method: str,
    path: str,
    params: Mapping[str, str],
    body: bytes,
    now: float,
    window: int = TIMESTAMP_WINDOW,
) -> None:
    """
    Verify a signed HTTP API request: C{params} are its query parameters
    (decoded; keys as sent), C{path} the request path.

    @raise PusherAuthError: a missing parameter, another app's key, a
        C{body_md5} that is not the body's, an C{auth_timestamp} more than
        C{window} seconds off, or a wrong C{auth_signature}.
    """
    for name in ("auth_key", "auth_timestamp", "auth_signature"):
        if name not in params:
            raise PusherAuthError(f"missing the query parameter {name!r}")
    if params.get("auth_version", "1.0") != "1.0":
        raise PusherAuthError("auth_version must be 1.0")
    if not hmac.compare_digest(params["auth_key"].encode("utf-8", "replace"), key.encode("utf-8")):
        raise PusherAuthError("unknown auth_key")
    stamp = params["auth_timestamp"]
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise PusherAuthError("auth_timestamp must be a Unix time in seconds")
    if abs(int(stamp) - now) > window:
        raise PusherAuthError(
            f"timestamp expired: auth_timestamp {stamp} is more than {window} s from the server time {int(now)}"
        )
    md5 = params.get("body_md5")
    if body or md5 is not None:
        if md5 is None:
            raise PusherAuthError("a request with a body needs body_md5")
        if not hmac.compare_digest(md5.encode("utf-8", "replace"), hashlib.md5(body).hexdigest().encode("ascii")):
            raise PusherAuthError("body_md5 does not match the body")
    expected = request_signature(secret, method, path, params)
    if not hmac.compare_digest(params["auth_signature"].encode("utf-8", "replace"), expected.encode("ascii")):
        raise PusherAuthError(
            f"invalid signature: expected the HMAC SHA256 hex digest of {string_to_sign(method, path, params)!r}"
            " with the app secret"
        )


def webhook_signature(secret: str, body: bytes) -> str:
    """The C{X-Pusher-Signature} of a webhook body: hex HMAC-SHA256 with the app secret."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()

"""Pusher's signatures (twisted_rt.core.pusher_auth) against what PyPI's pusher library computes."""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import parse_qsl

import pusher
import pytest
from pusher.http import Request as PusherRequest

from twisted_rt.core.pusher_auth import (
    PusherAuthError,
    channel_signature,
    check_channel_auth,
    check_request,
    check_user_auth,
    user_signature,
    webhook_signature,
)

KEY, SECRET, APP = "rt-key", "rt-secret", "1001"
CLIENT = pusher.Pusher(app_id=APP, key=KEY, secret=SECRET, host="127.0.0.1", port=1, ssl=False)


def _signed(method: str, path: str, params: dict[str, str] | None = None) -> tuple[dict[str, str], bytes]:
    req = PusherRequest(CLIENT._pusher_client, method, path, params or {})
    return dict(parse_qsl(req.query_string)), req.body


def test_channel_auth_matches_pusher_authenticate() -> None:
    """A private channel's auth is exactly what pusher.authenticate answers, and it verifies."""
    auth = CLIENT.authenticate(channel="private-a", socket_id="1.2")["auth"]
    assert auth == channel_signature(KEY, SECRET, "1.2", "private-a")
    check_channel_auth(KEY, SECRET, "1.2", "private-a", auth)


def test_presence_auth_covers_channel_data() -> None:
    """A presence auth signs channel_data: other channel_data, socket or channel fail."""
    a = CLIENT.authenticate(channel="presence-a", socket_id="1.2", custom_data={"user_id": "u"})
    check_channel_auth(KEY, SECRET, "1.2", "presence-a", a["auth"], a["channel_data"])
    for args in (("1.3", "presence-a", a["channel_data"]), ("1.2", "presence-b", a["channel_data"]),
                 ("1.2", "presence-a", '{"user_id":"v"}')):
        with pytest.raises(PusherAuthError, match="invalid signature"):
            check_channel_auth(KEY, SECRET, args[0], args[1], a["auth"], args[2])


def test_channel_auth_refuses_other_key_and_shapes() -> None:
    """Another app's key and values that are not 'key:signature' are refused with a reason."""
    with pytest.raises(PusherAuthError, match="not this app's key"):
        check_channel_auth(KEY, SECRET, "1.2", "private-a", "other:" + "0" * 64)
    for bad in (None, 5, "nocolon"):
        with pytest.raises(PusherAuthError, match="must be"):
            check_channel_auth(KEY, SECRET, "1.2", "private-a", bad)


def test_user_auth_matches_pusher_authenticate_user() -> None:
    """A pusher:signin auth is what pusher.authenticate_user answers."""
    a = CLIENT.authenticate_user("1.2", {"id": "alice"})
    assert a["auth"] == user_signature(KEY, SECRET, "1.2", a["user_data"])
    check_user_auth(KEY, SECRET, "1.2", a["user_data"], a["auth"])
    with pytest.raises(PusherAuthError):
        check_user_auth(KEY, SECRET, "1.3", a["user_data"], a["auth"])


def test_request_signed_by_pusher_verifies() -> None:
    """POST and GET requests signed by the pusher library verify; the body is checked by body_md5."""
    params, body = _signed("POST", f"/apps/{APP}/events", {"name": "e", "channels": ["a"], "data": "x"})
    check_request(KEY, SECRET, "POST", f"/apps/{APP}/events", params, body, time.time())
    with pytest.raises(PusherAuthError, match="body_md5"):
        check_request(KEY, SECRET, "POST", f"/apps/{APP}/events", params, body + b" ", time.time())
    params, body = _signed("GET", f"/apps/{APP}/channels", {"info": "user_count", "filter_by_prefix": "presence-"})
    check_request(KEY, SECRET, "GET", f"/apps/{APP}/channels", params, body, time.time())
    with pytest.raises(PusherAuthError, match="invalid signature"):
        check_request(KEY, SECRET, "GET", f"/apps/{APP}/channels", {**params, "info": "x"}, body, time.time())


def test_request_timestamp_window() -> None:
    """auth_timestamp more than 600 s off (past or future) is refused; inside it is accepted."""
    params, body = _signed("GET", "/apps/1001/channels")
    t = int(params["auth_timestamp"])
    check_request(KEY, SECRET, "GET", "/apps/1001/channels", params, body, t + 600)
    for now in (t + 601, t - 601):
        with pytest.raises(PusherAuthError, match="timestamp expired"):
            check_request(KEY, SECRET, "GET", "/apps/1001/channels", params, body, now)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"auth_key": "other"}, "unknown auth_key"),
        ({"auth_version": "2.0"}, "auth_version"),
        ({"auth_timestamp": "soon"}, "Unix time"),
        ({"auth_signature": "0" * 64}, "invalid signature"),
    ],
)
def test_request_refusals(change: dict[str, str], reason: str) -> None:
    """Each wrong parameter is refused with its own reason."""
    params, body = _signed("GET", "/apps/1001/channels")
    with pytest.raises(PusherAuthError, match=reason):
        check_request(KEY, SECRET, "GET", "/apps/1001/channels", {**params, **change}, body, time.time())


def test_request_missing_parameters() -> None:
    """A request without auth parameters, or with a body but no body_md5, is refused."""
    with pytest.raises(PusherAuthError, match="missing"):
        check_request(KEY, SECRET, "GET", "/apps/1001/channels", {}, b"", time.time())
    params, body = _signed("POST", "/apps/1001/events", {"name": "e"})
    del params["body_md5"]
    with pytest.raises(PusherAuthError, match="needs body_md5"):
        check_request(KEY, SECRET, "POST", "/apps/1001/events", params, body, time.time())


def test_webhook_signature_validates_with_pusher() -> None:
    """X-Pusher-Signature as computed here is accepted by pusher.validate_webhook."""
    body = json.dumps({"time_ms": int(time.time() * 1000), "events": [{"name": "channel_occupied",
                                                                        "channel": "a"}]}).encode()
    sig = webhook_signature(SECRET, body)
    assert sig == __import__("hmac").new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert CLIENT.validate_webhook(KEY, sig, body.decode())["events"][0]["name"] == "channel_occupied"

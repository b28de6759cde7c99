"""
Attacks on the Pusher protocol (/app/<key>) against the real daemon: the app key is public,
so everything here is what any browser could send.
"""

from __future__ import annotations

import json
from typing import Callable

import pytest

from tests.conftest import Daemon
from tests.test_pusher_daemon import CONFIG, KEY, SECRET, PusherWS
from twisted_rt.core.pusher_auth import channel_signature


@pytest.fixture
def pd(make_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon speaking the Pusher protocol (client events on, 2 KiB messages)."""
    return make_daemon(CONFIG)


def _presence(p: PusherWS, channel: str, channel_data: str, signed: str | None = None) -> dict[str, object]:
    auth = channel_signature(KEY, SECRET, p.socket_id, channel, signed if signed is not None else channel_data)
    return p.subscribe(channel, auth=auth, channel_data=channel_data)


def _healthy(d: Daemon) -> None:
    status, _ = d.get("/healthz")
    assert status == 200


def test_presence_user_info_over_1_kib_is_refused(pd: Daemon) -> None:
    """A signed channel_data whose user_info is over 1 KiB of JSON is refused (4009): members replies stay bounded."""
    p = PusherWS(pd).connect()
    cd = json.dumps({"user_id": "u1", "user_info": {"bio": "x" * 1100}})
    got = _presence(p, "presence-big", cd)
    assert got["event"] == "pusher:error" and got["data"]["code"] == 4009, got  # type: ignore[index]
    assert "1024" in got["data"]["message"]  # type: ignore[index]
    assert p.recv()["event"] == "pusher:subscription_error"
    ok = _presence(p, "presence-big", json.dumps({"user_id": "u1", "user_info": {"bio": "x" * 900}}))
    assert ok["event"] == "pusher_internal:subscription_succeeded"
    p.close()
    _healthy(pd)


def test_presence_user_id_comes_from_the_signed_channel_data_only(pd: Daemon) -> None:
    """channel_data changed after signing (another user_id) is refused: no member impersonation."""
    p = PusherWS(pd).connect()
    signed = json.dumps({"user_id": "alice"})
    got = _presence(p, "presence-room", json.dumps({"user_id": "mallory"}), signed=signed)
    assert got["event"] == "pusher:error" and got["data"]["code"] == 4009  # type: ignore[index]
    _healthy(pd)
    p.close()


def test_private_signature_of_another_socket_is_refused(pd: Daemon) -> None:
    """A private- auth signed for another socket_id does not open the channel on this socket."""
    a = PusherWS(pd).connect()
    b = PusherWS(pd).connect()
    auth = channel_signature(KEY, SECRET, a.socket_id, "private-x")
    got = b.subscribe("private-x", auth=auth)
    assert got["event"] == "pusher:error" and got["data"]["code"] == 4009  # type: ignore[index]
    assert a.subscribe("private-x", auth=auth)["event"] == "pusher_internal:subscription_succeeded"
    a.close()
    b.close()


def test_client_events_only_on_signed_channels(pd: Daemon) -> None:
    """A client- event on a public channel, or on a channel not subscribed, is refused and not relayed."""
    a = PusherWS(pd).connect()
    b = PusherWS(pd).connect()
    assert a.subscribe("orders.2")["event"] == "pusher_internal:subscription_succeeded"
    assert b.subscribe("orders.2")["event"] == "pusher_internal:subscription_succeeded"
    a.send("client-x", {"n": 1}, channel="orders.2")
    assert a.recv()["event"] == "pusher:error"
    a.send("client-x", {"n": 1}, channel="private-z")
    assert a.recv()["event"] == "pusher:error"
    a.send("pusher:ping")
    b.send("pusher:ping")
    assert b.recv()["event"] == "pusher:pong"  # nothing relayed before the pong
    a.close()
    b.close()


def test_subscriptions_per_connection_are_capped(pd: Daemon) -> None:
    """Thousands of public subscriptions from one socket stop at [websocket] max_subscriptions (4100)."""
    p = PusherWS(pd).connect()
    errors = 0
    for i in range(1100):
        p.send("pusher:subscribe", {"channel": f"spam.{i}"})
    for _ in range(1100):
        msg = p.recv()
        if msg["event"] == "pusher:error":
            assert msg["data"]["code"] == 4100
            errors += 1
    assert errors >= 1
    p.close()
    _healthy(pd)

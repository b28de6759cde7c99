"""
Attacks on the Pusher protocol (/app/<key>) against the real daemon: the app key is public,
so everything here is what any browser could send.
"""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import urlencode

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


# -- the signed HTTP API ------------------------------------------------------


def _signed(d: Daemon, method: str, path: str, body: bytes = b"", **params: str) -> tuple[int, Any]:
    import hashlib
    import time

    from tests.conftest import http
    from twisted_rt.core.pusher_auth import request_signature

    q = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0", **params}
    if body:
        q["body_md5"] = hashlib.md5(body).hexdigest()
    q["auth_signature"] = request_signature(SECRET, method, path, q)
    status, _, raw = http(method, d.url + path + "?" + urlencode(q), body or None,
                          {"Content-Type": "application/json"})
    return status, json.loads(raw) if raw else None


def test_http_api_refuses_unsigned_and_oversized_requests(pd: Daemon) -> None:
    """Unsigned, badly signed or stale calls are 401 JSON; 101 channels, 11 events, a long name, big data: 4xx JSON."""
    from tests.conftest import http_json

    status, body = http_json("POST", pd.url + "/apps/1001/events", {"name": "x", "data": "1", "channel": "a"})
    assert status == 401 and body["error"] == "invalid_signature"
    status, body = http_json("GET", pd.url + "/apps/1001/channels?auth_key=rt-key&auth_timestamp=1"
                             "&auth_version=1.0&auth_signature=00")
    assert status == 401 and "timestamp" in body["message"] and SECRET not in body["message"]
    cases = [
        ({"name": "e", "data": "1", "channels": [f"c{i}" for i in range(101)]}, 400),
        ({"name": "e" * 201, "data": "1", "channel": "c"}, 400),
        ({"name": "e", "data": "x" * 3000, "channel": "c"}, 413),
        ({"name": "e", "data": "1", "channel": "c\n"}, 400),
        ({"name": "e", "data": "1", "channels": [{"a": 1}]}, 400),
        ([1, 2], 400),
    ]
    for obj, expected in cases:
        status, got = _signed(pd, "POST", "/apps/1001/events", json.dumps(obj).encode())
        assert status == expected and isinstance(got, dict) and got.get("error"), (str(obj)[:60], status, got)
    batch = {"batch": [{"name": "e", "data": "1", "channel": "c"}] * 11}
    status, got = _signed(pd, "POST", "/apps/1001/batch_events", json.dumps(batch).encode())
    assert status == 400 and got["error"]
    status, got = _signed(pd, "GET", "/apps/1001/channels", info="user_count")
    assert status == 400 and got["error"]
    status, got = _signed(pd, "GET", "/apps/1001/channels/" + "c" * 300)
    assert status == 400 and got["error"] == "invalid_channel"
    status, got = _signed(pd, "GET", "/apps/9999/channels")
    assert status == 404
    _healthy(pd)


def test_occupancy_counters_do_not_pile_up_in_redis(
    make_daemon: Callable[..., Daemon], redis_server: Any
) -> None:
    """Anonymous subscribe/unsubscribe of many public channels leaves no pusher-occupancy key behind in Redis."""
    import socket

    d = make_daemon(CONFIG.replace('max_message_bytes = 2048', 'max_message_bytes = 2048\nwebhooks = "hooks"') + f"""
[broker]
kind = "redis"
url = "{redis_server.url}"

[[destinations]]
name = "hooks"
url = "http://127.0.0.1:9/hooks"
channels = ["never.>"]
max_attempts = 1
""")
    p = PusherWS(d).connect()
    for i in range(50):
        p.send("pusher:subscribe", {"channel": f"junk.{i}"})
        p.send("pusher:unsubscribe", {"channel": f"junk.{i}"})
    p.send("pusher:ping")
    while p.recv()["event"] != "pusher:pong":
        pass

    def keys() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as s:
            s.sendall(b"KEYS *pusher-occupancy*\r\n")
            time.sleep(0.2)
            return [line for line in s.recv(1 << 16).split(b"\r\n") if b"pusher-occupancy" in line]

    import time

    deadline = time.monotonic() + 5
    while keys() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert keys() == []
    p.close()
    _healthy(d)


def test_an_oversized_message_is_refused_before_it_is_buffered(pd: Daemon) -> None:
    """An 8 MiB Pusher message closes the socket (4100 or 1009) without the daemon holding it: RSS stays flat."""
    import psutil
    import websocket

    proc = psutil.Process(pd.proc.pid)  # type: ignore[union-attr]
    before = proc.memory_info().rss
    for _ in range(3):
        p = PusherWS(pd).connect()
        try:
            p.ws.send(json.dumps({"event": "pusher:ping", "data": "x" * (8 << 20)}))
        except (OSError, websocket.WebSocketException):
            pass  # the server may close while the client is still writing
        try:
            code = p.closed_with()
        except (OSError, websocket.WebSocketException):
            code = None
        assert code in (4100, 1009, None)
        p.close()
    assert proc.memory_info().rss - before < 8 << 20
    _healthy(pd)


def test_failing_subscribes_do_not_flood_the_log(make_daemon: Callable[..., Daemon], redis_server: Any) -> None:
    """With Redis down, 20 anonymous cache- subscribes are each answered, but the traceback is logged once per socket."""
    d = make_daemon(CONFIG + f"""
[broker]
kind = "redis"
url = "{redis_server.url}"
""")
    redis_server.stop()
    p = PusherWS(d).connect()
    for i in range(20):
        p.send("pusher:subscribe", {"channel": f"cache-x{i}"})
    answered = 0
    while answered < 20:
        msg = p.recv()
        if msg["event"] in ("pusher:error", "pusher:subscription_error", "pusher:cache_miss",
                            "pusher_internal:subscription_succeeded"):
            answered += msg["event"] == "pusher:error"
    assert d.log().count("handling pusher:subscribe") <= 1
    redis_server.start()  # the same port: the daemon reconnects; a retried subscribe really subscribes
    import time

    from tests.test_pusher_daemon import client

    deadline = time.monotonic() + 15
    while True:
        p.send("pusher:subscribe", {"channel": "cache-x0"})
        msg = p.recv()
        while msg["event"] not in ("pusher:error", "pusher_internal:subscription_succeeded"):
            msg = p.recv()
        if msg["event"] == "pusher_internal:subscription_succeeded" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert msg["event"] == "pusher_internal:subscription_succeeded", msg
    assert p.recv()["event"] == "pusher:cache_miss"
    client(d).trigger(["cache-x0"], "back", {"ok": 1})
    assert p.expect("back")["data"] == {"ok": 1}
    p.close()
    _healthy(d)


def test_public_channels_can_be_narrowed_so_webhook_channels_stay_unreadable(make_daemon: Callable[..., Daemon]) -> None:
    """With [pusher] public_channels set, an unsigned subscribe to any other unprefixed channel is refused 4009."""
    d = make_daemon(CONFIG.replace("client_events = true", 'client_events = true\npublic_channels = ["news.>"]'))
    p = PusherWS(d).connect()
    ok = p.subscribe("news.today")
    assert ok["event"] == "pusher_internal:subscription_succeeded"
    p.send("pusher:subscribe", {"channel": "github.push"})
    err = p.recv()
    assert err["event"] == "pusher:error" and err["data"]["code"] == 4009
    assert "not a public channel" in err["data"]["message"]
    sub_err = p.recv()
    assert sub_err["event"] == "pusher:subscription_error" and sub_err["data"]["status"] == 403
    p.close()
    _healthy(d)


def test_triggers_whose_caller_hangs_up_are_kept_and_counted(pd: Daemon) -> None:
    """Signed Pusher triggers whose connection closes before the answer are each journaled and counted."""
    import hashlib
    import socket
    import time

    from tests.conftest import API_KEY
    from tests.test_pusher_daemon import APP
    from twisted_rt.core.pusher_auth import request_signature

    auth = {"Authorization": f"Bearer {API_KEY}"}
    path = f"/apps/{APP}/events"
    socks = []
    for i in range(20):  # the close reaches the daemon while most of these commits are in flight
        body = json.dumps({"name": "gone", "channel": "hangup", "data": str(i)}).encode()
        q = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0",
             "body_md5": hashlib.md5(body).hexdigest()}
        q["auth_signature"] = request_signature(SECRET, "POST", path, q)
        s = socket.create_connection(("127.0.0.1", pd.port))
        s.sendall(f"POST {path}?{urlencode(q)} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(s)
    for s in socks:
        s.close()
    status, _ = _signed(pd, "POST", path, json.dumps({"name": "last", "channel": "hangup", "data": "x"}).encode())
    assert status == 200
    deadline = time.monotonic() + 10
    while True:
        _, page = pd.get("/api/channels/hangup/history?limit=100", headers=auth)
        _, stats = pd.get("/api/stats", headers=auth)
        kept, counted = len(page["events"]), stats["events_in_by_source"].get("pusher", 0)
        if kept == counted == 21 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (kept, counted) == (21, 21)  # every trigger kept, and counted

"""
The Pusher protocol against the real daemon: a raw WebSocket client speaking
Pusher protocol 7, and PyPI's pusher library signing every HTTP API call.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable
from urllib.parse import urlencode

import pusher
import pytest
import websocket

from tests.conftest import API_KEY, JWT_SECRET, Daemon, http, http_json

KEY, SECRET, APP = "rt-key", "rt-secret", "1001"

CONFIG = f"""
[journal]
path = "var/journal.sqlite3"

[auth]
api_keys = ["{API_KEY}"]
jwt_secret = "{JWT_SECRET}"
anonymous_subscribe = ["public.>"]

[pusher]
app_id = "{APP}"
key = "{KEY}"
secret = "{SECRET}"
client_events = true
max_message_bytes = 2048
"""


class PusherWS:
    """A raw Pusher protocol client: JSON messages, data decoded when it is JSON text."""

    def __init__(self, d: Daemon, key: str = KEY, query: str = "protocol=7") -> None:
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{d.port}/app/{key}?{query}", timeout=10)
        self.socket_id = ""
        self.close_code: int | None = None

    def connect(self) -> PusherWS:
        est = self.recv()
        assert est["event"] == "pusher:connection_established", est
        self.socket_id = est["data"]["socket_id"]
        return self

    def send(self, event: str, data: Any = None, **extra: Any) -> None:
        self.ws.send(json.dumps({"event": event, "data": data if data is not None else {}, **extra}))

    def recv(self) -> dict[str, Any]:
        while True:
            opcode, frame = self.ws.recv_data_frame(True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close_code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
                raise ConnectionError(f"closed {self.close_code}")
            if opcode == websocket.ABNF.OPCODE_TEXT:
                msg: dict[str, Any] = json.loads(frame.data)
                if isinstance(msg.get("data"), str):
                    try:
                        msg["data"] = json.loads(msg["data"])
                    except ValueError:
                        pass
                return msg

    def expect(self, event: str) -> dict[str, Any]:
        """The next message named C{event} (others before it are skipped)."""
        for _ in range(50):
            msg = self.recv()
            if msg["event"] == event:
                return msg
        raise AssertionError(f"no {event}")

    def closed_with(self) -> int | None:
        try:
            while True:
                self.recv()
        except ConnectionError:
            return self.close_code

    def subscribe(self, channel: str, **auth: Any) -> dict[str, Any]:
        self.send("pusher:subscribe", {"channel": channel, **auth})
        return self.recv()

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def pd(make_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon speaking the Pusher protocol (client events on, 2 KiB messages)."""
    return make_daemon(CONFIG)


def client(d: Daemon) -> pusher.Pusher:
    return pusher.Pusher(app_id=APP, key=KEY, secret=SECRET, host="127.0.0.1", port=d.port, ssl=False)


def test_trigger_reaches_pusher_ws_and_sse_clients(pd: Daemon) -> None:
    """pusher.trigger is journaled once: Pusher clients get it by name, /ws sees source pusher, type = name."""
    p = PusherWS(pd).connect()
    assert p.subscribe("orders.1")["event"] == "pusher_internal:subscription_succeeded"
    ws = websocket.create_connection(pd.ws_url + f"?token={API_KEY}", timeout=10)
    ws.send(json.dumps({"op": "subscribe", "channel": "orders.1"}))
    assert json.loads(ws.recv())["op"] == "subscribed"
    assert client(pd).trigger(["orders.1"], "order-shipped", {"id": 7}) == {}
    got = p.recv()
    assert got == {"event": "order-shipped", "channel": "orders.1", "data": {"id": 7}}
    ev = json.loads(ws.recv())
    assert (ev["channel"], ev["source"], ev["type"], ev["data"]) == ("orders.1", "pusher", "order-shipped", {"id": 7})
    status, body = pd.get("/api/channels/orders.1/history", headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and [e["offset"] for e in body["events"]] == [1]
    ws.close()
    p.close()


def test_api_publish_reaches_pusher_clients_as_type_or_message(pd: Daemon) -> None:
    """/api/publish events reach Pusher clients named by type (else 'message') with data as JSON text."""
    p = PusherWS(pd).connect()
    p.subscribe("chat.room1")
    pd.publish("chat.room1", {"text": "hi"}, type="said")
    pd.publish("chat.room1", "plain")
    raw1 = p.recv()
    raw2 = p.recv()
    assert raw1 == {"event": "said", "channel": "chat.room1", "data": {"text": "hi"}}
    assert raw2 == {"event": "message", "channel": "chat.room1", "data": "plain"}
    p.close()


def test_trigger_text_data_and_batch_and_socket_exclusion(pd: Daemon) -> None:
    """Non-JSON data round-trips verbatim; trigger_batch is one commit; socket_id leaves its sender out."""
    a, b = PusherWS(pd).connect(), PusherWS(pd).connect()
    a.subscribe("news")
    b.subscribe("news")
    c = client(pd)
    assert c.trigger_batch([{"channel": "news", "name": "n1", "data": "just text"},
                            {"channel": "news", "name": "n2", "data": "[1, 2]"}]) == {"batch": [{}, {}]}
    for p in (a, b):
        assert p.recv()["data"] == "just text"
        assert p.recv()["data"] == [1, 2]
    c.trigger("news", "n3", "for b only", socket_id=a.socket_id)
    assert b.recv()["data"] == "for b only"
    a.send("pusher:ping")
    assert a.recv()["event"] == "pusher:pong"  # a got nothing before its pong
    a.close()
    b.close()


def test_private_and_presence_with_pusher_authenticate(pd: Daemon) -> None:
    """Signatures from pusher.authenticate admit private-/presence-; members are added and removed."""
    c = client(pd)
    a = PusherWS(pd).connect()
    auth = c.authenticate(channel="private-orders", socket_id=a.socket_id)
    assert a.subscribe("private-orders", **auth)["event"] == "pusher_internal:subscription_succeeded"
    pa = c.authenticate(channel="presence-room", socket_id=a.socket_id,
                        custom_data={"user_id": "alice", "user_info": {"name": "Alice"}})
    ok = a.subscribe("presence-room", **pa)
    assert ok["data"]["presence"] == {"ids": ["alice"], "hash": {"alice": {"name": "Alice"}}, "count": 1}
    b = PusherWS(pd).connect()
    pb = c.authenticate(channel="presence-room", socket_id=b.socket_id, custom_data={"user_id": 42})
    ok = b.subscribe("presence-room", **pb)
    assert ok["data"]["presence"]["ids"] == ["42", "alice"]
    added = a.expect("pusher_internal:member_added")
    assert added["data"] == {"user_id": "42"}
    assert c.users_info("presence-room") == {"users": [{"id": "42"}, {"id": "alice"}]}
    assert c.channel_info("presence-room", ["user_count", "subscription_count"]) == {
        "occupied": True, "user_count": 2, "subscription_count": 2}
    info = c.channels_info("presence-", ["user_count"])
    assert info == {"channels": {"presence-room": {"user_count": 2}}}
    b.send("pusher:unsubscribe", {"channel": "presence-room"})
    assert a.expect("pusher_internal:member_removed")["data"] == {"user_id": "42"}
    a.close()
    b.close()


def test_bad_channel_signature_is_4009(pd: Daemon) -> None:
    """A wrong signature, or one for another socket, is pusher:error 4009 with a subscription_error."""
    c = client(pd)
    a = PusherWS(pd).connect()
    other = c.authenticate(channel="private-x", socket_id="123.456")
    err = a.subscribe("private-x", **other)
    assert err["event"] == "pusher:error" and err["data"]["code"] == 4009
    sub_err = a.recv()
    assert sub_err["event"] == "pusher:subscription_error" and sub_err["data"]["status"] == 401
    err = a.subscribe("presence-x", auth=f"{KEY}:{'0' * 64}", channel_data='{"user_id":"u"}')
    assert err["data"]["code"] == 4009
    a.close()


@pytest.mark.parametrize("name", ["bad=name", "a,b", "semi;colon", "x" * 201, "star.*"])
def test_channel_outside_character_rule_is_4009(pd: Daemon, name: str) -> None:
    """Pusher names outside the channel character rule are refused with pusher:error 4009."""
    a = PusherWS(pd).connect()
    err = a.subscribe(name)
    assert err["event"] == "pusher:error" and err["data"]["code"] == 4009
    a.close()


def test_wrong_app_key_is_4001(pd: Daemon) -> None:
    """A wrong key gets pusher:error 4001 and the close code 4001 (pusher-js does not retry)."""
    a = PusherWS(pd, key="nope")
    err = a.recv()
    assert err == {"event": "pusher:error", "data": {"code": 4001, "message": "App key nope does not exist"}}
    assert a.closed_with() == 4001


def test_unsupported_protocol_is_4007(pd: Daemon) -> None:
    """A missing or unknown ?protocol= is refused with 4007."""
    a = PusherWS(pd, query="protocol=1")
    assert a.recv()["data"]["code"] == 4007
    assert a.closed_with() == 4007


def test_oversized_message_closes_4100(pd: Daemon) -> None:
    """A message over [pusher] max_message_bytes is closed with 4100 before it is read whole."""
    a = PusherWS(pd).connect()
    a.send("client-big", {"x": "y" * 4000}, channel="private-a")
    assert a.expect("pusher:error")["data"]["code"] == 4100
    assert a.closed_with() == 4100


def test_client_events_relay_to_others_only(pd: Daemon) -> None:
    """client- events on private channels reach the other subscribers (not the sender), not the journal."""
    c = client(pd)
    a, b = PusherWS(pd).connect(), PusherWS(pd).connect()
    for p in (a, b):
        p.subscribe("private-chat", **c.authenticate(channel="private-chat", socket_id=p.socket_id))
    a.send("client-typing", {"who": "a"}, channel="private-chat")
    assert b.recv() == {"event": "client-typing", "channel": "private-chat", "data": {"who": "a"}}
    a.send("pusher:ping")
    assert a.recv()["event"] == "pusher:pong"
    a.subscribe("public-chan")
    a.send("client-x", {}, channel="public-chan")
    assert "private- and presence-" in a.expect("pusher:error")["data"]["message"]
    status, body = pd.get("/api/channels/private-chat/history", headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and body["events"] == []
    a.close()
    b.close()


def test_cache_channel_sends_last_event_or_cache_miss(pd: Daemon) -> None:
    """A cache- channel sends its last journaled event after subscribing, or pusher:cache_miss."""
    a = PusherWS(pd).connect()
    a.subscribe("cache-prices")
    assert a.recv() == {"event": "pusher:cache_miss", "channel": "cache-prices"}
    c = client(pd)
    c.trigger("cache-prices", "price", {"v": 1})
    c.trigger("cache-prices", "price", {"v": 2})
    b = PusherWS(pd).connect()
    assert b.subscribe("cache-prices")["event"] == "pusher_internal:subscription_succeeded"
    assert b.recv() == {"event": "price", "channel": "cache-prices", "data": {"v": 2}}
    a.close()
    b.close()


def test_signin_and_terminate_connections(pd: Daemon) -> None:
    """pusher:signin with authenticate_user; terminate_user_connections closes that user's sockets with 4009."""
    c = client(pd)
    a, b = PusherWS(pd).connect(), PusherWS(pd).connect()
    ua = c.authenticate_user(a.socket_id, {"id": "carol"})
    a.send("pusher:signin", ua)
    assert a.recv()["event"] == "pusher:signin_success"
    assert a.subscribe("#server-to-user-carol")["event"] == "pusher_internal:subscription_succeeded"
    b.send("pusher:signin", {"user_data": ua["user_data"], "auth": ua["auth"]})
    assert b.recv()["data"]["code"] == 4009  # signed for a's socket
    assert c.terminate_user_connections("carol") == {}
    assert a.expect("pusher:error")["data"]["code"] == 4009
    assert a.closed_with() == 4009
    b.send("pusher:ping")
    assert b.recv()["event"] == "pusher:pong"
    # the /apps/<id>/ path is served too
    params = _signed_query("POST", f"/apps/{APP}/users/carol/terminate_connections", b"{}")
    status, _ = http_json("POST", f"{pd.url}/apps/{APP}/users/carol/terminate_connections?{params}", b"{}")
    assert status == 200
    b.close()


def _signed_query(method: str, path: str, body: bytes, timestamp: int | None = None,
                  secret: str = SECRET) -> str:
    from hashlib import md5

    from twisted_rt.core.pusher_auth import request_signature

    q = {"auth_key": KEY, "auth_timestamp": str(int(time.time()) if timestamp is None else timestamp),
         "auth_version": "1.0", "body_md5": md5(body).hexdigest()}
    q["auth_signature"] = request_signature(secret, method, path, q)
    return urlencode(q)


def test_http_api_refuses_stale_and_wrong_signatures(pd: Daemon) -> None:
    """A stale auth_timestamp, a wrong secret, or a body not matching body_md5 is 401 (nothing journaled)."""
    path = f"/apps/{APP}/events"
    body = json.dumps({"name": "e", "channel": "a", "data": "{}"}).encode()
    hdr = {"Content-Type": "application/json"}
    for query in (_signed_query("POST", path, body, int(time.time()) - 700),
                  _signed_query("POST", path, body, secret="wrong")):
        status, _, raw = http("POST", f"{pd.url}{path}?{query}", body, hdr)
        assert status == 401 and json.loads(raw)["error"] == "invalid_signature"
    status, _, _ = http("POST", f"{pd.url}{path}?{_signed_query('POST', path, body)}", body + b" ", hdr)
    assert status == 401
    status, _, _ = http("POST", f"{pd.url}{path}", body, hdr)
    assert status == 401
    bad = pusher.Pusher(app_id=APP, key=KEY, secret="nope", host="127.0.0.1", port=pd.port, ssl=False)
    with pytest.raises(pusher.errors.PusherBadAuth):
        bad.trigger("a", "e", {})
    status, body2 = pd.get("/api/channels", headers={"Authorization": f"Bearer {API_KEY}"})
    assert all(ch["name"] != "a" for ch in body2["channels"])


def test_http_api_bad_requests(pd: Daemon) -> None:
    """Bad bodies are 400, unknown apps and routes 404, oversized data 413 (all signed correctly)."""
    def post(path: str, obj: Any) -> int:
        body = json.dumps(obj).encode()
        status, _, _ = http("POST", f"{pd.url}{path}?{_signed_query('POST', path, body)}", body,
                            {"Content-Type": "application/json"})
        return status

    ev = f"/apps/{APP}/events"
    assert post(ev, {"name": "e", "channel": "bad=name", "data": "x"}) == 400
    assert post(ev, {"name": "e", "channels": [f"c{i}" for i in range(101)], "data": "x"}) == 400
    assert post(ev, {"name": "", "channel": "a", "data": "x"}) == 400
    assert post(ev, {"name": "e", "channel": "a"}) == 400
    assert post(ev, {"name": "e", "data": "x"}) == 400
    assert post(ev, {"name": "e", "channel": "a", "data": "x" * 3000}) == 413
    assert post(f"/apps/{APP}/batch_events", {"batch": [{"name": "e", "channel": "a", "data": "x"}] * 11}) == 400
    assert post("/apps/999/events", {"name": "e", "channel": "a", "data": "x"}) == 404
    assert post(f"/apps/{APP}/nothing", {}) == 404
    c = client(pd)
    with pytest.raises(pusher.errors.PusherBadRequest):
        c.users_info("not-presence")
    with pytest.raises(pusher.errors.PusherBadRequest):
        c.channels_info(attributes=["user_count"])


def test_plain_get_of_app_endpoint_is_426(pd: Daemon) -> None:
    """GET /app/<key> without an upgrade is a JSON 426; POST is 405."""
    status, _, raw = http("GET", f"{pd.url}/app/{KEY}")
    assert status == 426 and json.loads(raw)["error"] == "upgrade_required"
    status, _, _ = http("POST", f"{pd.url}/app/{KEY}", b"")
    assert status == 405


def test_bad_messages_are_answered(pd: Daemon) -> None:
    """Bad JSON, unknown events and client events when not subscribed get pusher:error, not a crash."""
    a = PusherWS(pd).connect()
    a.ws.send("{nope")
    assert a.recv()["event"] == "pusher:error"
    a.send("pusher:whatever")
    assert "unsupported" in a.recv()["data"]["message"]
    a.send("client-x", {}, channel="private-none")
    assert "not subscribed" in a.recv()["data"]["message"]
    a.send("pusher:subscribe", "nochannel")
    assert a.recv()["event"] == "pusher:error"
    a.send("pusher:ping")
    assert a.recv()["event"] == "pusher:pong"
    a.close()


def test_pusher_off_without_section(make_daemon: Callable[..., Daemon]) -> None:
    """Without [pusher] the routes do not exist (JSON 404)."""
    d = make_daemon()
    status, _, _ = http("GET", f"{d.url}/apps/1/channels")
    assert status == 404


def test_pusher_webhooks_through_a_destination(make_daemon: Callable[..., Daemon]) -> None:
    """channel_occupied, member_added, client_event and channel_vacated reach the destination, Pusher-signed."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    got: list[dict[str, Any]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hook = pusher.Pusher(app_id=APP, key=KEY, secret=SECRET).validate_webhook(
                self.headers["X-Pusher-Key"], self.headers["X-Pusher-Signature"], body.decode())
            got.extend(hook["events"] if hook else [{"name": "INVALID"}])
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        d = make_daemon(CONFIG.replace('client_events = true', 'client_events = true\nwebhooks = "pusher-hooks"')
                        + f'\n[[destinations]]\nname = "pusher-hooks"\nurl = "http://127.0.0.1:{server.server_port}/"\n')
        c = client(d)
        a, b = PusherWS(d).connect(), PusherWS(d).connect()
        a.subscribe("presence-hooks", **c.authenticate(channel="presence-hooks", socket_id=a.socket_id,
                                                       custom_data={"user_id": "ann"}))
        b.subscribe("presence-hooks", **c.authenticate(channel="presence-hooks", socket_id=b.socket_id,
                                                       custom_data={"user_id": "ben"}))
        a.send("client-hi", {"x": 1}, channel="presence-hooks")
        b.expect("client-hi")
        a.close()
        b.close()
        deadline = time.monotonic() + 15
        want = {"channel_occupied", "member_added", "client_event", "member_removed", "channel_vacated"}
        while time.monotonic() < deadline and not want <= {e["name"] for e in got}:
            time.sleep(0.1)
        assert want <= {e["name"] for e in got}, got
        assert {"name": "member_added", "channel": "presence-hooks", "user_id": "ben"} in got
    finally:
        server.shutdown()


def test_pusher_connections_are_counted_under_their_own_transport(pd: Daemon) -> None:
    """/api/stats and /metrics count a Pusher socket, its subscription and its events under "pusher", not "ws"."""
    p = PusherWS(pd).connect()
    assert p.subscribe("orders.2")["event"] == "pusher_internal:subscription_succeeded"
    assert client(pd).trigger(["orders.2"], "e", {"n": 1}) == {}
    assert p.recv()["event"] == "e"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, stats = pd.get("/api/stats", headers=auth)
    assert status == 200 and stats["connections_by_transport"].get("pusher") == 1
    assert stats["connections_by_transport"].get("ws", 0) == 0
    from tests.conftest import http

    status, _, text = http("GET", pd.url + "/metrics", headers=auth)
    assert status == 200 and b'rt_connections{transport="pusher"} 1.0' in text
    assert b'rt_subscriptions{transport="pusher"} 1.0' in text
    p.close()

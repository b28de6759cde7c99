"""
/ws against the real daemon, with real clients: websocket-client and websockets.

Every close code of the contract (1001, 1008, 1009, 1013, 4001) and the
upgrade refusals (401, 403, 429) are pinned here, as are resume with no gap
and no duplicate across forced disconnects, wildcards and the slow-consumer
memory bound.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt
import psutil
import pytest
import websocket
from conftest import API_KEY, DEFAULT_CONFIG, JWT_SECRET, Daemon
from websockets.sync.client import connect as ws_connect

from twisted_rt.testing import MemoryBroker


def token(sub: str = "user", subscribe: list[str] | None = None, publish: list[str] | None = None,
          ttl: float = 3600) -> str:
    """A JWT signed with the test secret."""
    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + int(ttl), "iat": now, "subscribe": subscribe or [],
                       "publish": publish or []}, JWT_SECRET, algorithm="HS256")


def conn(d: Daemon, tok: str | None = API_KEY, timeout: float = 10, **kw: Any) -> websocket.WebSocket:
    """A websocket-client connection to /ws."""
    url = d.ws_url + (f"?token={tok}" if tok else "")
    return websocket.create_connection(url, timeout=timeout, **kw)


def send(ws: websocket.WebSocket, **msg: Any) -> None:
    ws.send(json.dumps(msg))


def recv(ws: websocket.WebSocket) -> dict[str, Any]:
    """The next message (events that request() stepped over come first)."""
    held = getattr(ws, "held", None)
    if held:
        m: dict[str, Any] = held.pop(0)
        return m
    msg: dict[str, Any] = json.loads(ws.recv())
    return msg


def request(ws: websocket.WebSocket, **msg: Any) -> dict[str, Any]:
    """Send one op and return its reply (events in between are kept for recv)."""
    send(ws, **msg)
    if not hasattr(ws, "held"):
        ws.held = []  # type: ignore[attr-defined]
    while True:
        m = json.loads(ws.recv())
        if m["op"] != "event":
            return m  # type: ignore[no-any-return]
        ws.held.append(m)  # type: ignore[attr-defined]


def read_until_close(ws: websocket.WebSocket) -> tuple[int | None, list[dict[str, Any]]]:
    """Read every message until the server's close frame: (close code, messages)."""
    msgs: list[dict[str, Any]] = []
    while True:
        try:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return None, msgs
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            return (struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None), msgs
        if opcode == websocket.ABNF.OPCODE_TEXT:
            msgs.append(json.loads(frame.data))


class Publisher:
    """Publishes through the WebSocket 'publish' op with the API key."""

    def __init__(self, d: Daemon) -> None:
        self.ws = conn(d)

    def publish(self, channel: str, data: Any = None) -> dict[str, Any]:
        send(self.ws, op="publish", channel=channel, data=data, ref="p")
        while True:
            m = recv(self.ws)
            if m.get("ref") == "p":
                assert m["op"] == "published", m
                return m

    def many(self, channel: str, n: int, data: Any = None, window: int = 32) -> list[int]:
        """Publish n events, at most `window` unanswered at a time; the offsets."""
        offsets: list[int] = []
        sent = 0
        while len(offsets) < n:
            while sent < n and sent - len(offsets) < window:
                send(self.ws, op="publish", channel=channel, data=data if data is not None else sent, ref=sent)
                sent += 1
            m = recv(self.ws)
            if m["op"] == "published":
                offsets.append(m["offset"])
        return offsets

    def close(self) -> None:
        self.ws.close()


def with_config(extra: str) -> str:
    return DEFAULT_CONFIG + "\n" + extra


def test_ping_pong_echoes_ref(daemon: Daemon) -> None:
    """ping gets pong with the same ref; a message without ref gets a reply without ref."""
    ws = conn(daemon)
    assert request(ws, op="ping", ref=4) == {"op": "pong", "ref": 4}
    assert request(ws, op="ping") == {"op": "pong"}
    ws.close()


def test_publish_subscribe_exact_and_wildcards(daemon: Daemon) -> None:
    """Exact, '*' and '>' subscriptions get exactly the matching live events, with contract fields."""
    pub = Publisher(daemon)
    ws = conn(daemon)
    assert request(ws, op="subscribe", channel="w.a", ref=1) == {"op": "subscribed", "channel": "w.a", "ref": 1}
    assert request(ws, op="subscribe", channel="w.*", ref=2)["op"] == "subscribed"
    assert request(ws, op="subscribe", channel="deep.>", ref=3)["op"] == "subscribed"
    receipt = pub.publish("w.a", {"k": 1})
    assert receipt["channel"] == "w.a" and receipt["offset"] == 1 and receipt["id"]
    pub.publish("w.b.c", 1)       # matches nothing
    pub.publish("deep", 1)        # '>' needs one more segment
    pub.publish("w.b", 2)
    pub.publish("deep.x.y", 3)
    got = [recv(ws) for _ in range(3)]
    assert [(m["channel"], m["offset"]) for m in got] == [("w.a", 1), ("w.b", 1), ("deep.x.y", 1)]
    first = got[0]
    assert first["op"] == "event" and first["data"] == {"k": 1} and first["source"] == "ws"
    assert first["id"] == receipt["id"] and first["time"].endswith("Z")
    assert request(ws, op="unsubscribe", channel="w.*", ref=9) == {"op": "unsubscribed", "channel": "w.*", "ref": 9}
    pub.publish("w.b", 3)
    pub.publish("w.a", 4)
    assert (recv(ws)["channel"]) == "w.a"
    assert request(ws, op="unsubscribe", channel="nope")["code"] == "not_subscribed"
    ws.close()
    pub.close()


def test_since_replays_then_live_with_wildcard_object(daemon: Daemon) -> None:
    """since=N replays offsets > N then live; a wildcard takes {channel: offset}, unnamed channels from 1."""
    pub = Publisher(daemon)
    pub.many("g.push", 5)
    pub.many("g.pr", 3)
    pub.many("g.tag", 1)
    ws = conn(daemon)
    assert request(ws, op="subscribe", channel="g.push", since=3)["op"] == "subscribed"
    assert [recv(ws)["offset"] for _ in range(2)] == [4, 5]
    ws2 = conn(daemon)
    assert request(ws2, op="subscribe", channel="g.*", since={"g.push": 4, "g.pr": 2})["op"] == "subscribed"
    got = sorted((m["channel"], m["offset"]) for m in (recv(ws2) for _ in range(3)))
    assert got == [("g.pr", 3), ("g.push", 5), ("g.tag", 1)]
    pub.publish("g.push")
    assert (recv(ws)["offset"], recv(ws2)["offset"]) == (6, 6)
    for bad in (-1, "x", {"g.push": "1"}, {"bad..chan": 1}, True):
        assert request(ws, op="subscribe", channel="g.x", since=bad)["code"] == "bad_request"
    for w in (ws, ws2, pub):
        w.close()


def test_resume_across_forced_disconnects_no_gap_no_duplicate(daemon: Daemon) -> None:
    """While a publisher keeps publishing, a subscriber cut off three times and resuming with since sees 1..N once each."""
    n = 600
    done = threading.Event()

    def publish() -> None:  # through POST /api/publish, one request per event
        try:
            for i in range(n):
                status, body = daemon.publish("resume.x", i)
                assert status == 202 and body["offset"] == i + 1
        finally:
            done.set()

    seen: list[int] = []
    last = 0
    t = threading.Thread(target=publish)
    t.start()
    try:
        for cut in (50, 150, 300, None):
            with ws_connect(daemon.ws_url + f"?token={API_KEY}", open_timeout=10, close_timeout=1) as c:
                c.send(json.dumps({"op": "subscribe", "channel": "resume.x", "since": last}))
                assert json.loads(c.recv(timeout=10))["op"] == "subscribed"
                while (cut is None and last < n) or (cut is not None and len(seen) < cut):
                    m = json.loads(c.recv(timeout=20))
                    assert m["op"] == "event"
                    seen.append(m["offset"])
                    last = m["offset"]
                if cut is not None:
                    # a forced disconnect: no close handshake
                    c.socket.shutdown(socket.SHUT_RDWR)
    finally:
        t.join(60)
    assert done.is_set()
    assert seen == list(range(1, n + 1))
    assert daemon.get("/api/channels/resume.x/history?since=599", headers={"Authorization": f"Bearer {API_KEY}"})[1][
        "last_offset"] == n


def test_upgrade_refused_with_401_for_bad_or_expired_token(daemon: Daemon) -> None:
    """A bad key or an expired JWT is refused at the upgrade with 401."""
    for tok in ("wrong-key", token(ttl=-10), "a.b.c"):
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            conn(daemon, tok)
        assert e.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(daemon.ws_url, timeout=5, header=["Authorization: Bearer nope"])
    assert e.value.status_code == 401
    assert json.loads(e.value.resp_body)["error"] == "invalid_token"
    ws = websocket.create_connection(daemon.ws_url, timeout=5, header=[f"Authorization: Bearer {API_KEY}"])
    assert request(ws, op="ping")["op"] == "pong"
    ws.close()


def test_refusals_and_plain_http_are_json(daemon: Daemon) -> None:
    """A refused upgrade has a JSON error body; plain GET /ws is 426 and POST 405, both JSON."""
    from conftest import http

    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        conn(daemon, "wrong-key")
    assert e.value.resp_headers["content-type"] == "application/json"
    assert json.loads(e.value.resp_body)["error"] == "invalid_token"
    status, headers, body = http("GET", daemon.url + "/ws")
    assert (status, headers["upgrade"], json.loads(body)["error"]) == (426, "websocket", "upgrade_required")
    status, headers, body = http("POST", daemon.url + "/ws", b"x")
    assert (status, json.loads(body)["error"]) == (405, "method_not_allowed")


def test_forbidden_origin_refused_with_403(make_daemon: Callable[..., Daemon]) -> None:
    """An Origin not in allowed_origins is refused with 403; a listed one is accepted."""
    d = make_daemon(with_config('[server]\nallowed_origins = ["https://app.example.com"]\n'))
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        conn(d, origin="https://evil.example.com")
    assert e.value.status_code == 403
    ws = conn(d, origin="https://app.example.com")
    assert request(ws, op="ping")["op"] == "pong"
    ws.close()


def test_rights_anonymous_and_jwt(daemon: Daemon) -> None:
    """Anonymous may only read public.>; a JWT may subscribe/publish only within its patterns."""
    anon = conn(daemon, None)
    assert request(anon, op="subscribe", channel="public.news")["op"] == "subscribed"
    assert request(anon, op="subscribe", channel="private")["code"] == "forbidden"
    assert request(anon, op="publish", channel="public.news", data=1)["code"] == "forbidden"
    user = conn(daemon, token(subscribe=["chat.>"], publish=["chat.room1"]))
    assert request(user, op="subscribe", channel="chat.*")["op"] == "subscribed"
    assert request(user, op="subscribe", channel=">")["code"] == "forbidden"
    assert request(user, op="publish", channel="chat.room2", data=1)["code"] == "forbidden"
    r = request(user, op="publish", channel="chat.room1", data={"t": "hi"}, id="idem-1", ref=3)
    assert r["op"] == "published" and r["ref"] == 3 and r["id"] == "idem-1" and r["offset"] == 1
    ev = recv(user)
    assert ev["op"] == "event" and ev["channel"] == "chat.room1" and ev["data"] == {"t": "hi"}
    again = request(user, op="publish", channel="chat.room1", data={"t": "hi"}, id="idem-1")
    assert again["offset"] == 1
    for w in (anon, user):
        w.close()


def test_bad_messages_get_errors_then_1008(daemon: Daemon) -> None:
    """Bad JSON and unknown ops get error replies; the 10th bad message closes with 1008."""
    ws = conn(daemon)
    assert request(ws, op="nope", ref=1) == {
        "op": "error", "code": "unknown_op", "ref": 1,
        "message": "unknown op 'nope': use subscribe, unsubscribe, publish, ping, auth, presence"}
    ws.send("{not json")
    assert recv(ws)["code"] == "bad_json"
    ws.send("[1]")
    assert recv(ws)["code"] == "bad_request"
    assert request(ws, op="subscribe", channel="a..b")["code"] == "invalid_channel"
    for _ in range(5):
        ws.send("x")
        assert recv(ws)["code"] == "bad_json"
    ws.send("x")
    code, msgs = read_until_close(ws)
    assert code == 1008
    assert msgs and msgs[-1]["code"] == "bad_json"


def test_binary_frame_closes_1008(daemon: Daemon) -> None:
    """A binary message closes the connection with 1008."""
    ws = conn(daemon)
    ws.send_binary(b"\x00\x01")
    assert read_until_close(ws)[0] == 1008


def test_oversized_message_closes_1009(make_daemon: Callable[..., Daemon]) -> None:
    """A message over max_message_bytes gets a real 1009 close frame (not a dropped TCP)."""
    d = make_daemon(with_config("[websocket]\nmax_message_bytes = 4096\n"))
    ws = conn(d)
    assert request(ws, op="ping")["op"] == "pong"
    send(ws, op="publish", channel="big", data="x" * 3000)
    assert recv(ws)["op"] == "published"
    send(ws, op="publish", channel="big", data="x" * 5000)
    assert read_until_close(ws)[0] == 1009


def test_limits_subscriptions_and_connections_per_ip(make_daemon: Callable[..., Daemon]) -> None:
    """max_subscriptions per connection, and max_connections_per_ip refused with 429 at the upgrade."""
    d = make_daemon(with_config("[websocket]\nmax_subscriptions = 2\nmax_connections_per_ip = 2\n"))
    a = conn(d)
    assert request(a, op="subscribe", channel="x.1")["op"] == "subscribed"
    assert request(a, op="subscribe", channel="x.2")["op"] == "subscribed"
    assert request(a, op="subscribe", channel="x.2")["op"] == "subscribed"  # again: not a new one
    assert request(a, op="subscribe", channel="x.3")["code"] == "too_many_subscriptions"
    b = conn(d)
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        conn(d)
    assert e.value.status_code == 429
    b.close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the close asynchronously
        try:
            c = conn(d)
            break
        except websocket.WebSocketBadStatusException:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    c.close()
    a.close()


def test_slow_consumer_closed_1013_and_memory_bounded(make_daemon: Callable[..., Daemon]) -> None:
    """
    A client that stops reading is closed with 1013 and the daemon's RSS
    grows by less than 16 MiB while 48 MiB of events are published past it
    (an unbounded queue would hold all 48 MB; max_send_buffer_bytes = 256 KiB).
    """
    d = make_daemon(with_config("[websocket]\nmax_send_buffer_bytes = 262144\n"))
    proc = psutil.Process(d.proc.pid)  # type: ignore[union-attr]
    slow = conn(d, timeout=30, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 8192),))
    assert request(slow, op="subscribe", channel="slow.x")["op"] == "subscribed"
    fast = conn(d)
    assert request(fast, op="subscribe", channel="slow.x")["op"] == "subscribed"
    pub = Publisher(d)
    chunk = "x" * 65536
    pub.many("slow.warmup", 16, chunk, window=8)
    before = proc.memory_info().rss
    for _ in range(256):  # 256 x 3 x 64 KiB = 48 MiB
        pub.many("slow.x", 3, chunk)
        for _ in range(3):  # the fast reader keeps up
            assert recv(fast)["op"] == "event"
    after = proc.memory_info().rss
    code, msgs = read_until_close(slow)
    assert code == 1013
    assert 0 < len(msgs) < 256 * 3
    offsets = [m["offset"] for m in msgs if m["op"] == "event"]
    assert offsets == list(range(1, len(offsets) + 1))
    assert after - before < 16 * 2**20, (before, after)
    # the fast subscriber was never affected, and the slow one may come back and resume
    again = conn(d)
    assert request(again, op="subscribe", channel="slow.x", since=offsets[-1])["op"] == "subscribed"
    assert recv(again)["offset"] == offsets[-1] + 1
    for w in (again, fast, pub):
        w.close()


def test_token_expiry_closes_4001_and_auth_refreshes(daemon: Daemon) -> None:
    """A connection whose JWT expires is closed with 4001, unless it sent a fresh token with op auth."""
    short = conn(daemon, token(subscribe=["public.>"], ttl=3))
    refreshed = conn(daemon, token(subscribe=["public.>"], ttl=3))
    r = request(refreshed, op="auth", token=token(sub="later", subscribe=["public.>"], ttl=3600), ref=1)
    assert r == {"op": "authenticated", "sub": "later", "ref": 1}
    assert request(refreshed, op="auth", token="bad-token")["code"] == "invalid_token"
    assert read_until_close(short)[0] == 4001
    assert request(refreshed, op="ping")["op"] == "pong"
    refreshed.close()


def test_server_pings_and_drops_dead_connections(make_daemon: Callable[..., Daemon]) -> None:
    """With ping_interval_seconds the server pings; a client that never answers is dropped, one that reads stays."""
    d = make_daemon(with_config("[websocket]\nping_interval_seconds = 0.5\nping_timeout_seconds = 1\n"))
    live = conn(d)
    frames: list[int] = []

    def read() -> None:  # websocket-client answers each ping with a pong while reading
        try:
            while True:
                frames.append(live.recv_data_frame(control_frame=True)[0])
        except Exception:
            frames.append(-1)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    dead = conn(d)  # never reads, so never answers a ping
    deadline = time.monotonic() + 15
    gone = False
    dead.sock.settimeout(0.2)
    while not gone and time.monotonic() < deadline:
        try:  # raw reads: the pings are consumed but never answered
            gone = dead.sock.recv(65536) == b""
        except TimeoutError:
            pass
        except ConnectionResetError:
            gone = True
    assert gone
    assert websocket.ABNF.OPCODE_PING in frames and -1 not in frames
    send(live, op="ping")
    while websocket.ABNF.OPCODE_TEXT not in frames:
        assert time.monotonic() < deadline and -1 not in frames
        time.sleep(0.02)
    live.close()


def test_compression_negotiated_when_enabled(make_daemon: Callable[..., Daemon]) -> None:
    """With compression = true, permessage-deflate is accepted and events still arrive intact."""
    d = make_daemon(with_config("[websocket]\ncompression = true\n"))
    pub = Publisher(d)
    with ws_connect(d.ws_url + f"?token={API_KEY}", compression="deflate") as c:
        assert "permessage-deflate" in (c.response.headers.get("Sec-WebSocket-Extensions") or "")
        c.send(json.dumps({"op": "subscribe", "channel": "z", "ref": 1}))
        assert json.loads(c.recv(timeout=10))["op"] == "subscribed"
        pub.many("z", 3, {"text": "abc" * 100})
        got = [json.loads(c.recv(timeout=10)) for _ in range(3)]
        assert [m["offset"] for m in got] == [1, 2, 3] and got[0]["data"] == {"text": "abc" * 100}
    plain = make_daemon(name="plain")
    with ws_connect(plain.ws_url + f"?token={API_KEY}", compression="deflate") as c:
        assert not c.response.headers.get("Sec-WebSocket-Extensions")
    pub.close()


def test_shutdown_closes_clients_with_1001(daemon: Daemon) -> None:
    """Stopping the daemon closes every WebSocket client with 1001 and the daemon exits promptly."""
    clients = [conn(daemon) for _ in range(3)]
    for c in clients:
        assert request(c, op="subscribe", channel="s")["op"] == "subscribed"
    codes: list[int | None] = []

    def read(c: websocket.WebSocket) -> None:
        codes.append(read_until_close(c)[0])

    readers = [threading.Thread(target=read, args=(c,)) for c in clients]
    for t in readers:
        t.start()
    daemon.stop()
    for t in readers:
        t.join(10)
    assert codes == [1001, 1001, 1001]


# ---------------------------------------------------------------------------
# unit tests: the delivery queue on a StringTransport with a fake clock


def fanout(broker: MemoryBroker, channel: str, offset: int, size: int = 10) -> None:
    """One live event with the offset the test chooses, through the broker's own fan-out (its index)."""
    from twisted_rt.core.event import Event

    broker.fanout(Event(f"id{offset}", channel, offset, "t", "test", "", "x" * size))


def open_proto(max_send: int = 4096, tok: str = "key", max_message: int = 1048576) -> tuple[Any, Any, Any, MemoryBroker]:
    """
    A /ws protocol after a real handshake on a StringTransport, its clock,
    transport and broker (whose publishes wait for the test to release them).
    """
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from twisted_rt.app import App
    from twisted_rt.core.auth import Authenticator
    from twisted_rt.core.config import AuthConfig, Config, WebSocketConfig
    from twisted_rt.core.metrics import Stats
    from twisted_rt.routes.ws import RTWebSocketFactory

    clock = MemoryReactorClock()
    clock.advance(time.time())
    broker = MemoryBroker(clock)
    broker.hold_publishes = True
    config = Config(websocket=WebSocketConfig(max_send_buffer_bytes=max_send, ping_interval_seconds=0,
                                              max_message_bytes=max_message),
                    auth=AuthConfig(api_keys=("key",), jwt_secret=JWT_SECRET))
    app = App(config=config, reactor=clock, broker=broker, auth=Authenticator(config.auth), stats=Stats())
    factory = RTWebSocketFactory(app)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(
        f"GET /ws?token={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert transport.value().startswith(b"HTTP/1.1 101")
    transport.clear()
    return proto, clock, transport, broker


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """Parse unmasked server frames: (opcode, payload)."""
    out = []
    while data:
        op, ln = data[0] & 0x0F, data[1] & 0x7F
        i = 2
        if ln == 126:
            ln, i = struct.unpack("!H", data[2:4])[0], 4
        elif ln == 127:
            ln, i = struct.unpack("!Q", data[2:10])[0], 10
        out.append((op, data[i:i + ln]))
        data = data[i + ln:]
    return out


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (mask of zeros)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def test_unit_frames_coalesced_into_one_write_per_turn() -> None:
    """Replies and events queued in one reactor turn reach the transport as one write, in order."""
    proto, clock, transport, broker = open_proto()
    writes: list[bytes] = []
    real = transport.write
    transport.write = lambda data: (writes.append(data), real(data))  # type: ignore[method-assign]
    proto.dataReceived(client_frame(b'{"op":"subscribe","channel":"u.*","ref":1}'))
    fanout(broker, "u.a", 1)
    fanout(broker, "u.b", 1)
    fanout(broker, "u.a", 1)  # a duplicate offset: dropped
    assert writes == []
    clock.advance(0)
    assert len(writes) == 1
    msgs = [json.loads(p) for _, p in frames(writes[0])]
    assert [m["op"] for m in msgs] == ["subscribed", "event", "event"]
    assert [(m["channel"], m["offset"]) for m in msgs[1:]] == [("u.a", 1), ("u.b", 1)]
    assert proto.factory.app.stats.events_out["ws"] == 2


def test_unit_paused_transport_holds_then_overflow_closes_1013() -> None:
    """While the transport is paused frames wait in the queue; past max_send_buffer_bytes it is dropped and 1013 sent."""
    proto, clock, transport, broker = open_proto(max_send=1000)
    proto.dataReceived(client_frame(b'{"op":"subscribe","channel":"u"}'))
    clock.advance(0)
    transport.clear()
    transport.producer.pauseProducing()
    for off in range(1, 5):
        fanout(broker, "u", off, 100)
    clock.advance(0)
    assert transport.value() == b""  # held while paused
    transport.producer.resumeProducing()
    clock.advance(0)
    assert [json.loads(p)["offset"] for _, p in frames(transport.value())] == [1, 2, 3, 4]
    transport.clear()
    transport.producer.pauseProducing()
    for off in range(5, 20):
        fanout(broker, "u", off, 100)
    clock.advance(0)
    (op, payload), = frames(transport.value())
    assert op == 8 and struct.unpack("!H", payload[:2])[0] == 1013
    assert proto.factory.app.stats.dropped["slow_consumer"] == 1
    assert len(broker.index) == 0  # no more deliveries to it


def test_unit_token_expiry_closes_4001_on_the_clock() -> None:
    """A JWT connection is closed with 4001 when the clock passes the token's exp, not before."""
    _proto, clock, transport, _broker = open_proto(tok=token(ttl=60))
    clock.advance(59)
    assert transport.value() == b""
    clock.advance(2)
    (op, payload), = frames(transport.value())
    assert op == 8 and struct.unpack("!H", payload[:2])[0] == 4001


def test_unit_parse_since_and_origin() -> None:
    """since is absent, an offset >= 0, or {channel: offset}; an empty allowed_origins allows any Origin."""
    from twisted_rt.routes.ws import parse_since
    from twisted_rt.web.resource import origin_allowed

    assert parse_since(None) is None and parse_since(3) == 3
    assert parse_since({"a.b": 2}) == {"a.b": 2}
    for bad in (-1, True, "3", {"a": -1}, {"a..b": 1}, [1]):
        with pytest.raises(ValueError):
            parse_since(bad)
    assert origin_allowed("https://x", ())
    assert origin_allowed(None, ("https://a",))
    assert origin_allowed("https://a/", ("https://a",))
    assert not origin_allowed("https://b", ("https://a",))
    assert origin_allowed("http://127.0.0.1:8080", ("https://a",), "127.0.0.1:8080")  # the daemon's own page
    assert not origin_allowed("http://evil:8080", ("https://a",), "127.0.0.1:8080")


def test_unit_failed_ops_use_the_one_error_mapper() -> None:
    """A failed op is answered with the shared mapper's code and message (journal_unavailable); others internal_error, logged."""
    from twisted.logger import globalLogPublisher
    from twisted.python.failure import Failure

    from twisted_rt.interfaces import JournalUnavailable
    from twisted_rt.routes.ws import RTWebSocketProtocol

    proto = RTWebSocketProtocol()
    proto.peer = "tcp:192.0.2.1:1234"
    sent: list[tuple[Any, ...]] = []
    proto._error = lambda *a: sent.append(a)  # type: ignore[method-assign]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto._failed(Failure(JournalUnavailable("disk full")), "publish", 7)
        proto._failed(Failure(RuntimeError("bug")), "publish", 8)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert sent == [
        ("journal_unavailable", "not acknowledged: disk full", 7, False),
        ("internal_error", "the server failed to handle this message; it was logged", 8, False),
    ]
    assert [e.get("log_failure") is not None for e in events if "handling" in e.get("log_format", "")] == [True]


def test_counters_follow_connections(daemon: Daemon) -> None:
    """connections/subscriptions/events_out for ws rise with use and fall back when clients leave."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    a, b = conn(daemon), conn(daemon)
    for c in (a, b):
        assert request(c, op="subscribe", channel="cnt.>")["op"] == "subscribed"
    assert request(a, op="subscribe", channel="cnt.x")["op"] == "subscribed"
    daemon.publish("cnt.x", 1)
    assert recv(a)["offset"] == 1 and recv(b)["offset"] == 1
    _, st = daemon.get("/api/stats", headers=auth)
    assert st["connections_by_transport"]["ws"] == 2
    assert st["subscriptions"] == 3
    assert st["events_out_by_transport"]["ws"] == 2
    a.close()
    b.close()
    deadline = time.monotonic() + 10
    while st["connections_by_transport"].get("ws", 0) or st["subscriptions"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
        _, st = daemon.get("/api/stats", headers=auth)


def test_unit_big_fanout_flushes_before_the_turn_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past FLUSH_EVERY queued deliveries, queues are written at once instead of at the end of the turn."""
    import twisted_rt.routes.ws as ws

    monkeypatch.setattr(ws, "FLUSH_EVERY", 3)
    proto, clock, transport, broker = open_proto()
    proto.dataReceived(client_frame(b'{"op":"subscribe","channel":"f"}'))
    clock.advance(0)
    transport.clear()
    fanout(broker, "f", 1)
    fanout(broker, "f", 2)
    assert transport.value() == b""
    fanout(broker, "f", 3)
    assert [json.loads(p)["offset"] for _, p in frames(transport.value())] == [1, 2, 3]
    assert proto.factory.app.stats.events_out["ws"] == 3


def test_unit_auth_op_drops_subscriptions_the_new_token_forbids() -> None:
    """After op auth with narrower rights, subscriptions outside them are dropped and reported."""
    proto, clock, transport, _broker = open_proto(tok=token(subscribe=["a.>", "b"], ttl=60))
    proto.dataReceived(client_frame(b'{"op":"subscribe","channel":"a.x"}'))
    proto.dataReceived(client_frame(b'{"op":"subscribe","channel":"b"}'))
    clock.advance(0)
    transport.clear()
    narrow = token(subscribe=["b"], ttl=120).encode()
    msg = b'{"op":"auth","token":"' + narrow + b'"}'
    frame = bytes([0x81, 0xFE]) + struct.pack("!H", len(msg)) + b"\0\0\0\0" + msg
    proto.dataReceived(frame)
    clock.advance(0)
    msgs = [json.loads(p) for _, p in frames(transport.value())]
    assert msgs[0]["op"] == "authenticated"
    assert msgs[1] == {"op": "unsubscribed", "channel": "a.x", "reason": "forbidden"}
    assert list(proto.subscriber.patterns) == ["b"]
    clock.advance(61)  # the old expiry no longer applies
    transport.clear()
    clock.advance(0)
    assert transport.value() == b""


def test_publish_with_out_of_range_number_is_refused(daemon: Daemon) -> None:
    """A WebSocket publish whose data holds 1e999 gets a bad_json error instead of journaling Infinity."""
    ws = websocket.create_connection(daemon.ws_url + f"?token={API_KEY}", timeout=10)
    try:
        ws.send('{"op":"publish","channel":"chat.x","data":[1e999],"ref":1}')
        reply = json.loads(ws.recv())
        assert reply["op"] == "error" and reply["code"] == "bad_json"
    finally:
        ws.close()


def test_publish_type_is_capped_as_over_http(daemon: Daemon) -> None:
    """A WebSocket publish with a type over 100 characters is refused, as POST /api/publish refuses it."""
    ws = websocket.create_connection(daemon.ws_url + f"?token={API_KEY}", timeout=10)
    try:
        ws.send(json.dumps({"op": "publish", "channel": "chat.x", "data": 1, "type": "t" * 101, "ref": 1}))
        reply = json.loads(ws.recv())
        assert (reply["op"], reply["code"], reply["ref"]) == ("error", "bad_request", 1)
        assert "100" in reply["message"]
        ws.send(json.dumps({"op": "publish", "channel": "chat.x", "data": 1, "type": "t" * 100, "ref": 2}))
        assert json.loads(ws.recv())["op"] == "published"
    finally:
        ws.close()


def test_write_now_sends_directly_and_keeps_order() -> None:
    """write_now sends at once on an idle TCP transport, and queues behind data the transport already holds."""
    from twisted.internet.testing import StringTransport

    from twisted_rt.routes.ws import write_now

    plain = StringTransport()
    write_now(plain, b"abc")  # not a TCP transport: plain write
    assert plain.value() == b"abc"

    import types

    from twisted.internet import reactor as _reactor
    from twisted.internet.protocol import Protocol
    from twisted.internet.tcp import Server

    a, b = socket.socketpair()
    a.setblocking(False)
    server = Server(a, Protocol(), ("127.0.0.1", 1), types.SimpleNamespace(_realPortNumber=1), 1, _reactor)
    try:
        write_now(server, b"first")
        assert b.recv(100) == b"first"  # sent at once, nothing left in the transport
        assert server._tempDataLen == 0
        server._tempDataBuffer.append(b"queued")
        server._tempDataLen = 6
        write_now(server, b"next")  # must not overtake what is queued
        assert server._tempDataBuffer == [b"queued", b"next"]
    finally:
        server.stopWriting()
        server.stopReading()  # the Server registered itself with the global reactor
        a.close()
        b.close()


def _client_text(payload: bytes) -> bytes:
    """A masked client text frame of any size (mask of zeros)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0xFE]) + struct.pack("!H", n)
    else:
        head = bytes([0x81, 0xFF]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


def test_unit_publishes_in_flight_pause_reading() -> None:
    """Past MAX_PUBLISHING publishes awaiting the journal the connection is no longer read, until half have settled."""
    from twisted_rt.routes.ws import MAX_PUBLISHING

    proto, clock, transport, broker = open_proto()
    for i in range(MAX_PUBLISHING - 1):
        proto.dataReceived(_client_text(b'{"op":"publish","channel":"p","data":%d}' % i))
    assert transport.producerState == "producing"
    proto.dataReceived(_client_text(b'{"op":"publish","channel":"p","data":"last"}'))
    assert transport.producerState == "paused"
    for k in range(MAX_PUBLISHING // 2):
        assert transport.producerState == "paused", k
        broker.release_one()  # journaled now: offset k + 1
    assert transport.producerState == "producing"
    clock.advance(0)
    replies = [json.loads(p) for _, p in frames(transport.value())]
    assert [r["offset"] for r in replies] == list(range(1, MAX_PUBLISHING // 2 + 1))


def test_unit_big_publishes_in_flight_pause_reading_by_bytes() -> None:
    """A few large publishes in flight (max_message_bytes of them) pause reading as well."""
    proto, _clock, transport, broker = open_proto(max_message=10_000)
    big = b'{"op":"publish","channel":"p","data":"' + b"x" * 4000 + b'"}'
    proto.dataReceived(_client_text(big))
    proto.dataReceived(_client_text(big))
    assert transport.producerState == "producing"
    proto.dataReceived(_client_text(big))
    assert transport.producerState == "paused"
    from twisted_rt.interfaces import JournalUnavailable

    while broker.held:  # failures settle them too
        broker.held.pop(0).fail(JournalUnavailable("disk full"))
    assert transport.producerState == "producing"


def test_unit_publish_carries_the_principal_scope() -> None:
    """A WebSocket publish is journaled in the publisher's idempotency scope (as over HTTP)."""
    proto, _clock, _transport, broker = open_proto()
    proto.dataReceived(_client_text(b'{"op":"publish","channel":"p","data":1,"id":"k"}'))
    jwt_proto, _c, _t, jwt_broker = open_proto(tok=token(sub="alice", publish=["p"]))
    jwt_proto.dataReceived(_client_text(b'{"op":"publish","channel":"p","data":1,"id":"k"}'))
    assert [d.scope for d in broker.drafts + jwt_broker.drafts] == ["pub:key", "pub:sub:alice"]


def test_unit_repeated_subscribe_replays_once() -> None:
    """Subscribing again with since to a pattern held answers 'subscribed' without another replay query."""
    proto, clock, transport, broker = open_proto()
    for _ in range(20):
        proto.dataReceived(_client_text(b'{"op":"subscribe","channel":"r.*","since":{"r.a":1},"ref":1}'))
    clock.advance(0)
    replies = [json.loads(p) for _, p in frames(transport.value())]
    # the first answer comes with the replay's first page (and says it is whole); the repeats at once
    assert replies == [{"op": "subscribed", "channel": "r.*", "ref": 1, "recovered": True}] + [
        {"op": "subscribed", "channel": "r.*", "ref": 1}] * 19
    assert [r.pattern for r in broker.replays] == ["r.*"]
    assert proto.factory.app.stats.subscriptions["ws"] == 1


def test_unit_parse_since_bounds_the_channels() -> None:
    """parse_since refuses an object naming more than max_channels channels before looking at them."""
    from twisted_rt.routes.ws import SinceTooLarge, parse_since

    assert parse_since({"a": 1, "b": 2}, 2) == {"a": 1, "b": 2}
    with pytest.raises(SinceTooLarge, match="may name 2 more"):
        parse_since({"a": 1, "b": 2, "bad..name": -1}, 2)
    assert len(parse_since({f"c{i}": 1 for i in range(5000)})) == 5000  # type: ignore[arg-type]


def test_unit_errors_do_not_echo_huge_input() -> None:
    """An unknown op or unsubscribe of a 60 KB string is named in the error cut to 80 characters."""
    proto, clock, transport, _broker = open_proto()
    proto.dataReceived(_client_text(json.dumps({"op": "x" * 60000}).encode()))
    proto.dataReceived(_client_text(json.dumps({"op": "unsubscribe", "channel": "y" * 60000}).encode()))
    clock.advance(0)
    errors = [json.loads(p) for _, p in frames(transport.value())]
    assert [e["code"] for e in errors] == ["unknown_op", "not_subscribed"]
    assert all(len(e["message"]) < 200 for e in errors)

"""Presence, channel rules and connection control end to end: the real daemon, real sockets, real JWTs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import websocket
from conftest import API_KEY, JWT_SECRET, Daemon, http
from test_sse import Stream

CONFIG = f"""
[journal]
path = "var/journal.sqlite3"
trim_interval_seconds = 0.2

[auth]
api_keys = ["{API_KEY}"]
jwt_secret = "{JWT_SECRET}"
anonymous_subscribe = ["public.>"]

[[channels]]
pattern = "room.>"
presence = true

[[channels]]
pattern = "short.*"
max_events = 3
"""

ADMIN = {"Authorization": f"Bearer {API_KEY}"}


def token(sub: str, subscribe: tuple[str, ...] = ("room.>",), **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": sub, "exp": now + 600, "iat": now, "subscribe": list(subscribe), **claims}
    return jwt.encode(body, JWT_SECRET, algorithm="HS256")


class Client:
    """A WebSocket client that reads JSON messages, keeping those it skipped."""

    def __init__(self, d: Daemon, tok: str | None) -> None:
        url = d.ws_url + (f"?token={tok}" if tok else "")
        self.ws = websocket.create_connection(url, timeout=10)
        self.inbox: list[dict[str, Any]] = []

    def send(self, **msg: Any) -> None:
        self.ws.send(json.dumps(msg))

    def next(self, op: str, **match: Any) -> dict[str, Any]:
        for i, m in enumerate(self.inbox):
            if m.get("op") == op and all(m.get(k) == v for k, v in match.items()):
                return self.inbox.pop(i)
        while True:
            m = json.loads(self.ws.recv())
            if m.get("op") == op and all(m.get(k) == v for k, v in match.items()):
                return m
            self.inbox.append(m)

    def subscribe(self, channel: str, **extra: Any) -> dict[str, Any]:
        self.send(op="subscribe", channel=channel, ref=channel, **extra)
        return self.next("subscribed", ref=channel)

    def ops(self) -> list[str]:
        """What arrived so far (after a ping round trip), by op."""
        self.send(op="ping", ref="sync")
        self.next("pong", ref="sync")
        out = [m["op"] for m in self.inbox]
        return out

    def close(self) -> None:
        self.ws.close()


def members(d: Daemon, channel: str, headers: dict[str, str] = ADMIN) -> tuple[int, Any]:
    return d.get(f"/api/channels/{channel}/presence", headers=headers)


def close_code(c: Client) -> int:
    """Read until the server's close frame; its code."""
    while True:
        opcode, frame = c.ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big")


def wait_for(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_join_leave_once_per_user_with_tabs(make_daemon: Callable[..., Daemon]) -> None:
    """Two tabs of alice are one member: one join, presence lists her once, and she leaves when the last tab closes."""
    d = make_daemon(CONFIG)
    watcher = Client(d, API_KEY)
    watcher.subscribe("room.1")
    tab1 = Client(d, token("alice", info={"name": "Alice"}))
    tab1.subscribe("room.1")
    assert watcher.next("join") == {"op": "join", "channel": "room.1", "user": "alice", "info": {"name": "Alice"}}
    assert tab1.next("join")["user"] == "alice"  # a member hears its own join too
    tab2 = Client(d, token("alice", info={"name": "Alice"}))
    tab2.subscribe("room.1")
    bob = Client(d, token("bob"))
    bob.subscribe("room.1")
    assert watcher.next("join")["user"] == "bob"
    assert "join" not in watcher.ops()  # no second join for alice's second tab
    bob.send(op="presence", channel="room.1", ref=5)
    assert bob.next("presence") == {"op": "presence", "channel": "room.1", "ref": 5, "members": [
        {"user": "alice", "info": {"name": "Alice"}}, {"user": "bob"}]}
    status, body = members(d, "room.1")
    assert status == 200 and body["count"] == 2 and [m["user"] for m in body["members"]] == ["alice", "bob"]
    status, body = d.get("/api/channels", headers=ADMIN)
    listed = next(c for c in body["channels"] if c["name"] == "room.1")
    assert listed["members"] == 2
    text = http("GET", d.url + "/metrics")[2].decode()
    assert 'rt_presence_members{channel="room.1"} 2.0' in text
    tab1.close()
    assert "leave" not in watcher.ops()
    tab2.close()
    assert watcher.next("leave") == {"op": "leave", "channel": "room.1", "user": "alice"}
    bob.send(op="unsubscribe", channel="room.1")
    assert watcher.next("leave")["user"] == "bob"
    assert members(d, "room.1")[1]["count"] == 0
    watcher.close()
    bob.close()


def test_narrowing_auth_leaves_and_wildcards_are_not_members(make_daemon: Callable[..., Daemon]) -> None:
    """An auth that drops the right leaves the channel; a wildcard subscription or an API key is no member."""
    d = make_daemon(CONFIG)
    watcher = Client(d, API_KEY)
    watcher.subscribe("room.2")
    wild = Client(d, token("wild"))
    wild.subscribe("room.*")
    carol = Client(d, token("carol"))
    carol.subscribe("room.2")
    assert watcher.next("join")["user"] == "carol"
    carol.send(op="auth", token=token("carol", subscribe=("other.>",)))
    assert carol.next("unsubscribed")["channel"] == "room.2"
    assert watcher.next("leave")["user"] == "carol"
    assert members(d, "room.2")[1]["members"] == []
    wild.close()
    carol.close()
    watcher.close()


def test_bad_presence_requests(make_daemon: Callable[..., Daemon]) -> None:
    """presence on a channel without presence is 404 presence_off; without the subscribe right 403; a big info 401."""
    d = make_daemon(CONFIG)
    status, body = members(d, "plain.x")
    assert status == 404 and body["error"] == "presence_off"
    status, body = members(d, "room.1", {"Authorization": f"Bearer {token('eve', subscribe=('x.>',))}"})
    assert status == 403 and body["error"] == "forbidden"
    status, body = members(d, "room.1", {})
    assert status == 401
    c = Client(d, token("eve", subscribe=("x.>",)))
    c.send(op="presence", channel="plain.x", ref=1)
    assert c.next("error", ref=1)["code"] == "presence_off"
    c.send(op="presence", channel="room.1", ref=2)
    assert c.next("error", ref=2)["code"] == "forbidden"
    c.send(op="presence", channel="bad channel", ref=3)
    assert c.next("error", ref=3)["code"] == "invalid_channel"
    c.close()
    for info in ({"pad": "x" * 1100}, ["not", "an", "object"]):
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            websocket.create_connection(d.ws_url + f"?token={token('eve', info=info)}", timeout=10)
        assert e.value.status_code == 401
        assert b"info" in (e.value.resp_body or b"")


def test_disconnect_route(make_daemon: Callable[..., Daemon]) -> None:
    """POST /api/users/<user>/disconnect closes that user's WebSockets with 4003 and ends its SSE streams (API key only)."""
    d = make_daemon(CONFIG)
    a1 = Client(d, token("alice"))
    a2 = Client(d, token("alice"))
    b = Client(d, token("bob"))
    a1.subscribe("room.1")
    sse = Stream(d, "channel=room.1", {"Authorization": f"Bearer {token('alice')}"})
    assert sse.block() is not None  # retry: the stream is open
    status, body = d.post("/api/users/alice/disconnect", {}, {"Authorization": f"Bearer {token('bob')}"})
    assert status == 403
    status, body = d.post("/api/users/alice/disconnect", {})
    assert status == 401
    status, body = d.post("/api/users/alice/disconnect", {}, ADMIN)
    assert (status, body) == (200, {"user": "alice", "disconnected": 3})
    for c in (a1, a2):
        assert close_code(c) == 4003
    while sse.block() is not None:
        pass  # the stream ends
    b.send(op="ping", ref=1)
    assert b.next("pong")["ref"] == 1
    assert d.post("/api/users/nobody/disconnect", {}, ADMIN) == (200, {"user": "nobody", "disconnected": 0})
    assert d.post("/api/users/alice/kick", {}, ADMIN)[0] == 404
    b.close()


def test_rules_trim_and_resume_tells_the_truth(make_daemon: Callable[..., Daemon]) -> None:
    """max_events of a rule trims its channels; subscribed says recovered false and history truncated true after a trim."""
    d = make_daemon(CONFIG)
    for i in range(10):
        d.publish("short.a", {"i": i})
        d.publish("long.a", {"i": i})
    wait_for(lambda: len(d.get("/api/channels/short.a/history", headers=ADMIN)[1]["events"]) == 3)
    _, body = d.get("/api/channels/short.a/history?since=2", headers=ADMIN)
    assert [e["offset"] for e in body["events"]] == [8, 9, 10] and body["truncated"] is True
    _status, body = d.get("/api/channels/short.a/history?since=8", headers=ADMIN)
    assert "truncated" not in body
    assert len(d.get("/api/channels/long.a/history", headers=ADMIN)[1]["events"]) == 10
    c = Client(d, API_KEY)
    got = c.subscribe("short.a", since=2)
    assert got["recovered"] is False
    assert [c.next("event")["offset"] for _ in range(3)] == [8, 9, 10]
    assert c.subscribe("long.a", since=2)["recovered"] is True
    assert c.subscribe("short.b", since=0)["recovered"] is True  # nothing ever published
    assert "recovered" not in c.subscribe("short.c")
    c.close()

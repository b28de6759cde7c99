"""Presence and disconnect on two nodes sharing a real redis-server, including kill -9 of one node."""

from __future__ import annotations

import time
from collections.abc import Callable

from conftest import API_KEY, JWT_SECRET, Daemon, RedisServer
from test_presence_e2e import ADMIN, Client, close_code, members, token


def config(redis: RedisServer) -> str:
    return f"""
[broker]
kind = "redis"
url = "{redis.url}"

[auth]
api_keys = ["{API_KEY}"]
jwt_secret = "{JWT_SECRET}"

[presence]
heartbeat_seconds = 0.5
node_timeout_seconds = 2

[[channels]]
pattern = "room.>"
presence = true
"""


def test_two_nodes_one_member_and_kill_9(make_daemon: Callable[..., Daemon], redis_server: RedisServer) -> None:
    """A user on both nodes joins once on each node; members agree; a node killed with -9 has its members leave."""
    a = make_daemon(config(redis_server), name="a")
    b = make_daemon(config(redis_server), name="b")
    wa, wb = Client(a, API_KEY), Client(b, API_KEY)
    wa.subscribe("room.1")
    wb.subscribe("room.1")
    alice_a = Client(a, token("alice", info={"n": 1}))
    alice_a.subscribe("room.1")
    assert wa.next("join")["user"] == "alice"
    assert wb.next("join") == {"op": "join", "channel": "room.1", "user": "alice", "info": {"n": 1}}
    alice_b = Client(b, token("alice", info={"n": 1}))
    alice_b.subscribe("room.1")
    bob_b = Client(b, token("bob"))
    bob_b.subscribe("room.1")
    assert wa.next("join")["user"] == "bob"
    assert wb.next("join")["user"] == "bob"
    assert wa.ops().count("join") == 0 and wb.ops().count("join") == 0  # alice joined once, cluster-wide
    for d in (a, b):
        status, body = members(d, "room.1")
        assert status == 200 and [m["user"] for m in body["members"]] == ["alice", "bob"]
    alice_a.close()  # alice is still on b: no leave
    assert members(a, "room.1")[1]["count"] == 2
    assert "leave" not in wa.ops()
    killed = time.monotonic()
    b.kill()  # kill -9: alice's second tab and bob go with it
    left = {wa.next("leave")["user"], wa.next("leave")["user"]}
    assert left == {"alice", "bob"}
    assert time.monotonic() - killed < 30
    assert members(a, "room.1")[1] == {"channel": "room.1", "members": [], "count": 0}
    wa.close()


def test_disconnect_on_two_nodes(make_daemon: Callable[..., Daemon], redis_server: RedisServer) -> None:
    """POST /api/users/<user>/disconnect on one node closes that user's connections on the other node too (4003)."""
    a = make_daemon(config(redis_server), name="a")
    b = make_daemon(config(redis_server), name="b")
    here, there, other = Client(a, token("carol")), Client(b, token("carol")), Client(b, token("dave"))
    for c in (here, there, other):
        c.subscribe("room.2")
    status, body = a.post("/api/users/carol/disconnect", {}, ADMIN)
    assert status == 200 and body["user"] == "carol" and body["disconnected"] >= 1
    assert close_code(here) == 4003
    assert close_code(there) == 4003
    other.send(op="ping", ref=1)
    assert other.next("pong")["ref"] == 1
    other.close()

"""Two daemons sharing a real redis-server: Pusher presence, triggers, queries and terminate across nodes."""

from __future__ import annotations

import time
from typing import Any, Callable

import pusher
import pytest

from tests.conftest import Daemon, RedisServer
from tests.test_pusher_daemon import APP, CONFIG, KEY, SECRET, PusherWS

pytestmark = pytest.mark.redis


def _config(url: str) -> str:
    return CONFIG + f"""
[broker]
kind = "redis"
url = "{url}"
"""


def _client(d: Daemon) -> pusher.Pusher:
    return pusher.Pusher(app_id=APP, key=KEY, secret=SECRET, host="127.0.0.1", port=d.port, ssl=False)


def _eventually(probe: Callable[[], Any], expected: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    got = probe()
    while got != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        got = probe()
    assert got == expected


def test_presence_triggers_and_terminate_across_two_nodes(
    make_daemon: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """Members on node A and B see each other; a trigger on A reaches B; queries and terminate are cluster-wide."""
    a = make_daemon(_config(redis_server.url), name="a")
    b = make_daemon(_config(redis_server.url), name="b")
    ca, cb = _client(a), _client(b)
    alice = PusherWS(a).connect()
    ok = alice.subscribe("presence-room", **ca.authenticate(
        channel="presence-room", socket_id=alice.socket_id, custom_data={"user_id": "alice"}))
    assert ok["data"]["presence"]["ids"] == ["alice"]
    bob = PusherWS(b).connect()
    ok = bob.subscribe("presence-room", **cb.authenticate(
        channel="presence-room", socket_id=bob.socket_id, custom_data={"user_id": "bob", "user_info": {"n": 2}}))
    assert ok["data"]["presence"]["ids"] == ["alice", "bob"]
    assert alice.expect("pusher_internal:member_added")["data"] == {"user_id": "bob", "user_info": {"n": 2}}
    # a trigger through node A's HTTP API reaches the subscriber on node B
    ca.trigger("presence-room", "hello", {"from": "a"})
    assert bob.expect("hello")["data"] == {"from": "a"}
    assert alice.expect("hello")["data"] == {"from": "a"}
    # client events cross nodes too (not journaled)
    alice.send("client-wave", {"w": 1}, channel="presence-room")
    assert bob.expect("client-wave") == {"event": "client-wave", "channel": "presence-room",
                                         "data": {"w": 1}, "user_id": "alice"}
    # both nodes answer for the whole cluster
    for c in (ca, cb):
        assert c.users_info("presence-room") == {"users": [{"id": "alice"}, {"id": "bob"}]}
        assert c.channels_info("presence-", ["user_count"]) == {"channels": {"presence-room": {"user_count": 2}}}
    _eventually(lambda: ca.channel_info("presence-room", ["subscription_count"])["subscription_count"], 2)
    # terminate on node A closes bob's connection on node B
    assert ca.terminate_user_connections("bob") == {}
    assert bob.expect("pusher:error")["data"]["code"] == 4009
    assert bob.closed_with() == 4009
    assert alice.expect("pusher_internal:member_removed")["data"] == {"user_id": "bob"}
    _eventually(lambda: cb.users_info("presence-room"), {"users": [{"id": "alice"}]})
    alice.close()

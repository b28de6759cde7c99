"""
The SSE cursor across nodes: with the Redis broker, a stream's v1 cursor
from one daemon resumes on another with no gap and no duplicate, wildcards
and several patterns included.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable

import pytest
from conftest import API_KEY, Daemon, RedisServer
from test_sse import Stream, seq

pytestmark = pytest.mark.redis


def _config(url: str) -> str:
    return f"""
    [journal]
    path = "var/journal.sqlite3"

    [broker]
    kind = "redis"
    url = "{url}"

    [auth]
    api_keys = ["{API_KEY}"]
    """


def test_cursor_resumes_on_another_node(make_daemon: Callable[..., Daemon], redis_server: RedisServer) -> None:
    """A Last-Event-ID from node A's stream resumes every channel and pattern on node B exactly once."""
    a = make_daemon(_config(redis_server.url), name="a")
    b = make_daemon(_config(redis_server.url), name="b")
    query = urllib.parse.urlencode([("pattern", "n.*"), ("channel", "x.one"), ("token", API_KEY)])
    s = Stream(a, query)
    s.block()
    s.block()
    for i in range(4):
        assert a.publish("n.a", i)[0] == 202
        assert b.publish("n.b", i)[0] == 202
        assert a.publish("x.one", i)[0] == 202
    got = [s.event() for _ in range(6)]
    s.close()
    for i in range(4, 6):
        assert b.publish("n.c", i)[0] == 202
    s2 = Stream(b, query, {"Last-Event-ID": got[-1]["id"]})
    rest = [s2.event() for _ in range(6 + 2)]
    s2.close()
    seen = [(e["event"], json.loads(e["data"])["offset"]) for e in got + rest]
    assert len(seen) == len(set(seen)) == 14
    assert sorted(seen) == sorted([("n.a", o) for o in range(1, 5)] + [("n.b", o) for o in range(1, 5)]
                                  + [("x.one", o) for o in range(1, 5)] + [("n.c", 1), ("n.c", 2)])
    assert [seq(e) for e in got + rest] == sorted(seq(e) for e in got + rest)

"""
Destinations with the Redis broker: two real daemons on one real
redis-server; exactly one node delivers, and when it is killed (kill -9)
the other takes the lease over (LEASE_SECONDS = 10: this test waits for
that expiry once, which is why it takes about 15 s).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import pytest
from conftest import API_KEY, JWT_SECRET, Daemon, RedisServer
from test_dest_support import Receiver, running_receiver

receiver = pytest.fixture(running_receiver, name="receiver")

pytestmark = [pytest.mark.redis, pytest.mark.slow]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def config(redis_url: str, url: str) -> str:
    return f"""
[broker]
kind = "redis"
url = "{redis_url}"

[auth]
api_keys = ["{API_KEY}"]
jwt_secret = "{JWT_SECRET}"

[[destinations]]
name = "backend"
url = "{url}"
channels = ["jobs.>"]
max_in_flight = 4
"""


def _holder(nodes: list[Daemon]) -> list[Daemon]:
    out = []
    for d in nodes:
        status, body = d.get("/api/destinations", headers=AUTH)
        if status == 200 and body["destinations"][0]["delivering_node"]:
            out.append(d)
    return out


def test_one_node_delivers_and_the_other_takes_over(
    make_daemon: Callable[..., Daemon], redis_server: RedisServer, receiver: Receiver
) -> None:
    """Two nodes: every event is delivered by the lease holder; after it is killed the other delivers within 30 s."""
    cfg = config(redis_server.url, receiver.url)
    a = make_daemon(cfg, name="a")
    b = make_daemon(cfg, name="b")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(_holder([a, b])) != 1:
        time.sleep(0.2)
    (holder,) = _holder([a, b])
    other = b if holder is a else a
    acked: set[str] = set()
    for i in range(10):
        status, body = (a if i % 2 else b).publish("jobs.x", {"n": i})
        assert status == 202
        acked.add(body["id"])
    receiver.wait_for(lambda r: len(r.delivered()) >= 10)
    holder.kill()
    killed_at = time.monotonic()
    for i in range(10, 15):
        status, body = other.publish("jobs.x", {"n": i})
        assert status == 202
        acked.add(body["id"])

    def all_there(r: Receiver) -> bool:
        return {json.loads(x.body)["id"] for x in r.delivered()} >= acked

    receiver.wait_for(all_there, timeout=30)
    assert time.monotonic() - killed_at < 30
    assert _holder([other]) == [other]
    ids: list[Any] = [json.loads(x.body)["id"] for x in receiver.delivered()]
    assert set(ids) == acked

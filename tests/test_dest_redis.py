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
import pytest_twisted
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


@pytest_twisted.ensureDeferred
async def test_redis_store_round_trip_and_lease(redis_server: RedisServer) -> None:
    """RedisDeliveries: state, queue rows (due, next_due, dead, revive, delete) and a lease one node holds at a time."""
    from twisted.internet import reactor

    from twisted_rt.core.config import BrokerConfig, Config
    from twisted_rt.core.metrics import Stats
    from twisted_rt.store.deliveries import Delivery, DestState, RedisDeliveries
    from twisted_rt.store.redis import RedisBroker

    broker = RedisBroker(Config(broker=BrokerConfig(kind="redis", url=redis_server.url)), reactor, Stats())
    await broker.start()
    try:
        store = RedisDeliveries(broker)
        await store.save("d", DestState(position=5, paused=True, reason="r"))
        await store.put("d", [
            Delivery(id="a", body=b"\x00a", headers=(("H", "v"),), next_at=10.0, attempts=1, channel="c", offset=2),
            Delivery(id="b", body=b"b", headers=(), next_at=20.0),
            Delivery(id="c", body=b"c", headers=(), next_at=3.0, dead=True, last_error="HTTP 500"),
        ])
        st = await store.load("d")
        assert (st.position, st.paused, st.reason, st.retrying, st.dead) == (5, True, "r", 2, 1)
        due = await store.due("d", 15.0, 10)
        assert [r.id for r in due] == ["a"] and due[0].body == b"\x00a" and due[0].headers == (("H", "v"),)
        assert await store.due("d", 15.0, 10, skip=["a"]) == []
        assert await store.next_due("d") == 10.0
        assert [r.id for r in await store.dead_letters("d", 10)] == ["c"]
        assert await store.revive("d", None, 1.0) == 1
        assert (await store.load("d")).dead == 0
        await store.delete("d", ["a", "b", "c"])
        assert (await store.load("d")).retrying == 0 and await store.next_due("d") is None
        assert await store.acquire("d", "n1", 5) is True
        assert await store.acquire("d", "n2", 5) is False
        assert await store.acquire("d", "n1", 5) is True
        await store.release("d", "n1")
        assert await store.acquire("d", "n2", 5) is True
    finally:
        await broker.stop()

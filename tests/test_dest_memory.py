"""
In memory: the destinations routes over StubTreq on a real App (MemoryBroker,
MemoryDeliveries, a fake sender), and the lease of a shared store on a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

from test_dest_engine import FAIL, OK, FakeSender
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from twisted_rt.app import App
from twisted_rt.core.auth import Authenticator
from twisted_rt.core.config import AuthConfig, Config, DestinationConfig
from twisted_rt.core.metrics import Stats
from twisted_rt.outbound import LEASE_RENEW_SECONDS, LEASE_SECONDS, Outbound
from twisted_rt.routes import api, destinations
from twisted_rt.store.deliveries import MemoryDeliveries
from twisted_rt.testing import MemoryBroker
from twisted_rt.web.resource import Root


def _setup() -> tuple[Any, MemoryBroker, FakeSender, Clock]:
    from treq.testing import StubTreq

    clock = Clock()
    broker = MemoryBroker(clock)
    sender = FakeSender()
    cfg = Config(destinations=(DestinationConfig(name="d", url="http://127.0.0.1:1/", channels=("a.>",),
                                                 max_attempts=1),))
    stats = Stats()
    app = App(config=cfg, reactor=clock, broker=broker, auth=Authenticator(AuthConfig(api_keys=("k",))), stats=stats)
    app.outbound = Outbound(cfg, clock, broker, MemoryDeliveries(), stats.destinations,
                            sender_factory=lambda _: sender)
    app.outbound.start()
    root = Root()
    api.mount(root, app)
    destinations.mount(root, app)
    return StubTreq(root), broker, sender, clock


def _call(stub: Any, method: str, path: str, body: bytes = b"", token: str = "k") -> tuple[int, Any]:
    headers = {"Authorization": [f"Bearer {token}"], "Content-Type": ["application/json"]}
    d = stub.request(method, "http://127.0.0.1" + path, data=body or None, headers=headers)
    stub.flush()
    results: list[Any] = []
    d.addCallback(lambda r: r.content().addCallback(lambda c: results.append((r.code, json.loads(c)))))
    stub.flush()
    assert results, "no answer"
    return results[0]  # type: ignore[no-any-return]


def test_routes_in_memory() -> None:
    """List, dead letters, retry by ids and all, replay, pause/resume and the 404/405/415 answers."""
    stub, broker, sender, clock = _setup()
    e = broker.commit("a.x", {"n": 1})
    sender.answer_all(FAIL)
    status, body = _call(stub, "GET", "/api/destinations/d/dead?limit=5")
    assert status == 200 and [x["id"] for x in body["dead"]] == [e.id]
    assert _call(stub, "POST", "/api/destinations/d/retry", b'{"ids": ["nope"]}')[1]["retried"] == 0
    assert _call(stub, "POST", "/api/destinations/d/retry")[1]["retried"] == 1
    clock.advance(1)
    sender.answer_all(OK)
    status, body = _call(stub, "GET", "/api/destinations")
    row = body["destinations"][0]
    assert (row["dead"], row["retrying"], row["delivered"], row["state"]) == (0, 0, 1, "active")
    assert _call(stub, "POST", "/api/destinations/d/replay", b'{"since": {"a.x": 0}}')[1]["queued"] == 1
    assert _call(stub, "POST", "/api/destinations/d/pause")[1]["state"] == "paused"
    assert _call(stub, "GET", "/api/destinations")[1]["destinations"][0]["state"] == "paused"
    assert _call(stub, "POST", "/api/destinations/d/resume", b"{}")[1]["state"] == "active"
    assert _call(stub, "GET", "/api/destinations/zz/dead")[0] == 404
    assert _call(stub, "GET", "/api/destinations/d")[0] == 404
    assert _call(stub, "GET", "/api/destinations/d/pause")[0] == 405
    assert _call(stub, "POST", "/api/destinations/d/pause", b'{"x": 1}')[0] == 400
    assert _call(stub, "POST", "/api/destinations/d/retry", b"[]")[0] == 400
    assert _call(stub, "GET", "/api/destinations", token="bad")[0] == 401
    d = stub.request("POST", "http://127.0.0.1/api/destinations/d/pause", data=b"{}",
                     headers={"Authorization": ["Bearer k"], "Content-Type": ["text/plain"]})
    stub.flush()
    codes: list[int] = []
    d.addCallback(lambda r: codes.append(r.code))
    assert codes == [415]


class SharedStore(MemoryDeliveries):
    """A shared store whose lease the test gives to one node or another."""

    shared = True

    def __init__(self) -> None:
        super().__init__()
        self.holder: str | None = None
        self.released: list[str] = []

    def acquire(self, dest: str, node: str, ttl: float) -> Deferred[bool]:
        if self.holder is None:
            self.holder = node
        return succeed(self.holder == node)

    def release(self, dest: str, node: str) -> Deferred[None]:
        self.released.append(node)
        if self.holder == node:
            self.holder = None
        return succeed(None)


def test_lease_decides_which_node_delivers() -> None:
    """Only the lease holder delivers; when the lease passes to another node this one stops, the other starts."""
    clock = Clock()
    broker = MemoryBroker(clock)
    store = SharedStore()
    cfg = Config(destinations=(DestinationConfig(name="d", url="http://127.0.0.1:1/", channels=("a.>",)),))
    senders = [FakeSender(), FakeSender()]
    nodes = []
    for i in range(2):
        s = senders[i]
        ob = Outbound(cfg, clock, broker, store, Stats().destinations, sender_factory=lambda _, s=s: s)
        ob.workers["d"].node_id = f"n{i}"
        ob.start()
        nodes.append(ob)
    assert store.holder == "n0"
    assert nodes[0].workers["d"].active and not nodes[1].workers["d"].active
    broker.commit("a.x", 1)
    assert len(senders[0].calls) == 1 and senders[1].calls == []
    senders[0].answer_all(OK)
    store.holder = "n1"  # n0's lease expired and n1 took it
    clock.advance(LEASE_RENEW_SECONDS + 0.1)
    assert not nodes[0].workers["d"].active and nodes[1].workers["d"].active
    broker.commit("a.x", 2)
    assert len(senders[1].calls) == 1 and len(senders[0].calls) == 1
    assert LEASE_SECONDS + LEASE_RENEW_SECONDS < 30
    d = nodes[1].stop()  # one request still in flight: waited for, up to the grace period
    for _ in range(60):
        clock.advance(0.05)
    assert d.called and "n1" in store.released


def test_store_start_failure_is_retried() -> None:
    """A delivery state that cannot be opened at start is tried again (the daemon still starts)."""
    clock = Clock()
    broker = MemoryBroker(clock)
    store = MemoryDeliveries()
    calls: list[int] = []

    def start() -> Deferred[None]:
        calls.append(1)
        if len(calls) == 1:
            d: Deferred[None] = Deferred()
            d.errback(OSError("not yet"))
            return d
        return succeed(None)

    store.start = start  # type: ignore[method-assign]
    cfg = Config(destinations=(DestinationConfig(name="d", url="http://127.0.0.1:1/", channels=("a.>",)),))
    sender = FakeSender()
    ob = Outbound(cfg, clock, broker, store, Stats().destinations, sender_factory=lambda _: sender)
    assert ob.start().called
    clock.advance(1.1)
    assert len(calls) == 2 and ob.workers["d"].active

"""
The engine's per-delivery costs kept small (issue 17's throughput): the
position is written at most once per SAVE_EVERY_SECONDS while deliveries go
on (one write in flight, the next one holding the latest state), on a fake
clock with a store whose writes the test completes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest_twisted
from test_dest_engine import OK, make
from twisted.internet.defer import Deferred

from twisted_rt.outbound._engine import SAVE_EVERY_SECONDS
from twisted_rt.store.deliveries import DestState, MemoryDeliveries


class SlowSaves(MemoryDeliveries):
    """Saves wait for the test to complete them (like the SQLite writer thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[DestState, Deferred[None]]] = []

    def save(self, dest: str, state: DestState) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.pending.append((replace(state), d))

        def write(_: Any) -> None:
            self.states[dest] = replace(state)

        return d.addCallback(write)

    def complete(self) -> int:
        done, self.pending = self.pending, []
        for _, d in done:
            d.callback(None)
        return len(done)


def test_position_writes_are_coalesced_and_throttled() -> None:
    """Many deliveries while a write is in flight give one more write, SAVE_EVERY_SECONDS later, with the last position."""
    ob, broker, _store, sender, clock = make()
    w = ob.workers["b"]
    slow = SlowSaves()
    slow.states = dict(_store.states)
    w.store = slow
    broker.commit("o.a", 0)
    sender.answer_all(OK)
    assert len(slow.pending) == 1  # the first write goes at once
    last = None
    for i in range(50):
        last = broker.commit("o.a", i)
        sender.answer_all(OK)
    assert len(slow.pending) == 1  # no more while it is in flight
    slow.complete()
    assert not slow.pending  # held: not at once again
    clock.advance(SAVE_EVERY_SECONDS / 2)
    assert not slow.pending
    clock.advance(SAVE_EVERY_SECONDS)
    assert len(slow.pending) == 1 and last is not None
    assert slow.pending[0][0].position == last.seq
    slow.complete()
    clock.advance(10 * SAVE_EVERY_SECONDS)
    assert not slow.pending  # nothing new to write


def test_stop_writes_the_latest_position_even_while_a_write_is_held() -> None:
    """Stopping while a throttled write waits still saves the latest position (the held call is cancelled)."""
    ob, broker, store, sender, clock = make()
    for i in range(5):
        broker.commit("o.a", i)
    w = ob.workers["b"]
    w._saving = True  # a write in flight: the next ones are held
    last = broker.commit("o.a", 9)
    sender.answer_all(OK)
    w._saving = False
    w._save_call = clock.callLater(SAVE_EVERY_SECONDS, w._save_held)
    ob.stop()
    clock.advance(1)
    assert store.states["b"].position == last.seq
    assert not clock.getDelayedCalls() or all(getattr(c, "func", None) != w._save_held for c in clock.getDelayedCalls())


@pytest_twisted.ensureDeferred
async def test_destination_connections_set_tcp_nodelay() -> None:
    """The destination's endpoint sets TCP_NODELAY on its connections (no Nagle wait on a delayed ACK per request)."""
    from twisted.internet import reactor as _reactor
    from twisted.internet.protocol import Factory, Protocol

    from twisted_rt.outbound._http import endpoint_for

    reactor: Any = _reactor
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        ep = endpoint_for(reactor, b"http://127.0.0.1:%d/h" % port.getHost().port, 3)
        proto = await ep.connect(Factory.forProtocol(Protocol))
        assert proto.transport.getTcpNoDelay()
        proto.transport.loseConnection()
    finally:
        await port.stopListening()


def test_signer_matches_sign_and_standardwebhooks() -> None:
    """The keyed-once signer gives the same signature as sign(), and standardwebhooks verifies it."""
    import base64

    from standardwebhooks import Webhook

    from twisted_rt.outbound._policy import sign, signer

    key = b"k" * 24
    s = signer(key)
    for i in range(3):  # the keyed HMAC is copied, not consumed
        body = b'{"n":%d}' % i
        assert s("evt_1", 1700000000 + i, body) == sign(key, "evt_1", 1700000000 + i, body)
    wh = Webhook("whsec_" + base64.b64encode(key).decode())
    import time

    ts = int(time.time())
    headers = {"webhook-id": "evt_2", "webhook-timestamp": str(ts), "webhook-signature": s("evt_2", ts, b"{}")}
    assert wh.verify(b"{}", headers) == {}


def test_lease_loss_cancels_a_held_position_write() -> None:
    """When the worker stops delivering (lease lost), a throttled position write still waiting is dropped."""
    ob, broker, _store, sender, clock = make()
    w = ob.workers["b"]
    slow = SlowSaves()
    w.store = slow
    broker.commit("o.a", 0)
    sender.answer_all(OK)
    broker.commit("o.a", 1)
    sender.answer_all(OK)
    slow.complete()  # the second save is now held for SAVE_EVERY_SECONDS
    assert w._save_call is not None
    w._deactivate()
    assert w._save_call is None
    clock.advance(10 * SAVE_EVERY_SECONDS)
    assert not slow.pending

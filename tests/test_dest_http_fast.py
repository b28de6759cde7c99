"""
The destination client's fast path (Twisted's HTTP/1.1 client protocol
without the Agent, L{twisted_rt._twisted_internals.PreparedRequest}) against
real loopback servers: the bytes on the wire are Agent's, its own pool reuses
kept-alive connections, skips ones the receiver closed, closes idle ones, and
C{close()} waits for them.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

import twisted_rt.outbound._http as http_module
from twisted_rt.core.config import DestinationConfig
from twisted_rt.outbound import Sender

reactor: Any = _reactor

HEADERS = [
    ("Content-Type", "application/json"),
    ("webhook-id", "msg_1"),
    ("x-repeated", "a"),
    ("X-Other", "line one\r\nline two"),
    ("X-REPEATED", "b"),
]


class Raw(Protocol):
    """Records the bytes of each connection; answers each complete request with 204 (or closes after it)."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        factory: Any = self.factory
        while b"\r\n\r\n" in self.data:
            head, _, rest = self.data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            if len(rest) < length:
                return
            factory.requests.append(head + b"\r\n\r\n" + rest[:length])
            self.data = rest[length:]
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")  # type: ignore[union-attr]
            if factory.close_after:
                self.transport.loseConnection()  # type: ignore[union-attr]


@pytest.fixture
def raw_server() -> Any:
    factory = Factory.forProtocol(Raw)
    factory.connections = []  # type: ignore[attr-defined]
    factory.requests = []  # type: ignore[attr-defined]
    factory.close_after = False  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield factory, port.getHost().port
    for c in factory.connections:  # type: ignore[attr-defined]
        c.transport.loseConnection()
    port.stopListening()


def _sender(port: int, fast: bool) -> Sender:
    return Sender(reactor, DestinationConfig(name="t", url=f"http://127.0.0.1:{port}/hook?x=1", channels=("a",),
                                             timeout_seconds=5), fast=fast)


@pytest_twisted.ensureDeferred
async def test_fast_path_writes_the_bytes_agent_writes(raw_server: Any) -> None:
    """Same body and headers (repeated names, any case, CR/LF in a value): byte for byte the request Agent sends."""
    factory, port = raw_server
    for fast in (True, False):
        s = _sender(port, fast)
        out = await s.send(b'{"a":1}', HEADERS)
        assert out.ok
        await s.close()
    fast_bytes, agent_bytes = factory.requests
    assert fast_bytes == agent_bytes
    assert fast_bytes.startswith(b"POST /hook?x=1 HTTP/1.1\r\nContent-Length: 7\r\nHost: 127.0.0.1:")
    assert b"X-Repeated: a\r\nX-Repeated: b\r\n" in fast_bytes and b"X-Other: line one line two\r\n" in fast_bytes


@pytest_twisted.ensureDeferred
async def test_fast_pool_reuses_one_connection(raw_server: Any) -> None:
    """Sequential requests go over one kept-alive connection; concurrent ones open one each, then are reused."""
    factory, port = raw_server
    s = _sender(port, True)
    try:
        for _ in range(3):
            assert (await s.send(b"x", [])).ok
        assert len(factory.connections) == 1
        from twisted.internet.defer import gatherResults

        outs = await gatherResults([s.send(b"y", []) for _ in range(3)])
        assert all(o.ok for o in outs) and len(factory.connections) == 3
        outs = await gatherResults([s.send(b"z", []) for _ in range(3)])
        assert all(o.ok for o in outs) and len(factory.connections) == 3
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_connection_closed_by_the_receiver_is_not_reused(raw_server: Any) -> None:
    """A receiver that closes after each answer: the next request opens a new connection and succeeds."""
    factory, port = raw_server
    factory.close_after = True
    s = _sender(port, True)
    try:
        assert (await s.send(b"x", [])).ok
        await deferLater(reactor, 0.05, lambda: None)
        assert (await s.send(b"y", [])).ok
        assert len(factory.connections) == 2 and len(factory.requests) == 2
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_closed_after_idle_seconds(raw_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection idle for IDLE_SECONDS is closed by the sender; the next request opens a new one."""
    monkeypatch.setattr(http_module, "IDLE_SECONDS", 0.2)
    factory, port = raw_server
    s = _sender(port, True)
    try:
        assert (await s.send(b"x", [])).ok
        first = factory.connections[0]
        await deferLater(reactor, 0.5, lambda: None)
        assert not first.transport.connected
        assert not s._open and not s._idle
        assert (await s.send(b"y", [])).ok
        assert len(factory.connections) == 2
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_close_fires_when_the_idle_connections_are_closed(raw_server: Any) -> None:
    """close() closes every idle kept-alive connection and fires once they are gone; nothing is left open."""
    factory, port = raw_server
    s = _sender(port, True)
    from twisted.internet.defer import gatherResults

    await gatherResults([s.send(b"y", []) for _ in range(2)])
    assert len(s._open) == 2
    d: Deferred[None] = s.close()
    assert not d.called
    await d
    assert not s._open
    await deferLater(reactor, 0.05, lambda: None)
    assert all(not c.transport.connected for c in factory.connections)  # the receiver saw them close
    assert (await s.close()) is None  # nothing left: fires at once


def test_fast_path_is_the_default_when_the_private_names_are_there() -> None:
    """With the tested Twisted the sender goes straight to the client protocol; off when the gate is off."""
    from twisted_rt import _twisted_internals as internals

    assert Sender(reactor, DestinationConfig(name="t", url="http://127.0.0.1:1/", channels=("a",))).fast
    try:
        internals.recheck((24, 1))
        assert not Sender(reactor, DestinationConfig(name="t", url="http://127.0.0.1:1/", channels=("a",))).fast
    finally:
        internals.recheck()


@pytest_twisted.ensureDeferred
async def test_a_connection_answered_after_close_is_closed_not_kept(raw_server: Any) -> None:
    """A request in flight at close(): its connection is closed once answered, not put back in the pool."""
    _factory, port = raw_server
    s = _sender(port, True)
    d = s.send(b"late", [])
    closed = s.close()  # nothing idle yet: fires at once
    assert closed.called
    assert (await d).ok
    await deferLater(reactor, 0.05, lambda: None)
    assert not s._idle and not s._open


class EndlessHead(Protocol):
    """Answers any request with a status line and then header lines, without end."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\n")  # type: ignore[union-attr]
        self.sent = 0
        self.more()

    def more(self) -> None:
        if self.transport is None or not self.transport.connected:  # type: ignore[attr-defined]
            return
        self.transport.write(b"X-Flood: " + b"f" * 1000 + b"\r\n" * 1 + b"X-Flood-2: " + b"g" * 1000 + b"\r\n")
        self.sent += 2024
        if self.sent < 50_000_000:
            reactor.callLater(0, self.more)


@pytest_twisted.ensureDeferred
async def test_an_answer_of_endless_header_lines_is_dropped_at_the_cap() -> None:
    """A receiver that streams header lines forever: the connection is dropped after ANSWER_CAP bytes, an 'error' outcome."""
    factory = Factory.forProtocol(EndlessHead)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        s = _sender(port.getHost().port, True)
        out = await s.send(b"x", [])
        assert out.kind == "error" and out.seconds < 5, out
        await deferLater(reactor, 0.05, lambda: None)
        assert not s._open and not s._idle  # dropped, not pooled
        await s.close()
    finally:
        await port.stopListening()

"""
The Twisted client L{twisted_rt.client.subscribe}: resume bookkeeping and
backoff on a fake reactor, and reconnect/resume against a real daemon that
is restarted mid-stream.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from tests.conftest import API_KEY, Daemon
from twisted_rt.client import Subscription, _endpoint_description, http_base, subscribe, ws_url


def make(patterns: list[str], since: Any = None, **kw: Any) -> tuple[Subscription, list[dict[str, Any]], MemoryReactorClock]:
    """A subscription on a memory reactor, collecting events."""
    clock = MemoryReactorClock()
    got: list[dict[str, Any]] = []
    sub = Subscription(patterns, got.append, since, url="ws://127.0.0.1:9/ws", reactor=clock,
                       start_at_end=False, **kw)
    return sub, got, clock


def event(channel: str, offset: int, **extra: Any) -> dict[str, Any]:
    """A server C{event} message."""
    return {"op": "event", "channel": channel, "offset": offset, "id": f"{channel}-{offset}",
            "time": "2026-11-21T18:45:15.123Z", "source": "api", "type": "", "data": extra}


class FakeProto:
    """Stands in for the WebSocket protocol: records sent messages."""

    STATE_OPEN = 3

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: int | None = None
        self.state = self.STATE_OPEN
        self.transport = None

    def sendMessage(self, payload: bytes) -> None:
        self.sent.append(json.loads(payload))

    def sendClose(self, code: int) -> None:
        self.closed = code


def test_http_base_and_endpoint() -> None:
    """The HTTP base and endpoint come from the ws:// or wss:// URL; an http:// base URL maps to its /ws."""
    assert http_base("ws://127.0.0.1:8080/ws") == "http://127.0.0.1:8080"
    assert http_base("wss://rt.example.com/prefix/ws") == "https://rt.example.com/prefix"
    assert _endpoint_description("ws://127.0.0.1:8080/ws") == "tcp:host=127.0.0.1:port=8080"
    assert _endpoint_description("wss://rt.example.com/ws") == "tls:rt.example.com:443"
    with pytest.raises(ValueError):
        _endpoint_description("http://127.0.0.1/ws")
    assert ws_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080/ws"
    assert ws_url("https://rt.example.com/") == "wss://rt.example.com/ws"
    assert ws_url("ws://127.0.0.1:8080/ws") == "ws://127.0.0.1:8080/ws"


def test_events_delivered_once_in_order() -> None:
    """An event at or below a channel's last delivered offset is dropped; others are passed on without 'op'."""
    sub, got, _ = make(["a.*"])
    for off in (1, 2, 2, 1, 3):
        sub._message(event("a.x", off))
    sub._message(event("a.y", 1))
    assert [(e["channel"], e["offset"]) for e in got] == [("a.x", 1), ("a.x", 2), ("a.x", 3), ("a.y", 1)]
    assert "op" not in got[0]
    assert sub.offsets == {"a.x": 3, "a.y": 1}


def test_since_sent_on_each_connection() -> None:
    """Each (re)connection subscribes with since = the offsets seen, else the initial since."""
    sub, _, _ = make(["a.x", "b.*"], since=4)
    p1 = FakeProto()
    sub._opened(p1)  # type: ignore[arg-type]
    assert [(m["channel"], m.get("since")) for m in p1.sent] == [("a.x", 4), ("b.*", 4)]
    sub._message(event("a.x", 5))
    sub._message(event("b.q", 9))
    sub._message(event("b.r", 2))  # below the wildcard's floor: dropped
    p2 = FakeProto()
    sub._opened(p2)  # type: ignore[arg-type]
    assert [(m["channel"], m.get("since")) for m in p2.sent] == [("a.x", 5), ("b.*", {"b.q": 9})]
    assert sub.connections == 2


def test_no_since_means_live() -> None:
    """Without since and with nothing seen, the subscribe carries no since."""
    sub, _, _ = make(["a.x", "b.>"])
    p = FakeProto()
    sub._opened(p)  # type: ignore[arg-type]
    assert all("since" not in m for m in p.sent)
    assert [m["op"] for m in p.sent] == ["subscribe", "subscribe"]


def test_reconnect_backoff_grows_and_resets() -> None:
    """Failed connects are retried with exponentially growing (jittered, capped) delays; an open resets it."""
    sub, _, clock = make(["a.x"], min_delay=1.0, max_delay=8.0)
    sub.start()
    delays = []
    for _ in range(6):
        assert clock.tcpClients, "a connection attempt"
        factory = clock.tcpClients.pop()[2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        assert sub.state == "waiting"
        (call,) = clock.getDelayedCalls()
        delays.append(call.getTime() - clock.seconds())
        clock.advance(call.getTime() - clock.seconds())
    bases = [1, 2, 4, 8, 8, 8]
    assert all(b / 2 <= d <= b for d, b in zip(delays, bases, strict=True)), delays
    sub._opened(FakeProto())  # type: ignore[arg-type]
    assert sub._attempt == 0


def test_stop_cancels_reconnect() -> None:
    """stop() while waiting for a reconnect cancels it and fires at once."""
    sub, _, clock = make(["a.x"])
    sub.start()
    clock.tcpClients.pop()[2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert clock.getDelayedCalls()
    d = sub.stop()
    assert d.called
    assert sub.state == "stopped"
    assert not [c for c in clock.getDelayedCalls() if c.active()]


def test_stop_closes_open_connection() -> None:
    """stop() on an open connection sends close 1000 and fires once the connection is gone."""
    sub, _, _ = make(["a.x"])
    p = FakeProto()
    sub._opened(p)  # type: ignore[arg-type]
    d = sub.stop()
    assert p.closed == 1000
    assert not d.called
    sub._lost(p)  # type: ignore[arg-type]
    assert d.called


def test_callback_errors_do_not_stop_delivery() -> None:
    """A callback that raises is logged; later events are still delivered."""
    calls: list[int] = []

    def cb(e: dict[str, Any]) -> None:
        calls.append(e["offset"])
        if e["offset"] == 1:
            raise RuntimeError("boom")

    sub = Subscription(["a.x"], cb, reactor=MemoryReactorClock(), url="ws://127.0.0.1:9/ws")
    sub._message(event("a.x", 1))
    sub._message(event("a.x", 2))
    assert calls == [1, 2]


def test_error_messages_go_to_on_error() -> None:
    """Server 'error' messages reach on_error."""
    errors: list[dict[str, Any]] = []
    sub, _, _ = make(["a.x"], on_error=errors.append)
    sub._message({"op": "error", "code": "forbidden", "message": "no", "ref": 1})
    assert errors[0]["code"] == "forbidden"


class FakeRawResponse:
    """A 200 answer of C{/api/raw} whose body is delivered at once."""

    code = 200

    def __init__(self, doc: dict[str, Any]) -> None:
        self.body = json.dumps(doc).encode()

    def deliverBody(self, protocol: Any) -> None:
        from twisted.web.client import ResponseDone

        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Answers every request with one L{FakeRawResponse}."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        return defer.succeed(FakeRawResponse(self.doc))


def test_forwarder_never_forwards_secret_headers() -> None:
    """Even when a daemon serves them (rows of an older version), credentials and GitLab's token are not re-sent."""
    from twisted_rt.client import Forwarder

    clock = MemoryReactorClock()
    fwd = Forwarder("http://127.0.0.1:9/hook", "ws://127.0.0.1:9/ws", API_KEY, clock, report=lambda line: None)
    doc = {"body_base64": "e30=", "headers": {
        "Content-Type": "application/json", "X-Gitlab-Token": "gl", "authorization": "Bearer k",
        "COOKIE": "a=b", "Proxy-Authorization": "Basic x", "Host": "rt.example.com", "Content-Length": "2",
        "X-Gitlab-Event": "Push Hook", "webhook-signature": "v1,abc"}}
    fwd.agent = FakeAgent(doc)  # type: ignore[assignment]
    got: list[Any] = []
    fwd.original({"channel": "gitlab.Push_Hook", "offset": 1}).addBoth(got.append)
    (delivery,) = got
    assert delivery.body == b"{}"
    assert delivery.headers == {"Content-Type": "application/json", "X-Gitlab-Event": "Push Hook",
                                "webhook-signature": "v1,abc"}


# -- against a real daemon ------------------------------------------------------


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> defer.Deferred[None]:
    """Poll C{predicate} on the reactor every 50 ms (bounded)."""
    from twisted.internet.task import deferLater

    async def go() -> None:
        deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
        while not predicate():
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                raise AssertionError("timed out")
            await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]

    return defer.ensureDeferred(go())


@pytest_twisted.ensureDeferred
async def test_resume_across_daemon_restart(daemon: Daemon) -> None:
    """The client reconnects to a restarted daemon and delivers every event exactly once, in order."""
    await threads.deferToThread(daemon.publish, "py.a", {"n": 0})
    got: list[dict[str, Any]] = []
    states: list[str] = []
    sub = subscribe(["py.a", "py.b.>"], got.append, url=daemon.ws_url, token=API_KEY,
                    reactor=reactor, min_delay=0.2, max_delay=1.0, on_state=states.append)
    try:
        await _wait(lambda: sub.state == "open")
        # the exact channel existed: the client started at its end (offset 1)
        assert sub.offsets.get("py.a") == 1
        await threads.deferToThread(daemon.publish, "py.a", {"n": 1})
        await threads.deferToThread(daemon.publish, "py.b.c", {"n": 2})
        await _wait(lambda: len(got) == 2)

        await threads.deferToThread(daemon.stop)
        await _wait(lambda: sub.state in ("waiting", "connecting"))
        await threads.deferToThread(daemon.start)
        # sent while the client is still reconnecting
        for n, ch in ((3, "py.a"), (4, "py.b.c"), (5, "py.b.d")):
            await threads.deferToThread(daemon.publish, ch, {"n": n})
        await _wait(lambda: len(got) >= 5)
        await threads.deferToThread(daemon.publish, "py.a", {"n": 6})
        await _wait(lambda: len(got) >= 6)
    finally:
        await sub.stop()
    assert sorted(e["data"]["n"] for e in got) == [1, 2, 3, 4, 5, 6]
    per_channel: dict[str, list[int]] = {}
    for e in got:
        per_channel.setdefault(e["channel"], []).append(e["offset"])
    assert per_channel == {"py.a": [2, 3, 4], "py.b.c": [1, 2], "py.b.d": [1]}
    assert sub.connections == 2
    assert states[-1] == "stopped"


def test_plain_websocket_client_example(daemon: Daemon) -> None:
    """The module docstring's websocket-client example subscribes, resumes with since and gets events."""
    import websocket

    daemon.publish("plain.a", {"n": 1})
    daemon.publish("plain.b", {"n": 2})
    ws = websocket.create_connection(daemon.ws_url, header=[f"Authorization: Bearer {API_KEY}"], timeout=10)
    try:
        ws.send(json.dumps({"op": "subscribe", "channel": "plain.*", "since": {"plain.a": 0, "plain.b": 0}}))
        got = []
        while len(got) < 2:
            msg = json.loads(ws.recv())
            if msg["op"] == "event":
                got.append((msg["channel"], msg["offset"], msg["data"]["n"]))
    finally:
        ws.close()
    assert sorted(got) == [("plain.a", 1, 1), ("plain.b", 1, 2)]

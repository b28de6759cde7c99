"""/poll against the real daemon: immediate answers, waiting, timeouts, limits, errors, cleanup."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from conftest import API_KEY, DEFAULT_CONFIG, Daemon, http_json

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def poll(d: Daemon, query: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return http_json("GET", d.url + "/poll?" + query, headers=AUTH if headers is None else headers)


def publish(d: Daemon, channel: str, data: Any) -> int:
    status, body = d.publish(channel, data)
    assert status == 202, body
    return int(body["offset"])


def stats(d: Daemon) -> dict[str, Any]:
    status, body = d.get("/api/stats", headers=AUTH)
    assert status == 200
    return body  # type: ignore[no-any-return]


def test_answers_at_once_when_events_exist(daemon: Daemon) -> None:
    """Events after since are returned at once, oldest first, with last_offset."""
    for i in range(3):
        publish(daemon, "p.a", i)
    status, body = poll(daemon, "channel=p.a&since=1")
    assert status == 200
    assert [e["offset"] for e in body["events"]] == [2, 3]
    assert body["events"][0]["data"] == 1 and body["last_offset"] == 3
    status, body = poll(daemon, "channel=p.a&since=0&limit=2")
    assert [e["offset"] for e in body["events"]] == [1, 2] and body["last_offset"] == 2


def test_waits_for_the_next_event(daemon: Daemon) -> None:
    """With nothing after since, the poll is answered by the next published event."""
    publish(daemon, "p.w", 0)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(poll(daemon, "channel=p.w&since=1&timeout=20")))
    t.start()
    deadline = time.monotonic() + 10
    while stats(daemon)["subscriptions"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # until the poll is waiting (its live listener counts as a subscriber)
    publish(daemon, "p.w", {"n": 2})
    t.join(20)
    status, body = result[0]
    assert status == 200
    assert [(e["offset"], e["data"]) for e in body["events"]] == [(2, {"n": 2})]
    assert body["last_offset"] == 2


def test_timeout_answers_empty(make_daemon: Callable[..., Daemon]) -> None:
    """At the timeout the answer is 200 {"events": []}; timeouts are capped at max_poll_timeout_seconds."""
    d = make_daemon(DEFAULT_CONFIG + "\n[sse]\nmax_poll_timeout_seconds = 0.3\n")
    status, body = poll(d, "channel=p.t&since=0&timeout=1")
    assert (status, body["events"]) == (200, [])
    status, body = poll(d, "channel=p.t&since=0&timeout=3600")  # capped: answered long before the client gives up
    assert (status, body["events"]) == (200, [])
    status, body = poll(d, "channel=p.t&since=0&timeout=0")
    assert (status, body) == (200, {"events": [], "last_offset": 0})


def test_bad_parameters_are_400(daemon: Daemon) -> None:
    """Missing/extra/wildcard channel, bad since, limit or timeout (integers only): 400 with a JSON error."""
    for query in ["", "channel=a&channel=b", "channel=a.*", "channel=a..b"]:
        status, body = poll(daemon, query)
        assert status == 400, query
        assert body["error"] in ("bad_request", "invalid_channel") and body["message"]
    for query in ["channel=a&since=-1", "channel=a&since=x", "channel=a&timeout=abc", "channel=a&timeout=-1",
                  "channel=a&timeout=nan", "channel=a&timeout=0.5", "channel=a&limit=x", "channel=a&since=%C2%B2",
                  "channel=a&since=" + "9" * 5000, "channel=a&limit=+1", "channel=a&since=%EF%BC%91"]:
        status, body = poll(daemon, query)
        assert status == 400, query
        assert body["error"] == "invalid_parameter" and body["message"], query


def test_auth_and_rights(daemon: Daemon) -> None:
    """A bad token is 401; anonymous may poll public.> only (403 otherwise); token via ?token= works."""
    status, body = poll(daemon, "channel=a&timeout=0", {"Authorization": "Bearer nope"})
    assert (status, body["error"]) == (401, "invalid_token")
    status, body = poll(daemon, "channel=private&timeout=0", {})
    assert (status, body["error"]) == (403, "forbidden")
    assert poll(daemon, "channel=public.x&timeout=0", {})[0] == 200
    assert poll(daemon, f"channel=private&timeout=0&token={API_KEY}", {})[0] == 200


def test_client_going_away_cleans_up(daemon: Daemon) -> None:
    """A client that hangs up on a waiting poll leaves no listener behind."""
    s = socket.create_connection(("127.0.0.1", daemon.port))
    s.sendall(f"GET /poll?channel=p.gone&timeout=30&token={API_KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    deadline = time.monotonic() + 10
    while stats(daemon)["subscriptions"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    s.close()
    while True:
        _, body = daemon.get("/api/channels", headers=AUTH)
        waiting = stats(daemon)["subscriptions"]
        if waiting == 0:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.02)


def test_shutdown_answers_waiting_polls(daemon: Daemon) -> None:
    """Stopping the daemon answers a waiting poll with 200 and no events, and the daemon exits."""
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(poll(daemon, "channel=p.s&timeout=30")))
    t.start()
    deadline = time.monotonic() + 10
    while stats(daemon)["subscriptions"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    daemon.stop()
    t.join(10)
    assert result and result[0][0] == 200 and result[0][1]["events"] == []


def test_unit_waiter_collects_one_turn_and_times_out() -> None:
    """A poll waiter answers with every event of the turn after since, or [] at the timeout; cancel stops its timers."""
    from twisted.internet.task import Clock

    from twisted_rt.core.event import Event
    from twisted_rt.routes.poll import _Waiter

    def ev(off: int) -> Event:
        return Event(str(off), "c", off, "t", "s", "", off)

    clock = Clock()
    w = _Waiter(clock, since=2)
    d = w.wait(30)
    w.deliver(ev(2))  # not after since
    w.deliver(ev(3))
    w.deliver(ev(4))
    assert not d.called
    clock.advance(0)
    assert [e.offset for e in d.result] == [3, 4]
    assert clock.getDelayedCalls() == []

    w2 = _Waiter(clock, since=0)
    d2 = w2.wait(5)
    clock.advance(4.9)
    assert not d2.called
    clock.advance(0.2)
    assert d2.result == []

    w3 = _Waiter(clock, since=0)
    d3 = w3.wait(5)
    d3.cancel()
    d3.addErrback(lambda f: None)
    assert clock.getDelayedCalls() == []


def test_huge_since_is_not_a_server_error(daemon: Daemon) -> None:
    """/poll with the largest 64-bit since answers 200 with no events; past it (or a Unicode digit) is 400, never 5xx."""
    status, body = daemon.get("/poll?channel=public.x&since=9223372036854775807&timeout=0")
    assert status == 200 and body["events"] == []
    for since in ("9223372036854775808", "99999999999999999999", "%C2%B2", "1" * 5000):
        status, body = daemon.get(f"/poll?channel=public.x&since={since}&timeout=0")
        assert status == 400 and body["error"] == "invalid_parameter", since
    assert "CRITICAL" not in daemon.log() and "Traceback" not in daemon.log()


def test_answer_is_bounded_by_bytes(daemon: Daemon) -> None:
    """A poll over large events answers at most about 4 MiB of events with "more": true, and paging gets the rest once."""
    big = "x" * (700 * 1024)
    for _ in range(8):
        publish(daemon, "p.big", big)
    status, body = poll(daemon, "channel=p.big&since=0&timeout=0")
    assert status == 200
    first = [e["offset"] for e in body["events"]]
    assert 1 <= len(first) < 8 and body["more"] is True
    assert sum(len(json.dumps(e)) for e in body["events"]) <= 4 * 1024 * 1024 + len(big) + 1024
    seen = list(first)
    while body.get("more"):
        status, body = poll(daemon, f"channel=p.big&since={body['last_offset']}&timeout=0")
        seen += [e["offset"] for e in body["events"]]
    assert seen == list(range(1, 9))


def test_live_answer_keeps_at_most_limit(daemon: Daemon) -> None:
    """A waiting poll with limit=3 answered by one commit of 50 events carries 3 of them and "more": true."""
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(poll(daemon, "channel=p.many&since=0&limit=3&timeout=20")))
    t.start()
    deadline = time.monotonic() + 10
    while stats(daemon)["subscriptions"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, _ = daemon.post("/api/publish", {"events": [{"channel": "p.many", "data": i} for i in range(50)]},
                            AUTH)
    assert status == 202
    t.join(20)
    status, body = result[0]
    assert status == 200 and [e["offset"] for e in body["events"]] == [1, 2, 3]
    assert body["more"] is True and body["last_offset"] == 3


def test_unit_waiter_keeps_no_more_than_it_sends() -> None:
    """The live listener stops collecting at limit events or about max_bytes (the first event always) and says more."""
    from twisted.internet.task import Clock

    from twisted_rt.core.event import Event
    from twisted_rt.routes.poll import _Waiter

    def ev(off: int, size: int = 1) -> Event:
        return Event(str(off), "c", off, "t", "s", "", "x" * size)

    clock = Clock()
    w = _Waiter(clock, since=0, limit=3, max_bytes=10**6)
    d = w.wait(30)
    for i in range(1, 11):
        w.deliver(ev(i))
    assert len(w.events) == 3 and w.more
    clock.advance(0)
    assert [e.offset for e in d.result] == [1, 2, 3]

    w2 = _Waiter(clock, since=0, limit=100, max_bytes=1000)
    w2.wait(30)
    w2.deliver(ev(1, 5000))  # over the byte bound alone: still sent
    w2.deliver(ev(2, 10))
    assert [e.offset for e in w2.events] == [1] and w2.more


def test_unit_poll_is_its_own_route() -> None:
    """build_root mounts /poll from routes.poll (not from the SSE module)."""
    from twisted.internet.task import Clock

    from twisted_rt.app import App
    from twisted_rt.core.auth import Authenticator
    from twisted_rt.core.config import AuthConfig, Config
    from twisted_rt.core.metrics import Stats
    from twisted_rt.routes import build_root
    from twisted_rt.routes.poll import PollResource
    from twisted_rt.testing import MemoryBroker

    app = App(Config(), Clock(), MemoryBroker(), Authenticator(AuthConfig()), Stats())
    root = build_root(app)
    assert type(root.children[b"poll"]) is PollResource  # type: ignore[attr-defined]

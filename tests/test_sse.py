"""
/sse against the real daemon: the text/event-stream format, the bounded
C{v1:<seq>} cursor and resume of every channel and pattern through
Last-Event-ID (raw HTTP and a real browser's EventSource in headless
chromium), the ids of earlier versions, token expiry, heartbeats, errors and
shutdown.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
from conftest import API_KEY, DEFAULT_CONFIG, Daemon, http_json
from conftest import http as http_call


class Stream:
    """A raw SSE reader over http.client (chunked decoding included)."""

    def __init__(self, d: Daemon, query: str, headers: dict[str, str] | None = None, timeout: float = 10) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout)
        self.conn.request("GET", "/sse?" + query, headers=headers or {})
        self.resp = self.conn.getresponse()

    def block(self) -> dict[str, Any] | None:
        """The next block as {field: value, "comments": [...]}; None at the end of the stream."""
        fields: dict[str, Any] = {"comments": []}
        while True:
            line = self.resp.readline()
            if not line:
                return None
            text = line.decode("utf-8").rstrip("\n")
            if text == "":
                if len(fields) > 1 or fields["comments"]:
                    return fields
                continue
            if text.startswith(":"):
                fields["comments"].append(text[1:].strip())
                continue
            name, _, value = text.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    def event(self) -> dict[str, Any]:
        """The next block that carries data."""
        while True:
            b = self.block()
            assert b is not None, "stream ended"
            if "data" in b:
                return b

    def close(self) -> None:
        self.conn.close()


def q(*channels: str, **extra: str) -> str:
    return urllib.parse.urlencode([("channel", c) for c in channels] + list(extra.items()))


def seq(block: dict[str, Any]) -> int:
    """The seq of a block's v1 cursor (asserting its form and size)."""
    cursor = block["id"]
    assert cursor.startswith("v1:") and len(cursor.encode()) <= 256, cursor
    return int(cursor[3:])


def publish(d: Daemon, channel: str, data: Any) -> int:
    status, body = d.publish(channel, data)
    assert status == 202, body
    return int(body["offset"])


def test_stream_format_and_live_events(daemon: Daemon) -> None:
    """text/event-stream with retry advice, a starting id, then id/event/data per event."""
    publish(daemon, "s.a", 0)
    s = Stream(daemon, q("s.a", "s.*", token=API_KEY))
    assert s.resp.status == 200
    assert s.resp.getheader("content-type", "").startswith("text/event-stream")
    assert s.resp.getheader("cache-control") == "no-cache"
    assert s.block() == {"comments": [], "retry": "2000"}
    start = s.block()
    assert start is not None and set(start) == {"comments", "id"} and seq(start) >= 1  # the starting position
    publish(daemon, "s.b", {"x": 1})
    publish(daemon, "s.a", {"x": 2})
    e1, e2 = s.event(), s.event()
    assert e1["event"] == "s.b" and e2["event"] == "s.a"
    assert seq(start) < seq(e1) < seq(e2)
    body = json.loads(e2["data"])
    assert body["channel"] == "s.a" and body["offset"] == 2 and body["data"] == {"x": 2}
    assert set(body) == {"id", "channel", "offset", "time", "source", "type", "data"}
    s.close()


def test_last_event_id_resumes_every_channel(daemon: Daemon) -> None:
    """Reconnecting with Last-Event-ID replays what each listed channel missed, once, then live."""
    for i in range(3):
        publish(daemon, "r.a", i)
        publish(daemon, "r.b.x", i)
    s = Stream(daemon, q("r.a", "r.b.>", since="0", token=API_KEY))
    got = [s.event() for _ in range(6)]
    s.close()
    last_id = got[3]["id"]  # the 4th event: the client saw only 4 of the 6
    seen = {(e["event"], json.loads(e["data"])["offset"]) for e in got[:4]}
    publish(daemon, "r.a", 9)
    publish(daemon, "r.b.y", 9)  # a channel new to the wildcard
    s2 = Stream(daemon, q("r.a", "r.b.>", token=API_KEY), {"Last-Event-ID": last_id})
    rest = []
    for _ in range(4):
        e = s2.event()
        rest.append((e["event"], json.loads(e["data"])["offset"]))
    publish(daemon, "r.a", 10)
    e = s2.event()
    rest.append((e["event"], json.loads(e["data"])["offset"]))
    assert seq(e) > seq(got[3])
    s2.close()
    everything = sorted(seen | set(rest))
    assert len(seen) + len(rest) == len(everything)  # no duplicate
    assert everything == sorted([("r.a", n) for n in range(1, 6)] + [("r.b.x", n) for n in range(1, 4)]
                                + [("r.b.y", 1)])


def test_since_query_and_bad_values(daemon: Daemon) -> None:
    """?since=N replays after N; a since that is not an integer or an unreadable Last-Event-ID is a 400 JSON error."""
    for i in range(3):
        publish(daemon, "q.a", i)
    s = Stream(daemon, q("q.a", since="2", token=API_KEY))
    assert json.loads(s.event()["data"])["offset"] == 3
    s.close()
    for bad in ("x", "q.a=1", "-1", "²", "1" * 20, ""):
        status, body = http_json("GET", daemon.url + "/sse?" + q("q.a", since=bad, token=API_KEY))
        assert status == 400 and body["error"] == "invalid_parameter", bad
    for bad in ("x", "q.a=", "q..a=1", "q.a=-1", "v1:", "v1:x", "v1:-1", "v1:" + "9" * 20, "q.a=1,,q.b=2", "v2:1"):
        status, body = http_json("GET", daemon.url + "/sse?" + q("q.a", token=API_KEY), headers={"Last-Event-ID": bad})
        assert status == 400 and body["error"] == "invalid_last_event_id" and body["message"], bad


def test_heartbeat_comments(make_daemon: Callable[..., Daemon]) -> None:
    """Idle streams get comment heartbeats every heartbeat_seconds."""
    d = make_daemon(DEFAULT_CONFIG + "\n[sse]\nheartbeat_seconds = 0.2\nretry_ms = 500\n")
    s = Stream(d, q("public.x"))
    assert s.block() == {"comments": [], "retry": "500"}
    assert s.block() == {"comments": [], "id": "v1:0"}
    assert s.block() == {"comments": ["hb"]}
    assert s.block() == {"comments": ["hb"]}
    s.close()


def test_errors_are_json(make_daemon: Callable[..., Daemon]) -> None:
    """Missing/bad channel 400, bad token 401, forbidden channel or origin 403."""
    d = make_daemon(DEFAULT_CONFIG + '\n[server]\nallowed_origins = ["https://ok.example"]\n')
    cases = [
        ("", {}, 400, "bad_request"),
        (q("a..b", token=API_KEY), {}, 400, "invalid_channel"),
        (q("a", token="nope"), {}, 401, "invalid_token"),
        (q("private"), {}, 403, "forbidden"),
        (q("public.a"), {"Origin": "https://evil.example"}, 403, "forbidden_origin"),
    ]
    for query, headers, status, code in cases:
        got, hdrs, raw = http_call("GET", d.url + "/sse?" + query, headers=headers)
        body = json.loads(raw)
        assert (got, body["error"]) == (status, code), query
        assert body["message"]
        # the one error mapper: a 401 says how to authenticate, as on every other route
        assert ("www-authenticate" in hdrs) is (status == 401), query
    s = Stream(d, q("public.a"), {"Origin": "https://ok.example"})
    assert s.resp.status == 200
    assert s.resp.getheader("access-control-allow-origin") == "https://ok.example"
    s.close()


def test_shutdown_ends_streams_cleanly(daemon: Daemon) -> None:
    """Stopping the daemon ends every SSE response with a clean end of stream."""
    streams = [Stream(daemon, q("public.a")) for _ in range(2)]
    for s in streams:
        assert s.block() is not None
    ends: list[Any] = []

    def drain(s: Stream) -> None:
        try:
            while s.block() is not None:
                pass
            ends.append("clean")
        except Exception as e:
            ends.append(e)

    threads = [threading.Thread(target=drain, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    daemon.stop()
    for t in threads:
        t.join(10)
    assert ends == ["clean", "clean"]


def test_counters_follow_streams(daemon: Daemon) -> None:
    """The sse connection and subscription counters go up with a stream and back down when it closes."""
    s = Stream(daemon, q("public.a", "public.b.>"))
    s.block()
    s.block()
    _, stats = daemon.get("/api/stats", headers={"Authorization": f"Bearer {API_KEY}"})
    assert stats["connections_by_transport"].get("sse") == 1
    s.close()
    deadline = time.monotonic() + 10
    while True:
        _, stats = daemon.get("/api/stats", headers={"Authorization": f"Bearer {API_KEY}"})
        if stats["connections_by_transport"].get("sse", 0) == 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stats["subscriptions"] == 0


BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.browser
def test_browser_eventsource_resumes_after_server_restart(make_daemon: Callable[..., Daemon]) -> None:
    """
    A real EventSource (headless chromium) reconnects by itself after the
    daemon restarts, sends Last-Event-ID, and ends up with offsets exactly
    1..N on both channels, including events published while it was away.
    """
    from playwright.sync_api import sync_playwright

    d = make_daemon(DEFAULT_CONFIG + "\n[sse]\nretry_ms = 1500\n")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(d.url + "/healthz")
            page.evaluate(
                """(url) => {
                    window.got = []; window.opens = 0;
                    const es = new EventSource(url);
                    es.onopen = () => { window.opens += 1; };
                    for (const ch of ["b.one", "b.two"]) {
                        es.addEventListener(ch, (m) => {
                            const e = JSON.parse(m.data);
                            window.got.push([e.channel, e.offset, m.lastEventId]);
                        });
                    }
                }""",
                "/sse?" + q("b.one", "b.*", token=API_KEY),
            )
            page.wait_for_function("window.opens === 1", timeout=10000)
            for i in range(3):
                publish(d, "b.one", i)
                publish(d, "b.two", i)
            page.wait_for_function("window.got.length === 6", timeout=10000)
            d.restart()
            for i in range(3):  # while the browser is between retries
                publish(d, "b.one", i)
                publish(d, "b.two", i)
            page.wait_for_function("window.opens >= 2", timeout=20000)
            publish(d, "b.one", "live")
            page.wait_for_function("window.got.length >= 13", timeout=10000)
            got = page.evaluate("window.got")
        finally:
            browser.close()
    one = [off for ch, off, _ in got if ch == "b.one"]
    two = [off for ch, off, _ in got if ch == "b.two"]
    assert one == [1, 2, 3, 4, 5, 6, 7]
    assert two == [1, 2, 3, 4, 5, 6]
    assert got[-1][2] == "v1:13"  # the 13th event journaled


def test_unit_last_event_id_forms() -> None:
    """A v1 cursor reads as a seq; a bare offset and chan=off,... (earlier versions' ids) as offsets; junk is refused."""
    from twisted_rt.routes.sse import encode_cursor, parse_last_event_id

    r = parse_last_event_id(encode_cursor(41))
    assert (r.after_seq, r.since) == (41, None)
    r = parse_last_event_id(" 12 ")
    assert r.after_seq is None and r.since is not None and r.since.get("any.channel", 0) == 12
    r = parse_last_event_id("github.push=41,a:b@c=0")
    assert r.since == {"github.push": 41, "a:b@c": 0} and r.since.get("other", 0) == 0
    assert parse_last_event_id("").fresh
    for everything in ("0", "a=0,b.c=0"):  # every channel from its start: the cursor v1:0
        r = parse_last_event_id(everything)
        assert (r.after_seq, r.since) == (0, None)
    for bad in ("a", "a=", "a=x", "a..b=1", "a=1,,b=2", "a=-1", "v1:", "v1:1.5", "v1:" + "1" * 20, "²", "a=²"):
        with pytest.raises(ValueError):
            parse_last_event_id(bad)


def test_slow_sse_reader_is_cut_off(make_daemon: Callable[..., Daemon]) -> None:
    """An SSE reader that stops reading is ended once max_send_buffer_bytes is queued for it; others are unaffected."""
    import socket

    d = make_daemon(DEFAULT_CONFIG + "\n[websocket]\nmax_send_buffer_bytes = 262144\n")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    slow.connect(("127.0.0.1", d.port))
    slow.sendall(f"GET /sse?channel=slow.sse&token={API_KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    deadline = time.monotonic() + 10
    while d.get("/api/stats", headers=auth)[1]["subscriptions"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    chunk = "y" * 65536
    n = 0
    while d.get("/api/stats", headers=auth)[1]["dropped_by_reason"].get("slow_consumer", 0) == 0:
        assert n < 400, "never cut off"
        for _ in range(10):
            publish(d, "slow.sse", chunk)
            n += 1
    # what was already sent can still be read, then the response ends
    slow.settimeout(10)
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        more = slow.recv(1 << 20)
        assert more, "closed without the last chunk"
        data += more
    assert data.count(b"event: slow.sse") < n
    slow.close()
    _, st = d.get("/api/stats", headers=auth)
    assert st["connections_by_transport"].get("sse", 0) == 0


def _publish_many(d: Daemon, events: list[tuple[str, Any]]) -> None:
    for i in range(0, len(events), 100):
        batch = [{"channel": c, "data": v} for c, v in events[i : i + 100]]
        status, body = d.post("/api/publish", {"events": batch}, {"Authorization": f"Bearer {API_KEY}"})
        assert status == 202, body


def test_id_stays_bounded_with_many_channels(daemon: Daemon) -> None:
    """With 1,500 channels on one wildcard stream every id is a v1 cursor of at most 256 bytes, and it resumes exactly."""
    n = 1500
    _publish_many(daemon, [(f"m.c{i}", i) for i in range(n)])
    s = Stream(daemon, urllib.parse.urlencode({"pattern": "m.>", "since": "0", "token": API_KEY}))
    got = [s.event() for _ in range(n)]
    s.close()
    assert all(len(e["id"].encode()) <= 256 for e in got)
    assert [json.loads(e["data"])["data"] for e in got] == list(range(n))
    seqs = [seq(e) for e in got]
    assert seqs == sorted(set(seqs))
    _publish_many(daemon, [("m.c7", "late"), ("m.new", "new")])
    s2 = Stream(daemon, urllib.parse.urlencode({"pattern": "m.>", "token": API_KEY}), {"Last-Event-ID": got[699]["id"]})
    rest = [s2.event() for _ in range(n - 700 + 2)]
    assert [json.loads(e["data"])["data"] for e in rest] == [*range(700, n), "late", "new"]
    publish(daemon, "m.c1", "live")
    e = s2.event()
    assert json.loads(e["data"])["data"] == "live" and seq(e) > seq(rest[-1])
    s2.close()


def test_pattern_param_and_overlapping_patterns(daemon: Daemon) -> None:
    """pattern= subscribes to wildcards beside channel=; an event matched by several of them comes once, replayed or live."""
    publish(daemon, "o.a", 1)
    publish(daemon, "o.b.c", 2)
    query = urllib.parse.urlencode([("pattern", "o.*"), ("channel", "o.a"), ("pattern", "o.>"), ("since", "0"),
                                    ("token", API_KEY)])
    s = Stream(daemon, query)
    replayed = [s.event() for _ in range(2)]
    assert [(e["event"], json.loads(e["data"])["data"]) for e in replayed] == [("o.a", 1), ("o.b.c", 2)]
    publish(daemon, "o.a", 3)
    publish(daemon, "o.x", 4)
    live = [s.event() for _ in range(2)]
    assert [(e["event"], json.loads(e["data"])["data"]) for e in live] == [("o.a", 3), ("o.x", 4)]
    publish(daemon, "o.b.d", 5)
    assert json.loads(s.event()["data"])["data"] == 5
    s.close()
    status, body = http_json("GET", daemon.url + "/sse?" + urllib.parse.urlencode(
        [("pattern", "o.>")] * 60 + [("channel", "o.a")] * 41 + [("token", API_KEY)]))
    assert status == 400 and body["error"] == "bad_request"


def test_earlier_ids_still_resume(daemon: Daemon) -> None:
    """A browser connected before the upgrade resumes with its old id (chan=off,... or a bare offset), then gets v1 ids."""
    for i in range(1, 4):
        publish(daemon, "l.a", i)
        publish(daemon, "l.b", i)
    publish(daemon, "l.c", 1)
    query = urllib.parse.urlencode([("pattern", "l.*"), ("token", API_KEY)])
    s = Stream(daemon, query, {"Last-Event-ID": "l.a=2,l.b=3"})
    events = [s.event(), s.event()]
    got = [(e["event"], json.loads(e["data"])["offset"]) for e in events]
    assert got == [("l.a", 3), ("l.c", 1)]  # l.c is not named: from its start
    # a replay by offsets carries no id (the browser keeps the one it resumed with) ...
    assert all("id" not in e for e in events)
    # ... then the position it has reached, and v1 ids from then on
    start = s.block()
    assert start is not None and seq(start) == 7
    publish(daemon, "l.b", 4)
    e = s.event()
    assert (e["event"], seq(e)) == ("l.b", 8)
    s.close()
    s = Stream(daemon, q("l.a", "l.b", token=API_KEY), {"Last-Event-ID": "2"})
    got = [(e["event"], json.loads(e["data"])["offset"]) for e in (s.event(), s.event())]
    assert got == [("l.a", 3), ("l.b", 3)]
    s.close()


def test_cursor_past_the_journal_starts_now(daemon: Daemon) -> None:
    """A cursor from another (longer) journal does not silence the stream: it starts at the current position."""
    publish(daemon, "f.a", 1)
    s = Stream(daemon, q("f.a", token=API_KEY), {"Last-Event-ID": "v1:999999"})
    assert s.block() == {"comments": [], "retry": "2000"}
    start = s.block()
    assert start is not None and seq(start) == 1
    publish(daemon, "f.a", 2)
    e = s.event()
    assert json.loads(e["data"])["offset"] == 2 and seq(e) == 2
    s.close()


def test_stream_ends_when_token_expires(daemon: Daemon) -> None:
    """An SSE stream opened with a JWT ends (cleanly) when the token's exp passes; a stream with an API key goes on."""
    import jwt
    from conftest import JWT_SECRET

    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 2, "subscribe": ["t.>"]}, JWT_SECRET,
                       algorithm="HS256")
    s = Stream(daemon, q("t.a", token=token), timeout=20)
    other = Stream(daemon, q("t.a", token=API_KEY), timeout=20)
    assert s.resp.status == 200
    s.block()
    s.block()
    publish(daemon, "t.a", "before")
    assert json.loads(s.event()["data"])["data"] == "before"
    comments: list[str] = []
    while (b := s.block()) is not None:  # the server ends the response
        comments += b["comments"]
    assert "token expired" in comments
    publish(daemon, "t.a", "after")
    assert json.loads(other.event()["data"])["data"] == "before"
    assert json.loads(other.event()["data"])["data"] == "after"
    other.close()
    status, body = http_json("GET", daemon.url + "/sse?" + q("t.a", token=token))
    assert (status, body["error"]) == (401, "token_expired")


def test_unit_expiry_uses_the_app_reactor() -> None:
    """The expiry timer runs on the app's reactor: with a Clock, the stream ends exactly when exp passes."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twisted_rt.app import App
    from twisted_rt.core.auth import Authenticator
    from twisted_rt.core.config import AuthConfig, Config
    from twisted_rt.core.metrics import Stats
    from twisted_rt.routes import build_root
    from twisted_rt.testing import MemoryBroker
    from twisted_rt.web.site import RTSite

    clock = Clock()
    clock.advance(1000)
    config = Config(auth=AuthConfig(jwt_secret="k" * 32))
    auth = Authenticator(config.auth, clock=clock.seconds)
    broker = MemoryBroker(clock)
    for _ in range(7):
        broker.commit("other")  # the stream starts at position 7
    app = App(config=config, reactor=clock, broker=broker, auth=auth, stats=Stats())
    site = RTSite(build_root(app), log_requests=False, reactor=clock)
    token = auth.mint("bob", subscribe=["u.>"], ttl=60)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
    proto = site.buildProtocol(transport.getPeer())
    assert proto is not None
    proto.makeConnection(transport)
    proto.dataReceived(f"GET /sse?channel=u.a&token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert b"id: v1:7" in transport.value() and len(broker.index) == 1
    clock.advance(59.9)
    assert not transport.value().endswith(b"0\r\n\r\n")
    clock.advance(0.2)
    assert b": token expired" in transport.value() and transport.value().endswith(b"0\r\n\r\n")
    assert len(broker.index) == 0 and app.stats.connections["sse"] == 0

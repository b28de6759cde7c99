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
        got, body = http_json("GET", d.url + "/sse?" + query, headers=headers)
        assert (got, body["error"]) == (status, code), query
        assert body["message"]
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
    from twisted_rt.sse import encode_cursor, parse_last_event_id

    r = parse_last_event_id(encode_cursor(41))
    assert (r.after_seq, r.since) == (41, None)
    r = parse_last_event_id(" 12 ")
    assert r.after_seq is None and r.since is not None and r.since.get("any.channel", 0) == 12
    r = parse_last_event_id("github.push=41,a:b@c=0")
    assert r.since == {"github.push": 41, "a:b@c": 0} and r.since.get("other", 0) == 0
    assert parse_last_event_id("").fresh
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

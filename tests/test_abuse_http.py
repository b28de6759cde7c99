"""
An attacker over raw sockets against the real daemon's HTTP layer:
slowloris heads and bodies, keep-alive abuse, more connections than the
caps, malformed request lines and headers, huge Last-Event-IDs, junk
integer parameters, and the daemon's memory (RSS) and /healthz afterwards.

The daemons here use small limits (a 1 s head deadline, a few connections
per address) so the suite stays fast; nothing asserts how fast an answer
comes, only what it is and that it comes at all.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import API_KEY, DEFAULT_CONFIG, Daemon, http, http_json

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FAST = DEFAULT_CONFIG + "\n[server]\nrequest_head_timeout_seconds = 1\n"


def connect(d: Daemon, timeout: float = 15) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d.port), timeout=timeout)
    return s


def read_until_closed(s: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    out = b""
    while len(out) < limit:
        try:
            more = s.recv(65536)
        except ConnectionResetError:
            break
        if not more:
            break
        out += more
    return out


def trickle(s: socket.socket, data: bytes, every: float = 0.2) -> tuple[int, bytes]:
    """
    Send C{data} one byte every C{every} seconds until the server answers;
    returns (bytes sent, what the server sent).
    """
    sent = 0
    s.settimeout(every)
    for b in data:
        try:
            s.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += 1
        try:
            first = s.recv(65536)
        except TimeoutError:
            continue
        s.settimeout(15)
        return sent, first + read_until_closed(s)
    s.settimeout(15)
    return sent, read_until_closed(s)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def json_body(answer: bytes) -> Any:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)


def test_slowloris_head_is_answered_408(make_daemon: Callable[..., Daemon]) -> None:
    """A head sent one byte at a time does not keep the connection: 408 JSON and close at the head deadline."""
    d = make_daemon(FAST)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    s = connect(d)
    sent, answer = trickle(s, head)
    s.close()
    assert sent < len(head)  # cut off long before the head was whole
    assert status_of(answer) == 408
    assert b"connection: close" in answer.lower()
    assert json_body(answer)["error"] == "request_timeout"


def test_slow_body_is_answered_408(make_daemon: Callable[..., Daemon]) -> None:
    """A body that trickles in (less than 16 KiB per head timeout) is answered 408 and the connection closed."""
    d = make_daemon(FAST)
    s = connect(d)
    s.sendall(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    sent, answer = trickle(s, b'{"channel":"a","data":"' + b"x" * 2000)
    s.close()
    assert sent < 2000
    assert status_of(answer) == 408 and json_body(answer)["error"] == "request_timeout"
    assert d.get("/api/channels", headers=AUTH)[1]["channels"] == []


def test_keepalive_next_head_has_the_same_deadline(make_daemon: Callable[..., Daemon]) -> None:
    """After a first answer on a keep-alive connection, the next request head gets its own deadline too."""
    d = make_daemon(FAST)
    s = connect(d)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        more = s.recv(65536)
        assert more
        first += more
    assert status_of(first) == 200
    _, answer = trickle(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"b" * 200 + b"\r\n\r\n")
    s.close()
    assert status_of(answer) == 408


def test_idle_connection_is_closed_quietly(make_daemon: Callable[..., Daemon]) -> None:
    """A connection that sends nothing is closed at the head deadline, with nothing written (no request, no answer)."""
    d = make_daemon(FAST)
    s = connect(d)
    assert read_until_closed(s) == b""
    s.close()


def test_streams_are_not_cut_by_the_head_deadline(make_daemon: Callable[..., Daemon]) -> None:
    """The deadline is for request heads only: an SSE stream and a long-poll outlive it."""
    d = make_daemon(FAST + "\n[sse]\nheartbeat_seconds = 0.5\n")
    s = connect(d)
    s.sendall(b"GET /sse?channel=public.a HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    deadline = time.monotonic() + 3.5  # well past the 1 s head deadline
    while time.monotonic() < deadline:
        more = s.recv(65536)
        assert more, got
        got += more
    assert got.count(b": hb") >= 3
    status, body = d.get("/poll?channel=public.a&timeout=2", timeout=10)
    assert (status, body["events"]) == (200, [])
    s.close()


def test_connections_past_the_per_ip_cap_get_503(make_daemon: Callable[..., Daemon]) -> None:
    """
    Past max_connections_per_ip, HTTP gets 503 JSON and a WebSocket upgrade is
    refused; the connections already open (SSE, WebSocket) are untouched,
    and a closed WebSocket frees its slot.
    """
    import websocket

    d = make_daemon(DEFAULT_CONFIG + "\n[server]\nmax_connections_per_ip = 4\n")
    streams = []
    for _ in range(3):
        s = connect(d)
        s.sendall(b"GET /sse?channel=public.cap HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        streams.append(s)
    ws = websocket.create_connection(d.ws_url, timeout=10)
    ws.send(json.dumps({"op": "subscribe", "channel": "public.cap"}))
    assert json.loads(ws.recv())["op"] == "subscribed"
    status, headers, raw = http("GET", d.url + "/healthz")
    assert status == 503 and json.loads(raw)["error"] == "too_many_connections"
    assert headers.get("retry-after") == "1"
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(d.ws_url, timeout=10)
    assert e.value.status_code == 503
    ws.send(json.dumps({"op": "ping", "ref": 1}))  # the open WebSocket still works
    assert json.loads(ws.recv())["op"] == "pong"
    ws.close()
    deadline = time.monotonic() + 10
    # its slot comes back when it is gone (a just-closed request's slot may lag a little too)
    while d.publish("public.cap", "still here")[0] != 202:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for s in streams:
        got = b""
        while b"still here" not in got:
            more = s.recv(65536)
            assert more
            got += more
        s.close()
    _, st = d.get("/api/stats", headers=AUTH)
    assert st["dropped_by_reason"].get("too_many_connections_per_ip", 0) >= 2


def test_connections_past_the_global_cap_get_503(make_daemon: Callable[..., Daemon]) -> None:
    """Past max_connections (all addresses together) new connections get 503 until one closes."""
    d = make_daemon(DEFAULT_CONFIG + "\n[server]\nmax_connections = 2\n")
    held = [connect(d) for _ in range(2)]
    for s in held:
        s.sendall(b"GET /sse?channel=public.g HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
    status, _, raw = http("GET", d.url + "/healthz")
    assert status == 503 and "2 connections" in json.loads(raw)["message"]
    held.pop().close()
    deadline = time.monotonic() + 10
    while http("GET", d.url + "/healthz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    held[0].close()


MALFORMED = [
    b"\x00\x01\x02\x03\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(600)) + b"\r\n",
    b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz?token=%ZZ&%%%=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
    b"\r\n" * 5000,
    b"GET /sse?channel=public.a HTTP/1.1\r\nLast-Event-ID: \xff\xfe\r\n\r\n",
    b"GET /poll?channel=public.a&since=\xc2\xb2 HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("raw", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_never_get_a_server_error(make_daemon: Callable[..., Daemon], raw: bytes) -> None:
    """Malformed request lines, headers, lengths and bodies are answered (4xx, or 200 when still readable) or closed, never 5xx."""
    d = make_daemon(FAST)
    s = connect(d)
    try:
        s.sendall(raw)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = read_until_closed(s)
    s.close()
    if answer:
        assert status_of(answer) < 500, answer[:300]
    assert d.get("/healthz", timeout=5) == (200, {"status": "ok"})


def test_huge_and_junk_last_event_ids(make_daemon: Callable[..., Daemon]) -> None:
    """A Last-Event-ID of junk is 400 JSON, one past the head limit 400, an old 1,000-channel id is still read."""
    d = make_daemon(FAST)
    url = d.url + "/sse?pattern=public.%3E"
    status, body = http_json("GET", url, headers={"Last-Event-ID": "x" * 10000})
    assert status == 400 and body["error"] == "invalid_last_event_id"
    s = connect(d)
    s.sendall(b"GET /sse?pattern=public.%3E HTTP/1.1\r\nHost: x\r\nLast-Event-ID: v1:" + b"1" * 17000 + b"\r\n\r\n")
    answer = read_until_closed(s)  # over the 16 KiB head limit: 400 and close (or a reset while sending)
    s.close()
    assert answer == b"" or status_of(answer) == 400
    old = ",".join(f"public.c{i}=1" for i in range(1000))
    s = connect(d)
    s.sendall(f"GET /sse?pattern=public.%3E HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {old}\r\n\r\n".encode())
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    s.close()


JUNK = ["", "-1", "+1", "1.0", "1e3", "0x10", " 1", "1 ", "\u00b2", "\u0661", "\uff11", "9" * 20, "9" * 5000, "nan", "∞", "\x00"]


def test_junk_integer_parameters_are_400(make_daemon: Callable[..., Daemon]) -> None:
    """Junk in since, limit or timeout of /poll and since of /sse is 400 invalid_parameter, never 5xx or a critical log."""
    from urllib.parse import quote

    d = make_daemon(FAST)
    for junk in JUNK:
        value = quote(junk)
        for path in (f"/poll?channel=public.a&since={value}", f"/poll?channel=public.a&limit={value}",
                     f"/poll?channel=public.a&timeout={value}", f"/sse?channel=public.a&since={value}"):
            status, body = http_json("GET", d.url + path)
            assert status == 400 and body["error"] == "invalid_parameter", (path, status, body)
    log = d.log()
    assert "CRITICAL" not in log.upper().replace("RT-S99", "") and "Traceback" not in log


def test_memory_stays_bounded_and_healthz_answers_after_an_attack(make_daemon: Callable[..., Daemon]) -> None:
    """
    RSS of the daemon after hundreds of slowloris heads, slow bodies, huge
    Last-Event-IDs and junk parameters is within a small bound of before,
    and /healthz answers promptly afterwards.
    """
    from urllib.parse import quote

    import psutil

    d = make_daemon(FAST + "max_connections_per_ip = 2000\n")
    proc = psutil.Process(d.proc.pid)  # type: ignore[union-attr]
    for _ in range(20):
        d.get("/healthz")
    before = proc.memory_info().rss
    socks = []
    for i in range(300):
        s = connect(d)
        if i % 3 == 0:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        elif i % 3 == 1:
            s.sendall(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        else:
            s.sendall(b"GET /sse?pattern=public.%3E HTTP/1.1\r\nHost: x\r\nLast-Event-ID: "
                      + ",".join(f"public.c{j}=1" for j in range(1000)).encode() + b"\r\n\r\n")
        socks.append(s)
    for junk in JUNK:
        assert http("GET", d.url + "/poll?channel=public.a&timeout=0&since=" + quote(junk))[0] == 400
    time.sleep(2.5)  # past the head deadline: the slow ones are gone
    for s in socks:
        s.close()
    status, body = d.get("/healthz", timeout=2)
    assert (status, body) == (200, {"status": "ok"})
    deadline = time.monotonic() + 10
    while True:
        _, st = d.get("/api/stats", headers=AUTH)
        if st["connections_by_transport"].get("sse", 0) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    grown = proc.memory_info().rss - before
    assert grown < 64 * 1024 * 1024, grown
    _, st = d.get("/api/stats", headers=AUTH)
    assert st["dropped_by_reason"].get("request_timeout", 0) >= 150

"""
An attacker against /ws of the real daemon, over real sockets.

Each test attacks the way a hostile (mostly anonymous) client would: huge
since objects, repeated subscribes with since, subscribe/unsubscribe loops,
thousands of wildcard channels, malformed and oversized frames, a client
that never reads.  Each measures the daemon's RSS (psutil) before and after
where memory is the target, and checks that ``/healthz`` still answers
promptly afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import websocket
from conftest import API_KEY, Daemon, http, http_json
from test_ws import conn, read_until_close, recv, request, send, with_config

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MiB = 2**20


def rss(d: Daemon) -> int:
    return int(psutil.Process(d.proc.pid).memory_info().rss)  # type: ignore[union-attr]


def cpu(d: Daemon) -> float:
    t = psutil.Process(d.proc.pid).cpu_times()  # type: ignore[union-attr]
    return float(t.user + t.system)


def settled_cpu(d: Daemon, limit: float = 60.0) -> float:
    """The daemon's CPU seconds once it has gone idle (background work, e.g. replays, finished)."""
    deadline = time.monotonic() + limit
    last = cpu(d)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu(d)
        if now - last < 0.02:
            return now
        last = now
    return last


def healthy_promptly(d: Daemon) -> None:
    """/healthz answers 200 within two seconds."""
    t0 = time.monotonic()
    status, _, _ = http("GET", d.url + "/healthz", timeout=2)
    assert status == 200 and time.monotonic() - t0 < 2


def publish_many(d: Daemon, events: list[dict[str, Any]]) -> None:
    for i in range(0, len(events), 100):
        status, body = http_json("POST", d.url + "/api/publish", {"events": events[i:i + 100]}, AUTH)
        assert status == 202, body


def raw_ws(d: Daemon, path: str = "/ws") -> socket.socket:
    """A raw socket that has done the WebSocket opening handshake (anonymous)."""
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def frame(payload: bytes, opcode: int = 1, fin: bool = True, mask: bool = True, length: int | None = None) -> bytes:
    """A client frame; `length` lets it lie about its payload size."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes([b0, (0x80 if mask else 0) | n])
    elif n < 65536:
        head = bytes([b0, (0x80 if mask else 0) | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, (0x80 if mask else 0) | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    m = os.urandom(4)
    return head + m + bytes(c ^ m[i % 4] for i, c in enumerate(payload))


def close_code(s: socket.socket, timeout: float = 10) -> int | None:
    """Read server frames until a close frame (its code) or EOF (None)."""
    s.settimeout(timeout)
    buf = b""
    try:
        while True:
            while len(buf) < 2 or len(buf) < _frame_len(buf):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            n = _frame_len(buf)
            op, payload = buf[0] & 0x0F, buf[_head_len(buf):n]
            buf = buf[n:]
            if op == 8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
    except (ConnectionResetError, TimeoutError):
        return None
    finally:
        s.close()


def _head_len(buf: bytes) -> int:
    ln = buf[1] & 0x7F
    return 2 + (2 if ln == 126 else 8 if ln == 127 else 0)


def _frame_len(buf: bytes) -> int:
    ln = buf[1] & 0x7F
    if ln == 126:
        if len(buf) < 4:
            return 4
        ln = struct.unpack("!H", buf[2:4])[0]
    elif ln == 127:
        if len(buf) < 10:
            return 10
        ln = struct.unpack("!Q", buf[2:10])[0]
    return _head_len(buf) + ln


# ---------------------------------------------------------------------------


def test_huge_since_objects_leave_memory_alone(daemon: Daemon) -> None:
    """
    60 anonymous subscribes each naming ~40,000 made-up channels (the
    review's attack: +206 MiB, never given back) are refused; the daemon's
    RSS grows by less than 24 MiB (the parser's transient high-water mark)
    and it stays healthy.
    """
    made_up = {f"public.f{i:07d}": 1 for i in range(40000)}
    msg = json.dumps({"op": "subscribe", "channel": "public.>", "since": made_up})
    assert len(msg) < 2**20
    before = rss(daemon)
    codes = []
    for _ in range(6):
        ws = conn(daemon, None, timeout=30)
        for _ in range(10):
            ws.send(msg)
        code, msgs = read_until_close(ws)  # ten refusals, then 1008 for abuse
        codes.append(code)
        assert {m["code"] for m in msgs} == {"too_many_channels"}
    after = rss(daemon)
    assert codes == [1008] * 6
    assert after - before < 24 * MiB, (before, after)
    healthy_promptly(daemon)


def test_subscribe_unsubscribe_loops_with_since_stay_bounded(daemon: Daemon) -> None:
    """
    2,000 rounds of subscribe (a since naming 100 made-up channels, the
    limit) and unsubscribe on one anonymous connection: RSS grows by less
    than 16 MiB (seen is pruned), and the connection still works.
    """
    ws = conn(daemon, None, timeout=30)
    before = rss(daemon)
    for r in range(2000):
        since = {f"public.r{r}.c{j}": 5 for j in range(100)}
        send(ws, op="subscribe", channel="public.>", since=since)
        send(ws, op="unsubscribe", channel="public.>")
        if r % 100 == 99:
            send(ws, op="ping", ref=r)
            replies = []
            while not replies or replies[-1].get("ref") != r:
                replies.append(recv(ws))
            assert {m["op"] for m in replies} == {"subscribed", "unsubscribed", "pong"}
    after = rss(daemon)
    assert after - before < 16 * MiB, (before, after)
    assert request(ws, op="subscribe", channel="public.live")["op"] == "subscribed"
    http_json("POST", daemon.url + "/api/publish", {"channel": "public.live", "data": 1}, AUTH)
    m = recv(ws)
    while m["op"] != "event":
        m = recv(ws)
    assert (m["channel"], m["offset"]) == ("public.live", 1)
    ws.close()
    healthy_promptly(daemon)


def test_repeated_subscribes_with_since_cost_no_replays(daemon: Daemon) -> None:
    """
    300 repeated subscribes with since=0 of a channel of 5,000 events cost
    the daemon less CPU than 15 full replays of it (each used to start a
    whole replay: 300 of them).
    """
    publish_many(daemon, [{"channel": "public.amp", "data": "x" * 100} for _ in range(5000)])
    c0 = settled_cpu(daemon)
    ws = conn(daemon, None, timeout=30)
    assert request(ws, op="subscribe", channel="public.amp", since=0)["op"] == "subscribed"
    for i in range(5000):
        assert recv(ws)["offset"] == i + 1
    one_replay = max(settled_cpu(daemon) - c0, 0.05)
    c1 = cpu(daemon)
    for _ in range(300):
        send(ws, op="subscribe", channel="public.amp", since=0)
    assert read_pongs_after(ws) == 300
    repeated = settled_cpu(daemon) - c1
    assert repeated < 15 * one_replay, (repeated, one_replay)
    ws.close()
    healthy_promptly(daemon)


def read_pongs_after(ws: websocket.WebSocket) -> int:
    """Send a ping; count the 'subscribed' replies before its pong (there must be no event)."""
    send(ws, op="ping", ref="z")
    n = 0
    while True:
        m = recv(ws)
        if m["op"] == "pong":
            return n
        assert m["op"] == "subscribed", m
        n += 1


def test_thousands_of_wildcard_channels(daemon: Daemon) -> None:
    """
    5,000 channels under one wildcard, replayed from the start by 20
    anonymous connections at once (each also naming 100 of them in since):
    every connection gets every event once, and RSS grows by less than
    64 MiB while they are all connected.
    """
    publish_many(daemon, [{"channel": f"public.w.c{i}", "data": i} for i in range(5000)])
    before = rss(daemon)
    clients = [conn(daemon, None, timeout=60) for _ in range(20)]
    since = {f"public.w.c{i}": 1 for i in range(100)}  # these are already seen
    for ws in clients:
        send(ws, op="subscribe", channel="public.w.*", since=since, ref=1)

    def read(ws: Any) -> set[str]:
        assert recv(ws) == {"op": "subscribed", "channel": "public.w.*", "recovered": True, "ref": 1}
        return {recv(ws)["channel"] for _ in range(4900)}

    # every client read at once, as real ones do: one left unread while the others are read
    # would not answer the auto-ping queued behind its replay (first ping: 5-100 % of the
    # interval), and be dropped after ping_timeout_seconds on a slow machine
    with ThreadPoolExecutor(len(clients)) as pool:
        for got in pool.map(read, clients):
            assert len(got) == 4900 and "public.w.c0" not in got
    after = rss(daemon)
    assert after - before < 64 * MiB, (before, after)
    for ws in clients:
        ws.close()
    healthy_promptly(daemon)


def test_bad_frames_are_closed_and_the_daemon_stays_well(make_daemon: Callable[..., Daemon]) -> None:
    """Binary, unmasked, bad UTF-8, fragmented-control, reserved-bit and unknown-opcode frames each get a close."""
    d = make_daemon(with_config("[websocket]\nmax_message_bytes = 65536\n"))
    before = rss(d)
    cases: dict[str, tuple[bytes, set[int | None]]] = {
        "binary": (frame(b"\x00\x01", opcode=2), {1008}),
        "unmasked": (frame(b'{"op":"ping"}', mask=False), {1002}),
        "bad utf-8": (frame(b'{"op":"\xff\xfe"}'), {1007}),
        "fragmented ping": (frame(b"x", opcode=9, fin=False), {1002}),
        "ping over 125 bytes": (frame(b"x" * 200, opcode=9), {1002}),
        "reserved bits": (bytes([0xF1, 0x80]) + b"\0\0\0\0", {1002}),
        "unknown opcode": (frame(b"x", opcode=3), {1002}),
        "continuation first": (frame(b"x", opcode=0), {1002}),
        "text inside a fragmented text": (frame(b"ab", fin=False) + frame(b"cd"), {1002}),
    }
    for why, (data, want) in cases.items():
        s = raw_ws(d)
        s.sendall(data)
        assert close_code(s) in want, why
    for _ in range(200):  # many of them, quickly
        s = raw_ws(d)
        s.sendall(frame(b"\x00", opcode=2))
        close_code(s)
    assert rss(d) - before < 16 * MiB
    healthy_promptly(d)


def test_oversized_messages_are_closed_without_buffering(make_daemon: Callable[..., Daemon]) -> None:
    """
    A frame header announcing 2**62 bytes, a slow stream of fragments past
    max_message_bytes and a plain oversized message each get 1009 (the
    daemon never allocates what was announced).
    """
    d = make_daemon(with_config("[websocket]\nmax_message_bytes = 65536\n"))
    before = rss(d)
    s = raw_ws(d)
    s.sendall(frame(b"", length=2**62)[:14])  # the header only: a 4 EiB frame announced
    assert close_code(s) == 1009
    s = raw_ws(d)
    s.sendall(frame(b"x" * 40000, fin=False))
    s.sendall(frame(b"y" * 40000, opcode=0, fin=False))  # 80 KB so far: over 64 KiB
    assert close_code(s) == 1009
    ws = conn(d)
    ws.send("x" * 70000)
    assert read_until_close(ws)[0] == 1009
    assert rss(d) - before < 16 * MiB
    healthy_promptly(d)


def test_a_client_that_never_reads_is_closed_1013(make_daemon: Callable[..., Daemon]) -> None:
    """Replies piling up for a client that sends but never reads are bounded: it is closed with 1013."""
    d = make_daemon(with_config("[websocket]\nmax_send_buffer_bytes = 65536\n"))
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.close()
    ws = conn(d, None, timeout=30, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    before = rss(d)
    ping = json.dumps({"op": "ping", "ref": "x" * 100})
    sent = 0
    try:
        while sent < 200000:  # ~25 MB of pongs unless it is cut off
            ws.send(ping)
            sent += 1
    except (OSError, websocket.WebSocketException):
        pass  # the daemon closed it
    code, _ = read_until_close(ws)
    assert code == 1013
    assert sent < 200000 or code == 1013
    assert rss(d) - before < 16 * MiB
    healthy_promptly(d)

"""
The load generator's wire code: a minimal hand-written WebSocket client
(handshake, masked client frames, an unmasked-frame parser) and a minimal
keep-alive HTTP/1.1 client, both on raw non-blocking sockets.

A Python client object per connection (autobahn, websockets) costs far more
CPU than the server it measures once there are 1,000 subscribers; this code
does the least work per received frame: it reads the 2-10 byte header, skips
the payload, and only looks inside the payloads of the sampled connections
(to read the publisher's send timestamp for the latency figures).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
from typing import Any

__all__ = [
    "HttpConn",
    "WSConn",
    "frame",
    "http_request",
    "parse_http_response",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TS = b'"ts":'


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame (FIN set)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    # XOR with the repeated mask, done on one big integer (fast in CPython).
    reps = (n // 4 + 1) * mask
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(reps[:n], "big")).to_bytes(n, "big") if n else b""
    return head + mask + masked


def _ts_of(payload: bytes | bytearray, start: int, end: int) -> float | None:
    """The C{"ts": <float>} value inside C{payload[start:end]}, if any."""
    p = payload.find(_TS, start, end)
    if p < 0:
        return None
    p += len(_TS)
    q = payload.find(b",", p, end)
    if q < 0:
        q = payload.find(b"}", p, end)
    try:
        return float(payload[p:q])
    except ValueError:
        return None


def _is_event(payload: bytes | bytearray, start: int, end: int) -> bool:
    """The slow check, for encoders that do not put C{"op"} first."""
    return payload.find(b'"op":"event"', start, end) >= 0 or payload.find(b'"op": "event"', start, end) >= 0


class WSConn:
    """
    One raw WebSocket client connection driven by a selectors loop.

    States: C{connecting} -> C{handshake} (101 awaited) -> C{open}.  Counts
    the text messages whose payload is an event, answers pings, notes a close.
    """

    __slots__ = (
        "_key",
        "buf",
        "close_code",
        "closed",
        "events",
        "host",
        "inbox",
        "latencies",
        "out",
        "path",
        "port",
        "sample",
        "sock",
        "state",
    )

    def __init__(self, host: str, port: int, path: str, sample: bool = False) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.sample = sample  # collect latencies from the "ts" in event data
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.out = bytearray()
        self.state = "connecting"
        self.closed = False
        self.close_code = 0
        self.events = 0
        self.latencies: list[float] = []
        self.inbox: list[bytes] = []
        self._key = base64.b64encode(os.urandom(16))

    def connect(self) -> None:
        """Start the non-blocking connect and queue the upgrade request."""
        err = self.sock.connect_ex((self.host, self.port))
        if err not in (0, 115, 11):  # EINPROGRESS, EAGAIN
            raise OSError(err, os.strerror(err))
        self.out += (
            b"GET " + self.path.encode() + b" HTTP/1.1\r\n"
            b"Host: " + f"{self.host}:{self.port}".encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + self._key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.state = "handshake"

    def send_json(self, obj: Any) -> None:
        """Queue one JSON text message."""
        self.out += frame(json.dumps(obj, separators=(",", ":")).encode())

    def flush(self) -> bool:
        """Write what can be written; True when everything went."""
        if self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self.closed = True
                return True
            del self.out[:n]
        return not self.out

    def on_readable(self) -> bool:
        """Read and parse; False when the peer has gone."""
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        buf = self.buf
        buf += data
        if self.state == "handshake":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return True
            head = bytes(buf[:end])
            del buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self.closed = True
                self.close_code = int(head[9:12] or b"0")
                return False
            accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
            if accept not in head:
                raise RuntimeError("bad Sec-WebSocket-Accept")
            self.state = "open"
        self._parse()
        return not self.closed

    def _parse(self) -> None:
        buf = self.buf
        n = len(buf)
        i = 0
        events = 0
        sample = self.sample
        while n - i >= 2:
            b0 = buf[i]
            ln = buf[i + 1] & 0x7F
            if ln < 126:
                h = 2
            elif ln == 126:
                if n - i < 4:
                    break
                ln = (buf[i + 2] << 8) | buf[i + 3]
                h = 4
            else:
                if n - i < 10:
                    break
                ln = int.from_bytes(buf[i + 2 : i + 10], "big")
                h = 10
            end = i + h + ln
            if end > n:
                break
            if b0 == 0x81:  # a whole text message
                start = i + h
                # events start with {"op":"event" (ours and the baseline's): look at the "v"
                if (ln > 12 and buf[start + 8] == 118 and buf[start + 7] == 101) or _is_event(buf, start, end):
                    events += 1
                    if sample:
                        ts = _ts_of(buf, start, end)
                        if ts is not None:
                            self.latencies.append(time.time() - ts)
                else:
                    self.inbox.append(bytes(buf[start:end]))
            elif b0 & 0x0F == 9:  # ping -> pong with the same payload
                self.out += frame(bytes(buf[i + h : end]), 0xA)
                self.flush()
            elif b0 & 0x0F == 8:
                self.close_code = (buf[i + h] << 8 | buf[i + h + 1]) if ln >= 2 else 1005
                self.closed = True
            elif b0 & 0x0F in (0, 1, 2):
                raise RuntimeError("fragmented or binary messages are not expected from the servers")
            i = end
        if i:
            del buf[:i]
        self.events += events

    def close(self) -> None:
        """Drop the socket."""
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True


def http_request(method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one keep-alive HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_http_response(buf: bytearray) -> tuple[int, bytes] | None:
    """Take one complete response off C{buf}: (status, body), or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    status = int(head[9:12])
    p = head.find(b"\r\ncontent-length:")
    if p >= 0:
        q = head.find(b"\r\n", p + 2)
        length = int(head[p + 17 : q if q >= 0 else len(head)])
        total = end + 4 + length
        if len(buf) < total:
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        return status, body
    if b"transfer-encoding: chunked" in head:
        i = end + 4
        chunks = []
        while True:
            le = buf.find(b"\r\n", i)
            if le < 0:
                return None
            size = int(bytes(buf[i:le]).split(b";")[0], 16)
            if len(buf) < le + 2 + size + 2:
                return None
            chunks.append(bytes(buf[le + 2 : le + 2 + size]))
            i = le + 2 + size + 2
            if size == 0:
                del buf[:i]
                return status, b"".join(chunks)
    body = bytes(buf[end + 4 :])
    del buf[:]
    return status, body


class HttpConn:
    """A blocking keep-alive HTTP/1.1 connection (the publisher's)."""

    def __init__(self, host: str, port: int, timeout: float = 30) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def _connect(self) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        return s

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Send one request and wait for its response."""
        if self.sock is None:
            self.sock = self._connect()
        self.sock.sendall(http_request(method, path, f"{self.host}:{self.port}", body, headers))
        while True:
            got = parse_http_response(self.buf)
            if got is not None:
                return got
            data = self.sock.recv(262144)
            if not data:
                self.sock.close()
                self.sock = None
                raise ConnectionError("server closed the connection")
            self.buf += data

    def close(self) -> None:
        """Close the socket."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

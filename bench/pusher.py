"""
C{python -m bench pusher} (or C{python -m bench.pusher}): the Pusher endpoint
against C{/ws} in the same run, on one fresh daemon.

  - fan-out: N subscribers of one channel (C{/ws} JSON protocol, then
    C{/app/<key>} Pusher protocol 7), K single-event publishes, one request
    at a time on one keep-alive connection (C{POST /api/publish} for
    C{/ws}, the signed C{POST /apps/<id>/events} of Pusher's libraries for
    Pusher); deliveries per second and publish->delivery p50/p99;
  - idle memory: the daemon's RSS growth per idle connection of each kind.

No threshold is asserted: the ratio column says whether Pusher is within
10 % of C{/ws} in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol

from twisted_rt.core.pusher_auth import request_signature

BIN = Path(sys.executable).parent
API_KEY, APP, KEY, SECRET = "bench-api-key-0123456789", "1", "bench-key", "bench-secret"
CHANNEL = "bench.pusher"
CONFIG = f"""
[journal]
path = ":memory:"
[auth]
api_keys = ["{API_KEY}"]
[server]
max_connections_per_ip = 0
max_connections = 0
[websocket]
max_connections_per_ip = 0
[pusher]
app_id = "{APP}"
key = "{KEY}"
secret = "{SECRET}"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Sub(WebSocketClientProtocol):
    kind = "ws"
    sink: dict[str, Any]

    def onOpen(self) -> None:
        if self.kind == "ws":
            self.sendMessage(json.dumps({"op": "subscribe", "channel": CHANNEL}).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        now = time.perf_counter()
        msg = json.loads(payload)
        sink = self.sink
        if self.kind == "ws":
            if msg.get("op") == "subscribed":
                sink["ready"] += 1
                return
            data = msg.get("data")
        else:
            ev = msg.get("event")
            if ev == "pusher:connection_established":
                self.sendMessage(json.dumps({"event": "pusher:subscribe", "data": {"channel": CHANNEL}}).encode())
                return
            if ev == "pusher_internal:subscription_succeeded":
                sink["ready"] += 1
                return
            data = json.loads(msg["data"]) if isinstance(msg.get("data"), str) else None
        if isinstance(data, dict) and "t" in data:
            sink["lat"].append(now - data["t"])
            sink["got"] += 1
            if sink["got"] >= sink["want"] and not sink["done"].done():
                sink["done"].set_result(None)


async def _open(port: int, kind: str, n: int, sink: dict[str, Any], subscribe: bool = True) -> list[Any]:
    loop = asyncio.get_running_loop()
    path = f"/ws?token={API_KEY}" if kind == "ws" else f"/app/{KEY}?protocol=7"
    proto_cls = type("Sub", (_Sub,), {"kind": kind if subscribe else "idle", "sink": sink})
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    factory.protocol = proto_cls
    conns = []
    for i in range(0, n, 100):
        batch = [loop.create_connection(factory, "127.0.0.1", port) for _ in range(min(100, n - i))]
        conns += [t for t, _ in await asyncio.gather(*batch)]
    return conns


class _Http:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.r is not None
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.w.write(head.encode() + body)
        status_line = await self.r.readline()
        length = 0
        while True:
            line = await self.r.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await self.r.readexactly(length)
        return int(status_line.split()[1])


def _pusher_path(body: bytes) -> str:
    path = f"/apps/{APP}/events"
    q = {"auth_key": KEY, "auth_timestamp": str(int(time.time())), "auth_version": "1.0",
         "body_md5": hashlib.md5(body).hexdigest()}
    q["auth_signature"] = request_signature(SECRET, "POST", path, q)
    return path + "?" + "&".join(f"{k}={v}" for k, v in q.items())


async def _fanout(port: int, kind: str, n: int, k: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    sink: dict[str, Any] = {"ready": 0, "got": 0, "want": n * k, "lat": [], "done": loop.create_future()}
    conns = await _open(port, kind, n, sink)
    while sink["ready"] < n:
        await asyncio.sleep(0.05)
    http = _Http(port)
    start = time.perf_counter()
    for i in range(k):
        data = {"t": time.perf_counter(), "i": i}
        if kind == "ws":
            body = json.dumps({"channel": CHANNEL, "data": data}).encode()
            status = await http.post("/api/publish", body, {"Authorization": f"Bearer {API_KEY}",
                                                            "Content-Type": "application/json"})
        else:
            body = json.dumps({"name": "tick", "channels": [CHANNEL], "data": json.dumps(data)}).encode()
            status = await http.post(_pusher_path(body), body, {"Content-Type": "application/json"})
        assert status in (200, 202), status
    await asyncio.wait_for(sink["done"], 120)
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    lat = sorted(sink["lat"])
    return {"deliveries_per_s": n * k / elapsed, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(len(lat) * 0.99) - 1]}


async def _idle(port: int, proc: psutil.Process, kind: str, n: int) -> float:
    sink: dict[str, Any] = {"ready": 0, "got": 0, "want": 1, "lat": [], "done": asyncio.get_running_loop().create_future()}
    await asyncio.sleep(0.5)
    before = proc.memory_info().rss
    conns = await _open(port, kind, n, sink, subscribe=False)
    await asyncio.sleep(1.0)
    after = proc.memory_info().rss
    for c in conns:
        c.close()
    await asyncio.sleep(0.5)
    return (after - before) / n / 1024


def run(subscribers: int, events: int, idle: int) -> dict[str, Any]:
    """Start one daemon, measure, stop it; the figures as a dict."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "rt.toml"
        conf.write_text(CONFIG)
        log = open(Path(tmp) / "daemon.log", "wb")
        proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--config", str(conf),
                                 "--listen", f"tcp:{port}:interface=127.0.0.1"], cwd=tmp, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("the daemon did not start") from None
                    time.sleep(0.1)
            ps = psutil.Process(proc.pid)

            async def main() -> dict[str, Any]:
                out: dict[str, Any] = {}
                out["idle_kib_ws"] = await _idle(port, ps, "ws", idle)
                out["idle_kib_pusher"] = await _idle(port, ps, "pusher", idle)
                out["ws"] = await _fanout(port, "ws", subscribers, events)
                out["pusher"] = await _fanout(port, "pusher", subscribers, events)
                return out

            return asyncio.run(main())
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()


def main(argv: list[str] | None = None) -> int:
    """Run and print the table."""
    p = argparse.ArgumentParser(prog="python -m bench pusher", description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    r = run(args.subscribers, args.events, args.idle)
    ratio = r["pusher"]["deliveries_per_s"] / r["ws"]["deliveries_per_s"]
    print(f"fan-out to {args.subscribers} subscribers, {args.events} single-event publishes")
    print(f"{'':10} {'deliveries/s':>14} {'p50 ms':>8} {'p99 ms':>8}")
    for kind in ("ws", "pusher"):
        f = r[kind]
        print(f"{kind:10} {f['deliveries_per_s']:14,.0f} {f['p50_ms']:8.1f} {f['p99_ms']:8.1f}")
    print(f"pusher / ws deliveries: {ratio:.2f} ({'within' if ratio >= 0.9 else 'NOT within'} 10 %)")
    print(f"idle memory per connection: /ws {r['idle_kib_ws']:.1f} KiB, Pusher {r['idle_kib_pusher']:.1f} KiB "
          f"(target <= 12 KiB: {'met' if r['idle_kib_pusher'] <= 12 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

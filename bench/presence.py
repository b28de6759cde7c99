"""
C{python -m bench presence} (or C{python -m bench.presence}): 1,000 members
joining and leaving one presence channel of one fresh daemon.

  - join: N WebSocket clients, each with its own JWT (C{sub} = member-i),
    subscribe to one C{presence = true} channel at once; the figure is the
    time from the first subscribe until every member knows every other
    member (the joins it heard plus the C{op: presence} list it asked for
    after its own C{subscribed});
  - leave: all N close at once; the time until a watcher (an API key,
    subscribed before) heard N leaves.

A join or leave is encoded once per event for all the watchers (not once per
pair of members), so the daemon's work grows with N joins x N watchers
frames written, not with encodings.  No threshold is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import websockets

BIN = Path(sys.executable).parent
API_KEY, SECRET = "bench-api-key-0123456789", "bench-jwt-secret-0123456789abcdef0123456789"
CHANNEL = "room.bench"
CONFIG = f"""
[journal]
path = "var/journal.sqlite3"
[server]
max_connections_per_ip = 0
access_log = false
[auth]
api_keys = ["{API_KEY}"]
jwt_secret = "{SECRET}"
[[channels]]
pattern = "room.>"
presence = true
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + 3600, "subscribe": ["room.>"], "info": {"n": sub}}, SECRET,
                      algorithm="HS256")


async def _member(url: str, i: int, n: int, start: asyncio.Event, done: asyncio.Future[float],
                  known: list[int]) -> Any:
    ws = await websockets.connect(f"{url}?token={_token(f'member-{i}')}", max_queue=None, open_timeout=60)
    await start.wait()
    await ws.send(json.dumps({"op": "subscribe", "channel": CHANNEL, "ref": 1}))
    seen: set[str] = set()
    async for raw in ws:
        m = json.loads(raw)
        if m["op"] == "subscribed":
            await ws.send(json.dumps({"op": "presence", "channel": CHANNEL, "ref": 2}))
        elif m["op"] == "presence":
            seen.update(x["user"] for x in m["members"])
        elif m["op"] == "join":
            seen.add(m["user"])
        if len(seen) >= n:
            known[0] += 1
            if known[0] == n and not done.done():
                done.set_result(time.perf_counter())
            return ws
    return ws


async def _run(url: str, n: int) -> dict[str, float]:
    watcher = await websockets.connect(f"{url}?token={API_KEY}", max_queue=None)
    await watcher.send(json.dumps({"op": "subscribe", "channel": CHANNEL, "ref": 0}))
    await watcher.recv()
    start = asyncio.Event()
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    known = [0]
    tasks = [asyncio.create_task(_member(url, i, n, start, done, known)) for i in range(n)]
    await asyncio.sleep(0.5 + n / 500)  # connected (the handshakes are not measured)
    t0 = time.perf_counter()
    start.set()
    t1 = await asyncio.wait_for(done, 300)
    members = await asyncio.gather(*tasks)
    joined = t1 - t0
    leaves = 0
    t2 = time.perf_counter()
    await asyncio.gather(*(ws.close() for ws in members))
    while leaves < n:
        m = json.loads(await asyncio.wait_for(watcher.recv(), 120))
        if m["op"] == "leave":
            leaves += 1
    left = time.perf_counter() - t2
    await watcher.close()
    return {"members": n, "join_all_seen_s": joined, "leave_all_seen_s": left}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench presence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    port = _port()
    with tempfile.TemporaryDirectory(prefix="rt-bench-presence-") as tmp:
        conf = Path(tmp) / "rt.toml"
        conf.write_text(CONFIG)
        log = open(Path(tmp) / "daemon.log", "wb")
        proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--config", str(conf),
                                 "--listen", f"tcp:{port}:interface=127.0.0.1"], cwd=tmp, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("the daemon did not start") from None
                    time.sleep(0.1)
            figures = asyncio.run(_run(f"ws://127.0.0.1:{port}/ws", args.members))
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    print(f"presence, {figures['members']} members of one channel: every member saw every join in "
          f"{figures['join_all_seen_s']:.2f} s; a watcher saw every leave in {figures['leave_all_seen_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""
C{python -m bench destinations}: outgoing webhooks at ingest saturation.

One daemon (pinned to CPU 0 unless C{--no-pin}) with one destination
matching every event (C{channels = [">"]}, C{max_in_flight = 32}, format
"event", signed) pointing at a local receiver (a minimal twisted.web
resource answering 204, in its own process).  Publishers post batches of
events as fast as the daemon accepts them for C{--seconds}; then the run
waits for the destination to catch up.  Printed: events accepted/s,
deliveries/s while ingest ran and overall, and the delivery lag (receiver
time minus the event's journal time) p50/p99.  No threshold is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
API_KEY = "bench-destinations-key"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the receiver (its own process) -------------------------------------------------


def receiver(port: int, out: str) -> None:
    """Answer every POST with 204; record (receive time, event time) pairs; write them at SIGTERM."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    got: list[tuple[float, str]] = []

    class Hook(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            body = request.content.read()
            i = body.find(b'"time":"')
            got.append((time.time(), body[i + 8 : i + 32].decode("ascii", "replace") if i >= 0 else ""))
            request.setResponseCode(204)
            return b""

        def render_GET(self, request: Any) -> bytes:
            return str(len(got)).encode()

    def dump(*_: Any) -> None:
        with open(out, "w") as f:
            json.dump(got, f)
        reactor.stop()  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, dump)
    site = Site(Hook())
    site.noisy = False
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _count(port: int) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/")
        return int(c.getresponse().read())
    finally:
        c.close()


def _publisher(port: int, stop: float, batch: int, counts: list[int]) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"events": [{"channel": f"bench.c{i % 8}", "data": {"i": i}} for i in range(batch)]})
    hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    n = 0
    while time.monotonic() < stop:
        c.request("POST", "/api/publish", body, hdrs)
        r = c.getresponse()
        r.read()
        if r.status == 202:
            n += batch
    counts.append(n)
    c.close()


def _parse(t: str) -> float:
    return datetime.strptime(t[:23], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def run(seconds: float, publishers: int, batch: int, in_flight: int, pin: bool, keep: bool) -> dict[str, Any]:
    """One measurement; returns the figures."""
    work = Path(tempfile.mkdtemp(prefix="rt-bench-dest-"))
    rport, dport = _free_port(), _free_port()
    out = work / "received.json"
    rec = subprocess.Popen([sys.executable, "-m", "bench.destinations", "--receiver", str(rport), str(out)],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    (work / "rt.toml").write_text(f"""
[server]
access_log = false
[journal]
path = "var/journal.sqlite3"
[auth]
api_keys = ["{API_KEY}"]
[[destinations]]
name = "bench"
url = "http://127.0.0.1:{rport}/hook"
channels = [">"]
max_in_flight = {in_flight}
secret = "whsec_YmVuY2gtc2VjcmV0LWtleS0wMTIzNDU2Nzg5"
""")
    cmd = [str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--config", "rt.toml",
           "--listen", f"tcp:{dport}:interface=127.0.0.1"]
    if pin and hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", "0", *cmd]
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", dport, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("daemon did not start")
            time.sleep(0.1)
        while True:
            try:
                _count(rport)
                break
            except OSError:
                time.sleep(0.1)
        counts: list[int] = []
        start = time.monotonic()
        threads = [threading.Thread(target=_publisher, args=(dport, start + seconds, batch, counts))
                   for _ in range(publishers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ingest_end = time.monotonic()
        during = _count(rport)
        accepted = sum(counts)
        while _count(rport) < accepted and time.monotonic() < ingest_end + 120:
            time.sleep(0.2)
        end = time.monotonic()
        total = _count(rport)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        rec.send_signal(signal.SIGTERM)
        rec.wait(30)
        log.close()
    got = json.loads(out.read_text()) if out.exists() else []
    lags = sorted(r - _parse(t) for r, t in got if t)
    figures = {
        "accepted_per_s": accepted / seconds,
        "deliveries_per_s_during_ingest": during / (ingest_end - start),
        "deliveries_per_s_overall": total / (end - start),
        "delivered": total,
        "accepted": accepted,
        "lag_p50_ms": 1000 * statistics.median(lags) if lags else None,
        "lag_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))] if lags else None,
        "work": str(work),
    }
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--receiver"]:
        receiver(int(args_in[1]), args_in[2])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench destinations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="ingest window (default 10)")
    p.add_argument("--publishers", type=int, default=4, help="publishing connections (default 4)")
    p.add_argument("--batch", type=int, default=50, help="events per publish request (default 50)")
    p.add_argument("--in-flight", type=int, default=32, help="max_in_flight of the destination (default 32)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the daemon to CPU 0")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    a = p.parse_args(args_in)
    f = run(a.seconds, a.publishers, a.batch, a.in_flight, not a.no_pin, a.keep)
    print(f"destinations (max_in_flight={a.in_flight}, one destination matching every event, receiver 204):")
    print(f"  events accepted          {f['accepted_per_s']:10,.0f} /s")
    print(f"  deliveries during ingest {f['deliveries_per_s_during_ingest']:10,.0f} /s")
    print(f"  deliveries overall       {f['deliveries_per_s_overall']:10,.0f} /s  ({f['delivered']:,} of {f['accepted']:,})")
    if f["lag_p99_ms"] is not None:
        print(f"  delivery lag p50 / p99   {f['lag_p50_ms']:10,.0f} / {f['lag_p99_ms']:,.0f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(f, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    from twisted.internet import reactor as _reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    reactor: Any = _reactor
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

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(got, f)

    # reactor.run() installs its own SIGTERM handler (a signal.signal() before it is replaced): write at shutdown
    reactor.addSystemEventTrigger("before", "shutdown", dump)
    class NoDelaySite(Site):
        """
        TCP_NODELAY on accepted connections, as real receivers (nginx, Go's
        net/http) have; no access log (without a C{logPath} twisted.web formats
        every request into the legacy log, which nothing observes here).
        """

        def log(self, request: Any) -> None:
            pass

        def buildProtocol(self, addr: Any) -> Any:
            proto = super().buildProtocol(addr)
            made = proto.makeConnection

            def make_connection(transport: Any) -> None:
                transport.setTcpNoDelay(True)
                made(transport)

            proto.makeConnection = make_connection
            return proto

    site = NoDelaySite(Hook())
    site.noisy = False
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()


def lean_receiver(port: int, out: str) -> None:
    """
    The same answers from a bare Twisted protocol (no twisted.web): HTTP/1.1
    keep-alive, C{Content-Length} bodies only, 204 to a POST, the count to a
    GET.  A fraction of twisted.web's CPU per request, so that the daemon,
    not the receiver, is what is measured on a small machine.
    """
    from twisted.internet import reactor as _reactor
    from twisted.internet.protocol import Factory, Protocol

    reactor: Any = _reactor
    got: list[tuple[float, str]] = []

    class Lean(Protocol):
        buf = b""

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            answers = []
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = self.buf[:end].lower()
                i = head.find(b"content-length:")
                size = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
                if len(self.buf) < end + 4 + size:
                    break
                body = self.buf[end + 4 : end + 4 + size]
                self.buf = self.buf[end + 4 + size :]
                if head.startswith(b"get"):
                    text = str(len(got)).encode()
                    answers.append(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
                    continue
                j = body.find(b'"time":"')
                got.append((time.time(), body[j + 8 : j + 32].decode("ascii", "replace") if j >= 0 else ""))
                answers.append(b"HTTP/1.1 204 No Content\r\n\r\n")
            if answers:
                self.transport.write(b"".join(answers))  # type: ignore[union-attr]

    def dump() -> None:
        with open(out, "w") as f:
            json.dump(got, f)

    reactor.addSystemEventTrigger("before", "shutdown", dump)
    reactor.listenTCP(port, Factory.forProtocol(Lean), interface="127.0.0.1", backlog=1024)
    reactor.run()


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


def _cpu(proc: Any) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def run(seconds: float, publishers: int, batch: int, in_flight: int, pin: bool, keep: bool,
        mode: str = "active", profile: str | None = None, lean: bool = False,
        subscribers: int = 0) -> dict[str, Any]:
    """
    One measurement; returns the figures.  C{mode}: C{active} (the
    destination matches every event), C{idle} (a destination configured
    whose channels match none of them) or C{none} (no destination).
    """
    import psutil  # type: ignore[import-untyped]

    work = Path(tempfile.mkdtemp(prefix="rt-bench-dest-"))
    rport, dport = _free_port(), _free_port()
    out = work / "received.json"
    rcmd = [sys.executable, "-m", "bench.destinations", "--lean-receiver" if lean else "--receiver", str(rport), str(out)]
    if pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        rcmd = ["taskset", "-c", "1", *rcmd]  # the receiver off the daemon's core
    rec = subprocess.Popen(rcmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    channels = {"active": '[">"]', "idle": '["idle.>"]'}.get(mode)
    dest = "" if channels is None else f"""
[[destinations]]
name = "bench"
url = "http://127.0.0.1:{rport}/hook"
channels = {channels}
max_in_flight = {in_flight}
secret = "whsec_YmVuY2gtc2VjcmV0LWtleS0wMTIzNDU2Nzg5"
"""
    (work / "rt.toml").write_text(f"""
[journal]
path = "var/journal.sqlite3"
[server]
access_log = false
max_connections_per_ip = 0
[auth]
api_keys = ["{API_KEY}"]
anonymous_subscribe = ["bench.>"]
{dest}""")
    cmd = [str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--config", "rt.toml",
           "--listen", f"tcp:{dport}:interface=127.0.0.1"]
    if pin and hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", "0", *cmd]
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    proc = psutil.Process(daemon.pid)
    rproc = psutil.Process(rec.pid)
    profiler = None
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
        subs: list[Any] = []
        if subscribers:  # WebSocket subscribers of bench.c0 (1/8 of the events): the fan-out figure
            from bench.loadgen import spawn, subscriber_worker

            subs = [spawn(subscriber_worker, "127.0.0.1", dport, "/ws", subscribers, "bench.c0", 10 ** 9, None)]
            for _, pipe in subs:
                ready = pipe.recv()
                if ready["ready"] < subscribers:
                    raise RuntimeError(f"only {ready['ready']}/{subscribers} subscribers: {ready['failures']}")
        fan0 = 0
        for _, pipe in subs:
            pipe.send("mark")
            fan0 += pipe.recv()["events"]
        counts: list[int] = []
        cpu0, rcpu0 = _cpu(proc), _cpu(rproc)
        start = time.monotonic()
        threads = [threading.Thread(target=_publisher, args=(dport, start + seconds, batch, counts))
                   for _ in range(publishers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ingest_end = time.monotonic()
        cpu1 = _cpu(proc)
        sys1 = proc.cpu_times().system
        fan1 = 0
        for proc_, pipe in subs:
            pipe.send("stop")
            fan1 += pipe.recv()["events"]
            proc_.join(10)
        during = _count(rport)
        if profile and mode == "active":  # the drain: delivery alone
            from bench.profile import Profiler

            profiler = Profiler(daemon.pid, Path(profile), min(5.0, seconds))
        accepted = sum(counts)
        while mode == "active" and _count(rport) < accepted and time.monotonic() < ingest_end + 120:
            time.sleep(0.2)
        end = time.monotonic()
        cpu2, rcpu2 = _cpu(proc), _cpu(rproc)
        sys2 = proc.cpu_times().system
        total = _count(rport)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        rec.send_signal(signal.SIGTERM)
        rec.wait(30)
        log.close()
    summary = profiler.finish() if profiler else ""
    got = json.loads(out.read_text()) if out.exists() else []
    lags = sorted(r - _parse(t) for r, t in got if t)
    drained = total - during
    figures = {
        "mode": mode,
        "accepted_per_s": accepted / seconds,
        "fanout_per_s": (fan1 - fan0) / (ingest_end - start) if subscribers else None,
        "deliveries_per_s_during_ingest": during / (ingest_end - start),
        "deliveries_per_s_overall": total / (end - start),
        "delivered": total,
        "accepted": accepted,
        "cpu_s_ingest": cpu1 - cpu0,
        "cpu_s_drain": cpu2 - cpu1,
        "drain_s": end - ingest_end,
        "receiver_cpu_s": rcpu2 - rcpu0,
        "seconds": end - start,
        # the drain (no ingest left) is delivery alone: its CPU per delivery
        "cpu_ms_per_delivery_drain": 1000 * (cpu2 - cpu1) / drained if drained > 100 else None,
        "sys_share_drain": (sys2 - sys1) / (cpu2 - cpu1) if cpu2 > cpu1 else None,
        "cpu_ms_per_event_ingest": 1000 * (cpu1 - cpu0) / accepted if accepted else None,
        "lag_p50_ms": 1000 * statistics.median(lags) if lags else None,
        "lag_p99_ms": 1000 * lags[int(0.99 * (len(lags) - 1))] if lags else None,
        "profile": summary,
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
    if args_in[:1] == ["--lean-receiver"]:
        lean_receiver(int(args_in[1]), args_in[2])
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
    p.add_argument("--profile", metavar="PATH", help="py-spy the daemon for up to 5 s of the drain, after ingest (collapsed stacks to PATH)")
    p.add_argument("--lean", action="store_true",
                   help="a bare-protocol receiver instead of the twisted.web one (measures the daemon, not the receiver)")
    p.add_argument("--subscribers", type=int, default=200,
                   help="with --idle: WebSocket subscribers of one channel during ingest, for fan-out (default 200; 0: none)")
    p.add_argument("--idle", type=int, metavar="ROUNDS", default=0,
                   help="instead: compare ingest with no destination and with one configured but idle"
                        " (matching none of the events), ROUNDS alternating runs of each")
    a = p.parse_args(args_in)
    if a.idle:
        return _idle(a)
    f = run(a.seconds, a.publishers, a.batch, a.in_flight, not a.no_pin, a.keep, profile=a.profile, lean=a.lean)
    kind = "bare-protocol" if a.lean else "twisted.web"
    print(f"destinations (max_in_flight={a.in_flight}, one destination matching every event, {kind} receiver 204):")
    print(f"  events accepted          {f['accepted_per_s']:10,.0f} /s")
    print(f"  deliveries during ingest {f['deliveries_per_s_during_ingest']:10,.0f} /s")
    print(f"  deliveries overall       {f['deliveries_per_s_overall']:10,.0f} /s  ({f['delivered']:,} of {f['accepted']:,})")
    if f["cpu_ms_per_delivery_drain"] is not None:
        print(f"  CPU per delivery (drain) {f['cpu_ms_per_delivery_drain']:10.3f} ms"
              f"  ({100 * (f['sys_share_drain'] or 0):.0f} % in the kernel)")
    if f["cpu_ms_per_event_ingest"] is not None:
        print(f"  CPU per event (ingest)   {f['cpu_ms_per_event_ingest']:10.3f} ms  (ingest and delivery together)")
    print(f"  receiver CPU per request {1000 * f['receiver_cpu_s'] / max(1, f['delivered']):10.3f} ms")
    if f["lag_p99_ms"] is not None:
        print(f"  delivery lag p50 / p99   {f['lag_p50_ms']:10,.0f} / {f['lag_p99_ms']:,.0f} ms")
    if f["profile"]:
        print(f["profile"])
    if a.json:
        Path(a.json).write_text(json.dumps(f, indent=2))
    return 0


def _idle(a: Any) -> int:
    """Ingest with no destination vs. one configured but idle, alternating (machine noise hits both)."""
    rates: dict[str, list[float]] = {"none": [], "idle": []}
    fan: dict[str, list[float]] = {"none": [], "idle": []}
    for _ in range(a.idle):
        for mode in ("none", "idle"):
            f = run(a.seconds, a.publishers, a.batch, a.in_flight, not a.no_pin, False, mode=mode,
                    subscribers=a.subscribers)
            rates[mode].append(f["accepted_per_s"])
            if a.subscribers:
                fan[mode].append(f["fanout_per_s"])
    none, idle = statistics.mean(rates["none"]), statistics.mean(rates["idle"])
    print(f"ingest, {a.idle} rounds of {a.seconds:g} s each (events accepted/s):")
    print(f"  no destination           {none:10,.0f} /s  {[round(r) for r in rates['none']]}")
    print(f"  one destination, idle    {idle:10,.0f} /s  {[round(r) for r in rates['idle']]}")
    print(f"  idle / none              {idle / none:10.3f}")
    if a.subscribers:
        fn, fi = statistics.mean(fan["none"]), statistics.mean(fan["idle"])
        print(f"fan-out meanwhile, {a.subscribers} WebSocket subscribers of bench.c0 (deliveries/s):")
        print(f"  no destination           {fn:10,.0f} /s  {[round(r) for r in fan['none']]}")
        print(f"  one destination, idle    {fi:10,.0f} /s  {[round(r) for r in fan['idle']]}")
        print(f"  idle / none              {fi / fn:10.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rates": rates, "fanout": fan, "ratio": idle / none}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

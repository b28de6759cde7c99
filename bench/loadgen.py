"""
The load generator: worker functions, each run in its own process (forked by
L{spawn}) and driven over a pipe by the orchestrator in C{bench/__main__.py}.

  - L{subscriber_worker}: holds N WebSocket subscribers in one selectors
    loop; on C{"mark"} reports the events received so far, the latencies
    sampled since the last mark and its own CPU time;
  - L{single_publisher_worker}: the realistic publisher -- ONE event per
    request, paced at a fixed rate of events/s over C{conns} keep-alive
    connections with at most one request in flight on each (the send time
    in each event's C{data.ts});
  - L{publisher_worker}: the batched publisher -- a fixed rate of events/s
    over one keep-alive connection, closed loop, every event due when the
    last answer came sent in one request (at most C{max_batch});
  - L{ingest_worker}: signed GitHub webhooks, or single-event publishes,
    at a fixed concurrency, closed loop, one keep-alive connection per slot;
  - L{resume_worker}: one subscriber with C{since}, timed until caught up.

Every worker reports C{time.process_time()} so the table can show the
generator's CPU beside the server's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import resource
import select
import selectors
import socket
import time
from collections import Counter, deque
from multiprocessing.connection import Connection
from typing import Any, Callable

from bench.wire import HttpConn, WSConn, http_request, parse_http_response

__all__ = [
    "event_body",
    "github_body",
    "ingest_worker",
    "open_subscribers",
    "publisher_worker",
    "raise_nofile",
    "resume_worker",
    "single_publisher_worker",
    "spawn",
    "subscriber_worker",
]


def raise_nofile() -> int:
    """Raise the soft limit of open files to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _pin(cpus: list[int] | None) -> None:
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass


def spawn(target: Callable[..., None], *args: Any) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """Run C{target(pipe, *args)} in a forked process; return it and our end of the pipe."""
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_run, args=(target, theirs, *args), daemon=True)
    proc.start()
    theirs.close()
    return proc, ours


def _run(target: Callable[..., None], pipe: Connection, *args: Any) -> None:
    try:
        target(pipe, *args)
    except BaseException as e:  # report, never hang the orchestrator
        try:
            pipe.send({"error": f"{type(e).__name__}: {e}"})
        except OSError:
            pass
        raise


def open_subscribers(
    host: str,
    port: int,
    path: str,
    n: int,
    channel: str,
    sample_every: int = 0,
    since: int | None = None,
    inflight: int = 24,
    timeout: float = 120,
    subscribe: bool = True,
) -> tuple[list[WSConn], Counter[str]]:
    """
    Open C{n} WebSocket connections and subscribe each to C{channel}, at
    most C{inflight} handshakes at a time.  Returns the subscribed
    connections and a count of the failures by reason.  With C{subscribe}
    false the channel is in C{path} (nchan): a connection is subscribed
    once its upgrade was answered 101.
    """
    sel = selectors.DefaultSelector()
    ready: list[WSConn] = []
    failures: Counter[str] = Counter()
    todo = n
    pending = 0
    index = 0
    deadline = time.monotonic() + timeout
    sub: dict[str, Any] = {"op": "subscribe", "channel": channel, "ref": 1}
    if since is not None:
        sub["since"] = since

    def fail(c: WSConn, why: str) -> None:
        nonlocal pending
        failures[why] += 1
        sel.unregister(c.sock)
        c.close()
        pending -= 1

    while (todo or pending) and time.monotonic() < deadline:
        while todo and pending < inflight:
            c = WSConn(host, port, path, sample=bool(sample_every) and index % sample_every == 0)
            index += 1
            todo -= 1
            try:
                c.connect()
            except OSError as e:
                failures[f"connect: {e.strerror}"] += 1
                c.close()
                continue
            sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
            pending += 1
        for key, mask in sel.select(0.5):
            c = key.data
            if mask & selectors.EVENT_WRITE:
                c.flush()
                if c.closed:
                    fail(c, "reset")
                    continue
                if not c.out:
                    sel.modify(c.sock, selectors.EVENT_READ, c)
            if mask & selectors.EVENT_READ:
                was = c.state
                alive = c.on_readable()
                if c.state == "open" and was == "handshake" and not subscribe:
                    sel.unregister(c.sock)
                    pending -= 1
                    ready.append(c)
                    continue
                if c.state == "open" and was == "handshake":
                    c.send_json(sub)
                    if not c.flush():
                        sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
                if c.inbox:
                    first = c.inbox.pop(0)
                    if b'"subscribed"' in first:
                        sel.unregister(c.sock)
                        pending -= 1
                        ready.append(c)
                        c.inbox.clear()
                        continue
                    fail(c, "refused: " + first[:80].decode("utf-8", "replace"))
                    continue
                if not alive:
                    fail(c, f"closed {c.close_code}")
    for key in list(sel.get_map().values()):
        failures["timeout"] += 1
        key.data.close()
    sel.close()
    return ready, failures


def subscriber_worker(
    pipe: Connection,
    host: str,
    port: int,
    path: str,
    n: int,
    channel: str,
    sample_every: int,
    cpus: list[int] | None,
    subscribe: bool = True,
    drain: float = 0.25,
) -> None:
    """
    Hold C{n} subscribers; answer C{"mark"} and C{"stop"} on the pipe.

    The sampled connections (the latency probes) are read the moment they
    are readable.  The others only count frames, so they are drained every
    C{drain} seconds: many frames then come with one C{recv}, where one
    event at a time would cost a wake-up and a C{recv} per delivery (a
    loopback C{recv} costs 10-30 us of CPU on this machine: read at once,
    1,000 subscribers cost the generator ~10 us per delivery and it, not
    the server, was the limit below 100k deliveries/s; drained, ~5 us).
    What waits in a socket buffer meanwhile is tens of KiB at most (700
    frames/s of ~250 bytes), far below the kernel's receive buffer, so the
    servers' sends never block on it.  A mark drains them first, so the
    counts are exact.
    """
    _pin(cpus)
    raise_nofile()
    conns, failures = open_subscribers(host, port, path, n, channel, sample_every, subscribe=subscribe)
    pipe.send({"ready": len(conns), "failures": dict(failures)})
    sel = selectors.DefaultSelector()
    lazy = select.epoll()
    later: dict[int, WSConn] = {}
    for c in conns:
        if c.sample:
            sel.register(c.sock, selectors.EVENT_READ, c)
        else:
            later[c.sock.fileno()] = c
            lazy.register(c.sock.fileno(), select.EPOLLIN)
    sel.register(pipe.fileno(), selectors.EVENT_READ, None)
    closed: Counter[int] = Counter()

    def sweep() -> None:
        for fd, _ in lazy.poll(0):
            c = later[fd]
            if not c.on_readable():
                lazy.unregister(fd)
                del later[fd]
                closed[c.close_code] += 1
                c.close()

    next_sweep = time.monotonic() + drain
    while True:
        for key, _ in sel.select(max(0.0, next_sweep - time.monotonic())):
            c = key.data
            if c is None:
                cmd = pipe.recv()
                sweep()
                lat: list[float] = []
                for c2 in conns:
                    if c2.latencies:
                        lat.extend(c2.latencies)
                        c2.latencies = []
                pipe.send(
                    {
                        "t": time.time(),
                        "events": sum(c2.events for c2 in conns),
                        "latencies": lat,
                        "closed": dict(closed),
                        "cpu": time.process_time(),
                    }
                )
                if cmd == "stop":
                    for c2 in conns:
                        c2.close()
                    lazy.close()
                    return
            elif not c.on_readable():
                sel.unregister(c.sock)
                closed[c.close_code] += 1
                c.close()
        if time.monotonic() >= next_sweep:
            sweep()
            next_sweep = time.monotonic() + drain


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def event_body(form: str, channel: str, ts: float, seq: int, padding: str) -> bytes:
    """
    The body of a single-event publish.  C{form} C{"api"}: C{{"channel",
    "data"}} (twisted_rt and the Autobahn baseline build the frame);
    C{"frame"}: the frame twisted_rt would deliver for it, same keys in the
    same order (nchan relays the body as it is), so every server puts the
    same JSON with the same C{data.ts} on the subscribers' wire.
    """
    data = {"ts": ts, "seq": seq, "pad": padding}
    if form == "frame":
        return json.dumps(
            {"op": "event", "id": f"{os.getpid():08x}{seq:024x}", "channel": channel, "offset": seq + 1,
             "time": _iso(ts), "source": "api", "type": "", "data": data},
            separators=(",", ":"),
        ).encode()
    return json.dumps({"channel": channel, "data": data}).encode()


class _Slot:
    """One keep-alive connection of the single-event publisher."""

    __slots__ = ("buf", "sent_at", "sock")

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()  # the timeout keeps sendall whole; recv only after select said readable
        self.sent_at = 0.0


def single_publisher_worker(
    pipe: Connection,
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    channel: str,
    rate: float,
    duration: float,
    pad: int,
    cpus: list[int] | None,
    form: str = "api",
    conns: int = 16,
    grace: float = 10.0,
) -> None:
    """
    Publish C{rate} events/s to C{channel} for C{duration} seconds, ONE
    event per request, over C{conns} keep-alive connections with at most one
    request in flight on each.  Event C{k} is due at C{t0 + k / rate}; a due
    event goes out on the first idle connection, with C{data.ts} set to the
    time it is sent.  When every connection waits for an answer, due events
    wait (C{behind}, in the report) and go out as connections free up.
    Reports every request's C{(sent_at, ack seconds)} for a 2xx: the publish
    ack, send to durable 2xx.
    """
    _pin(cpus)
    padding = "x" * pad
    hdrs = {**headers, "Content-Type": "application/json"}
    authority = f"{host}:{port}"
    slots = [_Slot(host, port) for _ in range(conns)]
    idle: deque[_Slot] = deque(slots)
    sel = selectors.DefaultSelector()
    for sl in slots:
        sel.register(sl.sock, selectors.EVENT_READ, sl)
    sent = ok = errors = 0
    statuses: Counter[int] = Counter()
    acks: list[tuple[float, float]] = []
    max_behind = 0
    cpu0 = time.process_time()
    t0 = time.time()
    end = t0 + duration

    def reconnect(sl: _Slot) -> _Slot:
        sel.unregister(sl.sock)
        sl.sock.close()
        fresh = _Slot(host, port)
        sel.register(fresh.sock, selectors.EVENT_READ, fresh)
        return fresh

    while True:
        now = time.time()
        if (now >= end and len(idle) == conns) or now >= end + grace:
            break
        if now < end:
            due = int((now - t0) * rate) + 1
            max_behind = max(max_behind, due - sent - len(idle))
            while idle and sent < due:
                sl = idle.popleft()
                ts = time.time()
                req = http_request("POST", path, authority, event_body(form, channel, ts, sent, padding), hdrs)
                sl.sent_at = ts
                sl.sock.sendall(req)
                sent += 1
            wait = (t0 + sent / rate - time.time()) if idle and sent >= due else 0.05
            wait = min(max(wait, 0.0), 0.05)
        else:
            wait = 0.05
        for key, _ in sel.select(wait):
            sl = key.data
            try:
                data = sl.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:  # the server closed it: count the request lost, go on with a new one
                errors += 1
                statuses[0] += 1
                idle.append(reconnect(sl))
                continue
            sl.buf += data
            got = parse_http_response(sl.buf)
            if got is None:
                continue
            status = got[0]
            statuses[status] += 1
            if 200 <= status < 300:
                ok += 1
                acks.append((sl.sent_at, time.time() - sl.sent_at))
            else:
                errors += 1
            idle.append(sl)
        if errors > 50:
            break
    for sl in slots:
        try:
            sl.sock.close()
        except OSError:
            pass
    pipe.send(
        {
            "sent": ok,
            "requests": sent,
            "elapsed": min(time.time(), end) - t0,
            "errors": errors,
            "statuses": dict(statuses),
            "cpu": time.process_time() - cpu0,
            "acks": acks,
            "behind": max(0, max_behind),
        }
    )


def publisher_worker(
    pipe: Connection,
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    channel: str,
    rate: float,
    duration: float,
    pad: int,
    cpus: list[int] | None,
    max_batch: int = 100,
) -> None:
    """Publish C{rate} events/s to C{channel} for C{duration} seconds."""
    _pin(cpus)
    conn = HttpConn(host, port)
    padding = "x" * pad
    hdrs = {**headers, "Content-Type": "application/json"}
    sent = requests = errors = seq = 0
    statuses: Counter[int] = Counter()
    acks: list[tuple[float, float]] = []  # (sent at, seconds to the 2xx: the durable ack) per request
    t0 = time.time()
    cpu0 = time.process_time()
    while True:
        now = time.time()
        elapsed = now - t0
        if elapsed >= duration:
            break
        due = int(rate * elapsed) + 1 - sent
        if due <= 0:
            time.sleep(min(max(sent / rate - elapsed, 0.0005), 0.01))
            continue
        k = min(due, max_batch)
        ts = time.time()
        evs = [{"channel": channel, "data": {"ts": ts, "seq": seq + i, "pad": padding}} for i in range(k)]
        seq += k
        body = json.dumps({"events": evs} if k > 1 else evs[0]).encode()
        status, _ = conn.request("POST", path, body, hdrs)
        acks.append((ts, time.time() - ts))
        requests += 1
        statuses[status] += 1
        if 200 <= status < 300:
            sent += k
        else:
            errors += 1
            if errors > 20:
                break
    conn.close()
    pipe.send(
        {
            "sent": sent,
            "elapsed": time.time() - t0,
            "requests": requests,
            "errors": errors,
            "statuses": dict(statuses),
            "cpu": time.process_time() - cpu0,
            "acks": acks,
        }
    )


def github_body(size: int = 1024) -> bytes:
    """A GitHub C{push} payload of about C{size} bytes."""
    body: dict[str, Any] = {
        "ref": "refs/heads/main",
        "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        "after": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5",
        "repository": {"id": 1296269, "name": "Hello-World", "full_name": "octocat/Hello-World",
                       "private": False, "html_url": "https://github.com/octocat/Hello-World"},
        "pusher": {"name": "octocat", "email": "octocat@github.com"},
        "sender": {"login": "octocat", "id": 1, "type": "User"},
        "head_commit": {"id": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5",
                        "message": "", "timestamp": "2026-11-21T18:45:15Z",
                        "author": {"name": "Mona", "email": "mona@github.com"}},
    }
    raw = json.dumps(body).encode()
    body["head_commit"]["message"] = "m" * max(0, size - len(raw))
    return json.dumps(body).encode()


def ingest_worker(
    pipe: Connection,
    host: str,
    port: int,
    path: str,
    concurrency: int,
    warm: float,
    duration: float,
    secret: str,
    cpus: list[int] | None,
    kind: str = "github",
    headers: dict[str, str] | None = None,
    pad: int = 64,
) -> None:
    """
    C{concurrency} requests in flight (one per keep-alive connection), closed
    loop.  C{kind} C{"github"}: signed GitHub C{push} webhooks, each with a
    fresh C{X-GitHub-Delivery}; C{"publish"}: single-event C{{"channel",
    "data"}} publishes (C{headers} carries the API key).  Counts the 2xx
    completed inside the window C{[warm, warm + duration]} and their
    latencies.
    """
    _pin(cpus)
    prefix = f"{os.getpid():08x}-0000-4000-8000-"
    if kind == "github":
        body = github_body()
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"User-Agent: GitHub-Hookshot/bench\r\nX-GitHub-Event: push\r\n"
            f"X-Hub-Signature-256: {sig}\r\nContent-Length: {len(body)}\r\nX-GitHub-Delivery: "
        ).encode()

        def request(n: int) -> bytes:
            return head + f"{prefix}{n:012x}\r\n\r\n".encode() + body
    else:
        channel = f"bench.ingest.{os.getpid()}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        template = json.dumps({"channel": channel, "data": {"seq": "@" * 12, "pad": "x" * pad}}).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(template)}\r\n\r\n"
        ).encode()
        at = template.index(b"@" * 12)

        def request(n: int) -> bytes:
            return head + template[:at] + f"{n:012x}".encode() + template[at + 12:]
    counter = 0
    sel = selectors.DefaultSelector()
    socks: dict[int, tuple[socket.socket, bytearray, list[float]]] = {}

    def send(s: socket.socket, st: list[float]) -> None:
        nonlocal counter
        counter += 1
        st[0] = time.time()
        s.sendall(request(counter))

    for _ in range(concurrency):
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        st = [0.0]
        socks[s.fileno()] = (s, bytearray(), st)
        sel.register(s, selectors.EVENT_READ, s.fileno())
    t0 = time.time()
    start, end = t0 + warm, t0 + warm + duration
    cpu_start = cpu_end = 0.0
    ok = 0
    statuses: Counter[int] = Counter()
    lat: list[float] = []
    for s, _, st in socks.values():
        send(s, st)
    inflight = concurrency
    while inflight:
        now = time.time()
        if now > end + 10:
            break
        if cpu_start == 0.0 and now >= start:
            cpu_start = time.process_time()
        for key, _ in sel.select(0.5):
            s, buf, st = socks[key.data]
            data = s.recv(65536)
            if not data:
                raise ConnectionError("server closed an ingest connection")
            buf += data
            got = parse_http_response(buf)
            if got is None:
                continue
            now = time.time()
            if start <= st[0] and now <= end:
                statuses[got[0]] += 1
                if 200 <= got[0] < 300:
                    ok += 1
                    lat.append(now - st[0])
            if now < end:
                send(s, st)
            else:
                if cpu_end == 0.0:
                    cpu_end = time.process_time()
                inflight -= 1
    for s, _, _ in socks.values():
        s.close()
    pipe.send({"ok": ok, "seconds": duration, "latencies": lat, "statuses": dict(statuses),
               "cpu": (cpu_end or time.process_time()) - cpu_start})


def resume_worker(
    pipe: Connection,
    host: str,
    port: int,
    path: str,
    channel: str,
    since: int,
    count: int,
    cpus: list[int] | None,
    timeout: float = 120,
) -> None:
    """Connect, subscribe with C{since}, and time until C{count} events arrived."""
    _pin(cpus)
    t0 = time.perf_counter()
    conns, failures = open_subscribers(host, port, path, 1, channel, since=since, timeout=timeout)
    if not conns:
        pipe.send({"error": f"could not subscribe: {dict(failures)}"})
        return
    c = conns[0]
    # events that came with the "subscribed" reply were already counted
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(c.sock, selectors.EVENT_READ, c)
    while c.events < count and not c.closed and time.monotonic() < deadline:
        for _ in sel.select(0.5):
            c.on_readable()
    elapsed = time.perf_counter() - t0
    c.close()
    pipe.send({"seconds": elapsed, "events": c.events, "closed": c.close_code if c.closed else None})

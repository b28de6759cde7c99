"""
C{python -m bench}: measure twisted_rt against two baselines in one run --
a plain Autobahn broadcast server on Twisted and nginx + nchan (C), the
latter also with C{TCP_NODELAY} on its subscribers' sockets (like for like,
fan-out only) -- and print one table (see C{bench/README.md}).

  python -m bench            # the full run (~9 minutes)
  python -m bench --quick    # tiny sizes, to check the instrument works
  python -m bench --only fanout --rounds 3 --json out.json

The realistic fan-out comes first: ONE event per C{POST /api/publish}, over
16 keep-alive connections with at most one request in flight on each, at
rising rates, to 1,000 WebSocket subscribers of one channel; every rate step
is printed (deliveries/s, publish->delivery p50/p99, server CPU per delivery,
publish ack p50/p99).  The batched publisher (up to 100 events per request)
is the second, labelled line.  Each round runs the scenarios in groups
(L{PASSES}: the fan-outs, ingest, resume and idle), every server started
fresh for a group and run through it before the next server, so the servers'
figures of one group are measured minutes apart at most; every figure is
shown once per round and the ratios are ours / each baseline of the means.
No threshold is asserted: the target column just says whether the issue's
target was met in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import psutil  # type: ignore[import-untyped]

from bench.loadgen import (
    ingest_worker,
    publisher_worker,
    raise_nofile,
    resume_worker,
    single_publisher_worker,
    spawn,
    subscriber_worker,
)
from bench.profile import Profiler
from bench.servers import (
    BENCH_DIR,
    NCHAN_PACKAGES,
    Baseline,
    Nchan,
    NchanNoDelay,
    Ours,
    Server,
    install_nchan,
    nchan_missing,
)
from bench.wire import HttpConn

SCENARIOS = ("fanout", "batched", "ingest", "resume", "idle")
#: each round runs these groups of scenarios one after the other, every server through a
#: group (started fresh for it) before the next group: a server's ingest is then measured a
#: few seconds after the others', not minutes (this machine's speed moves by a third within
#: minutes, and the short, CPU-bound ingest windows showed it most: 2026-12-03, the same code
#: read 0.64-0.66 x the bare resource with the two ~4 minutes apart and 0.90-1.27 x back to back)
PASSES: tuple[frozenset[str], ...] = (
    frozenset({"fanout", "batched"}),
    frozenset({"ingest"}),
    frozenset({"resume", "idle"}),
)
SERVER_NAMES = {"baseline": Baseline, "nchan": Nchan, "nchan_nodelay": NchanNoDelay, "ours": Ours}
REFS = ("baseline", "nchan", "nchan_nodelay")  # the baselines ours is divided by


@dataclass
class Sizes:
    """How big each scenario is."""

    fanout_subs: tuple[int, ...] = (1000,)
    sub_procs: int = 2
    pad: int = 64
    warm: float = 1.0
    window: float = 2.0
    drain: float = 5.0  # at most this long between steps for the server to drain its backlog
    # one event per request (the realistic case): deliveries/s of each step = start x factor
    single_start: float = 10000.0
    single_factors: tuple[float, ...] = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
    single_conns: int = 16
    single_min_events: int = 240  # a step's window holds at least this many events (40k/s: 6 s)...
    single_max_window: float = 6.0  # ...up to this long
    tail_ms: float = 500.0  # stop rising once p99 passes this
    hot: float = 0.8  # the follow-up step, at this fraction of the saturation rate
    # the batched publisher (up to 100 events per request, one connection, closed loop)
    start_deliveries: float = 10000.0
    max_deliveries: float = 2_560_000.0
    max_steps: int = 10
    latency_window: float = 3.0
    ingest_concurrency: int = 50
    ingest_procs: int = 2
    ingest_warm: float = 1.0
    ingest_seconds: float = 6.0
    idle_conns: int = 10000
    idle_procs: int = 2
    resume_events: int = 10000
    fresh_idle: bool = True  # measure idle memory on a freshly started server
    settle: float = 0.5  # seconds to let the server settle before reading its memory


QUICK = Sizes(
    fanout_subs=(20,),
    sub_procs=1,
    warm=0.1,
    window=0.25,
    drain=1.0,
    single_start=1000.0,
    single_factors=(1, 4),
    single_conns=4,
    single_min_events=10,
    single_max_window=0.25,
    start_deliveries=1000.0,
    max_deliveries=4000.0,
    max_steps=1,
    latency_window=0.25,
    ingest_concurrency=5,
    ingest_procs=1,
    ingest_warm=0.1,
    ingest_seconds=0.25,
    idle_conns=200,
    idle_procs=1,
    resume_events=500,
    fresh_idle=False,
    settle=0.1,
)

Check = Callable[[float, dict[str, float]], bool | None]


@dataclass
class Metric:
    """One row of the table: a figure per round for each server."""

    key: str
    label: str
    unit: str
    fmt: str = "{:,.0f}"
    target: str = ""
    check: Check | None = None  # (ours, {baseline name: mean}) -> met, None: not decidable
    ratio: bool = True  # False: ours/base means nothing for this row
    values: dict[str, list[float | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Step:
    """One rate step of a fan-out run, as printed in the per-step tables."""

    shape: str
    subs: int
    server: str
    rnd: int
    kind: str  # "step", or "80%" / "50%" for the follow-up step at that fraction of saturation
    offered: float
    delivered: float
    published: float  # events/s the publisher got a 2xx for
    p50: float
    p99: float
    pmax: float
    cpu_us: float  # server CPU µs per delivery
    ack50: float
    ack99: float
    server_cpu: float
    gen_cpu: float
    server_wait: float
    closed: dict[str, int]
    errors: dict[str, int]


def percentile(xs: list[float], p: float) -> float:
    """The C{p}-th percentile (nearest rank) of C{xs}."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def _recv(pipe: Connection, timeout: float, what: str) -> dict[str, Any]:
    if not pipe.poll(timeout):
        raise RuntimeError(f"{what}: no answer within {timeout:.0f}s")
    msg: dict[str, Any] = pipe.recv()
    if "error" in msg:
        raise RuntimeError(f"{what}: {msg['error']}")
    return msg


def _rate(x: float) -> str:
    """10000 -> '10k/s'."""
    return f"{x / 1000:,.4g}k/s" if x >= 1000 else f"{x:,.0f}/s"


def _le(name: str, factor: float = 1.0) -> Check:
    return lambda o, refs: None if refs.get(name) is None else o <= factor * refs[name]


def _ge(name: str, factor: float = 1.0) -> Check:
    return lambda o, refs: None if refs.get(name) is None else o >= factor * refs[name]


def _below(limit: float) -> Check:
    return lambda o, refs: o < limit


def _at_most(limit: float) -> Check:
    return lambda o, refs: o <= limit


class Bench:
    """One run: servers, scenarios, table."""

    def __init__(self, sizes: Sizes, rounds: int, only: set[str], pin: bool, verbose: bool,
                 keep: bool = False, profile: Path | None = None) -> None:
        self.sizes = sizes
        self.profile = profile
        self.servers: list[type[Server]] = [Baseline, Nchan, NchanNoDelay, Ours]
        self.wait_idle = 0.0
        self.idle_below = 15.0
        self.rounds = rounds
        self.only = only
        self.verbose = verbose
        self.keep = keep
        ncpu = os.cpu_count() or 1
        self.server_cpus: list[int] | None = [0] if pin and ncpu >= 2 else None
        self.gen_cpus: list[int] | None = list(range(1, ncpu)) if pin and ncpu >= 2 else None
        self.metrics: dict[str, Metric] = {}
        self.steps: list[Step] = []
        self.errors: list[str] = []
        self.notes: list[str] = []

    # ----------------------------------------------------------------- rows
    def metric(self, key: str, label: str, unit: str, fmt: str = "{:,.0f}", target: str = "",
               check: Check | None = None, ratio: bool | None = None) -> Metric:
        m = self.metrics.get(key)
        if m is None:
            if ratio is None:
                ratio = not (unit == "%" or unit == "% time" or "generator" in label)
            m = self.metrics[key] = Metric(key, label, unit, fmt, target, check, ratio=ratio)
        return m

    def record(self, key: str, server: Server, value: float | None) -> None:
        self.metrics[key].values.setdefault(server.name, []).append(value)

    def record_text(self, key: str, server: Server, text: str) -> None:
        """A figure shown as text only (no mean, no ratio)."""
        m = self.metrics[key]
        m.ratio = False
        m.texts.setdefault(server.name, []).append(text)

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"  [{time.strftime('%H:%M:%S')}{f'{time.time() % 1:.2f}'[1:]}] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------- fan-out
    def _subscribers(self, server: Server, n: int, channel: str, sample_every: int,
                     procs: int) -> list[tuple[Any, Connection]]:
        counts = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        workers = [spawn(subscriber_worker, server.host, server.port, server.ws_target(channel), k, channel,
                         sample_every, self.gen_cpus, server.ws_subscribe) for k in counts if k]
        total = 0
        problems: dict[str, int] = {}
        for _, pipe in workers:
            msg = _recv(pipe, 180, "subscribers")
            total += msg["ready"]
            for k, v in msg["failures"].items():
                problems[k] = problems.get(k, 0) + v
        if total < n:
            self._stop(workers)
            raise RuntimeError(f"only {total}/{n} subscribers: {problems}")
        try:
            server.subscribers_ready()
        except Exception:
            self._stop(workers)
            raise
        return workers

    def _profiler(self, server: Server, name: str, seconds: float) -> Profiler | None:
        if self.profile is None or not isinstance(server, Ours) or server.proc is None:
            return None
        return Profiler(server.proc.pid, self.profile / f"{name}.raw", seconds)

    def _profiled(self, prof: Profiler | None) -> None:
        if prof is not None:
            summary = prof.finish()
            self.say(f"profile {prof.out.with_suffix('')}:\n" + "\n".join(summary.splitlines()[:18]))

    def _mark(self, workers: list[tuple[Any, Connection]], cmd: str = "mark") -> list[dict[str, Any]]:
        for _, pipe in workers:
            pipe.send(cmd)
        return [_recv(pipe, 60, "subscriber mark") for _, pipe in workers]

    def _stop(self, workers: list[tuple[Any, Connection]]) -> None:
        for proc, pipe in workers:
            try:
                pipe.send("stop")
                pipe.poll(10)
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()

    def _step(self, server: Server, workers: list[tuple[Any, Connection]], n: int, rate: float,
              window: float, channel: str, shape: str, rnd: int, kind: str = "step") -> Step:
        """Publish C{rate} events/s; measure deliveries over C{window} after the warm-up."""
        sz = self.sizes
        duration = sz.warm + window + 0.1
        if shape == "single":
            pub, pipe = spawn(single_publisher_worker, server.host, server.port, server.publish_target(channel),
                              server.publish_headers, channel, rate, duration, sz.pad, self.gen_cpus,
                              server.publish_form, sz.single_conns)
        else:
            pub, pipe = spawn(publisher_worker, server.host, server.port, server.publish_target(channel),
                              server.publish_headers, channel, rate, duration, sz.pad, self.gen_cpus)
        time.sleep(sz.warm)
        m0 = self._mark(workers)
        c0, t0, w0 = server.cpu(), time.time(), server.wait()
        prof = self._profiler(server, f"{channel}.{round(rate * n)}", window)
        time.sleep(window)
        m1 = self._mark(workers)
        c1, t1, w1 = server.cpu(), time.time(), server.wait()
        self._profiled(prof)
        p = _recv(pipe, 120, "publisher")
        pub.join(10)
        delivered = sum(m["events"] for m in m1) - sum(m["events"] for m in m0)
        lat = [x for m in m1 for x in m["latencies"]]
        acks = [a for s, a in p["acks"] if t0 <= s <= t1]
        closed: dict[str, int] = {}
        for m in m1:
            for k, v in m["closed"].items():
                closed[str(k)] = closed.get(str(k), 0) + v
        gen_cpu = sum(b["cpu"] - a["cpu"] for a, b in zip(m0, m1, strict=True)) + p["cpu"] * window / max(p["elapsed"], 1e-9)
        errors = {str(k): v for k, v in p["statuses"].items() if not 200 <= int(k) < 300}
        dt = t1 - t0
        st = Step(
            shape=shape, subs=n, server=server.name, rnd=rnd, kind=kind, offered=rate * n,
            delivered=delivered / dt, published=p["sent"] / max(p["elapsed"], 1e-9),
            p50=percentile(lat, 50) * 1000, p99=percentile(lat, 99) * 1000, pmax=max(lat, default=float("nan")) * 1000,
            cpu_us=(c1 - c0) / delivered * 1e6 if delivered else float("nan"), ack50=percentile(acks, 50) * 1000,
            ack99=percentile(acks, 99) * 1000, server_cpu=(c1 - c0) / dt, gen_cpu=gen_cpu / dt,
            server_wait=(w1 - w0) / dt, closed=closed, errors=errors,
        )
        self.steps.append(st)
        self.say(f"{server.name} {shape} n={n} offered {st.offered:,.0f}/s delivered {st.delivered:,.0f}/s "
                 f"p50/p99 {st.p50:.1f}/{st.p99:.1f} ms ack {st.ack50:.1f}/{st.ack99:.1f} ms "
                 f"{st.cpu_us:.1f} µs/delivery server {st.server_cpu:.0%} (waited {st.server_wait:.0%}) "
                 f"gen {st.gen_cpu:.0%} closed {closed or '-'}" + (f" publish errors {errors}" if errors else ""))
        if errors:
            self.notes.append(f"{server.name} round {rnd}: {shape} fan-out at {_rate(st.offered)}: publish answers {errors}")
        return st

    def _title(self, shape: str, n: int) -> str:
        if shape == "single":
            return f"fan-out {n:,}, 1 event/req"
        return f"fan-out {n:,}, batched"

    def fanout(self, server: Server, n: int, rnd: int, shape: str) -> None:
        sz = self.sizes
        single = shape == "single"
        tag = f"{'one' if single else 'batch'}{n}"
        t = self._title(shape, n)
        big = n >= 1000  # the targets are for 1,000 subscribers
        lo, hi = sz.single_start, 4 * sz.single_start
        self.metric(f"{tag}.sat", f"{t}: deliveries/s at saturation", "msg/s",
                    target=("≥ 1.0x nchan" if single else "") if big else "",
                    check=(_ge("nchan") if single else None) if big else None)
        if single:
            self.metric(f"{tag}.tail", f"{t}: p99 passed {sz.tail_ms:.0f} ms at", "", "{}")
            self.metric(f"{tag}.p50lo", f"{t}: p50 latency at {_rate(lo)}", "ms", "{:.1f}",
                        target="≤ nchan" if big else "", check=_le("nchan") if big else None)
            self.metric(f"{tag}.p99lo", f"{t}: p99 latency at {_rate(lo)}", "ms", "{:.1f}")
            self.metric(f"{tag}.p99hi", f"{t}: p99 latency at {_rate(hi)}", "ms", "{:.1f}",
                        target="≤ 1.5x nchan" if big else "", check=_le("nchan", 1.5) if big else None)
            self.metric(f"{tag}.cpuhi", f"{t}: server CPU per delivery at {_rate(hi)}", "µs", "{:.2f}",
                        target="≤ nchan" if big else "", check=_le("nchan") if big else None)
            self.metric(f"{tag}.ackhi", f"{t}: publish ack p50 / p99 at {_rate(hi)}", "ms", "{}")
            frac = f"{sz.hot:.0%}"
        else:
            frac = "50%"
        self.metric(f"{tag}.cpusat", f"{t}: server CPU per delivery at saturation", "µs", "{:.2f}")
        self.metric(f"{tag}.load", f"{t}: at sat.: server/gen CPU, waited", "% core", "{}")
        self.metric(f"{tag}.hp50", f"{t}: p50 latency at {frac} of sat.", "ms", "{:.1f}")
        self.metric(f"{tag}.hp99", f"{t}: p99 latency at {frac} of sat.", "ms", "{:.1f}",
                    target="< 100 ms" if single and big else "", check=_below(100) if single and big else None)
        if single:
            self.metric(f"{tag}.hack", f"{t}: publish ack p99 at {frac} of sat.", "ms", "{:.1f}",
                        target="≤ 25 ms" if big else "", check=_at_most(25) if big else None)
        else:
            self.metric(f"{tag}.hack", f"{t}: publish ack p50 / p99 at {frac} of sat.", "ms", "{}")
        self.metric(f"{tag}.hdel", f"{t}: delivered / offered at {frac} of sat.", "%", "{:.0f}")

        channel = f"bench.{tag}.r{rnd}"
        sample_every = max(1, n // 50)  # 50 latency probes, read at once; the others are drained (loadgen)
        procs = min(sz.sub_procs, n)
        if single:
            rates = [sz.single_start * f for f in sz.single_factors if sz.single_start * f <= sz.max_deliveries]
        else:
            rates = [sz.start_deliveries * 2**i for i in range(sz.max_steps)
                     if sz.start_deliveries * 2**i <= sz.max_deliveries]
        workers = self._subscribers(server, n, channel, sample_every, procs)
        best: Step | None = None
        tail: Step | None = None
        done: list[Step] = []
        try:
            prev = 0.0
            for i, offered in enumerate(rates):
                if i:
                    server.wait_quiet(timeout=sz.drain)
                rate = offered / n
                window = sz.window
                if single:
                    window = max(sz.window, min(sz.single_max_window, sz.single_min_events / rate))
                r = self._step(server, workers, n, rate, window, channel, shape, rnd)
                done.append(r)
                if best is None or r.delivered > best.delivered:
                    best = r
                if r.closed:
                    self.notes.append(f"{server.name} round {rnd}: {t}: subscribers closed at {_rate(r.offered)}: {r.closed}")
                    break
                if single and r.p99 > sz.tail_ms:
                    tail = r
                    break
                if r.delivered < 0.85 * r.offered and r.delivered < 1.1 * prev:
                    break  # short of the offered rate and no longer rising: saturated
                prev = r.delivered
        finally:
            self._stop(workers)
        assert best is not None
        sat = best.delivered
        self.record(f"{tag}.sat", server, sat)
        self.record(f"{tag}.cpusat", server, best.cpu_us)
        self.record_text(f"{tag}.load", server,
                         f"{best.server_cpu * 100:.0f}/{best.gen_cpu * 100:.0f}/{best.server_wait * 100:.0f}")
        if single:
            self.record_text(f"{tag}.tail", server,
                             f"{_rate(tail.offered)} ({tail.p99:.0f} ms)" if tail else f"not by {_rate(done[-1].offered)}")
            at = {round(s.offered): s for s in done}
            a, b = at.get(round(lo)), at.get(round(hi))
            self.record(f"{tag}.p50lo", server, a.p50 if a else None)
            self.record(f"{tag}.p99lo", server, a.p99 if a else None)
            self.record(f"{tag}.p99hi", server, b.p99 if b else None)
            self.record(f"{tag}.cpuhi", server, b.cpu_us if b else None)
            self.record_text(f"{tag}.ackhi", server, f"{b.ack50:.1f}/{b.ack99:.1f}" if b else "n/a")
        # the follow-up step below saturation, on fresh subscribers and a drained server
        server.wait_quiet()
        frac_v = sz.hot if single else 0.5
        channel = f"bench.{tag}.r{rnd}.hot"
        workers = self._subscribers(server, n, channel, sample_every, procs)
        try:
            rate = max(sat * frac_v / n, 0.5)
            window = sz.latency_window if not single else max(sz.window, min(sz.single_max_window,
                                                                             sz.single_min_events / rate))
            r = self._step(server, workers, n, rate, window, channel, shape, rnd, kind=f"{frac_v:.0%}")
        finally:
            self._stop(workers)
        self.record(f"{tag}.hp50", server, r.p50)
        self.record(f"{tag}.hp99", server, r.p99)
        if single:
            self.record(f"{tag}.hack", server, r.ack99)
        else:
            self.record_text(f"{tag}.hack", server, f"{r.ack50:.1f}/{r.ack99:.1f}")
        self.record(f"{tag}.hdel", server, r.delivered / r.offered * 100)
        server.wait_quiet()

    # -------------------------------------------------------------- ingest
    def ingest(self, server: Server, rnd: int, kind: str) -> None:
        sz = self.sizes
        c = sz.ingest_concurrency
        tag = "hook" if kind == "github" else "pub"
        what = f"ingest webhook, c={c}" if kind == "github" else f"ingest /api/publish, c={c}"
        self.metric(f"{tag}.rps", f"{what}: 2xx/s", "req/s", target="≥ 1x base", check=_ge("baseline"))
        self.metric(f"{tag}.p99", f"{what}: p99 latency", "ms", "{:.1f}", target="≤ 25 ms", check=_at_most(25))
        self.metric(f"{tag}.cpureq", f"{what}: server CPU per 2xx", "ms", "{:.3f}")
        self.metric(f"{tag}.load", f"{what}: server/gen CPU, waited", "% core", "{}")
        path = server.hook_path if kind == "github" else server.ingest_publish_path
        procs = max(1, min(sz.ingest_procs, c))
        counts = [c // procs + (1 if i < c % procs else 0) for i in range(procs)]
        workers = [spawn(ingest_worker, server.host, server.port, path, k, sz.ingest_warm, sz.ingest_seconds,
                         server.github_secret, self.gen_cpus, kind, server.publish_headers, sz.pad)
                   for k in counts]
        time.sleep(sz.ingest_warm)
        c0, t0, w0 = server.cpu(), time.time(), server.wait()
        prof = self._profiler(server, f"ingest.{tag}.r{rnd}", sz.ingest_seconds)
        time.sleep(sz.ingest_seconds)
        c1, t1, w1 = server.cpu(), time.time(), server.wait()
        self._profiled(prof)
        res = [_recv(pipe, 120, "ingest") for _, pipe in workers]
        for proc, _ in workers:
            proc.join(10)
        ok = sum(r["ok"] for r in res)
        lat = [x for r in res for x in r["latencies"]]
        statuses: dict[str, int] = {}
        for r in res:
            for k, v in r["statuses"].items():
                statuses[str(k)] = statuses.get(str(k), 0) + v
        bad = {k: v for k, v in statuses.items() if not k.startswith("2")}
        self.say(f"{server.name} ingest {kind} {ok / sz.ingest_seconds:,.0f}/s p99 {percentile(lat, 99) * 1000:.1f} ms "
                 f"statuses {statuses}")
        if bad:
            self.metrics[f"{tag}.rps"].notes.append(f"{server.name} round {rnd}: {what}: non-2xx {bad}")
        if not ok:
            raise RuntimeError(f"no 2xx answers: {statuses}")
        dt = t1 - t0
        self.record(f"{tag}.rps", server, ok / sz.ingest_seconds)
        self.record(f"{tag}.p99", server, percentile(lat, 99) * 1000)
        self.record(f"{tag}.cpureq", server, (c1 - c0) / ok * 1000 * sz.ingest_seconds / dt)
        gen = sum(r["cpu"] for r in res) / sz.ingest_seconds * 100
        self.record_text(f"{tag}.load", server, f"{(c1 - c0) / dt * 100:.0f}/{gen:.0f}/{(w1 - w0) / dt * 100:.0f}")
        server.wait_quiet()

    # -------------------------------------------------------------- resume
    def resume(self, server: Server, rnd: int) -> None:
        n = self.sizes.resume_events
        self.metric("resume.s", f"resume: catch up {n:,} events with since", "s", "{:.3f}",
                    target="< 1 s", check=_below(1))
        channel = f"bench.resume.r{rnd}"
        conn = HttpConn(server.host, server.port)
        last = 0
        hdrs = {**server.publish_headers, "Content-Type": "application/json"}
        for start in range(0, n, 100):  # twisted_rt takes at most 100 events per request
            k = min(100, n - start)
            body = json.dumps({"events": [{"channel": channel, "data": {"seq": start + i, "pad": "x" * self.sizes.pad}}
                                          for i in range(k)]}).encode()
            status, raw = conn.request("POST", server.publish_path, body, hdrs)
            if status // 100 != 2:
                raise RuntimeError(f"publish answered {status}: {raw[:200]!r}")
            got = json.loads(raw)
            items = got["events"] if isinstance(got, dict) and "events" in got else got
            if isinstance(items, dict):
                items = [items]
            last = max(last, max(int(x["offset"]) for x in items))
        conn.close()
        server.wait_quiet()
        proc, pipe = spawn(resume_worker, server.host, server.port, server.ws_path, channel, last - n, n,
                           self.gen_cpus)
        r = _recv(pipe, 180, "resume")
        proc.join(10)
        self.say(f"{server.name} resume {r}")
        if r["events"] < n:
            raise RuntimeError(f"only {r['events']}/{n} events came back (closed: {r['closed']})")
        if r["events"] > n:
            self.metrics["resume.s"].notes.append(f"{server.name} round {rnd}: {r['events']} events for {n}")
        self.record("resume.s", server, r["seconds"])

    # ---------------------------------------------------------------- idle
    def idle(self, server: Server, rnd: int) -> None:
        sz = self.sizes
        n = sz.idle_conns
        self.metric("idle.kib", f"idle: server memory per idle WebSocket ({n:,} conns)", "KiB", "{:.1f}",
                    target="≤ 12 KiB", check=_at_most(12))
        if sz.fresh_idle:  # first connections pay for lazy imports and caches: not counted
            self._stop(self._subscribers(server, min(100, n), "bench.idle.warm", 0, 1))
            server.wait_quiet()
        time.sleep(sz.settle)
        rss0 = server.rss()
        workers = self._subscribers(server, n, f"bench.idle.r{rnd}", 0, max(1, min(sz.idle_procs, n)))
        try:
            server.wait_quiet()
            time.sleep(sz.settle)
            rss1 = server.rss()
        finally:
            self._stop(workers)
        per = (rss1 - rss0) / n / 1024
        self.say(f"{server.name} idle rss {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB: {per:.1f} KiB/conn")
        self.record("idle.kib", server, per)

    # ---------------------------------------------------------------- runs
    def _guard(self, what: str, server: Server, f: Callable[..., None], *args: Any) -> None:
        try:
            f(server, *args)
        except Exception as e:
            msg = f"{server.name}: {what}: {e}"
            self.errors.append(msg)
            self.say("FAILED " + msg)

    def _wait_idle(self) -> None:
        """Wait (at most C{wait_idle} s) until the machine's other load has gone."""
        if not self.wait_idle:
            return
        deadline = time.monotonic() + self.wait_idle
        busy = psutil.cpu_percent(interval=1.0)
        while busy > self.idle_below and time.monotonic() < deadline:
            busy = psutil.cpu_percent(interval=1.0)
        self.say(f"machine {busy:.0f}% busy before this server's round")

    def run(self) -> None:
        for rnd in range(1, self.rounds + 1):
            for group in PASSES:
                for cls in self.servers:
                    todo = self.only & cls.scenarios & group
                    if not todo:
                        continue
                    server: Server = cls(self.server_cpus, keep=self.keep)
                    self._wait_idle()
                    self.say(f"round {rnd}: {server.label}: {', '.join(s for s in SCENARIOS if s in todo)}")
                    try:
                        self.run_server(server, rnd, todo)
                    except Exception as e:
                        self.errors.append(f"{server.name}: {e}")
                        self.say(f"FAILED {server.name}: {e}")
                    finally:
                        if self.errors and self.keep:
                            self.say(f"{server.name} log kept in {server.workdir}")
                        server.cleanup()

    def run_server(self, server: Server, rnd: int, todo: set[str]) -> None:
        fresh = self.sizes.fresh_idle
        if todo - {"idle"} or not fresh:
            server.start()
            if "fanout" in todo:
                for n in self.sizes.fanout_subs:
                    self._guard(f"fan-out {n}, 1 event/request", server, self.fanout, n, rnd, "single")
            if "batched" in todo:
                for n in self.sizes.fanout_subs:
                    self._guard(f"fan-out {n}, batched", server, self.fanout, n, rnd, "batched")
            if "ingest" in todo:
                self._guard("ingest webhook", server, self.ingest, rnd, "github")
                self._guard("ingest /api/publish", server, self.ingest, rnd, "publish")
            if "resume" in todo:
                self._guard("resume", server, self.resume, rnd)
        if "idle" in todo:
            if fresh:
                server.stop()
                server.start()  # a fresh process: nothing else in its heap
            self._guard("idle", server, self.idle, rnd)
        server.stop()

    # --------------------------------------------------------------- table
    def names(self) -> list[tuple[str, str]]:
        """(name, column title) of the servers in this run, in run order."""
        titles = {"baseline": "Autobahn base", "nchan": "nginx+nchan", "nchan_nodelay": "nchan, NODELAY",
                  "twisted_rt": "twisted_rt"}
        return [(c.name, titles.get(c.name, c.name)) for c in self.servers]

    def table(self, targets: bool = True) -> str:
        def fmt(m: Metric, v: float | None) -> str:
            return "n/a" if v is None or v != v else m.fmt.format(v)

        def runs(m: Metric, name: str) -> str:
            if m.texts:
                return " / ".join(m.texts.get(name, [])) or "-"
            vs = m.values.get(name, [])
            return " / ".join(fmt(m, v) for v in vs) if vs else "-"

        def mean(m: Metric, name: str) -> float | None:
            vs = [v for v in m.values.get(name, []) if v is not None and v == v]
            return statistics.fmean(vs) if vs else None

        names = self.names()
        refs = [r for r in REFS if r in dict(names)]
        head = ["measure", "unit"] + [f"{t} (runs)" for _, t in names]
        short = {"baseline": "base", "nchan_nodelay": "nchan ND"}
        head += [f"ours/{short.get(r, r)}" for r in refs]
        if targets:
            head += ["target", "met"]
        rows: list[list[str]] = [head]
        for m in self.metrics.values():
            o = mean(m, "twisted_rt")
            means = {r: v for r in refs if (v := mean(m, r)) is not None}
            row = [m.label, m.unit] + [runs(m, name) for name, _ in names]
            for r in refs:
                b = means.get(r)
                if not m.ratio or r not in m.values or "twisted_rt" not in m.values:
                    row.append("-")  # no ratio for this row, or a server that does not take part in it
                else:
                    row.append(f"{o / b:.2f}x" if b and o is not None else "n/a")
            if targets:
                met = ""
                if m.check is not None:
                    got = None if o is None else m.check(o, means)
                    met = "n/a" if got is None else ("yes" if got else "NO")
                row += [m.target, met]
            rows.append(row)
        return _grid(rows)

    def step_tables(self) -> str:
        """The per-step lines of every fan-out, one table per shape and size."""
        out: list[str] = []
        order = {name: i for i, (name, _) in enumerate(self.names())}
        sz = self.sizes
        for shape in ("single", "batched"):
            for n in sz.fanout_subs:
                steps = [s for s in self.steps if s.shape == shape and s.subs == n]
                if not steps:
                    continue
                if shape == "single":
                    out.append(f"{self._title(shape, n)} -- ONE event per POST /api/publish, {sz.single_conns} "
                               f"keep-alive connections, at most 1 request in flight on each; per rate step "
                               f"(* = the follow-up step at {sz.hot:.0%} of that run's saturation, on fresh "
                               f"subscribers):")
                else:
                    out.append(f"{self._title(shape, n)} -- up to 100 events per request, 1 connection, closed "
                               f"loop (every event due when the last answer came goes in the next request); "
                               f"per rate step (* = at 50% of saturation):")
                steps.sort(key=lambda s: (s.kind != "step", s.offered if s.kind == "step" else 0,
                                          order.get(s.server, 9), s.rnd))
                rows = [["offered/s", "server", "run", "delivered/s", "p50 ms", "p99 ms", "max ms", "CPU µs/deliv.",
                         "ack p50 ms", "ack p99 ms", "sent ev/s", "server CPU %", "gen CPU %", "waited %"]]
                for s in steps:
                    rows.append([
                        f"{s.offered:,.0f}" + ("" if s.kind == "step" else " *"), s.server, str(s.rnd),
                        f"{s.delivered:,.0f}", _f(s.p50), _f(s.p99), _f(s.pmax), _f(s.cpu_us, "{:.2f}"),
                        _f(s.ack50), _f(s.ack99), f"{s.published:,.0f}", f"{s.server_cpu * 100:.0f}",
                        f"{s.gen_cpu * 100:.0f}", f"{s.server_wait * 100:.0f}",
                    ])
                out[-1] = textwrap.fill(out[-1], 110, subsequent_indent="  ")
                out.append(_grid(rows))
                out.append("")
        return "\n".join(out)


def _f(v: float, fmt: str = "{:,.1f}") -> str:
    return "n/a" if v != v else fmt.format(v)


def _grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> str:
    """One line about this machine."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} CPUs ({model}), {ram:.1f} GiB RAM, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def nchan_versions() -> str:
    """C{nginx 1.22.1, nchan 1:1.3.6+dfsg-2} as Debian has them, or what is known."""
    out = []
    for pkg in NCHAN_PACKAGES:
        try:
            r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True,
                               timeout=10, check=False)
            out.append(f"{pkg} {r.stdout.strip() or '?'}")
        except (OSError, subprocess.TimeoutExpired):
            out.append(f"{pkg} ?")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["destinations"]:  # python -m bench destinations: outgoing webhooks (bench/destinations.py)
        from bench.destinations import main as destinations_main

        return destinations_main(args_in[1:])
    if args_in[:1] == ["pusher"]:  # python -m bench pusher: the Pusher endpoint against /ws (bench/pusher.py)
        from bench.pusher import main as pusher_main

        return pusher_main(args_in[1:])
    if args_in[:1] == ["presence"]:  # python -m bench presence: 1,000 members join and leave (bench/presence.py)
        from bench.presence import main as presence_main

        return presence_main(args_in[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: a few seconds, to check the instrument (never installs nginx)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every figure (default 2)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="comma-separated scenarios: fanout (one event per request), batched, ingest, "
                             "resume, idle")
    parser.add_argument("--subs", default="", help="fan-out subscriber counts, e.g. 100,1000 (default 1000)")
    parser.add_argument("--window", type=float, default=0.0, metavar="SECONDS",
                        help="shorter or longer measurement windows (fan-out steps, ingest)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and the generator to the rest")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    parser.add_argument("--write-readme", action="store_true", help="put the table into bench/README.md")
    parser.add_argument("--keep", action="store_true", help="keep the servers' work directories (logs, journal)")
    parser.add_argument("--servers", default="baseline,nchan,nchan_nodelay,ours",
                        help="which servers: baseline, nchan, nchan_nodelay (nchan with TCP_NODELAY on its "
                             "subscribers' sockets, fan-out only), ours (default all four)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install nginx and libnginx-mod-nchan when missing (skip nchan)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each server's round, wait up to SECONDS for the machine to be < 15%% busy")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the daemon in every measurement window into DIR")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    # a SIGTERM (a timeout) unwinds like Ctrl-C: every server is stopped, work directories removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = QUICK if args.quick else Sizes()
    if args.subs:
        sizes.fanout_subs = tuple(int(x) for x in args.subs.split(","))
    if args.window > 0:
        sizes.window = sizes.latency_window = sizes.ingest_seconds = args.window
        sizes.single_max_window = max(args.window, min(sizes.single_max_window, 3 * args.window))
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    wanted = [x.strip() for x in args.servers.split(",") if x.strip()]
    if set(wanted) - set(SERVER_NAMES):
        parser.error(f"unknown server(s): {', '.join(sorted(set(wanted) - set(SERVER_NAMES)))}")
    nofile = raise_nofile()
    if nofile < sizes.idle_conns + 1000 and "idle" in only:
        print(f"warning: open-file limit {nofile} is low for {sizes.idle_conns} connections", file=sys.stderr)
    bench = Bench(sizes, args.rounds, only, pin=not args.no_pin, verbose=not args.quiet, keep=args.keep,
                  profile=Path(args.profile) if args.profile else None)
    nchan_note = ""
    if {"nchan", "nchan_nodelay"} & set(wanted) and only & Nchan.scenarios:
        if args.quick or args.no_install:
            why = nchan_missing()
            if why is not None:
                why += " (--quick and --no-install never install it; python -m bench does)"
        else:
            why = install_nchan(lambda s: print(f"bench: nchan: {s}", file=sys.stderr, flush=True))
        if why is not None:
            wanted = [x for x in wanted if x not in ("nchan", "nchan_nodelay")]
            nchan_note = f"the nginx + nchan lines are missing: {why}"
            print(f"bench: {nchan_note}", file=sys.stderr, flush=True)
            bench.notes.append(nchan_note)
    bench.servers = [SERVER_NAMES[x] for x in wanted if only & SERVER_NAMES[x].scenarios]  # no empty columns
    bench.wait_idle = args.wait_idle
    started = time.time()
    bench.run()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    load = os.getloadavg()
    pin = (f"server pinned to CPU {bench.server_cpus}, load generator to CPU {bench.gen_cpus}"
           if bench.server_cpus else "no CPU pinning")
    servers = []
    for cls in bench.servers:
        if cls is Baseline:
            servers.append("Autobahn base = bench/baseline.py, a plain Autobahn broadcast server on Twisted "
                           "with a bare twisted.web POST resource")
        elif cls is Nchan:
            servers.append(f"nginx+nchan = {nchan_versions()} (Debian), one worker, bench/nchan.conf")
        elif cls is NchanNoDelay:
            servers.append("nchan, NODELAY = the same nginx+nchan with TCP_NODELAY set on its subscribers' sockets "
                           "(as twisted_rt's are): the like-for-like line, fan-out only (bench/servers.py)")
        elif cls is Ours:
            servers.append("twisted_rt = twistd -n rt --config bench/bench.toml, durable on-disk journal")
    head = [
        f"twisted_rt bench{' --quick' if args.quick else ''}: {when}, {time.time() - started:.0f} s, "
        f"{args.rounds} round(s)",
        f"machine: {machine()}",
        f"{pin}; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        *[f"  {s}" for s in servers],
    ]
    table = bench.table(targets=not args.quick)
    legend: list[str] = []
    if only & {"fanout", "batched"}:
        legend.append(f"1 event/req: one event per POST /api/publish over {sizes.single_conns} keep-alive connections "
                      "(at most 1 request in flight on each), rates rising step by step (per-step lines below); "
                      "batched: up to 100 events per request.")
    if "ingest" in only:
        legend.append("ingest webhook: GitHub-signed ~1 KB push, 202 after the journal commit; ingest /api/publish: "
                      "one event per request, 202 after the commit. In both, the Autobahn base column is the bare "
                      "twisted.web POST resource (reads the body, answers 202 {}, keeps nothing).")
    if Nchan in bench.servers:
        legend.append("nginx+nchan takes part in the 1 event/req fan-out and idle rows only ('-' elsewhere).")
    if NchanNoDelay in bench.servers:
        legend.append("The targets are against nginx+nchan as it ships: Nagle's algorithm on its subscribers' sockets "
                      "(twisted_rt sets TCP_NODELAY); with Nagle a frame sent while the last one is unacknowledged "
                      "waits for the ACK, which on loopback sends it from the generator's core. 'nchan, NODELAY' is "
                      "the same server with TCP_NODELAY set from outside: compare per-delivery figures with it too.")
    if only & {"fanout", "batched", "ingest"}:
        legend.append("'server/gen CPU, waited': % of one core in the window for the server and the load generator, "
                      "and the time the server's threads were runnable without a CPU (much above 0 for a one-thread "
                      "server: other load, that run is noise).")
    notes = list(bench.notes) + [n for m in bench.metrics.values() for n in m.notes]
    gen_cores = len(bench.gen_cpus) if bench.gen_cpus else (os.cpu_count() or 1)
    for s in bench.steps:
        if s.gen_cpu * 100 >= 85 * gen_cores and s.kind == "step":
            notes.append(f"{s.server} round {s.rnd}: {bench._title(s.shape, s.subs)} at {_rate(s.offered)}: the "
                         f"generator was at {s.gen_cpu:.0%} of its CPU; from there on that run is a lower bound")
            break
    legend = [textwrap.fill(x, 110, subsequent_indent="  ") for x in legend]
    text = "\n".join(head) + "\n\n" + table + "\n\n" + "".join(x + "\n" for x in legend) + "\n" + bench.step_tables()
    if notes or bench.errors:
        text += "\n" + "\n".join(f"note: {n}" for n in notes + bench.errors) + "\n"
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"when": when, "machine": machine(), "quick": args.quick, "servers": servers,
             "metrics": {k: {"label": m.label, "unit": m.unit, "values": m.values, "texts": m.texts}
                         for k, m in bench.metrics.items()},
             "steps": [asdict(s) for s in bench.steps],
             "notes": notes, "errors": bench.errors}, indent=2))
    if args.write_readme:
        readme = BENCH_DIR / "README.md"
        src = readme.read_text()
        a, b = "<!-- bench-table -->", "<!-- /bench-table -->"
        if a in src and b in src:
            pre, rest = src.split(a, 1)
            _, post = rest.split(b, 1)
            readme.write_text(pre + a + "\n```\n" + text + "```\n" + b + post)
    return 1 if bench.errors else 0  # a scenario that could not run is a failure; slow figures are not


if __name__ == "__main__":
    sys.exit(main())

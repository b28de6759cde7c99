"""
C{python -m bench}: measure twisted_rt against the plain Autobahn baseline
in one run and print one table (see C{bench/README.md}).

  python -m bench            # the full run (a few minutes)
  python -m bench --quick    # tiny sizes, to check the instrument works
  python -m bench --only fanout,resume --rounds 3 --json out.json

Each round starts each server fresh, runs every scenario against it, then
the next server (baseline first), so machine noise hits both alike; every
figure is shown once per round and the ratio is ours / baseline of the
means.  No threshold is asserted: the target column just says whether the
issue's target was met in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import psutil  # type: ignore[import-untyped]

from bench.loadgen import (
    ingest_worker,
    publisher_worker,
    raise_nofile,
    resume_worker,
    spawn,
    subscriber_worker,
)
from bench.profile import Profiler
from bench.servers import BENCH_DIR, Baseline, Ours, Server, sched_wait
from bench.wire import HttpConn


@dataclass
class Sizes:
    """How big each scenario is."""

    fanout_subs: tuple[int, ...] = (100, 1000)
    sub_procs: int = 2
    start_deliveries: float = 10000.0
    max_deliveries: float = 2_560_000.0
    max_steps: int = 10
    warm: float = 1.0
    window: float = 2.0
    latency_window: float = 3.0
    pad: int = 64
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
    start_deliveries=1000.0,
    max_deliveries=4000.0,
    max_steps=1,
    warm=0.2,
    window=0.4,
    latency_window=0.4,
    ingest_concurrency=5,
    ingest_procs=1,
    ingest_warm=0.2,
    ingest_seconds=0.5,
    idle_conns=200,
    idle_procs=1,
    resume_events=500,
    fresh_idle=False,
    settle=0.1,
)


@dataclass
class Metric:
    """One row of the table: a figure per round for each server."""

    key: str
    label: str
    unit: str
    fmt: str = "{:,.0f}"
    target: str = ""
    check: Callable[[float, float], bool] | None = None  # (ours, baseline) -> met
    ratio: bool = True  # False: ours/base means nothing for this row
    values: dict[str, list[float | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)


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


class Bench:
    """One run: servers, scenarios, table."""

    def __init__(self, sizes: Sizes, rounds: int, only: set[str], pin: bool, verbose: bool,
                 keep: bool = False, profile: Path | None = None) -> None:
        self.sizes = sizes
        self.profile = profile
        self.servers: list[type[Server]] = [Baseline, Ours]
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
        self.errors: list[str] = []

    # ----------------------------------------------------------------- rows
    def metric(self, key: str, label: str, unit: str, fmt: str = "{:,.0f}", target: str = "",
               check: Callable[[float, float], bool] | None = None) -> Metric:
        m = self.metrics.get(key)
        if m is None:
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
        workers = [spawn(subscriber_worker, server.host, server.port, server.ws_path, k, channel,
                         sample_every, self.gen_cpus) for k in counts if k]
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
              window: float, channel: str) -> dict[str, Any]:
        """Publish C{rate} events/s; measure deliveries over C{window} after the warm-up."""
        sz = self.sizes
        pub, pipe = spawn(publisher_worker, server.host, server.port, server.publish_path,
                          server.publish_headers, channel, rate, sz.warm + window + 0.1, sz.pad, self.gen_cpus)
        time.sleep(sz.warm)
        gens = [p.pid for p, _ in workers] + [pub.pid]
        m0 = self._mark(workers)
        c0, t0, w0, g0 = server.cpu(), time.time(), server.wait(), sum(sched_wait(x) for x in gens)
        prof = self._profiler(server, f"{channel}.{round(rate * n)}", window)
        time.sleep(window)
        m1 = self._mark(workers)
        c1, t1, w1, g1 = server.cpu(), time.time(), server.wait(), sum(sched_wait(x) for x in gens)
        self._profiled(prof)
        p = _recv(pipe, 120, "publisher")
        pub.join(10)
        delivered = sum(m["events"] for m in m1) - sum(m["events"] for m in m0)
        lat = [x for m in m1 for x in m["latencies"]]
        closed: dict[str, int] = {}
        for m in m1:
            for k, v in m["closed"].items():
                closed[str(k)] = closed.get(str(k), 0) + v
        gen_cpu = sum(b["cpu"] - a["cpu"] for a, b in zip(m0, m1, strict=True)) + p["cpu"] * window / max(p["elapsed"], 1e-9)
        out = {
            "rate": rate,
            "offered": rate * n,
            "published": p["sent"] / max(p["elapsed"], 1e-9),
            "pub_errors": p["statuses"] if p["errors"] else {},
            "delivered": delivered / (t1 - t0),
            "deliveries": delivered,
            "server_cpu": (c1 - c0) / (t1 - t0),
            "server_cpu_s": c1 - c0,
            "gen_cpu": gen_cpu / (t1 - t0),
            "server_wait": (w1 - w0) / (t1 - t0),
            "gen_wait": (g1 - g0) / (t1 - t0),
            "lat": lat,
            "acks": p["acks"],
            "closed": closed,
        }
        self.say(f"{server.name} n={n} offered {rate * n:,.0f}/s delivered {out['delivered']:,.0f}/s "
                 f"server {out['server_cpu']:.0%} (waited {out['server_wait']:.0%}) gen {out['gen_cpu']:.0%} "
                 f"(waited {out['gen_wait']:.0%}) closed {closed or '-'}"
                 + (f" publish errors {out['pub_errors']}" if out["pub_errors"] else ""))
        return out

    def fanout(self, server: Server, n: int, rnd: int) -> None:
        sz = self.sizes
        tag = f"fan{n}"
        self.metric(f"{tag}.sat", f"fan-out {n:,} subs: deliveries/s at saturation", "msg/s",
                    target="≥ 4x base" if n >= 1000 else "", check=(lambda o, b: o >= 4 * b) if n >= 1000 else None)
        self.metric(f"{tag}.p50", f"fan-out {n:,} subs: p50 latency at half sat.", "ms", "{:.1f}")
        self.metric(f"{tag}.p99", f"fan-out {n:,} subs: p99 latency at half sat.", "ms", "{:.1f}",
                    target="< 50 ms" if n >= 1000 else "", check=(lambda o, b: o < 50) if n >= 1000 else None)
        self.metric(f"{tag}.ack", f"fan-out {n:,} subs: half sat.: publish ack p50 / p99", "ms", "{}")
        self.metric(f"{tag}.half", f"fan-out {n:,} subs: half sat.: delivered / offered", "%", "{:.0f}")
        self.metric(f"{tag}.hcpu", f"fan-out {n:,} subs: half sat.: server CPU", "% core", "{:.0f}")
        self.metric(f"{tag}.hgen", f"fan-out {n:,} subs: half sat.: generator CPU", "% core", "{:.0f}")
        self.metric(f"{tag}.cpu", f"fan-out {n:,} subs: server CPU s / 1M deliveries", "s", "{:.2f}")
        self.metric(f"{tag}.scpu", f"fan-out {n:,} subs: server CPU at saturation", "% core", "{:.0f}")
        self.metric(f"{tag}.gcpu", f"fan-out {n:,} subs: generator CPU at saturation", "% core", "{:.0f}")
        self.metric(f"{tag}.swait", f"fan-out {n:,} subs: server threads waiting for a CPU", "% time", "{:.0f}")
        channel = f"bench.fan{n}.r{rnd}"
        sample_every = max(1, n // 100)
        workers = self._subscribers(server, n, channel, sample_every, min(sz.sub_procs, n))
        best: dict[str, Any] | None = None
        try:
            target = sz.start_deliveries
            prev = 0.0
            for _ in range(sz.max_steps):
                if target > sz.max_deliveries:
                    break
                r = self._step(server, workers, n, target / n, sz.window, channel)
                if best is None or r["delivered"] > best["delivered"]:
                    best = r
                if r["closed"]:
                    break
                if r["delivered"] < 0.85 * r["offered"] and r["delivered"] < 1.1 * prev:
                    break  # short of the offered rate and no longer rising: saturated
                prev = r["delivered"]
                target *= 2
        finally:
            self._stop(workers)
        assert best is not None
        sat = best["delivered"]
        self.record(f"{tag}.sat", server, sat)
        self.record(f"{tag}.cpu", server, best["server_cpu_s"] / max(best["deliveries"], 1) * 1e6)
        self.record(f"{tag}.scpu", server, best["server_cpu"] * 100)
        self.record(f"{tag}.gcpu", server, best["gen_cpu"] * 100)
        self.record(f"{tag}.swait", server, best["server_wait"] * 100)
        # latency at half the saturation rate, on fresh subscribers and a drained server
        server.wait_quiet()
        channel = f"bench.fan{n}.r{rnd}.lat"
        workers = self._subscribers(server, n, channel, sample_every, min(sz.sub_procs, n))
        try:
            r = self._step(server, workers, n, sat / 2 / n, sz.latency_window, channel)
        finally:
            self._stop(workers)
        self.record(f"{tag}.half", server, r["delivered"] / r["offered"] * 100)
        self.record_text(f"{tag}.ack", server,
                         f"{percentile(r['acks'], 50) * 1000:.1f}/{percentile(r['acks'], 99) * 1000:.1f}")
        self.record(f"{tag}.hcpu", server, r["server_cpu"] * 100)
        self.record(f"{tag}.hgen", server, r["gen_cpu"] * 100)
        self.record(f"{tag}.p50", server, percentile(r["lat"], 50) * 1000)
        self.record(f"{tag}.p99", server, percentile(r["lat"], 99) * 1000)
        server.wait_quiet()

    # -------------------------------------------------------------- ingest
    def ingest(self, server: Server, rnd: int) -> None:
        sz = self.sizes
        c = sz.ingest_concurrency
        self.metric("ingest.rps", f"ingest (github-signed, ~1 KB, c={c}): 2xx/s", "req/s",
                    target="≥ 1x base", check=lambda o, b: o >= b)
        self.metric("ingest.p99", f"ingest (c={c}): p99 latency", "ms", "{:.1f}",
                    target="< 25 ms", check=lambda o, b: o < 25)
        self.metric("ingest.scpu", "ingest: server CPU", "% core", "{:.0f}")
        self.metric("ingest.cpureq", "ingest: server CPU per 2xx request", "ms", "{:.3f}")
        self.metric("ingest.gcpu", "ingest: generator CPU", "% core", "{:.0f}")
        self.metric("ingest.swait", "ingest: server threads waiting for a CPU", "% time", "{:.0f}")
        procs = max(1, min(sz.ingest_procs, c))
        counts = [c // procs + (1 if i < c % procs else 0) for i in range(procs)]
        workers = [spawn(ingest_worker, server.host, server.port, server.hook_path, k, sz.ingest_warm,
                         sz.ingest_seconds, server.github_secret, self.gen_cpus) for k in counts]
        time.sleep(sz.ingest_warm)
        c0, t0, w0 = server.cpu(), time.time(), server.wait()
        prof = self._profiler(server, f"ingest.r{rnd}", sz.ingest_seconds)
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
        self.say(f"{server.name} ingest {ok / sz.ingest_seconds:,.0f}/s p99 {percentile(lat, 99) * 1000:.1f} ms "
                 f"statuses {statuses}")
        if bad:
            self.metrics["ingest.rps"].notes.append(f"{server.name} round {rnd}: non-2xx {bad}")
        if not ok:
            raise RuntimeError(f"no 2xx answers: {statuses}")
        self.record("ingest.rps", server, ok / sz.ingest_seconds)
        self.record("ingest.p99", server, percentile(lat, 99) * 1000)
        self.record("ingest.scpu", server, (c1 - c0) / (t1 - t0) * 100)
        self.record("ingest.cpureq", server, (c1 - c0) / ok * 1000 * sz.ingest_seconds / (t1 - t0))
        self.record("ingest.gcpu", server, sum(r["cpu"] for r in res) / sz.ingest_seconds * 100)
        self.record("ingest.swait", server, (w1 - w0) / (t1 - t0) * 100)
        server.wait_quiet()

    # -------------------------------------------------------------- resume
    def resume(self, server: Server, rnd: int) -> None:
        n = self.sizes.resume_events
        self.metric("resume.s", f"resume: catch up {n:,} events with since", "s", "{:.3f}",
                    target="< 1 s", check=lambda o, b: o < 1)
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
                    target="≤ 16 KiB", check=lambda o, b: o <= 16)
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
            for cls in self.servers:
                server: Server = cls(self.server_cpus, keep=self.keep)
                self._wait_idle()
                self.say(f"round {rnd}: {server.label}")
                try:
                    self.run_server(server, rnd)
                except Exception as e:
                    self.errors.append(f"{server.name}: {e}")
                    self.say(f"FAILED {server.name}: {e}")
                finally:
                    if self.errors and self.keep:
                        self.say(f"{server.name} log kept in {server.workdir}")
                    server.cleanup()

    def run_server(self, server: Server, rnd: int) -> None:
        fresh = self.sizes.fresh_idle
        if {"fanout", "ingest", "resume"} & self.only or not fresh:
            server.start()
            if "fanout" in self.only:
                for n in self.sizes.fanout_subs:
                    self._guard(f"fan-out {n}", server, self.fanout, n, rnd)
            if "ingest" in self.only:
                self._guard("ingest", server, self.ingest, rnd)
            if "resume" in self.only:
                self._guard("resume", server, self.resume, rnd)
        if "idle" in self.only:
            if fresh:
                server.stop()
                server.start()  # a fresh process: nothing else in its heap
            self._guard("idle", server, self.idle, rnd)
        server.stop()

    # --------------------------------------------------------------- table
    def table(self, targets: bool = True) -> str:
        def fmt(m: Metric, v: float | None) -> str:
            return "n/a" if v is None or v != v else m.fmt.format(v)

        def runs(m: Metric, name: str) -> str:
            if m.texts:
                return " / ".join(m.texts.get(name, [])) or "n/a"
            vs = m.values.get(name, [])
            return " / ".join(fmt(m, v) for v in vs) if vs else "n/a"

        def mean(m: Metric, name: str) -> float | None:
            vs = [v for v in m.values.get(name, []) if v is not None and v == v]
            return statistics.fmean(vs) if vs else None

        rows: list[tuple[str, ...]] = [("measure", "unit", "baseline (runs)", "twisted_rt (runs)", "ours/base", "target", "met")]
        for m in self.metrics.values():
            b, o = mean(m, "baseline"), mean(m, "twisted_rt")
            ratio = f"{o / b:.2f}x" if b and o is not None else "n/a"
            if not m.ratio:
                ratio = "-"
            met = ""
            if m.check is not None:
                met = "n/a" if o is None or b is None else ("yes" if m.check(o, b) else "NO")
            rows.append((m.label, m.unit, runs(m, "baseline"), runs(m, "twisted_rt"), ratio, m.target, met))
        if not targets:  # tiny sizes: the targets do not apply
            rows = [r[:5] for r in rows]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a few seconds, to check the instrument")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every figure (default 2)")
    parser.add_argument("--only", default="fanout,ingest,idle,resume",
                        help="comma-separated scenarios: fanout, ingest, idle, resume")
    parser.add_argument("--subs", default="", help="fan-out subscriber counts, e.g. 100,1000")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0 and the generator to the rest")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    parser.add_argument("--write-readme", action="store_true", help="put the table into bench/README.md")
    parser.add_argument("--keep", action="store_true", help="keep the servers' work directories (logs, journal)")
    parser.add_argument("--servers", default="baseline,ours", help="which servers: baseline, ours (default both)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each server's round, wait up to SECONDS for the machine to be < 15%% busy")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the daemon in every measurement window into DIR")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    if args.subs:
        sizes.fanout_subs = tuple(int(x) for x in args.subs.split(","))
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {"fanout", "ingest", "idle", "resume"}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    nofile = raise_nofile()
    if nofile < sizes.idle_conns + 1000 and "idle" in only:
        print(f"warning: open-file limit {nofile} is low for {sizes.idle_conns} connections", file=sys.stderr)
    bench = Bench(sizes, args.rounds, only, pin=not args.no_pin, verbose=not args.quiet, keep=args.keep,
                  profile=Path(args.profile) if args.profile else None)
    bench.servers = [{"baseline": Baseline, "ours": Ours}[x.strip()] for x in args.servers.split(",")]
    bench.wait_idle = args.wait_idle
    started = time.time()
    bench.run()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    load = os.getloadavg()
    pin = (f"server pinned to CPU {bench.server_cpus}, load generator to CPU {bench.gen_cpus}"
           if bench.server_cpus else "no CPU pinning")
    head = [
        f"twisted_rt bench{' --quick' if args.quick else ''}: {when}, {time.time() - started:.0f} s",
        f"machine: {machine()}",
        f"{pin}; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]
    table = bench.table(targets=not args.quick)
    notes = [n for m in bench.metrics.values() for n in m.notes]
    gen_cores = len(bench.gen_cpus) if bench.gen_cpus else (os.cpu_count() or 1)
    for m in bench.metrics.values():
        if m.unit == "% core" and "generator" in m.label:
            for name, vs in m.values.items():
                if any(v is not None and v >= 85 * gen_cores for v in vs):
                    notes.append(f"{name}: {m.label}: the generator was near its CPU limit; that figure is a lower bound")
    text = "\n".join(head) + "\n\n" + table + "\n"
    if notes or bench.errors:
        text += "\n" + "\n".join(f"note: {n}" for n in notes + bench.errors) + "\n"
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"when": when, "machine": machine(), "quick": args.quick,
             "metrics": {k: {"label": m.label, "unit": m.unit, "values": m.values, "texts": m.texts}
                         for k, m in bench.metrics.items()},
             "errors": bench.errors}, indent=2))
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

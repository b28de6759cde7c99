"""
The two servers under test, each started as its own process the way its
users would start it, optionally pinned to a set of CPUs.

  - L{Ours}: C{twistd -n --pidfile= rt --config bench/bench.toml --listen
    tcp:<port>:interface=127.0.0.1} in a fresh directory (durable journal
    under C{var/} there);
  - L{Baseline}: C{python -m bench.baseline --port <port>}.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

import psutil  # type: ignore[import-untyped]

__all__ = ["BENCH_DIR", "Baseline", "Ours", "Server", "free_port", "sched_wait"]

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sched_wait(pid: int) -> float:
    """
    Seconds the threads of C{pid} spent runnable but waiting for a CPU
    (C{/proc/<pid>/task/*/schedstat}, second field): how much the machine's
    other load held this process back.  0.0 where unavailable.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        return 0.0
    return total / 1e9


class Server:
    """A server process on a free loopback port."""

    name = "server"
    label = "server"

    def __init__(self, cpus: list[int] | None = None, keep: bool = False) -> None:
        self.cpus = cpus
        self.keep = keep
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"rt-bench-{self.name}-"))
        self.api_key = secrets.token_hex(16)
        self.github_secret = secrets.token_hex(16)
        self._ps: psutil.Process | None = None

    # what the generator needs to know
    host = "127.0.0.1"
    ws_path = "/ws"
    publish_path = "/api/publish"
    hook_path = "/hooks/github"

    @property
    def publish_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1")

    def start(self) -> Server:
        """Start on a new free port and wait until C{/healthz} answers."""
        self.port = free_port()
        cpus = self.cpus
        preexec: Callable[[], None] | None = None
        if cpus:
            def preexec() -> None:
                os.sched_setaffinity(0, cpus)
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=self.env(), stdout=log,
                                     stderr=subprocess.STDOUT, preexec_fn=preexec)
        log.close()
        self._ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 60
        url = f"http://{self.host}:{self.port}/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not come up:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return (self.workdir / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def cpu(self) -> float:
        """CPU seconds used so far (all threads)."""
        assert self._ps is not None
        t = self._ps.cpu_times()
        return float(t.user + t.system)

    def wait(self) -> float:
        """Seconds spent runnable but not running, so far (see L{sched_wait})."""
        return sched_wait(self.proc.pid) if self.proc is not None else 0.0

    def rss(self) -> int:
        """Resident memory in bytes."""
        assert self._ps is not None
        return int(self._ps.memory_info().rss)

    def wait_quiet(self, below: float = 0.15, timeout: float = 30) -> None:
        """Wait until the server uses less than C{below} of a core (backlogs drained)."""
        deadline = time.monotonic() + timeout
        last = self.cpu()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.cpu()
            if (now - last) / 0.2 < below:
                return
            last = now

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; remove the work directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Ours(Server):
    """twisted_rt, as users run it."""

    name = "twisted_rt"
    label = "twisted_rt"

    def command(self) -> list[str]:
        return [str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--config", str(BENCH_DIR / "bench.toml"),
                "--listen", f"tcp:{self.port}:interface=127.0.0.1"]

    def env(self) -> dict[str, str]:
        return dict(super().env(), RT_BENCH_API_KEY=self.api_key, RT_BENCH_GITHUB_SECRET=self.github_secret)


class Baseline(Server):
    """The plain Autobahn broadcast server of C{bench/baseline.py}."""

    name = "baseline"
    label = "baseline (plain Autobahn)"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.baseline", "--port", str(self.port)]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

"""
The servers under test, each started as its own process the way its users
would start it, optionally pinned to a set of CPUs.

  - L{Ours}: C{twistd -n --pidfile= rt --config bench/bench.toml --listen
    tcp:<port>:interface=127.0.0.1} in a fresh directory (durable journal
    under C{var/} there);
  - L{Baseline}: C{python -m bench.baseline --port <port>};
  - L{NchanNoDelay}: the same nginx + nchan with C{TCP_NODELAY} set on
    its subscribers' sockets, as twisted_rt's (and Autobahn's) are;
  - L{Nchan}: Debian's C{nginx} with C{libnginx-mod-nchan}, in the
    foreground from a fresh directory (C{nginx -p DIR -c DIR/nginx.conf}),
    with the config made from C{bench/nchan.conf}; L{install_nchan} puts
    the two packages on the machine with C{apt-get} when they are missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, ClassVar

import psutil  # type: ignore[import-untyped]

__all__ = [
    "BENCH_DIR",
    "NCHAN_PACKAGES",
    "Baseline",
    "Nchan",
    "NchanNoDelay",
    "Ours",
    "Server",
    "free_port",
    "install_nchan",
    "nchan_missing",
    "sched_wait",
    "set_nodelay",
]

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BIN = Path(sys.executable).parent


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when the bench goes, however it goes (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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
    # which scenarios this server takes part in
    scenarios: ClassVar[frozenset[str]] = frozenset({"fanout", "batched", "ingest", "idle", "resume"})
    # True: after the upgrade a subscriber sends {"op":"subscribe"} and waits for "subscribed";
    # False: the channel is in the URL and the subscription starts with the 101
    ws_subscribe: ClassVar[bool] = True
    # "api": POST {"channel","data"} (the server builds the event frame);
    # "frame": POST the frame itself (nchan relays the body as it is)
    publish_form: ClassVar[str] = "api"

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
    ingest_publish_path = "/api/publish"  # the single-event ingest line's target

    def ws_target(self, channel: str) -> str:
        """The WebSocket path a subscriber of C{channel} opens."""
        return self.ws_path

    def publish_target(self, channel: str) -> str:
        """The path a publisher to C{channel} POSTs to."""
        return self.publish_path

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
        return self._launch()

    def _launch(self) -> Server:
        cpus = self.cpus

        def preexec() -> None:
            _die_with_parent()
            if cpus:
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
        """CPU seconds used so far (all threads, and any child processes)."""
        assert self._ps is not None
        t = self._ps.cpu_times()
        total = float(t.user + t.system)
        try:
            for child in self._ps.children(recursive=True):
                c = child.cpu_times()
                total += float(c.user + c.system)
        except psutil.Error:
            pass
        return total

    def wait(self) -> float:
        """Seconds spent runnable but not running, so far (see L{sched_wait})."""
        if self.proc is None:
            return 0.0
        total = sched_wait(self.proc.pid)
        if self._ps is not None:
            try:
                total += sum(sched_wait(c.pid) for c in self._ps.children(recursive=True))
            except psutil.Error:
                pass
        return total

    def rss(self) -> int:
        """Resident memory in bytes (with any child processes)."""
        assert self._ps is not None
        total = int(self._ps.memory_info().rss)
        try:
            total += sum(int(c.memory_info().rss) for c in self._ps.children(recursive=True))
        except psutil.Error:
            pass
        return total

    def subscribers_ready(self) -> None:
        """Called once a round of subscribers is connected (see L{NchanNoDelay})."""

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
    # the single-event ingest line is measured against the bare POST resource
    ingest_publish_path = "/hooks/publish"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.baseline", "--port", str(self.port)]

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env


# ------------------------------------------------------------------ nchan

NCHAN_PACKAGES = ("nginx", "libnginx-mod-nchan")
_MODULE_DIRS = (Path("/usr/lib/nginx/modules"), Path("/usr/share/nginx/modules"))
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def _nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def _nchan_module() -> Path | None:
    for d in _MODULE_DIRS:
        if (d / "ngx_nchan_module.so").exists():
            return d / "ngx_nchan_module.so"
    return None


def nchan_missing() -> str | None:
    """Why the nchan baseline cannot run on this machine now, or C{None} when it can."""
    if _nginx_binary() is None:
        return "nginx is not installed"
    if _nchan_module() is None:
        return "nginx is installed but not libnginx-mod-nchan (no ngx_nchan_module.so)"
    return None


def install_nchan(say: Callable[[str], None]) -> str | None:
    """
    Install Debian's C{nginx} and C{libnginx-mod-nchan} with C{apt-get}
    (C{apt-get update} first) when they are missing.  Returns C{None} when
    they are there afterwards, else why not (the caller goes on without the
    nchan lines).  As root only (no sudo is tried).  While it installs, a
    C{policy-rc.d} that answers 101 keeps the packaged nginx service from
    starting on port 80 (only when the machine has none of its own).
    """
    why = nchan_missing()
    if why is None:
        return None
    if shutil.which("apt-get") is None:
        return f"{why}, and there is no apt-get here to install {' and '.join(NCHAN_PACKAGES)}"
    if os.geteuid() != 0:
        return f"{why}; not root, so not installing: apt-get install {' '.join(NCHAN_PACKAGES)} as root"
    say(f"{why}: installing Debian's {' and '.join(NCHAN_PACKAGES)} with apt-get (apt-get update first)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    created = False
    try:
        if not _POLICY_RC_D.exists():
            _POLICY_RC_D.write_text("#!/bin/sh\n# written by python -m bench while it installs nginx\nexit 101\n")
            _POLICY_RC_D.chmod(0o755)
            created = True
        for cmd in (["apt-get", "-q", *lock, "update"],
                    ["apt-get", "-q", "-y", *lock, "install", "--no-install-recommends", *NCHAN_PACKAGES]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                return f"{' '.join(cmd)} exited {r.returncode}: {' | '.join(tail)}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get failed: {e}"
    finally:
        if created:
            _POLICY_RC_D.unlink(missing_ok=True)
    why = nchan_missing()
    if why is None:
        say(f"installed {' and '.join(NCHAN_PACKAGES)}")
    return None if why is None else f"after apt-get install: {why}"


class Nchan(Server):
    """
    nginx + nchan, the C pub/sub server: nginx in the foreground (C{daemon
    off}) with one worker process, from a fresh directory, with the config of
    C{bench/nchan.conf}; its CPU, memory and run-queue wait are the master's
    and the worker's together.  It relays each POSTed body to the channel's
    WebSocket subscribers as one text frame, so the publisher POSTs the very
    frame twisted_rt would deliver (same JSON, same C{data.ts}).
    """

    name = "nchan"
    label = "nginx + nchan (C)"
    scenarios: ClassVar[frozenset[str]] = frozenset({"fanout", "idle"})
    ws_subscribe: ClassVar[bool] = False
    publish_form: ClassVar[str] = "frame"

    @property
    def publish_headers(self) -> dict[str, str]:
        return {}

    def ws_target(self, channel: str) -> str:
        return "/ws?channel=" + urllib.parse.quote(channel, safe="")

    def publish_target(self, channel: str) -> str:
        return "/api/publish?channel=" + urllib.parse.quote(channel, safe="")

    def config(self) -> str:
        """C{bench/nchan.conf} with this run's port, directory and module path."""
        module = _nchan_module()
        if module is None:
            raise RuntimeError(nchan_missing() or "no nchan module")
        text = (BENCH_DIR / "nchan.conf").read_text()
        for key, value in (("@MODULE@", str(module)), ("@DIR@", str(self.workdir)), ("@PORT@", str(self.port))):
            text = text.replace(key, value)
        return text

    def start(self) -> Server:
        why = nchan_missing()
        if why is not None:
            raise RuntimeError(why)
        self.port = free_port()
        (self.workdir / "tmp").mkdir(exist_ok=True)
        (self.workdir / "nginx.conf").write_text(self.config())
        return self._launch()

    def command(self) -> list[str]:
        nginx = _nginx_binary()
        assert nginx is not None
        return [nginx, "-p", f"{self.workdir}/", "-c", str(self.workdir / "nginx.conf"), "-e", "stderr"]


#: pidfd_getfd(2) (Linux 5.6): the same number on every architecture
_SYS_PIDFD_GETFD = 438


def set_nodelay(pid: int, value: bool = True) -> int:
    """
    Set C{TCP_NODELAY} on every connected TCP socket of process C{pid}, from
    outside (C{pidfd_getfd} gives a duplicate of each descriptor; a socket
    option set on it is the socket's).  Needs the right to ptrace C{pid} (a
    child of the bench, or root).  How many sockets it set.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    done = 0
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue  # closed meanwhile
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err == errno.EBADF:
                    continue  # closed meanwhile
                raise OSError(err, f"pidfd_getfd on {pid}: {os.strerror(err)}")
            sock = socket.socket(fileno=fd)
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                    sock.getpeername()  # connected (not the listener)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(value))
                    done += 1
            except OSError:
                pass
            finally:
                sock.close()  # the duplicate only
    finally:
        os.close(pidfd)
    return done


class NchanNoDelay(Nchan):
    """
    L{Nchan} with C{TCP_NODELAY} on its subscribers' sockets: the like-for-like
    line for the per-delivery figures.  nginx leaves Nagle's algorithm on for
    nchan's WebSocket subscribers (its C{tcp_nodelay} is for keep-alive HTTP;
    nchan has no directive for it), while twisted_rt, like Autobahn and
    twisted.web, sets C{TCP_NODELAY}.  With Nagle a frame written while the
    previous one is unacknowledged waits in the kernel and leaves when the
    ACK comes in: on loopback the generator's ACK pushes it, on the
    generator's core, so part of the sending is not counted as nchan's.
    Only the fan-out with one event per request (the per-delivery figures).
    """

    name = "nchan_nodelay"
    label = "nginx + nchan (C), TCP_NODELAY"
    scenarios: ClassVar[frozenset[str]] = frozenset({"fanout"})

    def subscribers_ready(self) -> None:
        assert self._ps is not None
        done = sum(set_nodelay(p.pid) for p in [self._ps, *self._ps.children(recursive=True)])
        if not done:
            raise RuntimeError("could not set TCP_NODELAY on any of nchan's sockets")

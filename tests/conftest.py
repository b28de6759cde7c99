"""
Shared fixtures: the real daemon as a subprocess on a free loopback port,
and a real redis-server.

The daemon is started exactly as users start it (``twistd -n rt --config``)
in a temporary working directory; its log is kept in that directory and
printed when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHARED_DATA = ROOT.parent / "shared" / "data"
ARTIFACTS = ROOT / "test-artifacts"

API_KEY = "test-api-key-0123456789"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(
    method: str,
    url: str,
    body: bytes | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    """A plain blocking HTTP request: (status, headers, body); never raises on 4xx/5xx."""
    data: bytes | None
    hdrs = dict(headers or {})
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    else:
        data = body
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 10) -> tuple[int, Any]:
    """Like L{http}, with the answer parsed as JSON."""
    status, _, raw = http(method, url, body, headers, timeout)
    return status, json.loads(raw) if raw else None


class Daemon:
    """A twisted_rt daemon run by ``twistd -n rt`` in its own directory."""

    def __init__(self, workdir: Path, config: str = "", env: dict[str, str] | None = None,
                 port: int | None = None, extra_args: list[str] | None = None,
                 runner: str = "twistd") -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_text = config
        self.env = dict(env or {})
        self.extra_args = list(extra_args or [])
        self.runner = runner
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "daemon.log"
        self.config_path = workdir / "twisted-rt.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def command(self) -> list[str]:
        self.config_path.write_text(self.config_text)
        if self.runner == "twist":
            cmd = [str(BIN / "twist"), "rt"]
        else:
            cmd = [str(BIN / "twistd"), "-n", "--pidfile=", "rt"]
        return [*cmd, "--config", str(self.config_path),
                "--listen", f"tcp:{self.port}:interface=127.0.0.1", *self.extra_args]

    def start(self, wait: bool = True, ready_path: str = "/healthz") -> Daemon:
        env = {**os.environ, **self.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_up(ready_path)
        return self

    def wait_up(self, path: str = "/healthz", timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, _ = http("GET", self.url + path, timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not come up:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:  # kw: headers, timeout
        return http_json("GET", self.url + path, **kw)

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return http_json("POST", self.url + path, body, headers)

    def publish(self, channel: str, data: Any, **extra: Any) -> tuple[int, Any]:
        return self.post("/api/publish", {"channel": channel, "data": data, **extra},
                         {"Authorization": f"Bearer {API_KEY}"})


DEFAULT_CONFIG = f"""
[journal]
path = "var/journal.sqlite3"

[auth]
api_keys = ["{API_KEY}"]
jwt_secret = "{JWT_SECRET}"
anonymous_subscribe = ["public.>"]
"""


@pytest.fixture
def make_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """A factory of started daemons (stopped at the end; logs printed on failure)."""
    started: list[Daemon] = []

    def make(config: str = DEFAULT_CONFIG, env: dict[str, str] | None = None, start: bool = True,
             name: str | None = None, **kw: Any) -> Daemon:
        d = Daemon(tmp_path / (name or f"d{len(started)}"), textwrap.dedent(config), env, **kw)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        try:
            d.stop()
        except Exception:
            d.kill()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for d in started:
            sys.stderr.write(f"\n----- daemon log {d.workdir} -----\n{d.log()[-6000:]}\n")


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    """One daemon with the default test config (API key, JWT secret, anonymous public.>)."""
    return make_daemon()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)


class RedisServer:
    """A redis-server on a free loopback port, no persistence (subclasses may change C{persistence})."""

    persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", *self.persistence,
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test (skipped only when none is installed outside CI)."""
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (tests/run installs it)")
        pytest.skip("redis-server is not installed")
    r = RedisServer(tmp_path / "redis").start()
    yield r
    r.stop()

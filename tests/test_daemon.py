"""The daemon as users launch it: twistd/twist plugin, options, defaults, lifecycle, logging, packaging."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from conftest import BIN, ROOT, Daemon, free_port, http, http_json

from twisted_rt.tap import Options


def test_options_defaults_are_the_contract() -> None:
    """With no options the plugin serves tcp:8080 with its journal under ./var/."""
    o = Options()
    o.parseOptions([])
    cfg = o["rtconfig"]
    assert cfg.server.listen == ("tcp:8080",)
    assert cfg.journal.path == "var/journal.sqlite3"


def test_options_listen_repeatable_and_journal_override() -> None:
    """--listen (repeatable) replaces [server] listen and --journal replaces [journal] path."""
    o = Options()
    o.parseOptions(["--listen", "tcp:1234", "--listen", "unix:/tmp/rt.sock", "--journal", ":memory:"])
    assert o["rtconfig"].server.listen == ("tcp:1234", "unix:/tmp/rt.sock")
    assert o["rtconfig"].journal.path == ":memory:"


def test_options_refuse_bad_listen_with_one_line() -> None:
    """A bad --listen endpoint string stops option parsing with one line naming it."""
    o = Options()
    with pytest.raises(SystemExit) as e:
        o.parseOptions(["--listen", "tcp:port"])
    assert "server.listen[0]: bad endpoint 'tcp:port'" in str(e.value)


def test_no_config_serves_with_journal_under_var(tmp_path: Path) -> None:
    """`twistd -n rt` without a config answers /healthz and /readyz and keeps its journal in ./var/."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--listen", f"tcp:{port}:interface=127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        d = Daemon(tmp_path, port=port)
        d.proc = proc  # type: ignore[assignment]
        d.wait_up("/readyz")
        assert http_json("GET", d.url + "/healthz") == (200, {"status": "ok"})
        assert (tmp_path / "var" / "journal.sqlite3").exists()
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_twist_runner_starts_it(make_daemon: Callable[..., Daemon]) -> None:
    """`twist rt --config ...` (Twisted's newer runner) starts the same daemon."""
    d = make_daemon(runner="twist")
    assert d.get("/readyz") == (200, {"status": "ready"})


def test_several_listeners_and_memory_journal(make_daemon: Callable[..., Daemon]) -> None:
    """Repeated --listen serves on every endpoint; --journal :memory: works."""
    other = free_port()
    d = make_daemon(extra_args=["--listen", f"tcp:{other}:interface=127.0.0.1", "--journal", ":memory:"])
    assert d.get("/readyz")[0] == 200
    assert http_json("GET", f"http://127.0.0.1:{other}/readyz")[0] == 200
    assert not (d.workdir / "var").exists()


def test_json_errors_for_unknown_routes_and_methods(daemon: Daemon) -> None:
    """Unknown paths are a JSON 404 and wrong methods a JSON 405 with Allow."""
    status, body = daemon.get("/no/such/route")
    assert status == 404 and body["error"] == "not_found" and body["message"]
    status, headers, raw = http("DELETE", daemon.url + "/healthz")
    assert status == 405 and headers["allow"] == "GET"
    assert json.loads(raw)["error"] == "method_not_allowed"


def test_sigterm_stops_cleanly_and_flushes(daemon: Daemon) -> None:
    """SIGTERM: listeners close, the journal is checkpointed and closed, the process exits 0."""
    assert daemon.get("/readyz")[0] == 200
    assert daemon.stop() == 0
    log = daemon.log()
    assert "stopping: no new connections" in log and "stopped" in log
    wal = daemon.workdir / "var" / "journal.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.port), timeout=1).close()


def test_port_in_use_fails_start_with_one_line(tmp_path: Path) -> None:
    """A listener that cannot bind stops the daemon with exit 1 and a line saying which endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--journal", ":memory:",
                            "--listen", f"tcp:{port}:interface=127.0.0.1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"twisted-rt: cannot listen on tcp:{port}:interface=127.0.0.1" in r.stderr


def test_corrupt_journal_makes_readyz_503(make_daemon: Callable[..., Daemon]) -> None:
    """A journal file that cannot be used: /healthz 200 but /readyz 503 naming the journal."""
    d = make_daemon(start=False)
    (d.workdir / "var").mkdir(parents=True)
    (d.workdir / "var" / "journal.sqlite3").write_bytes(b"garbage" * 1000)
    d.start()
    assert d.get("/healthz")[0] == 200
    status, body = d.get("/readyz")
    assert status == 503 and body["error"] == "not_ready" and "journal" in body["message"]


def test_json_log_format(make_daemon: Callable[..., Daemon]) -> None:
    """--log-format json writes one JSON object per log line, with request lines among them."""
    d = make_daemon(extra_args=["--log-format", "json"])
    d.get("/healthz")
    d.stop()
    lines = [ln for ln in d.log().splitlines() if ln.startswith("{")]
    events = [json.loads(ln) for ln in lines]
    assert any(e.get("log_category") == "RT-ACCESS" and e.get("uri") == "/healthz" for e in events)
    assert any(e.get("log_category") == "RT-S11" for e in events)
    late = d.log().split('"RT-S02"', 1)[1]
    assert all(ln.startswith("{") for ln in late.splitlines()[1:] if ln.strip())


def test_text_log_has_one_line_per_request(daemon: Daemon) -> None:
    """The default log has one readable line per request with method, path, status and time."""
    daemon.get("/healthz")
    time.sleep(0.2)
    assert any("GET /healthz 200" in ln and "ms" in ln for ln in daemon.log().splitlines())


def test_wheel_ships_the_plugin(tmp_path: Path) -> None:
    """A plain (non-editable) install carries twisted/plugins/twisted_rt_plugin.py, and twistd finds `rt` from it alone."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "w"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    [wheel] = list((tmp_path / "w").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/twisted_rt_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = (
        "import sys; sys.path[:] = [sys.argv[1], sys.argv[2]] + [p for p in sys.path if 'site-packages' not in p "
        "and p != sys.argv[3]];"
        "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
        "import twisted_rt; assert twisted_rt.__file__.startswith(sys.argv[1]), twisted_rt.__file__;"
        "print([p.tapname for p in getPlugins(IServiceMaker)])"
    )
    r = subprocess.run([sys.executable, "-S", "-c", code, str(target), site, str(ROOT)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "'rt'" in r.stdout


def test_sigterm_lets_in_flight_requests_finish(daemon: Daemon) -> None:
    """A long-poll in flight when SIGTERM arrives is answered (not cut) before the process exits 0."""
    import threading

    answers: list[tuple[int, object]] = []

    def poll() -> None:
        answers.append(daemon.get("/poll?channel=public.x&since=0&timeout=30", timeout=30))

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert daemon.stop() == 0
    t.join(10)
    assert answers and answers[0][0] == 200, answers
    assert time.monotonic() - started < 15


def test_unsupported_methods_are_json_405_everywhere(daemon: Daemon) -> None:
    """Even routes built on plain twisted.web resources answer an unknown method with JSON 405 and Allow."""
    for method, path in (("TRACE", "/"), ("DELETE", "/client.js"), ("PUT", "/api/publish")):
        status, headers, raw = http(method, daemon.url + path)
        assert status == 405, (method, path, status)
        assert headers.get("allow")
        assert json.loads(raw)["error"] == "method_not_allowed"


SOCKET_ACTIVATION = (
    "import os, sys; "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
    "os.environ['LISTEN_FDNAMES'] = 'twisted-rt.socket'; "
    "fd = int(sys.argv[1]); (os.dup2(fd, 3), os.close(fd)) if fd != 3 else None; os.set_inheritable(3, True); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def test_systemd_socket_activation(tmp_path: Path) -> None:
    """With a socket handed over as systemd does (LISTEN_FDS, fd 3), `--listen systemd:domain=INET:index=0` serves on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        port = s.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-c", SOCKET_ACTIVATION, str(s.fileno()), str(BIN / "twistd"), "-n", "--pidfile=",
             "rt", "--journal", ":memory:", "--listen", "systemd:domain=INET:index=0"],
            pass_fds=[s.fileno()], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        d = Daemon(tmp_path, port=port)
        d.proc = proc  # type: ignore[assignment]
        d.wait_up("/readyz")
        assert http_json("GET", d.url + "/healthz") == (200, {"status": "ok"})
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_systemd_endpoint_without_socket_is_one_line(tmp_path: Path) -> None:
    """`--listen systemd:…` outside socket activation stops the start with one line saying systemd passed no socket."""
    r = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--journal", ":memory:",
                        "--listen", "systemd:domain=INET:index=0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "twisted-rt: cannot listen on systemd:domain=INET:index=0: systemd passed no such socket" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_tokens_never_reach_the_log(make_daemon: Callable[..., Daemon]) -> None:
    """A ?token= (and other secret query parameters) is written token=REDACTED in text and JSON logs, whatever the route."""
    from conftest import API_KEY

    secret_meta = "meta-verify-secret-xyz"
    for fmt in ("text", "json"):
        d = make_daemon(extra_args=["--log-format", fmt], name=f"log-{fmt}")
        d.get(f"/poll?channel=public.a&timeout=0&token={API_KEY}")
        d.get(f"/sse?channel=a..b&token={API_KEY}")  # a 400
        d.get(f"/no/such/route?x=1&access_token={API_KEY}")
        d.get(f"/hooks/nothing?hub.verify_token={secret_meta}&hub.challenge=1")
        d.get(f"/poll?channel=public.a&timeout=0&To%6Ben={API_KEY}")  # an encoded name
        d.stop()
        log = d.log()
        assert API_KEY not in log and secret_meta not in log, fmt
        assert "token=REDACTED" in log and "access_token=REDACTED" in log and "hub.verify_token=REDACTED" in log
        assert "channel=public.a&timeout=0&token=REDACTED" in log


def test_unit_redact_uri() -> None:
    """redact_uri replaces only secret query values and keeps the rest byte for byte."""
    from twisted_rt.core.logs import redact_uri

    assert redact_uri(b"/sse?channel=a&token=abc&since=1") == "/sse?channel=a&token=REDACTED&since=1"
    assert redact_uri(b"/p?to%6Ben=s&TOKEN=t&x_token&api_key=k") == "/p?to%6Ben=REDACTED&TOKEN=REDACTED&x_token=REDACTED&api_key=REDACTED"
    assert redact_uri(b"/healthz") == "/healthz"
    assert redact_uri(b"/a?tokenizer=1&monkey=2") == "/a?tokenizer=1&monkey=2"
    assert redact_uri(b"/a?\xff=1&token=\xfe") == "/a?\ufffd=1&token=REDACTED"
    # Pusher's HTTP API signs the query: the signature is replayable for 600 s
    assert (redact_uri(b"/apps/1/channels?auth_key=k&auth_timestamp=1&auth_signature=ab12")
            == "/apps/1/channels?auth_key=k&auth_timestamp=1&auth_signature=REDACTED")


# -- process-wide policy: the entry point's, never the service's -------------


def _process_settings() -> tuple[object, ...]:
    """Everything an RTService must leave alone: GC, switch interval, log observers."""
    import gc

    from twisted_rt.core import logs

    return (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled(), sys.getswitchinterval(), list(logs._installed))


def _inprocess_config(*listen: str) -> Any:
    from twisted_rt.core.config import Config, JournalConfig, ServerConfig, SourceConfig

    return Config(
        server=ServerConfig(listen=listen, shutdown_timeout_seconds=1),
        journal=JournalConfig(path=":memory:"),
        sources=(SourceConfig(name="open", verify="none", channel="open"),),
        log_format="json",
    )


@pytest_twisted.ensureDeferred
async def test_inprocess_service_changes_no_process_setting() -> None:
    """Building, starting (listening, READY) and stopping an RTService in-process leaves GC, switch interval and logging as they were."""
    from twisted.internet import reactor

    from twisted_rt.service import RTService

    before = _process_settings()
    service = RTService(_inprocess_config("tcp:0:interface=127.0.0.1"), reactor)  # type: ignore[arg-type]
    ready: list[bool] = []
    service.on_ready(lambda: ready.append(True))
    service.startService()
    assert service._started is not None
    await service._started
    assert ready == [True] and len(service.ports) == 1 and service.start_failure is None
    assert _process_settings() == before
    await service.stopService()
    assert _process_settings() == before and reactor.running


@pytest_twisted.ensureDeferred
async def test_inprocess_failed_start_only_reports() -> None:
    """A listener that cannot bind, in-process: on_fatal hooks get the one line; the reactor keeps running, nothing exits."""
    from twisted.internet import reactor

    from twisted_rt.service import RTService

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        service = RTService(_inprocess_config(f"tcp:{port}:interface=127.0.0.1"), reactor)  # type: ignore[arg-type]
        fatal: list[str] = []
        service.on_fatal(fatal.append)
        service.startService()
        assert service._started is not None
        await service._started
    assert fatal == [f"cannot listen on tcp:{port}:interface=127.0.0.1: {fatal[0].split(': ', 1)[1]}"]
    assert "Address already in use" in fatal[0] and service.start_failure == fatal[0] and reactor.running
    await service.stopService()


def test_options_tuning_defaults_are_documented() -> None:
    """--switch-interval 0.0005, --gc-threshold 10000 and the GC freeze are the defaults, and --help names them."""
    from twisted_rt.tap import GC_THRESHOLD, GIL_SWITCH_INTERVAL, Tuning

    o = Options()
    o.parseOptions([])
    assert Tuning.from_options(o) == Tuning(0.0005, 10000, True) == Tuning()
    assert (GIL_SWITCH_INTERVAL, GC_THRESHOLD) == (0.0005, 10000)
    o = Options()
    o.parseOptions(["--switch-interval", "0", "--gc-threshold", "0", "--no-gc-freeze"])
    assert Tuning.from_options(o) == Tuning(0.0, 0, False)
    assert Tuning.from_options({}) == Tuning()  # makeService called without postOptions
    usage = str(Options())
    assert "--switch-interval=" in usage and "[default: 0.0005]" in usage
    assert "--gc-threshold=" in usage and "[default: 10000]" in usage and "--no-gc-freeze" in usage


@pytest.mark.parametrize("args", [["--switch-interval", "x"], ["--switch-interval", "2"],
                                  ["--switch-interval", "nan"], ["--gc-threshold", "-1"], ["--gc-threshold", "1.5"]])
def test_options_refuse_bad_tuning(args: list[str]) -> None:
    """A switch interval outside 0..1 s or a negative or non-integer GC threshold is a usage error."""
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError):
        Options().parseOptions(args)


class _Hooks:
    """Just the hook registry of an RTService (and its config)."""

    def __init__(self, log_format: str = "text") -> None:
        from twisted_rt.core.config import Config

        self.config = Config(log_format=log_format)
        self.starting: list[Callable[[], object]] = []
        self.ready: list[Callable[[], object]] = []

    def on_starting(self, hook: Callable[[], object]) -> None:
        self.starting.append(hook)

    def on_ready(self, hook: Callable[[], object]) -> None:
        self.ready.append(hook)


def test_tune_sets_the_process_policy_at_start_and_once_listening(monkeypatch: pytest.MonkeyPatch) -> None:
    """tap.tune: the switch interval when the service starts; gc.collect, gc.freeze and the threshold once it listens."""
    import gc

    from twisted_rt import tap

    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: calls.append(("switch", v)))
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(("collect", a)) or 0)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(("freeze", ())))
    monkeypatch.setattr(gc, "set_threshold", lambda *a: calls.append(("threshold", a)))
    monkeypatch.setattr(gc, "get_threshold", lambda: (700, 10, 10))

    service = _Hooks()
    tap.tune(service, tap.Tuning())  # type: ignore[arg-type]
    assert calls == []  # building sets nothing
    [starting], [ready] = service.starting, service.ready
    starting()
    assert calls == [("switch", 0.0005)]
    ready()
    assert calls[1:] == [("collect", ()), ("freeze", ()), ("threshold", (10000, 10, 10))]

    calls.clear()
    service = _Hooks()
    tap.tune(service, tap.Tuning(switch_interval=0, gc_threshold=0, gc_freeze=False))  # type: ignore[arg-type]
    for hook in service.starting + service.ready:
        hook()
    assert calls == []


def test_tune_installs_json_logging_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON logging (which replaces twistd's global log observers) is installed by tap's start hook, for log_format json only."""
    from twisted_rt import tap
    from twisted_rt.core import logs

    installed: list[bool] = []
    monkeypatch.setattr(logs, "use_json_logging", lambda: installed.append(True))
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: None)
    for fmt in ("text", "json"):
        service = _Hooks(fmt)
        tap.tune(service, tap.Tuning())  # type: ignore[arg-type]
        service.starting[0]()
    assert installed == [True]


def test_exit_on_fatal_stops_the_reactor_then_exits_1(monkeypatch: pytest.MonkeyPatch,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """tap.exit_on_fatal: the line on the real stderr, the reactor stopped (or stopped once running), os._exit(1) after shutdown."""
    import os

    from twisted.internet.testing import MemoryReactor

    from twisted_rt.tap import exit_on_fatal

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    reactor = MemoryReactor()
    exit_on_fatal(reactor)("cannot listen on tcp:1: no")
    assert "twisted-rt: cannot listen on tcp:1: no\n" in capfd.readouterr().err
    assert not reactor.hasStopped
    assert reactor.whenRunningHooks == [(reactor.stop, (), {})]  # not running yet: stops once it runs
    [(leave, args, kw)] = reactor.triggers["after"]["shutdown"]
    assert exits == []
    leave(*args, **kw)
    assert exits == [1]

    running = MemoryReactor()
    running.running = True
    exit_on_fatal(running)("start failed: boom")
    assert running.hasStopped and running.whenRunningHooks == [] and len(running.triggers["after"]["shutdown"]) == 1


def test_make_service_registers_the_process_policy() -> None:
    """tap.makeService gives the service the tuning, the exit-1-on-fatal and the clean-exit hooks; building it sets nothing."""
    from twisted_rt.tap import makeService

    o = Options()
    o.parseOptions(["--journal", ":memory:"])
    before = _process_settings()
    service = makeService(o)
    assert _process_settings() == before
    assert len(service._starting) == len(service._ready) == len(service._stopped) == len(service._fatal_hooks) == 1


def test_every_package_is_listed_for_a_non_editable_install() -> None:
    """setup.cfg's packages name every directory of twisted_rt with an __init__.py (pip install . ships them all)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "twisted_rt").rglob("__init__.py")
    }
    assert on_disk <= listed, sorted(on_disk - listed)

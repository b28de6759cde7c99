# -*- test-case-name: tests.test_daemon -*-
"""
The C{rt} plugin for C{twistd} and C{twist}: command-line options and
L{makeService}.

A bad config stops the start here, before any service exists, with one
line on stderr naming the key and the problem, and exit status 1.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, cast

from twisted.internet.interfaces import IReactorCore
from twisted.python import usage

from twisted_rt.checks import check, load
from twisted_rt.core.config import Config, ConfigError

if TYPE_CHECKING:
    from twisted_rt.service import RTService

__all__ = ["GC_THRESHOLD", "GIL_SWITCH_INTERVAL", "Options", "Tuning", "makeService", "tune"]

#: the GIL switch interval the daemon runs with, in seconds (CPython's default: 0.005)
GIL_SWITCH_INTERVAL = 0.0005
#: the cyclic collector's young-generation threshold (CPython's default: 700)
GC_THRESHOLD = 10000


def _switch_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:  # also refuses nan
        raise ValueError(f"expected seconds from 0 to 1, not {text!r}")
    return value


_switch_interval.coerceDoc = "Seconds, 0 to 1; 0 keeps Python's own (0.005)."  # type: ignore[attr-defined]


def _gc_threshold(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected a count of 0 or more, not {text!r}")
    return value


_gc_threshold.coerceDoc = "Allocations, 0 or more; 0 keeps CPython's own (700)."  # type: ignore[attr-defined]


class Options(usage.Options):
    """Options of C{twistd rt} / C{twist rt}."""

    synopsis = (
        "[--config PATH] [--listen ENDPOINT]... [--journal PATH] [--log-format text|json]"
        " [--switch-interval SECONDS] [--gc-threshold N] [--no-gc-freeze]"
    )
    longdesc = (
        "The twisted_rt real-time event daemon.  With no options it serves on tcp:8080 "
        "with its SQLite journal under ./var/."
    )
    optParameters = [
        ["config", "c", None, "The TOML config file (conf/twisted-rt.toml is the documented sample)."],
        ["journal", "j", None, "The journal's SQLite path (':memory:' allowed); overrides [journal] path."],
        ["log-format", None, None, "text (default) or json: one JSON object per log line."],
        [
            "switch-interval",
            None,
            GIL_SWITCH_INTERVAL,
            "The GIL switch interval the process runs with (sys.setswitchinterval): the journal's"
            " writer thread needs the GIL a few times per commit, and with Python's 5 ms it waits"
            " behind a busy reactor for each.",
            _switch_interval,
        ],
        [
            "gc-threshold",
            None,
            GC_THRESHOLD,
            "The cyclic collector's young-generation threshold (gc.set_threshold), set once the"
            " daemon listens: requests free their objects by reference counting, and collecting"
            " every 700 allocations cost about 3% of the ingest path.",
            _gc_threshold,
        ],
    ]
    optFlags = [
        [
            "no-gc-freeze",
            None,
            "Do not freeze what start-up built (gc.freeze) out of the cyclic collector's scans.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on this Twisted endpoint (repeatable), e.g. tcp:8080,
        ssl:8443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET:index=0.
        Overrides [server] listen.
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        try:
            cfg = load(self["config"]) if self["config"] else Config()
            cfg = cfg.with_overrides(listen=self["listen"], journal=self["journal"])
            fmt = self["log-format"]
            if fmt is not None:
                if fmt not in ("text", "json"):
                    raise ConfigError("--log-format", "expected text or json")
                cfg = replace(cfg, log_format=fmt)
            check(cfg)
        except ConfigError as e:
            where = self["config"] or "command line"
            raise SystemExit(f"twisted-rt: {where}: {e}") from None
        self["rtconfig"] = cfg


@dataclass(frozen=True)
class Tuning:
    """
    The process-wide settings the daemon runs with, from the L{Options}
    (each default is the option's).

    @ivar switch_interval: C{sys.setswitchinterval} at start (0: leave Python's).
    @ivar gc_threshold: the collector's young-generation threshold once
        listening (0: leave CPython's).
    @ivar gc_freeze: C{gc.freeze()} what start-up built, once listening.
    """

    switch_interval: float = GIL_SWITCH_INTERVAL
    gc_threshold: int = GC_THRESHOLD
    gc_freeze: bool = True

    @classmethod
    def from_options(cls, options: Any) -> Tuning:
        """The tuning parsed L{Options} ask for (the defaults for anything unset)."""
        return cls(
            switch_interval=options.get("switch-interval", GIL_SWITCH_INTERVAL),
            gc_threshold=options.get("gc-threshold", GC_THRESHOLD),
            gc_freeze=not options.get("no-gc-freeze", False),
        )


def tune(service: RTService, tuning: Tuning) -> None:
    """
    Register the process-wide settings with C{service}: the GIL switch
    interval and JSON logging when it starts, the collector once it listens.
    """

    def starting() -> None:
        if tuning.switch_interval:
            sys.setswitchinterval(tuning.switch_interval)
        if service.config.log_format == "json":
            from twisted_rt.core.logs import use_json_logging

            use_json_logging()

    def ready() -> None:
        # Everything built so far lives as long as the daemon: keep it out of
        # the cyclic collector's scans, and collect the young generation less
        # often.
        if tuning.gc_freeze:
            gc.collect()
            gc.freeze()
        if tuning.gc_threshold:
            gc.set_threshold(tuning.gc_threshold, *gc.get_threshold()[1:])

    service.on_starting(starting)
    service.on_ready(ready)


def exit_on_fatal(reactor: IReactorCore) -> Callable[[str], None]:
    """
    What twistd does when the start fails: the one line on the real stderr,
    the reactor stopped, and exit status 1 once it has.
    """

    def fatal(msg: str) -> None:
        # twistd has redirected sys.stderr into the log; say it on the real one too
        err = sys.__stderr__
        if err is not None:
            err.write(f"twisted-rt: {msg}\n")
            err.flush()

        def leave() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        reactor.addSystemEventTrigger("after", "shutdown", leave)
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    return fatal


def makeService(options: Any) -> RTService:
    """
    Build the daemon's service from parsed L{Options}, with the process
    policy only an entry point may set: L{tune}, exit status 1 when the
    start fails, and exit status 0 after a clean stop by signal.
    """
    from twisted.internet import reactor

    from twisted_rt._twisted_internals import clear_exit_signal
    from twisted_rt.service import RTService
    from twisted_rt.store.journal import ThreadedReactor

    cfg = options.get("rtconfig")
    if cfg is None:  # called without postOptions (e.g. by tests)
        cfg = Config()
    # The global reactor's declared type leaves out its threads (IReactorFromThreads).
    service = RTService(cfg, cast(ThreadedReactor, reactor))
    tune(service, Tuning.from_options(options))
    service.on_fatal(exit_on_fatal(reactor))
    # twistd re-raises a received SIGTERM/SIGINT after the reactor stops, so
    # the process would die "by signal"; a clean shutdown exits 0 instead.
    service.on_stopped(lambda: clear_exit_signal(reactor))
    return service

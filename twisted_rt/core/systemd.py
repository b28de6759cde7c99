# -*- test-case-name: tests.test_systemd -*-
"""
systemd's notify protocol: C{READY=1} once listening, C{WATCHDOG=1} pings
at half of C{WATCHDOG_USEC}, C{RELOADING=1} and C{STOPPING=1}.

Datagrams go to C{$NOTIFY_SOCKET} (a path, or C{@name} for the abstract
namespace).  Without that variable every call does nothing, so the daemon
runs the same outside systemd.  Sending one small datagram to a local
socket does not block.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping, cast

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_rt.interfaces import Reactor

__all__ = ["Notifier", "WatchdogService"]


class Notifier:
    """Sends notify datagrams to systemd, if it is listening."""

    log = Logger()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.address = addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_seconds: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        """Whether C{NOTIFY_SOCKET} is set."""
        return bool(self.address)

    def notify(self, *lines: str) -> bool:
        """Send C{lines} as one datagram; C{False} if it could not be sent."""
        if not self.address:
            return False
        msg = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(msg, self.address)
        except OSError as e:
            self.log.warn("sd_notify to {addr} failed: {e}", addr=self.address, e=e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """C{READY=1}, with an optional status line."""
        return self.notify("READY=1", f"STATUS={status or 'ready'}", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        """C{STOPPING=1}."""
        return self.notify("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> bool:
        """C{RELOADING=1} with the monotonic time systemd 253+ asks for."""
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """C{WATCHDOG=1}."""
        return self.notify("WATCHDOG=1")


class WatchdogService(Service):
    """Pings the systemd watchdog at half its interval while running."""

    def __init__(self, notifier: Notifier, reactor: Reactor) -> None:
        self.notifier = notifier
        self._reactor = reactor
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.notifier.watchdog_seconds:
            self._loop = LoopingCall(self.notifier.watchdog)
            self._loop.clock = cast(IReactorTime, self._reactor)
            self._loop.start(self.notifier.watchdog_seconds / 2, now=True)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()  # type: ignore[no-any-return]

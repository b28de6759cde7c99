"""systemd notify protocol: READY, WATCHDOG, STOPPING, tested against a test socket instead of systemd."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import Daemon
from twisted.internet.task import Clock

from twisted_rt.core.systemd import Notifier, WatchdogService


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(10)
    yield path, s
    s.close()


def _messages(s: socket.socket, until: str, timeout: float = 20) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(s.recv(4096).decode())
        except TimeoutError:
            break
        if any(until in m for m in got):
            break
    return got


def test_notifier_sends_datagrams(notify_socket: tuple[str, socket.socket]) -> None:
    """ready/watchdog/stopping/reloading send the systemd lines to NOTIFY_SOCKET."""
    path, s = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving")
    msg = s.recv(4096).decode()
    assert "READY=1" in msg.splitlines() and "STATUS=serving" in msg and f"MAINPID={os.getpid()}" in msg
    assert n.watchdog() and s.recv(100) == b"WATCHDOG=1"
    assert n.stopping() and s.recv(100).startswith(b"STOPPING=1")
    assert n.reloading() and s.recv(100).startswith(b"RELOADING=1\nMONOTONIC_USEC=")


def test_notifier_without_systemd_does_nothing() -> None:
    """Without NOTIFY_SOCKET every call is a no-op returning False."""
    n = Notifier({})
    assert not n.enabled and not n.ready() and n.watchdog_seconds is None


def test_notifier_abstract_socket_and_errors() -> None:
    """An @abstract address is mapped to the abstract namespace; an unreachable socket is logged, not raised."""
    n = Notifier({"NOTIFY_SOCKET": "@rt-test-nobody-listens-here"})
    assert n.address.startswith("\0")
    assert n.notify("X=1") is False


def test_watchdog_interval_and_pid_filter() -> None:
    """WATCHDOG_USEC sets the ping interval; a WATCHDOG_PID for another process disables it."""
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_seconds == 4.0
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_seconds is None


def test_watchdog_service_pings_at_half_the_interval() -> None:
    """The watchdog service pings at start and then every WATCHDOG_USEC/2 on the given clock."""
    pings: list[int] = []
    n = Notifier({"WATCHDOG_USEC": "2000000"})
    n.watchdog = lambda: pings.append(1) or True  # type: ignore[method-assign]
    clock = Clock()
    svc = WatchdogService(n, clock)
    svc.startService()
    assert len(pings) == 1
    clock.advance(1.0)
    assert len(pings) == 2
    clock.pump([1.0, 1.0, 1.0])
    assert len(pings) == 5
    svc.stopService()
    clock.advance(10)
    assert len(pings) == 5


def test_daemon_notifies_ready_watchdog_and_stopping(
    make_daemon: Callable[..., Daemon], notify_socket: tuple[str, socket.socket]
) -> None:
    """Run under a fake systemd: READY=1 once listening, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""
    path, s = notify_socket
    d = make_daemon(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}, start=False)
    d.start()
    got = _messages(s, "READY=1")
    assert any("READY=1" in m for m in got), got
    got = _messages(s, "WATCHDOG=1")
    assert any(m == "WATCHDOG=1" for m in got), got
    assert d.stop() == 0
    got = _messages(s, "STOPPING=1")
    assert any(m.startswith("STOPPING=1") for m in got), got

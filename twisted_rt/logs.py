# -*- test-case-name: tests.test_daemon -*-
"""
Log output: twistd's readable text by default, or one JSON object per line
(C{--log-format json}) for log shippers.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import globalLogPublisher, jsonFileLogObserver

__all__ = ["use_json_logging"]

_installed: list[object] = []


def use_json_logging(out: IO[str] | None = None) -> None:
    """
    Replace the observers twistd installed with a JSON-lines observer on
    stdout.  twistd builds its observer before it calls our service, and
    offers no public way to swap it, so the swap happens at service start.
    """
    if _installed:
        return
    # twistd has redirected sys.stdout into the log itself; write to the real one
    stream = out or sys.__stdout__ or sys.stdout
    observer = jsonFileLogObserver(stream, recordSeparator="")
    observers = list(getattr(globalLogPublisher, "_observers", []))
    globalLogPublisher.addObserver(observer)
    _installed.append(observer)
    for o in observers:
        globalLogPublisher.removeObserver(o)

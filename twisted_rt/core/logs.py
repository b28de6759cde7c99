# -*- test-case-name: tests.test_daemon -*-
"""
Log output: twistd's readable text by default, or one JSON object per line
(C{--log-format json}) for log shippers; and L{redact_uri}, the one way a
request's URI is written to any log line (tokens never reach logs).
"""

from __future__ import annotations

import re
import sys
from typing import IO
from urllib.parse import unquote_to_bytes

from twisted.logger import globalLogPublisher, jsonFileLogObserver

from twisted_rt._twisted_internals import log_observers

__all__ = ["redact_uri", "use_json_logging"]

_installed: list[object] = []


def use_json_logging(out: IO[str] | None = None) -> None:
    """
    Replace the observers twistd installed with a JSON-lines observer on
    stdout.  twistd builds its observer before it calls our service, and
    offers no public way to swap it, so the swap happens at service start
    (the observers are listed by L{log_observers}, the one reach into
    twisted.logger's private state; where it cannot list them, they stay
    and the JSON observer is added beside them).
    """
    if _installed:
        return
    # twistd has redirected sys.stdout into the log itself; write to the real one
    stream = out or sys.__stdout__ or sys.stdout
    observer = jsonFileLogObserver(stream, recordSeparator="")
    observers = log_observers(globalLogPublisher)
    globalLogPublisher.addObserver(observer)
    _installed.append(observer)
    for o in observers:
        globalLogPublisher.removeObserver(o)


# Query parameters whose values are secrets: never written to a log.
_SECRET_NAMES = frozenset({
    b"token", b"api_key", b"apikey", b"access_key", b"secret", b"client_secret", b"password",
    b"auth_signature",  # Pusher's HTTP API: replayable for its 600 s window
})
_SECRET_SUFFIXES = (b"_token", b".token", b"-token")
# a cheap test that a query may name one of them (or hide a name behind %XX)
_MAYBE_SECRET = re.compile(rb"(?i)token|key|secret|password|signature|%")


def _secret_name(raw: bytes) -> bool:
    name = unquote_to_bytes(raw.replace(b"+", b" ")).lower()
    return name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def redact_uri(uri: bytes | str) -> str:
    """
    C{uri} as it may be logged: the value of every secret query parameter
    (C{token}, C{access_token}, C{hub.verify_token}, C{api_key}, ...) is
    replaced by C{REDACTED} (C{/sse?channel=a&token=REDACTED}); the rest is
    kept byte for byte (decoded as UTF-8 with replacement).
    """
    raw = uri.encode("utf-8", "surrogateescape") if isinstance(uri, str) else uri
    path, q, query = raw.partition(b"?")
    if q and _MAYBE_SECRET.search(query):
        parts = query.split(b"&")
        changed = False
        for i, part in enumerate(parts):
            name = part.partition(b"=")[0]
            if _secret_name(name):
                parts[i] = name + b"=REDACTED"
                changed = True
        if changed:
            raw = path + b"?" + b"&".join(parts)
    return raw.decode("utf-8", "replace")

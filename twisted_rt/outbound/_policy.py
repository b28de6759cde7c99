# -*- test-case-name: tests.test_dest_unit -*-
"""
The pure parts of delivery: the retry schedule, C{Retry-After}, Standard
Webhooks signing, and which headers of a webhook are passed on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from email.utils import parsedate_to_datetime
from typing import Callable, Iterable, Mapping

from twisted_rt.web.outgoing import FORWARD_DROPPED_HEADERS

__all__ = [
    "DROPPED_HEADERS",
    "MAX_RETRY_AFTER",
    "SCHEDULE",
    "backoff",
    "forwarded_headers",
    "retry_after",
    "sign",
    "signer",
]

#: seconds before attempt 2, 3, ... (then the last one, every 2 h)
SCHEDULE: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0)
#: the share of a delay that is random: a delay D is drawn from [D * (1 - JITTER), D * (1 + JITTER)]
JITTER = 0.2
#: the longest C{Retry-After} honoured (seconds); a longer one waits this long
MAX_RETRY_AFTER = 86400.0

#: request headers of a webhook never passed on by C{format = "raw"}: those
#: that carry a secret, hop-by-hop ones and those the HTTP client sets itself
DROPPED_HEADERS = FORWARD_DROPPED_HEADERS | {"accept-encoding"}


def backoff(attempts: int, rand: Callable[[], float]) -> float:
    """The delay after C{attempts} failed attempts (1 = the first failed), with jitter."""
    base = SCHEDULE[min(max(attempts, 1), len(SCHEDULE)) - 1]
    return base * (1 - JITTER + 2 * JITTER * rand())


def retry_after(value: str | None, now: float) -> float | None:
    """
    The seconds a C{Retry-After} value asks to wait (delta-seconds or an
    HTTP date), at most L{MAX_RETRY_AFTER}; C{None} when absent or unreadable.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, when - now), MAX_RETRY_AFTER)


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks C{webhook-signature}: C{v1,} + base64 HMAC-SHA256 of C{id.timestamp.body}."""
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode("utf-8"), timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signer(key: bytes) -> Callable[[str, int, bytes], str]:
    """L{sign} with C{key} keyed once (the HMAC's key setup copied per message, not redone)."""
    keyed = hmac.new(key, digestmod=hashlib.sha256)

    def sign_with(msg_id: str, timestamp: int, body: bytes) -> str:
        mac = keyed.copy()
        mac.update(b"%s.%d.%s" % (msg_id.encode("utf-8"), timestamp, body))
        return "v1," + base64.b64encode(mac.digest()).decode("ascii")

    return sign_with


def forwarded_headers(
    headers: Mapping[str, str] | None, redact: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """A webhook's stored headers as passed on: without L{DROPPED_HEADERS} and the source's C{redact_headers}."""
    if not headers:
        return []
    drop = DROPPED_HEADERS | {h.lower() for h in redact}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]

# -*- test-case-name: tests.test_journal -*-
"""
Events: what the journal keeps and the transports send.

A L{Draft} is an event not yet accepted (no offset).  An L{Event} is one the
journal has made durable.  Each L{Event} encodes its public JSON form once
and caches it, so a fan-out to many subscribers costs one C{json.dumps}.
"""

from __future__ import annotations

import json
import os
import re
import time as _time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["Accepted", "Draft", "Event", "dumps", "loads", "new_id", "now_iso"]


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes (the one encoder of the project)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def loads(body: bytes | str) -> Any:
    """
    Strict JSON: what L{dumps} can write back.  No C{NaN}/C{Infinity}, no
    number that overflows to infinity, no lone surrogate (C{"\\ud800"}).

    @raise ValueError: on anything else (C{RecursionError} included).
    """
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass") if isinstance(body, bytes) else body
        obj = _DECODER.decode(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    probe = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    if b"\\u" in probe and re.search(rb"\\u[dD][89abAB89cdefCDEF]", probe):
        try:
            dumps(obj)
        except UnicodeEncodeError:
            raise ValueError("a string has a lone surrogate (\\ud800-\\udfff)") from None
    return obj


_MS_MASK = (1 << 48) - 1
_RAND_B_MASK = (1 << 62) - 1


def new_id() -> str:
    """
    A fresh event id: a UUID version 7 (RFC 9562) in hex, 32 digits.

    Its first 48 bits are the Unix time in milliseconds and the other 74
    are random, so the ids of a journal grow with time: each goes to the
    right-hand end of the idempotency index (C{deliveries}) instead of a
    random leaf page of it.  A commit of 25 generated ids then dirties one
    or two index pages instead of 25, which was most of the journal
    writer's work per event (its CPU per C{/api/publish} at c = 50: 85-107
    -> 51-65 µs; README "Benchmarks", item 10).  An id carries its creation
    time, like the event's C{time} field beside it; it is not a secret.
    """
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (_time.time_ns() // 1_000_000 & _MS_MASK) << 80
        | 0x7000 << 64
        | (rand >> 64 & 0xFFF) << 64
        | 0x8000_0000_0000_0000
        | rand & _RAND_B_MASK
    )
    return f"{value:032x}"


def now_iso(t: float | None = None) -> str:
    """RFC 3339 UTC time with milliseconds, e.g. C{2026-11-21T18:45:15.123Z}."""
    if t is None:
        t = _time.time()
    d = datetime.fromtimestamp(t, tz=UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


@dataclass(slots=True)
class Draft:
    """
    An event offered to the journal.

    @ivar id: the delivery id or idempotency key; C{None} to generate one.
    @ivar raw: the request body bytes as received (webhooks), else C{None}.
    @ivar headers: the provider's request headers (webhooks), else C{None}.
    @ivar text: C{data} already written as JSON (a webhook's own UTF-8 JSON
        body, which L{loads} accepted), so the journal need not encode it
        again; C{None} to encode C{data}.
    @ivar scope: the idempotency scope of C{id}: two drafts are the same
        event when their C{(scope, id)} are equal.  C{None} means the
        C{source} (a webhook source's delivery ids); publishers use
        L{twisted_rt.core.auth.Principal.scope}, so one publisher's keys are the
        same over HTTP and WebSocket and never meet another publisher's.
    """

    channel: str
    data: Any
    source: str = "api"
    type: str = ""
    id: str | None = None
    raw: bytes | None = None
    headers: dict[str, str] | None = None
    text: str | None = None
    scope: str | None = None


class Event:
    """
    An accepted event with its offset.

    C{seq} is the event's place in the journal's global order (one counter
    for every channel, never reused; 0 when unknown): the broker fans events
    out in C{seq} order, and an SSE cursor is a C{seq}.

    The public dict (contract fields only) and its JSON encodings are built
    lazily and cached: they are shared by every subscriber.
    """

    __slots__ = (
        "_cache",
        "_json",
        "_ws",
        "alone",
        "channel",
        "data",
        "headers",
        "id",
        "offset",
        "raw",
        "seq",
        "source",
        "time",
        "type",
    )

    def __init__(
        self,
        id: str,
        channel: str,
        offset: int,
        time: str,
        source: str,
        type: str,
        data: Any,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        seq: int = 0,
    ) -> None:
        self.id = id
        self.channel = channel
        self.offset = offset
        self.time = time
        self.source = source
        self.type = type
        self.data = data
        self.raw = raw
        self.headers = headers
        self.seq = seq
        # the only event of its commit: nothing else is fanned out with it (the
        # transports may then write it at once instead of batching the turn)
        self.alone = False
        self._json: bytes | None = None
        self._ws: bytes | None = None
        self._cache: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        """The contract's event object."""
        return {
            "id": self.id,
            "channel": self.channel,
            "offset": self.offset,
            "time": self.time,
            "source": self.source,
            "type": self.type,
            "data": self.data,
        }

    def json(self) -> bytes:
        """The event object as JSON bytes, encoded once."""
        j = self._json
        if j is None:
            j = self._json = dumps(self.public())
        return j

    def ws_json(self) -> bytes:
        """The WebSocket C{{"op":"event",...}} message, encoded once."""
        w = self._ws
        if w is None:
            w = self._ws = b'{"op":"event",' + self.json()[1:]
        return w

    def cached(self, key: str) -> Any:
        """A per-transport encoding stored by L{cache}, or C{None}."""
        c = self._cache
        return None if c is None else c.get(key)

    def cache(self, key: str, value: Any) -> Any:
        """Store a per-transport encoding (e.g. a prepared WebSocket frame)."""
        if self._cache is None:
            self._cache = {}
        self._cache[key] = value
        return value

    def __repr__(self) -> str:
        return f"<Event {self.channel}#{self.offset} id={self.id}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.public() == other.public()

    __hash__ = None  # type: ignore[assignment]


@dataclass(slots=True)
class Accepted:
    """The journal's answer to one L{Draft}: the event and whether it was known."""

    event: Event
    duplicate: bool = field(default=False)

    def receipt(self) -> dict[str, Any]:
        """The C{{"id","channel","offset"[,"duplicate"]}} body of a 2xx."""
        r: dict[str, Any] = {
            "id": self.event.id,
            "channel": self.event.channel,
            "offset": self.event.offset,
        }
        if self.duplicate:
            r["duplicate"] = True
        return r

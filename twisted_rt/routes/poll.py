# -*- test-case-name: tests.test_poll -*-
"""
C{/poll}: long-poll, for clients that can keep neither a WebSocket nor an
event stream open.

C{GET /poll?channel=a&since=N&timeout=30} registers a live listener
I{before} reading the journal after C{N}, so an event committed while the
query runs is not missed; it answers with what the journal had, or the
first live events (all those delivered in the same reactor turn), or
C{{"events": []}} at the timeout.  No thread is held.  An answer holds at
most C{limit} events and about L{PAGE_BYTES} of event JSON (C{"more":
true} when the channel has more); the live listener keeps no more than that.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.web.resource import IResource
from twisted.web.server import Request

from twisted_rt.app import App
from twisted_rt.core.event import Event
from twisted_rt.core.matcher import ChannelError, validate_channel
from twisted_rt.interfaces import PAGE_BYTES, Reactor
from twisted_rt.web.resource import (
    JsonError,
    JsonResource,
    Reply,
    allow_origin,
    check_origin,
    int_arg,
    str_args,
)

__all__ = ["MAX_POLL_EVENTS", "PollResource", "resource"]

#: most events one long-poll answer carries
MAX_POLL_EVENTS = 1000


class _Waiter:
    """
    A long-poll's live listener: collects the events after C{since} of one
    reactor turn, at most C{limit} of them and about C{max_bytes} of JSON
    (the first one always); C{more} says some were left out.
    """

    def __init__(
        self, reactor: Reactor, since: int, limit: int = MAX_POLL_EVENTS, max_bytes: int = PAGE_BYTES
    ) -> None:
        self.reactor = reactor
        self.since = since
        self.limit = limit
        self.max_bytes = max_bytes
        self.events: list[Event] = []
        self.size = 0
        self.more = False
        self.d: Deferred[list[Event]] = Deferred(self._cancel)
        self._fire_call: IDelayedCall | None = None
        self._timer: IDelayedCall | None = None

    def deliver(self, event: Event) -> None:
        if self.d.called or event.offset <= self.since:
            return
        if len(self.events) >= self.limit or (self.events and self.size >= self.max_bytes):
            self.more = True
            return
        self.events.append(event)
        self.size += len(event.json())
        if self._fire_call is None:
            self._fire_call = self.reactor.callLater(0, self.fire)

    def wait(self, timeout: float) -> Deferred[list[Event]]:
        if not self.d.called and self._fire_call is None:
            self._timer = self.reactor.callLater(timeout, self.fire)
        return self.d

    def fire(self) -> None:
        self._stop_timers()
        if not self.d.called:
            self.d.callback(self.events)

    def _stop_timers(self) -> None:
        for c in (self._fire_call, self._timer):
            if c is not None and c.active():
                c.cancel()
        self._fire_call = self._timer = None

    def _cancel(self, d: Deferred[list[Event]]) -> None:
        self._stop_timers()


class PollResource(JsonResource):
    """C{GET /poll?channel=a&since=N&limit=M&timeout=S}."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app
        self.waiters: set[_Waiter] = set()
        app.on_shutdown(self.shutdown)

    async def handle_GET(self, request: Request) -> Reply:
        app = self.app
        origin = check_origin(request, app.config.server.allowed_origins)
        principal = app.principal(request)
        names = str_args(request, "channel")
        if len(names) != 1:
            raise JsonError(400, "bad_request", "name exactly one channel: /poll?channel=a&since=N")
        try:
            channel = validate_channel(names[0])
        except ChannelError as e:
            raise JsonError(400, "invalid_channel", f"{e}; /poll takes one exact channel") from None
        if not principal.can_read(channel):
            raise JsonError(403, "forbidden", f"this token may not read {channel!r}")
        since = int_arg(request, "since", 0)
        limit = min(int_arg(request, "limit", MAX_POLL_EVENTS), MAX_POLL_EVENTS) or MAX_POLL_EVENTS
        timeout = min(float(int_arg(request, "timeout", 30)), app.config.sse.max_poll_timeout_seconds)
        allow_origin(request, origin)
        broker = app.broker
        waiter = _Waiter(app.reactor, since, limit)
        broker.subscribe(channel, waiter)
        self.waiters.add(waiter)
        stats = app.stats
        stats.connections["poll"] += 1
        stats.subscriptions["poll"] += 1
        more = False
        try:
            events = await broker.history(channel, since, limit, max_bytes=PAGE_BYTES)
            if events:
                more = events[-1].offset < await broker.last_offset(channel)
            elif timeout > 0 and not app.stopping:
                events = await waiter.wait(timeout)
                more = waiter.more
        finally:
            stats.connections["poll"] -= 1
            stats.subscriptions["poll"] -= 1
            waiter._stop_timers()
            self.waiters.discard(waiter)
            broker.unsubscribe(channel, waiter)
        stats.events_out["poll"] += len(events)
        # the events' cached JSON, not a second encoding of each
        body = b'{"events":[%s],"last_offset":%d%s}' % (
            b",".join(e.json() for e in events),
            events[-1].offset if events else since,
            b',"more":true' if more else b"",
        )
        return Reply(200, body)

    def shutdown(self) -> None:
        """Answer every waiting poll now (with what it has: usually nothing)."""
        for w in list(self.waiters):
            w.fire()


def resource(app: App) -> IResource:
    """The C{/poll} resource."""
    return PollResource(app)

# -*- test-case-name: tests.test_sse -*-
"""
C{/sse}: Server-Sent Events (long-poll is L{twisted_rt.routes.poll}).

SSE cursor: every event's C{id:} is C{v1:<seq>}, the event's place in the
journal's global order (L{Event.seq}): a few bytes whatever the number of
channels or patterns on the stream (the contract allows 256).  A stream
starts with an C{id:}-only block holding the position it starts from (the
HTML standard sets C{lastEventId} even for a block without C{data}), so a
browser's automatic reconnect always sends a C{Last-Event-ID} that resumes
every channel of the stream, wildcards included, on any node.

Resume rule (no gap, no duplicate, O(1) state per stream): a stream
registers its live listener I{first} and buffers what arrives (bounded),
then reads the broker's position, then does I{one} merged replay of all its
patterns after the cursor (C{Broker.replay(patterns, since,
after_seq=...)}, paged by C{seq} until a page comes back empty), then
sends the buffered and later live events whose C{seq} is above the last one
it sent.  Live fan-out is in C{seq} order, so that one comparison also drops
the second copy of an event matched by two overlapping patterns.  Older
ids are still read, for browsers connected before an upgrade: a bare offset
(every channel after it) and C{chan=off,chan=off,...} (those channels after
those offsets, other matching channels from their start).  Such a replay
(and C{?since=N} with N > 0) is by offsets, which a C{seq} cannot stand
for, so its events carry no C{id:} (the browser keeps the id it resumed
with) and an C{id:} block with the position follows the replay; live
events then carry C{v1:} ids as usual.

Memory per connection is bounded whatever the client sends: at most
L{MAX_SSE_PATTERNS} patterns, one replay page (L{REPLAY_PAGE_EVENTS},
L{REPLAY_PAGE_BYTES}), at most L{MAX_BUFFER_EVENTS} / L{MAX_BUFFER_BYTES}
of live events held during a replay and C{[websocket]
max_send_buffer_bytes} queued while the client does not read; past a bound
the stream ends and the client resumes from its last id.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from twisted_rt.app import App
from twisted_rt.core.auth import Principal
from twisted_rt.core.event import Event
from twisted_rt.core.matcher import ChannelError, PatternError, validate_channel, validate_pattern
from twisted_rt.interfaces import AuthError, Reactor
from twisted_rt.web.resource import (
    JsonError,
    allow_origin,
    as_json_error,
    ascii_int,
    check_origin,
    int_arg,
    str_args,
    write_error,
)

__all__ = [
    "CURSOR_PREFIX",
    "MAX_SSE_PATTERNS",
    "Resume",
    "encode_cursor",
    "parse_last_event_id",
    "resource",
]

log = Logger()

#: the format tag of an SSE cursor (C{v1:<seq>})
CURSOR_PREFIX = "v1:"
#: most C{channel=} plus C{pattern=} values one C{/sse} request may list
MAX_SSE_PATTERNS = 100
#: events and bytes of event JSON read per replay query of a stream
REPLAY_PAGE_EVENTS = 1000
REPLAY_PAGE_BYTES = 1024 * 1024
#: live events held while a stream catches up; past either, the stream ends
MAX_BUFFER_EVENTS = 10000
MAX_BUFFER_BYTES = 4 * 1024 * 1024
#: the longest Last-Event-ID read (the whole request head is at most 16 KiB)
MAX_LAST_EVENT_ID = 16384

_SHUTTING_DOWN = JsonError(503, "shutting_down", "the server is shutting down")


def encode_cursor(seq: int) -> str:
    """The C{id:} of a stream whose last event has C{seq}."""
    return f"{CURSOR_PREFIX}{seq}"


class _Floor(dict[str, int]):
    """A since-map whose channels not named default to a floor offset."""

    def __init__(self, base: Mapping[str, int], floor: int) -> None:
        super().__init__(base)
        self.floor = floor

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, self.floor)


class Resume:
    """
    Where a stream starts: fresh (now), after a cursor's C{seq}, or (older
    ids, C{?since=N}) after per-channel offsets.
    """

    __slots__ = ("after_seq", "since")

    def __init__(self, after_seq: int | None = None, since: Mapping[str, int] | None = None) -> None:
        self.after_seq = after_seq
        self.since = since

    @property
    def fresh(self) -> bool:
        """Nothing to replay: the stream starts at the broker's position."""
        return self.after_seq is None and self.since is None

    def __repr__(self) -> str:
        return f"Resume(after_seq={self.after_seq!r}, since={self.since!r})"


def parse_last_event_id(text: str) -> Resume:
    """
    Read a C{Last-Event-ID}: C{v1:<seq>} (this version's cursor), a bare
    offset or C{chan=off,...} (the ids of earlier versions), or nothing.

    @raise ValueError: anything else.
    """
    text = text.strip()
    if not text:
        return Resume()
    if len(text) > MAX_LAST_EVENT_ID:
        raise ValueError("it is too long")
    if text.startswith(CURSOR_PREFIX):
        seq = ascii_int(text[len(CURSOR_PREFIX) :])
        if seq is None:
            raise ValueError(f"a {CURSOR_PREFIX} cursor is followed by an integer of at most 19 digits")
        return Resume(after_seq=seq)
    offset = ascii_int(text)
    if offset is not None:
        return _since(_Floor({}, offset))
    since: dict[str, int] = {}
    for part in text.split(","):
        chan, eq, off = part.partition("=")
        value = ascii_int(off)
        if not eq or value is None:
            raise ValueError(f"expected {CURSOR_PREFIX}<seq> (the id of an earlier event), not {part[:40]!r}")
        try:
            since[validate_channel(chan)] = value
        except ChannelError as e:
            raise ValueError(str(e)) from None
    return _since(since)


def _since(since: Mapping[str, int]) -> Resume:
    """Resume after offsets; when every one is 0 that is all of it: the cursor C{v1:0}."""
    if not any(since.values()) and not getattr(since, "floor", 0):
        return Resume(after_seq=0)
    return Resume(since=since)


def _frame_without_id(event: Event) -> bytes:
    """An event's SSE block without C{id:} (a replay by offsets)."""
    return b"event: %s\ndata: %s\n\n" % (event.channel.encode(), event.json())


def _frame(event: Event) -> bytes:
    """An event's SSE block, built once and shared by every stream."""
    frame: bytes | None = event.cached("sse")
    if frame is None:
        frame = event.cache(
            "sse",
            b"id: %s%d\nevent: %s\ndata: %s\n\n"
            % (CURSOR_PREFIX.encode(), event.seq, event.channel.encode(), event.json()),
        )
    return frame


@implementer(IPushProducer)
class _Stream:
    """
    One open C{/sse} response: the broker's listener for its patterns and
    the push producer of its transport.

    @ivar last_seq: the C{seq} of the last event sent (or the position the
        stream started at); only events above it are sent.
    """

    def __init__(self, owner: SSEResource, request: Request, principal: Principal, patterns: list[str]) -> None:
        app = owner.app
        self.owner = owner
        self.stats = app.stats
        self.request = request
        self.principal = principal
        self.patterns = patterns
        self.subscribed: list[str] = []
        self.last_seq = 0
        # live events held while the stream catches up; None once live
        self._buffer: list[Event] | None = []
        self._buffered = 0
        self.waiters: list[Deferred[None]] = []
        self.paused = False
        self.queue: list[bytes] = []
        self.queued = 0
        self.done = False
        self.limit = app.config.websocket.max_send_buffer_bytes
        self.expiry: IDelayedCall | None = None

    # the broker's listener (the hot path: a few attribute operations)

    def deliver(self, event: Event) -> None:
        buf = self._buffer
        if buf is not None:
            buf.append(event)
            self._buffered += len(event.json())
            if len(buf) > MAX_BUFFER_EVENTS or self._buffered > MAX_BUFFER_BYTES:
                self._buffer = []
                self._overflow()
            return
        if event.seq <= self.last_seq:
            return  # already sent (replayed, or matched by another pattern)
        self.last_seq = event.seq
        self.write(_frame(event))
        self.stats.events_out["sse"] += 1

    def go_live(self, since: Mapping[str, int] | None) -> None:
        """
        Send the events buffered while catching up (above C{last_seq}, and
        for an offset resume above C{since}), then live ones as they come.
        """
        buf, self._buffer, self._buffered = self._buffer or [], None, 0
        sent = 0
        for event in buf:
            if self.done:
                return
            if event.seq <= self.last_seq:
                continue
            if since is not None and event.offset <= since.get(event.channel, 0):
                continue
            self.last_seq = event.seq
            self.write(_frame(event))
            sent += 1
        self.stats.events_out["sse"] += sent

    # IPushProducer: the transport's buffer is full / drained / gone

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.queue and not self.done:
            data = b"".join(self.queue)
            self.queue = []
            self.queued = 0
            self.request.write(data)
        if not self.paused:
            self._fire_waiters()

    def stopProducing(self) -> None:
        self.paused = True

    def drained(self) -> Deferred[None] | None:
        """A Deferred while the client's transport is full (fires when it drains), else C{None}."""
        if not self.paused or self.done:
            return None
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d

    def _fire_waiters(self) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)

    def _overflow(self) -> None:
        self.stats.dropped["slow_consumer"] += 1
        self.finish()

    def write(self, data: bytes) -> None:
        if self.done:
            return
        if self.paused:
            self.queue.append(data)
            self.queued += len(data)
            if self.queued > self.limit:
                self.queue = []
                self.queued = 0
                self._overflow()
            return
        self.request.write(data)

    def expired(self) -> None:
        """The token's C{exp} passed: the stream ends (as WebSocket closes with 4001)."""
        self.expiry = None
        if not self.done:
            self.write(b": token expired\n\n")
            self.finish()

    def disconnect(self) -> None:
        """The operator closed this user's connections: the stream ends (L{twisted_rt.interfaces.Closable})."""
        if not self.done:
            self.stats.dropped["disconnected"] += 1
            self.write(b": disconnected\n\n")
            self.finish()

    def finish(self) -> None:
        """End the response (shutdown, slow consumer, expired token, disconnect)."""
        if self.done:
            return
        self.closed()
        try:
            self.request.unregisterProducer()
            self.request.finish()
        except RuntimeError:  # pragma: no cover - already finished
            pass

    def closed(self) -> None:
        """The response is over: drop subscriptions, timers and counters."""
        if self.done:
            return
        self.done = True
        self._buffer = None
        self.queue = []
        self.queued = 0
        if self.expiry is not None and self.expiry.active():
            self.expiry.cancel()
        self.expiry = None
        self._fire_waiters()
        stats = self.stats
        stats.connections["sse"] -= 1
        stats.subscriptions["sse"] -= len(self.subscribed)
        broker = self.owner.app.broker
        for p in self.subscribed:
            broker.unsubscribe(p, self)
        self.subscribed = []
        self.owner.discard(self)
        user = self.principal.member
        registry = self.owner.app.connections
        if user is not None and registry is not None:
            registry.unregister(user, self)


class SSEResource(Resource):
    """C{GET /sse?channel=a&pattern=b.*[&since=N][&token=...]}."""

    isLeaf = True

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app
        self.streams: set[_Stream] = set()
        self.heartbeat = LoopingCall(self._beat)
        reactor: Reactor = app.reactor
        # every reactor (and Clock) provides IReactorTime; Reactor is the
        # structural view of it this package types with (twisted_rt.interfaces)
        self.heartbeat.clock = cast(IReactorTime, reactor)
        app.on_shutdown(self.shutdown)

    def render_GET(self, request: Request) -> int:
        app = self.app
        try:
            origin = check_origin(request, app.config.server.allowed_origins)
            principal = app.principal(request)
            patterns = self._patterns(request, principal)
            resume = self._resume(request)
        except (JsonError, AuthError) as e:
            return write_error(request, as_json_error(e))
        if app.stopping:
            return write_error(request, _SHUTTING_DOWN)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        allow_origin(request, origin)
        stream = _Stream(self, request, principal, patterns)
        app.stats.connections["sse"] += 1
        self.streams.add(stream)
        if not self.heartbeat.running:
            self.heartbeat.start(app.config.sse.heartbeat_seconds, now=False)
        if principal.exp is not None:
            reactor: Reactor = app.reactor
            stream.expiry = reactor.callLater(max(0.0, principal.exp - reactor.seconds()), stream.expired)
        user = principal.member
        if user is not None and app.connections is not None:
            app.connections.register(user, stream)  # POST /api/users/<user>/disconnect ends it
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.closed())
        request.write(b"retry: %d\n\n" % app.config.sse.retry_ms)
        d = ensureDeferred(self._open(stream, resume))
        d.addErrback(self._failed, stream)
        return NOT_DONE_YET

    def _patterns(self, request: Request, principal: Principal) -> list[str]:
        names = str_args(request, "channel") + str_args(request, "pattern")
        if not names:
            raise JsonError(
                400, "bad_request", "name at least one channel or pattern: /sse?channel=a&pattern=b.*"
            )
        if len(names) > MAX_SSE_PATTERNS:
            raise JsonError(400, "bad_request", f"at most {MAX_SSE_PATTERNS} channels and patterns per stream")
        out: list[str] = []
        for n in names:
            try:
                p = validate_pattern(n)
            except PatternError as e:
                raise JsonError(400, "invalid_channel", str(e)) from None
            if not principal.can_subscribe(p):
                raise JsonError(403, "forbidden", f"this token may not subscribe to {p!r}")
            if p not in out:
                out.append(p)
        return out

    def _resume(self, request: Request) -> Resume:
        raw = request.getHeader(b"last-event-id")
        if raw is not None:
            try:
                return parse_last_event_id(raw.decode("latin-1"))
            except ValueError as e:
                raise JsonError(400, "invalid_last_event_id", f"cannot read Last-Event-ID: {e}") from None
        since = int_arg(request, "since", -1)
        return Resume() if since < 0 else _since(_Floor({}, since))

    async def _open(self, stream: _Stream, resume: Resume) -> None:
        broker = self.app.broker
        # live first (buffered), then the position, then the replay: an event
        # committed meanwhile is in the replay or the buffer (or both: sent once)
        for p in stream.patterns:
            broker.subscribe(p, stream)
            stream.subscribed.append(p)
        self.app.stats.subscriptions["sse"] += len(stream.subscribed)
        position = await broker.position()
        if stream.done:
            return
        replayed_to: int | None = None
        if resume.fresh:
            stream.last_seq = position
        else:
            # a cursor past the position comes from another journal: start now
            stream.last_seq = min(resume.after_seq or 0, position)
            replayed_to = await self._replay(stream, resume.since)
            if stream.done:
                return
            stream.last_seq = max(stream.last_seq, position)
        if replayed_to != stream.last_seq:
            # the position this stream is at, before any newer event
            stream.write(b"id: %s\n\n" % encode_cursor(stream.last_seq).encode())
        stream.go_live(resume.since)

    async def _replay(self, stream: _Stream, since: Mapping[str, int] | None) -> int | None:
        """
        Send every journaled event of the stream's patterns above
        C{stream.last_seq} (and C{since}), paced by the client.  Returns the
        C{seq} of the last event sent with an C{id:} (none are with
        C{since}), or C{None}.
        """
        broker = self.app.broker
        patterns: Sequence[str] = stream.patterns
        cursor: Mapping[str, int] = since if since is not None else {}
        frame = _frame if since is None else _frame_without_id
        last: int | None = None
        stats = self.app.stats
        while not stream.done:
            page = await broker.replay(
                patterns, cursor, REPLAY_PAGE_EVENTS, after_seq=stream.last_seq, max_bytes=REPLAY_PAGE_BYTES
            )
            if not page or stream.done:
                break
            sent = 0
            for event in page:
                if event.seq > stream.last_seq:
                    stream.last_seq = event.seq
                    stream.write(frame(event))
                    sent += 1
            stats.events_out["sse"] += sent
            if sent and since is None:
                last = stream.last_seq
            if page[-1].seq <= stream.last_seq and not sent:
                break  # nothing new (a broker that ignores after_seq): do not loop
            wait = stream.drained()
            if wait is not None:
                await wait
        return last

    def _failed(self, f: Failure, stream: _Stream) -> None:
        if not f.check(CancelledError):
            log.failure("opening an SSE stream", f, log_category="RT-SSE1")
        stream.finish()

    def _beat(self) -> None:
        for s in list(self.streams):
            s.write(b": hb\n\n")

    def discard(self, stream: _Stream) -> None:
        """C{stream} is over."""
        self.streams.discard(stream)
        if not self.streams and self.heartbeat.running:
            self.heartbeat.stop()

    def shutdown(self) -> None:
        """End every stream cleanly."""
        for s in list(self.streams):
            s.finish()


def resource(app: App) -> IResource:
    """The C{/sse} resource."""
    return SSEResource(app)

# -*- test-case-name: tests.test_sse -*-
# mypy: disable-error-code="no-untyped-call"
"""
C{/sse} (Server-Sent Events) and C{/poll} (long-poll).

SSE resume: every event's C{id:} is the stream's whole position,
C{chan=off,chan=off,...} (channel names never contain C{=} or C{,}), and
the stream starts with an C{id:}-only block holding the starting position
of every listed channel (the HTML standard sets C{lastEventId} even for a
block without C{data}).  So a browser's automatic reconnect sends a
C{Last-Event-ID} that resumes every listed channel, wildcards included,
through the same no-gap/no-duplicate rule as the WebSocket
(L{twisted_rt.subscriber.Subscriber}).

Long-poll: C{GET /poll?channel=a&since=N&timeout=30} registers a live
listener I{before} reading the journal after C{N}, so an event committed
while the query runs is not missed; it answers with what the journal had,
or the first live events (all those delivered in the same reactor turn), or
C{{"events": []}} at the timeout.  No thread is held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from twisted_rt.auth import AuthError, Principal
from twisted_rt.event import Event
from twisted_rt.matcher import (
    ChannelError,
    PatternError,
    is_wildcard,
    matches,
    validate_channel,
    validate_pattern,
)
from twisted_rt.subscriber import Since, Subscriber
from twisted_rt.web import JsonError, JsonResource, error_body, write_json
from twisted_rt.ws import origin_allowed

if TYPE_CHECKING:
    from twisted_rt.app import App

__all__ = ["encode_position", "parse_position", "poll_resource", "resource"]

log = Logger()

#: most channels one C{/sse} request may list
MAX_SSE_CHANNELS = 100
#: most events one long-poll answer carries
MAX_POLL_EVENTS = 1000


def encode_position(seen: dict[str, int]) -> str:
    """The C{id:} of a stream at C{seen}: C{chan=off,chan=off}."""
    return ",".join(f"{c}={o}" for c, o in seen.items())


def parse_position(text: str) -> int | dict[str, int]:
    """
    Read a C{Last-Event-ID} or C{?since=}: a bare offset, or
    C{chan=off,...} as written by L{encode_position}.

    @raise ValueError: anything else.
    """
    text = text.strip()
    if text.isdigit():
        return int(text)
    out: dict[str, int] = {}
    if not text:
        return out
    for part in text.split(","):
        chan, eq, off = part.partition("=")
        if not eq or not off.isdigit():
            raise ValueError(f"bad position {part!r}: use chan=offset,...")
        try:
            out[validate_channel(chan)] = int(off)
        except ChannelError as e:
            raise ValueError(str(e)) from None
    return out


def _arg(request: Request, name: str) -> list[str]:
    return [v.decode("utf-8", "replace") for v in (request.args or {}).get(name.encode(), [])]


def _check_origin(app: App, request: Request) -> str | None:
    origin = request.getHeader(b"origin")
    o = origin.decode("latin-1") if isinstance(origin, bytes) else origin
    host = request.getHeader(b"host")
    if not origin_allowed(o, app.config.server.allowed_origins, host.decode("latin-1") if host else None):
        raise JsonError(403, "forbidden_origin", f"origin {o!r} is not allowed")
    return o


def _cors(request: Request, origin: str | None) -> None:
    if origin:
        request.setHeader(b"access-control-allow-origin", origin.encode("latin-1"))
        request.setHeader(b"vary", b"Origin")


@implementer(IPushProducer)
class _Stream:
    """One open C{/sse} response."""

    def __init__(self, owner: SSEResource, request: Request, principal: Principal) -> None:
        self.owner = owner
        self.request = request
        self.principal = principal
        self.subscriber = Subscriber(owner.app.broker, self._send, backlog=self._backlog, on_overflow=self._overflow)
        self.waiters: list[Deferred[None]] = []
        self.position: dict[str, int] = {}
        self.paused = False
        self.queue: list[bytes] = []
        self.queued = 0
        self.done = False
        self.limit = owner.app.config.websocket.max_send_buffer_bytes

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

    def _backlog(self) -> Deferred[None] | None:
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
        self.owner.app.stats.dropped["slow_consumer"] += 1
        self.finish()

    def stopProducing(self) -> None:
        self.paused = True

    def write(self, data: bytes) -> None:
        if self.done:
            return
        if self.paused:
            self.queue.append(data)
            self.queued += len(data)
            if self.queued > self.limit:
                self.queue = []
                self._overflow()
            return
        self.request.write(data)

    def _send(self, event: Event) -> None:
        self.position[event.channel] = event.offset
        self.write(
            b"id: %s\nevent: %s\ndata: %s\n\n"
            % (
                encode_position(self.position).encode(),
                event.channel.encode(),
                event.json(),
            )
        )
        self.owner.app.stats.events_out["sse"] += 1

    def finish(self) -> None:
        """End the response (shutdown, slow consumer)."""
        if self.done:
            return
        self.closed()
        try:
            self.request.unregisterProducer()
            self.request.finish()
        except RuntimeError:  # pragma: no cover - already finished
            pass

    def closed(self) -> None:
        """The response is over: drop subscriptions and counters."""
        if self.done:
            return
        self.done = True
        self._fire_waiters()
        stats = self.owner.app.stats
        stats.connections["sse"] -= 1
        stats.subscriptions["sse"] -= len(self.subscriber.patterns)
        self.subscriber.close()
        self.owner.discard(self)


class SSEResource(Resource):
    """C{GET /sse?channel=a&channel=b[&since=...][&token=...]}."""

    isLeaf = True

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app
        self.streams: set[_Stream] = set()
        self.heartbeat = LoopingCall(self._beat)
        self.heartbeat.clock = app.reactor
        app.on_shutdown(self.shutdown)

    def render_GET(self, request: Request) -> int:
        try:
            origin = _check_origin(self.app, request)
            principal = self.app.principal(request)
            patterns = self._patterns(request, principal)
            raw = request.getHeader(b"last-event-id")
            if raw is None:
                since_arg = _arg(request, "since")
                text = since_arg[0] if since_arg else None
            else:
                text = raw.decode("latin-1")
            try:
                position = parse_position(text) if text is not None else None
            except ValueError as e:
                raise JsonError(400, "bad_request", f"bad since/Last-Event-ID: {e}") from None
        except JsonError as e:
            write_json(request, e.status, error_body(e.code, e.message), e.headers)
            return NOT_DONE_YET
        except AuthError as e:
            write_json(request, e.status, error_body(e.code, e.message))
            return NOT_DONE_YET
        if self.app.stopping:
            write_json(request, 503, error_body("shutting_down", "the server is shutting down"))
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        _cors(request, origin)
        stream = _Stream(self, request, principal)
        self.app.stats.connections["sse"] += 1
        self.streams.add(stream)
        if not self.heartbeat.running:
            self.heartbeat.start(self.app.config.sse.heartbeat_seconds, now=False)
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.closed())
        request.write(b"retry: %d\n\n" % self.app.config.sse.retry_ms)
        d = ensureDeferred(self._open(stream, patterns, position))
        d.addErrback(self._failed, stream)
        return NOT_DONE_YET

    def _patterns(self, request: Request, principal: Principal) -> list[str]:
        names = _arg(request, "channel")
        if not names:
            raise JsonError(400, "bad_request", "name at least one channel: /sse?channel=a&channel=b")
        if len(names) > MAX_SSE_CHANNELS:
            raise JsonError(400, "bad_request", f"at most {MAX_SSE_CHANNELS} channels per stream")
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

    async def _open(self, stream: _Stream, patterns: list[str], position: int | dict[str, int] | None) -> None:
        broker = self.app.broker
        sinces: list[Since] = []
        if position is None:
            known: list[dict[str, Any]] | None = None
            for p in patterns:
                if is_wildcard(p):
                    if known is None:
                        known = await broker.channels()
                    sinces.append({c["name"]: c["last_offset"] for c in known if matches(p, c["name"])})
                else:
                    sinces.append(await broker.last_offset(p))
        elif isinstance(position, int):
            sinces = [position for _ in patterns]
        else:
            for p in patterns:
                if is_wildcard(p):
                    sinces.append({c: o for c, o in position.items() if matches(p, c)})
                else:
                    sinces.append(position.get(p, 0))
        if stream.done:
            return
        sub = stream.subscriber
        pos = stream.position
        for p, s in zip(patterns, sinces, strict=True):
            if isinstance(s, dict):
                for c, o in s.items():
                    pos[c] = max(o, pos.get(c, 0))
            elif isinstance(s, int) and not is_wildcard(p):
                pos[p] = max(s, pos.get(p, 0))
        # every listed channel's starting position, before any replayed event
        # ("0" when no listed channel has an event yet: all is new)
        stream.write(b"id: %s\n\n" % (encode_position(pos) or "0").encode())
        replays = [sub.add(p, s) for p, s in zip(patterns, sinces, strict=True)]
        self.app.stats.subscriptions["sse"] += len(sub.patterns)
        for r in replays:
            await r

    def _failed(self, f: Failure, stream: _Stream) -> None:
        if not f.check(CancelledError):
            log.failure("opening an SSE stream", f)
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


class _Waiter:
    """A long-poll's live listener: collects events after C{since}."""

    def __init__(self, reactor: Any, since: int) -> None:
        self.reactor = reactor
        self.since = since
        self.events: list[Event] = []
        self.d: Deferred[list[Event]] = Deferred(self._cancel)
        self._fire_call: IDelayedCall | None = None
        self._timer: IDelayedCall | None = None

    def deliver(self, event: Event) -> None:
        if self.d.called or event.offset <= self.since:
            return
        self.events.append(event)
        if self._fire_call is None:
            self._fire_call = self.reactor.callLater(0, self.fire)

    def wait(self, timeout: float) -> Deferred[list[Event]]:
        if not self.d.called and self._fire_call is None:
            self._timer = self.reactor.callLater(timeout, self.fire)
        return self.d

    def fire(self) -> None:
        self._stop_timers()
        if not self.d.called:
            self.d.callback(self.events[:MAX_POLL_EVENTS])

    def _stop_timers(self) -> None:
        for c in (self._fire_call, self._timer):
            if c is not None and c.active():
                c.cancel()
        self._fire_call = self._timer = None

    def _cancel(self, d: Deferred[list[Event]]) -> None:
        self._stop_timers()


class PollResource(JsonResource):
    """C{GET /poll?channel=a&since=N&timeout=30}."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app
        self.waiters: set[_Waiter] = set()
        app.on_shutdown(self.shutdown)

    async def handle_GET(self, request: Request) -> dict[str, Any]:
        app = self.app
        origin = _check_origin(app, request)
        principal = app.principal(request)
        names = _arg(request, "channel")
        if len(names) != 1:
            raise JsonError(400, "bad_request", "name exactly one channel: /poll?channel=a&since=N")
        try:
            channel = validate_channel(names[0])
        except ChannelError as e:
            raise JsonError(400, "invalid_channel", f"{e}; /poll takes one exact channel") from None
        if not principal.can_read(channel):
            raise JsonError(403, "forbidden", f"this token may not read {channel!r}")
        since = _int_arg(request, "since", 0)
        limit = min(_int_arg(request, "limit", MAX_POLL_EVENTS), MAX_POLL_EVENTS) or MAX_POLL_EVENTS
        t = _arg(request, "timeout")
        timeout = 30.0
        if t:
            try:
                timeout = float(t[0])
            except ValueError:
                timeout = -1.0
            if not 0 <= timeout < float("inf"):
                raise JsonError(400, "bad_request", "'timeout' must be a number of seconds >= 0")
        timeout = min(timeout, app.config.sse.max_poll_timeout_seconds)
        _cors(request, origin)
        waiter = _Waiter(app.reactor, since)
        app.broker.subscribe(channel, waiter)
        self.waiters.add(waiter)
        stats = app.stats
        stats.connections["poll"] += 1
        stats.subscriptions["poll"] += 1
        try:
            events = await app.broker.history(channel, since, limit)
            if not events and timeout > 0 and not app.stopping:
                events = await waiter.wait(timeout)
        finally:
            stats.connections["poll"] -= 1
            stats.subscriptions["poll"] -= 1
            waiter._stop_timers()
            self.waiters.discard(waiter)
            app.broker.unsubscribe(channel, waiter)
        events = events[:limit]
        app.stats.events_out["poll"] += len(events)
        return {
            "events": [e.public() for e in events],
            "last_offset": events[-1].offset if events else since,
        }

    def shutdown(self) -> None:
        """Answer every waiting poll now (with what it has: usually nothing)."""
        for w in list(self.waiters):
            w.fire()


def _int_arg(request: Request, name: str, default: int) -> int:
    v = _arg(request, name)
    if not v:
        return default
    if not v[0].isdigit():
        raise JsonError(400, "bad_request", f"{name!r} must be an integer >= 0")
    return int(v[0])


def resource(app: App) -> IResource:
    """The C{/sse} resource."""
    return SSEResource(app)


def poll_resource(app: App) -> IResource:
    """The C{/poll} resource."""
    return PollResource(app)

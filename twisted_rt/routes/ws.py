# -*- test-case-name: tests.test_ws -*-
"""
C{/ws}: WebSocket subscribers and publishers (Autobahn, mounted in the
C{twisted.web} tree with L{WebSocketResource}).

The delivery path is the hot path of the daemon, so it does as little as
possible per subscriber:

  - each event is framed once (C{factory.prepareMessage} on
    C{event.ws_json()}) and the frame bytes are cached on the event, shared
    by every connection;
  - a connection appends the frame to its own queue; the connections with
    something queued are written in rounds (L{RTWebSocketFactory._schedule}:
    at once when idle, after an adaptive hold when busy, a chunk of
    connections per reactor turn), each queue as B{one} C{transport.write}
    (a fan-out of more than L{FLUSH_EVERY} deliveries in one reactor turn
    is flushed every L{FLUSH_EVERY}, so its first events are not held back);
  - the queue is bounded I{before} the transport: the connection registers
    a push producer on its transport, so it knows when the kernel and the
    transport's buffer are full (C{pauseProducing}); while paused frames
    stay in the queue, and when the queue passes
    C{websocket.max_send_buffer_bytes} it is dropped and the connection is
    closed with 1013 (the close frame is then the next thing on the wire
    after at most the transport's own buffer).

Per-connection memory is bounded whatever the client sends (see
L{twisted_rt.subscriber} for subscriptions and replays): a C{since} object
names at most C{max_since_channels} channels over the connection's life
(those the subscriber still keeps; else C{too_many_channels}); a
subscribe of a pattern already held is answered and changes nothing; the
queue of frames and replies is bounded as above (1013); publishes waiting
for the journal are at most L{MAX_PUBLISHING} and about
C{max_message_bytes} of messages, past which the connection is not read
until half have settled; incoming messages are bounded by Autobahn at
C{max_message_bytes} (1009).

Autobahn traps handled here: C{sendClose} only accepts 1000 and 3000-4999,
so 1001/1008/1009/1013 go through C{sendCloseFrame}; C{failByDrop} is off so
an oversized message gets a real 1009 close; C{onMessage}'s async work has
an errback; the factory is started and stopped from the app's lifecycle
hooks because a C{Site} never does it.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Mapping

import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from twisted_rt.app import App
from twisted_rt.core.auth import Principal
from twisted_rt.core.event import Draft, Event, dumps, loads
from twisted_rt.core.matcher import (
    ChannelError,
    PatternError,
    is_wildcard,
    validate_channel,
    validate_pattern,
)
from twisted_rt.interfaces import AuthError, Reactor
from twisted_rt.subscriber import Since, Subscriber
from twisted_rt.web.resource import as_json_error, origin_allowed, write_json
from twisted_rt.web.site import write_now

__all__ = ["RTWebSocketFactory", "RTWebSocketProtocol", "SinceTooLarge", "parse_since", "resource"]

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_DISCONNECTED = 4003

#: bad messages (bad JSON, unknown op, invalid fields) tolerated before 1008
MAX_BAD_MESSAGES = 10
#: seconds between two C{op: presence} requests of one connection: a member list is up to
#: ~1 MB of JSON (1,000 members with 1 KiB of info each), so a loop of them is a CPU and
#: bandwidth amplifier; changes come as join/leave events anyway
PRESENCE_INTERVAL = 1.0
#: longest event type a publish may give (as C{POST /api/publish}: L{twisted_rt.routes.api.MAX_TYPE_LENGTH})
MAX_TYPE_LENGTH = 100
#: seconds to wait for the peer's close frame before dropping TCP
CLOSE_HANDSHAKE_TIMEOUT = 5.0
#: seconds a closed slow consumer gets to read what is already in flight and
#: the 1013 (its queue is gone: only the transport's bounded buffer is held)
SLOW_CLOSE_TIMEOUT = 30.0
#: deliveries queued in one turn after which every queue is written at once
FLUSH_EVERY = 20000
#: auto-pings sent per reactor turn (Autobahn's own timer sends up to 1,000)
PING_CHUNK = 50
#: connections written per reactor turn: between chunks the reactor reads
#: requests and takes commits, so publishers are answered during a fan-out
FLUSH_CHUNK = 128
#: seconds a round of writes may wait after the previous one (which waits as
#: long as that one took): at once when idle, several events per write when busy
MAX_HOLD = 0.025
#: a direct fan-out (the only event of a commit, written at once) counts as a
#: round of this fraction of its length for the hold: with its whole length,
#: at 40k deliveries/s (a 15 ms fan-out every 25 ms) most events waited up to
#: a fan-out's time with nothing to share a write with
DIRECT_HOLD = 1 / 3
#: a round that wrote fewer events per connection than this counts for the hold
#: as a direct fan-out does (L{DIRECT_HOLD} of its length): the daemon keeps up,
#: and holding the next round as long as this one took only added latency (at
#: 40k deliveries/s on a slow machine rounds of ~20 ms every 25 ms each waited a
#: whole round: p50 25-35 ms instead of 13-20); a round of more (events come
#: faster than rounds) counts whole, so that the next writes carry more events
BUSY_ROUND = 2
#: seconds the shutdown hook waits for clients to answer the 1001 close
SHUTDOWN_WAIT = 3.0
#: publishes of one connection awaiting the journal before its reads pause
MAX_PUBLISHING = 64
#: channels the C{since} objects of one connection may name when C{max_since_channels} is 0
MAX_SINCE_CHANNELS = 100000

_STATE_OPEN = 3  # WebSocketProtocol.STATE_OPEN

# Our own log: the classes below keep Autobahn's txaio logger as C{self.log}
# (it filters debug output cheaply; a twisted Logger there would emit it all).
_log = Logger()


def _dropped(event: Event) -> None:
    """What a closed connection's subscriber sends to: nothing."""


def _short(value: Any) -> str:
    """C{repr(value)}, cut to 80 characters (error messages echo client input)."""
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


class SinceTooLarge(ValueError):
    """A C{since} object naming more channels than one subscribe may."""


def parse_since(value: Any, max_channels: int | None = None) -> Since:
    """
    Check a C{since} value: absent, an offset, or C{{channel: offset}}
    naming at most C{max_channels} channels (C{None}: any number).

    @raise SinceTooLarge: an object naming more channels (refused before
        any of them is looked at).
    @raise ValueError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("'since' must be an offset or an object of channel offsets")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("'since' may not be negative")
        return value
    if isinstance(value, dict):
        if max_channels is not None and len(value) > max_channels:
            raise SinceTooLarge(
                f"'since' names {len(value)} channels; this connection may name {max_channels} more"
                " ([websocket] max_since_channels)"
            )
        out: dict[str, int] = {}
        for k, v in value.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"'since' for {k!r} must be an offset >= 0")
            try:
                out[validate_channel(k)] = v
            except ChannelError as e:
                raise ValueError(f"'since' names a bad channel {k!r}: {e}") from None
        return out
    raise ValueError("'since' must be an offset or an object of channel offsets")


@implementer(IPushProducer)
class _Backpressure:
    """The push producer a connection registers on its transport."""

    __slots__ = ("proto",)

    def __init__(self, proto: RTWebSocketProtocol) -> None:
        self.proto = proto

    def pauseProducing(self) -> None:
        self.proto._paused = True

    def resumeProducing(self) -> None:
        p = self.proto
        p._paused = False
        if p._queue:
            if not p._dirty:
                p._dirty = True
                p.factory.mark(p)
        elif p._drain_waiters:
            p._fire_waiters()

    def stopProducing(self) -> None:
        self.proto._paused = True


class RTWebSocketProtocol(WebSocketServerProtocol):
    """One WebSocket client."""

    factory: RTWebSocketFactory
    #: the C{transport} label of its connections, subscriptions and events in the stats
    stat_name = "ws"

    # What the delivery path reads for every (event, subscriber), in slots: at
    # fixed offsets in the object, not in the instance dictionary, which
    # Autobahn's ~150 attributes make a table of several KiB per connection
    # (one more cache miss per attribute; with 1,000 connections the tables
    # do not stay in cache).  A/B at 10k and 40k deliveries/s: ~1 us less per
    # delivery.  _fac and _tr are the factory and the transport, set when the
    # connection is made.
    __slots__ = ("_closing", "_compress", "_dirty", "_fac", "_paused", "_queue", "_queued", "_queued_events", "_tr")

    def __init__(self) -> None:
        super().__init__()
        self._queue: list[bytes] = []
        self._queued = 0
        self._queued_events = 0
        self._paused = False
        self._dirty = False
        self._closing = False
        self._opened = False
        self._ip: str | None = None
        self._bad = 0
        self._expiry: IDelayedCall | None = None
        self._compress = False
        self._drain_waiters: list[Deferred[None]] = []
        # publishes awaiting the journal (count, message bytes); reads pause past a bound
        self._publishing = 0
        self._publishing_bytes = 0
        self._reads_paused = False
        self._msg_bytes = 0
        self.principal: Principal | None = None
        self.subscriber: Subscriber | None = None
        self._deny_code = ""
        # presence: the channels this connection is a member of (as _member), and watches
        self._rt_member: str | None = None
        self._rt_joined: dict[str, None] = {}
        self._rt_watching: dict[str, None] = {}
        self._rt_registered: str | None = None
        self._presence_next = 0.0

    def connectionMade(self) -> None:
        self._fac = self.factory
        self._tr = self.transport
        super().connectionMade()

    def _spread_auto_ping(self) -> None:
        """
        Move this connection's first auto-ping to a random point of the
        interval.  Autobahn plans it one interval after the open, and each
        next one an interval after the last, so connections opened together
        ping together for ever, and their pongs come back together: with
        1,000 subscribers, 1,000 frames to parse in a few hundred ms every
        interval, a latency tail for the events fanned out meanwhile (the
        bench's fan-out at 40k/s: p99 ~35 ms in the windows that met one,
        ~17 ms in the others).  Spread, they are ~50 a second.  Missing
        public API: a jitter option; this re-plans Autobahn's
        C{autoPingPendingCall} with its private C{_sendAutoPing} (Autobahn
        24.4-26.11); without them Autobahn's plan stays.
        """
        interval: float = getattr(self, "autoPingInterval", 0)
        call = getattr(self, "autoPingPendingCall", None)
        send = getattr(self, "_sendAutoPing", None)
        if not interval or call is None or send is None:
            return
        call.cancel()
        self.autoPingPendingCall = self.factory._batched_timer.call_later(
            interval * random.uniform(0.05, 1.0), send)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        """A refused upgrade, answered like every other error: a JSON body."""
        error = self._deny_code or _DENY_CODES.get(code, "bad_request")
        body = dumps({"error": error, "message": reason})
        phrase = RESPONSES.get(code, b"Error").decode("latin-1")
        head = [f"HTTP/1.1 {code} {phrase}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close"]
        if code == 401:
            head.append('WWW-Authenticate: Bearer error="invalid_token"')
        for k, v in responseHeaders or ():
            head.append(f"{k}: {v}")
        self.sendData(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    # handshake

    def onConnect(self, request: ConnectionRequest) -> None:
        f = self.factory
        app = f.app
        if app.stopping:
            raise ConnectionDeny(503, "the server is shutting down")
        headers = request.headers
        origin = headers.get("origin")
        if not origin_allowed(origin, app.config.server.allowed_origins, headers.get("host")):
            self._deny_code = "forbidden_origin"
            raise ConnectionDeny(403, f"origin {origin!r} is not allowed")
        token = (request.params.get("token") or [None])[0]
        try:
            principal = app.auth.bearer(headers.get("authorization"), token)
        except AuthError as e:
            self._deny_code = e.code
            raise ConnectionDeny(e.status, e.message) from None
        limit = app.config.websocket.max_connections_per_ip
        transport: Any = self.transport
        peer = transport.getPeer()
        ip = getattr(peer, "host", None) or str(peer)
        if limit and f.per_ip[ip] >= limit:
            self._deny_code = "too_many_connections"
            raise ConnectionDeny(429, f"more than {limit} WebSocket connections from {ip}")
        f.per_ip[ip] += 1
        self._ip = ip
        self.principal = principal
        return None

    def onOpen(self) -> None:
        f = self.factory
        app = f.app
        self._opened = True
        self._compress = bool(self.websocket_extensions_in_use)  # public: permessage-deflate accepted
        self._spread_auto_ping()
        f.clients.add(self)
        app.stats.connections[self.stat_name] += 1
        self.subscriber = Subscriber(
            app.broker,
            self._send_event,
            backlog=self._backlog,
            on_overflow=self._slow_consumer,
            max_buffer_bytes=f.max_send_buffer,
        )
        self.subscriber.send_many = self._send_events
        transport: Any = self.transport
        try:
            # the HTTP channel that carried the upgrade is still registered
            transport.unregisterProducer()
        except RuntimeError:
            pass  # none was (a transport that refuses to unregister nothing)
        transport.registerProducer(_Backpressure(self), True)
        self._schedule_expiry()
        self._rt_register(self.principal.member if self.principal is not None else None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        f = self.factory
        if self._ip is not None:
            f.per_ip[self._ip] -= 1
            if f.per_ip[self._ip] <= 0:
                del f.per_ip[self._ip]
            self._ip = None
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        self._queue = []
        self._queued = 0
        self._fire_waiters()
        self._leave_all()
        self._rt_register(None)
        if not self._opened:
            return
        self._opened = False
        f.clients.discard(self)
        stats = f.app.stats
        stats.connections[self.stat_name] -= 1
        if self.subscriber is not None:
            stats.subscriptions[self.stat_name] -= len(self.subscriber.patterns)
            self.subscriber.close()

    # delivery (the hot path)

    def _send_event(self, event: Event) -> None:
        # called once per event per subscriber: keep it to a few attribute ops
        f = self._fac
        if self._compress:
            frame = event.ws_json()
        elif event is f._last_event:
            frame = f._last_frame
        else:
            frame = f.frame(event)
            f._started(event)
        if self._closing:
            return
        if event is f._direct_event and not self._queued and not self._paused:  # (_queued: no list to read)
            # the only event of its commit on an idle daemon: written at once
            write_now(self._tr, frame)
            f._events_out[f.stat_name] += 1
            return
        self._queue.append(frame)
        queued = self._queued = self._queued + len(frame)
        self._queued_events += 1
        if queued > f.max_send_buffer:
            self._slow_consumer()
            return
        if not self._dirty and not self._paused:
            self._dirty = True
            f._dirty.append(self)  # f.mark(self), one call less per delivery
            if f._flush_call is None:
                f._schedule()
        pending = f._pending = f._pending + 1
        if pending >= FLUSH_EVERY:
            # a commit of many events to many clients in this turn: don't make
            # the first ones wait until the whole batch has been queued
            f.flush_now()
        elif pending == 1:
            f._count_turn()

    def _send_events(self, events: list[Event]) -> None:
        """
        Several live events of one channel, in order (a commit's): their
        frames are queued as one piece (joined once for every connection,
        L{RTWebSocketFactory.frames}) and written by the next round, so the
        per-connection work is paid once per commit, not once per event.
        """
        if self._compress or self._closing:
            for event in events:
                self._send_event(event)
            return
        self._enqueue(self._fac.frames(events), len(events))

    def _enqueue(self, data: bytes, events: int) -> None:
        """
        Queue C{data}, the frames of C{events} events (0: a reply), for the
        next round: the queued path of L{_send_event}, which has it inline
        (one call less per delivery).
        """
        if self._closing:
            return
        f = self._fac
        self._queue.append(data)
        queued = self._queued = self._queued + len(data)
        self._queued_events += events
        if queued > f.max_send_buffer:
            self._slow_consumer()
            return
        if not self._dirty and not self._paused:
            self._dirty = True
            f.mark(self)
        if events:
            pending = f._pending = f._pending + events
            if pending >= FLUSH_EVERY:
                f.flush_now()
            elif pending == events:
                f._count_turn()

    def _flush(self) -> int:
        """Write the queue as one write; the number of events written."""
        self._dirty = False
        if self._paused or not self._queue or self._closing:
            return 0
        queue, n = self._queue, self._queued_events
        self._queued = 0
        self._queued_events = 0
        if self._compress:
            for m in queue:
                self.sendMessage(m)
        else:
            write_now(self.transport, b"".join(queue) if len(queue) > 1 else queue[0])
        # the same list again: no new (collector-tracked) object per write
        queue.clear()
        if self._drain_waiters and not self._paused:
            self._fire_waiters()
        return n

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Gone: after Autobahn's own handling (and L{onClose}), break the
        reference cycles the connection is in (its subscriber holds three of
        its methods; Autobahn's C{is_closed} holds the protocol as its
        result), so that reference counting frees its ~30 objects at once.
        Otherwise only a full collection of the cyclic GC finds them: after a
        round of connections closed, a pause of tens of milliseconds in the
        middle of the fan-out.
        """
        super().connectionLost(reason)
        sub = self.subscriber
        if sub is not None:
            sub.send = _dropped
            sub.send_many = None
            sub.backlog = None
            sub.on_overflow = None
        self.is_closed = succeed(None)

    def _backlog(self) -> Deferred[None] | None:
        """For replays: a Deferred while the queue is half full or the transport is full."""
        if self._closing or not (self._paused or self._queued > self.factory.max_send_buffer // 2):
            return None
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def _fire_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for d in waiters:
            d.callback(None)

    def _slow_consumer(self) -> None:
        f = self.factory
        f.app.stats.dropped["slow_consumer"] += 1
        _log.info(
            "closing slow consumer {peer}: send buffer over {limit} bytes",
            peer=self.peer,
            limit=f.max_send_buffer,
            log_category="RT-WS13",
        )
        self.closeHandshakeTimeout = SLOW_CLOSE_TIMEOUT
        self.close_with(CLOSE_TRY_AGAIN, f"slow consumer: send buffer over {f.max_send_buffer} bytes", False)

    def close_with(self, code: int, reason: str, flush: bool = True) -> None:
        """
        Stop deliveries and close with C{code} (any code, unlike
        C{sendClose}).  With C{flush}, what is queued is written first
        (unless the transport is full); else it is dropped.
        """
        if flush and self._queue and not self._closing and self.state == _STATE_OPEN:
            self._flush()
        self._queue = []
        self._queued = 0
        self._queued_events = 0
        self._closing = True
        self._leave_all()
        if self.subscriber is not None:
            self.factory.app.stats.subscriptions[self.stat_name] -= len(self.subscriber.patterns)
            self.subscriber.close()
        self._fire_waiters()
        if self.state == _STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def _reply(self, msg: dict[str, Any], ref: Any = None) -> None:
        if ref is not None:
            msg["ref"] = ref
        payload = dumps(msg)
        if self._compress:
            self._enqueue(payload, 0)
        else:
            self._enqueue(self.factory.prepareMessage(payload).payloadHybi, 0)

    def _error(self, code: str, message: str, ref: Any = None, abuse: bool = True) -> None:
        self._reply({"op": "error", "code": code, "message": message}, ref)
        if abuse:
            self._bad += 1
            if self._bad >= MAX_BAD_MESSAGES:
                self.close_with(CLOSE_POLICY, f"{self._bad} bad messages")

    # presence and connection control (the logic is in twisted_rt.store.presence)

    def disconnect(self) -> None:
        """The operator closed this user's connections (C{POST /api/users/<user>/disconnect}): 4003."""
        self.factory.app.stats.dropped["disconnected"] += 1
        self.close_with(CLOSE_DISCONNECTED, "disconnected by the operator")

    def _rt_register(self, user: str | None) -> None:
        """Be C{user}'s connection in the registry (C{None}: in nobody's)."""
        registry = self.factory.app.connections
        if registry is None or user == self._rt_registered:
            return
        if self._rt_registered is not None:
            registry.unregister(self._rt_registered, self)
        self._rt_registered = user
        if user is not None:
            registry.register(user, self)

    def _presence_on(self, channel: str) -> bool:
        """Whether C{channel} (an exact name) has presence."""
        rule = self.factory.app.config.rule(channel)
        return rule is not None and rule.presence

    def _presence_join(self, pattern: str) -> None:
        """C{pattern} is subscribed: on a presence channel, watch it and (with a JWT) be a member."""
        presence = self.factory.app.presence
        if presence is None or is_wildcard(pattern) or not self._presence_on(pattern) or self._closing:
            return
        if pattern not in self._rt_watching:
            self._rt_watching[pattern] = None
            presence.watch(pattern, self)
        user = self.principal.member if self.principal is not None else None
        if user is not None and pattern not in self._rt_joined:
            self._rt_member = user
            self._rt_joined[pattern] = None
            info = self.principal.info if self.principal is not None else None
            presence.add(pattern, user, info, self)

    def _presence_part(self, channel: str) -> None:
        """C{channel} is no longer subscribed: stop watching it and leave it."""
        presence = self.factory.app.presence
        if presence is None:
            return
        if self._rt_watching.pop(channel, 0) is None:
            presence.unwatch(channel, self)
        if self._rt_joined.pop(channel, 0) is None and self._rt_member is not None:
            presence.remove(channel, self._rt_member, self)

    def _leave_all(self) -> None:
        """The connection closes: every membership and watch goes."""
        for channel in list(self._rt_watching) + [c for c in self._rt_joined if c not in self._rt_watching]:
            self._presence_part(channel)

    def presence_changed(self, op: str, channel: str, user: str, info: Mapping[str, Any] | None) -> None:
        """A join or leave of a channel this connection subscribed to (encoded once for all of them)."""
        if not self._closing:
            self._enqueue(self.factory.presence_frame(op, channel, user, info, self._compress), 0)

    def op_presence(self, msg: dict[str, Any], ref: Any) -> Deferred[None] | None:
        """C{{"op":"presence","channel":...}} -> the channel's members (needs the subscribe right)."""
        try:
            channel = validate_channel(msg.get("channel"))
        except ChannelError as e:
            self._error("invalid_channel", str(e), ref)
            return None
        presence = self.factory.app.presence
        if presence is None or not self._presence_on(channel):
            self._error("presence_off", f"{channel!r} has no presence (a [[channels]] rule with presence = true)", ref)
            return None
        assert self.principal is not None
        if not self.principal.can_subscribe(channel):
            self._error("forbidden", f"this token may not subscribe to {channel!r}", ref)
            return None
        now = self.factory.app.reactor.seconds()
        if now < self._presence_next:
            # counted as a bad message: a client looping on it is closed with 1008
            self._error(
                "rate_limited",
                f"one presence request per {PRESENCE_INTERVAL:g} s per connection"
                " (after it, joins and leaves come as presence events)",
                ref,
            )
            return None
        self._presence_next = now + PRESENCE_INTERVAL

        def listed(members: list[Any]) -> None:
            self._reply({"op": "presence", "channel": channel, "members": members}, ref)

        return presence.members(channel).addCallback(listed)

    # token expiry

    def _schedule_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        exp = self.principal.exp if self.principal is not None else None
        if exp is not None:
            reactor: Reactor = self.factory.app.reactor
            self._expiry = reactor.callLater(max(0.0, exp - reactor.seconds()), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self.close_with(CLOSE_TOKEN_EXPIRED, "token expired")

    # client messages

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._closing:
            return
        if isBinary:
            self.close_with(CLOSE_POLICY, "binary messages are not accepted; send JSON text")
            return
        try:
            msg = loads(payload)
        except ValueError:
            self._error("bad_json", "the message is not valid JSON")
            return
        if not isinstance(msg, dict):
            self._error("bad_request", "a message is a JSON object with an 'op'")
            return
        ref = msg.get("ref")
        op = msg.get("op")
        handler = _OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            self._error("unknown_op", f"unknown op {_short(op)}: use subscribe, unsubscribe, publish, ping, auth, presence", ref)
            return
        self._msg_bytes = len(payload)
        try:
            result = handler(self, msg, ref)
        except Exception:  # noqa: BLE001 - answered, logged
            self._failed(Failure(), op, ref)
            return
        if isinstance(result, Deferred):
            result.addErrback(self._failed, op, ref)

    def _failed(self, f: Failure, op: Any, ref: Any) -> None:
        """
        An op failed: answered with the error of the one mapper
        (L{twisted_rt.web.resource.as_json_error}, e.g. C{journal_unavailable}),
        or logged and answered C{internal_error}.
        """
        e = as_json_error(f.value)
        if e is None:
            _log.failure("handling {op} from {peer}", f, op=op, peer=self.peer)
            self._error("internal_error", "the server failed to handle this message; it was logged", ref, False)
            return
        self._error(e.code, e.message, ref, False)

    def op_ping(self, msg: dict[str, Any], ref: Any) -> None:
        """C{{"op":"ping"}} -> C{{"op":"pong"}}."""
        self._reply({"op": "pong"}, ref)

    def op_subscribe(self, msg: dict[str, Any], ref: Any) -> Deferred[None] | None:
        """
        Subscribe to a channel or pattern, replaying after C{since}.  A
        pattern this connection already has (subscribed, or still replaying)
        is answered C{subscribed} and nothing else happens: no second replay,
        its C{since} is not used (see L{twisted_rt.subscriber}).
        """
        channel = msg.get("channel")
        try:
            pattern = validate_pattern(channel)
        except PatternError as e:
            self._error("invalid_channel", str(e), ref)
            return None
        wsconf = self.factory.app.config.websocket
        limit = wsconf.max_subscriptions
        assert self.principal is not None and self.subscriber is not None
        # what a since object may still name on this connection: the names it claims
        # are kept (per channel) for as long as a pattern of the connection matches them
        room = max(0, (wsconf.max_since_channels or MAX_SINCE_CHANNELS) - len(self.subscriber.seen))
        try:
            since = parse_since(msg.get("since"), room)
        except SinceTooLarge as e:
            self._error("too_many_channels", str(e), ref)
            return None
        except ValueError as e:
            self._error("bad_request", str(e), ref)
            return None
        if not self.principal.can_subscribe(pattern):
            self._error("forbidden", f"this token may not subscribe to {pattern!r}", ref)
            return None
        sub = self.subscriber
        if pattern in sub.patterns:
            self._reply({"op": "subscribed", "channel": pattern}, ref)
            return None
        if limit and len(sub.patterns) >= limit:
            self._error("too_many_subscriptions", f"at most {limit} subscriptions per connection", ref, False)
            return None
        def confirmed(recovered: bool | None = None) -> None:
            reply: dict[str, Any] = {"op": "subscribed", "channel": pattern}
            if recovered is not None:
                reply["recovered"] = recovered
            self._reply(reply, ref)
            self._presence_join(pattern)

        stats = self.factory.app.stats
        if since is None:
            confirmed()
            d = sub.add(pattern, since)
        else:
            # "subscribed" waits for the first replay page: it says whether the replay is whole
            d = sub.add(pattern, since, on_start=confirmed)
        stats.subscriptions[self.stat_name] += 1

        def undo(f: Failure) -> Failure:
            if pattern not in sub.patterns and not sub.closed:
                stats.subscriptions[self.stat_name] -= 1
            return f

        d.addErrback(undo)
        return d

    def op_unsubscribe(self, msg: dict[str, Any], ref: Any) -> None:
        """Stop a subscription."""
        channel = msg.get("channel")
        assert self.subscriber is not None
        if not isinstance(channel, str) or not self.subscriber.remove(channel):
            self._error("not_subscribed", f"not subscribed to {_short(channel)}", ref, False)
            return
        self.factory.app.stats.subscriptions[self.stat_name] -= 1
        self._presence_part(channel)
        self._reply({"op": "unsubscribed", "channel": channel}, ref)

    def op_publish(self, msg: dict[str, Any], ref: Any) -> Deferred[None] | None:
        """Publish one event (when the token allows it)."""
        try:
            channel = validate_channel(msg.get("channel"))
        except ChannelError as e:
            self._error("invalid_channel", str(e), ref)
            return None
        if "data" not in msg:
            self._error("bad_request", "publish needs 'data'", ref)
            return None
        event_id = msg.get("id")
        if event_id is not None and (not isinstance(event_id, str) or not 1 <= len(event_id) <= 200):
            self._error("bad_request", "'id' must be a string of 1-200 characters", ref)
            return None
        etype = msg.get("type", "")
        if not isinstance(etype, str) or len(etype) > MAX_TYPE_LENGTH:
            # the same rule as POST /api/publish
            self._error("bad_request", f"'type' must be a string of at most {MAX_TYPE_LENGTH} characters", ref)
            return None
        assert self.principal is not None
        if not self.principal.can_publish(channel):
            self._error("forbidden", f"this token may not publish to {channel!r}", ref)
            return None
        app = self.factory.app
        size = self._msg_bytes
        self._publish_started(size)
        # the publisher's idempotency scope: the same key over HTTP is the same event
        draft = Draft(channel=channel, data=msg["data"], source="ws", type=etype, id=event_id,
                      scope=self.principal.scope)
        d = app.broker.publish([draft])

        def settled(result: Any) -> Any:
            self._publish_settled(size)
            return result

        def done(accepted: list[Any]) -> None:
            a = accepted[0]
            if not a.duplicate:
                app.stats.events_in[self.stat_name] += 1
            self._reply({"op": "published", **a.receipt()}, ref)

        return d.addBoth(settled).addCallback(done)

    def _publish_started(self, size: int) -> None:
        """
        One more publish awaits the journal.  Past L{MAX_PUBLISHING} of them,
        or C{max_message_bytes} of their messages (a message's parsed data
        is held until journaled, and JSON like C{[{},{},...]} takes some 24
        times its text), the connection is no longer read (TCP pushes back
        on the client) until half have settled.
        """
        self._publishing += 1
        self._publishing_bytes += size
        if not self._reads_paused and (
            self._publishing >= MAX_PUBLISHING or self._publishing_bytes >= self.factory.max_message
        ):
            self._reads_paused = True
            transport: Any = self.transport
            if transport is not None:
                transport.pauseProducing()

    def _publish_settled(self, size: int) -> None:
        self._publishing -= 1
        self._publishing_bytes -= size
        if self._reads_paused and (
            self._publishing <= MAX_PUBLISHING // 2 and self._publishing_bytes <= self.factory.max_message // 2
        ):
            self._reads_paused = False
            transport: Any = self.transport
            if transport is not None:
                transport.resumeProducing()

    def op_auth(self, msg: dict[str, Any], ref: Any) -> None:
        """
        Replace the connection's token (e.g. before it expires); any valid
        token is accepted, and subscriptions it does not allow are dropped.
        """
        token = msg.get("token")
        if not isinstance(token, str) or not token:
            self._error("bad_request", "auth needs a 'token'", ref)
            return
        try:
            principal = self.factory.app.auth.authenticate(token)
        except AuthError as e:
            self._error(e.code, e.message, ref, False)
            return
        self.principal = principal
        self._schedule_expiry()
        # the new token may have fewer rights: first drop (and stop the
        # replays of) every pattern it may not read, then answer
        dropped: list[str] = []
        sub = self.subscriber
        if sub is not None:
            dropped = sub.remove_many([p for p in sub.patterns if not principal.can_subscribe(p)])
        self.factory.app.stats.subscriptions[self.stat_name] -= len(dropped)
        for pattern in dropped:
            self._presence_part(pattern)
        if principal.member != self._rt_member and self._rt_joined:
            # another identity (or none): leave as the old one, join as the new one
            channels = list(self._rt_joined)
            for channel in channels:
                self._presence_part(channel)
            for channel in channels:
                self._presence_join(channel)
        self._rt_register(principal.member)
        self._reply({"op": "authenticated", "sub": principal.sub}, ref)
        for pattern in dropped:
            self._reply({"op": "unsubscribed", "channel": pattern, "reason": "forbidden"})


_DENY_CODES = {400: "bad_request", 401: "invalid_token", 403: "forbidden", 429: "too_many_connections",
               503: "shutting_down"}

_OPS: dict[str, Any] = {
    "ping": RTWebSocketProtocol.op_ping,
    "subscribe": RTWebSocketProtocol.op_subscribe,
    "unsubscribe": RTWebSocketProtocol.op_unsubscribe,
    "publish": RTWebSocketProtocol.op_publish,
    "auth": RTWebSocketProtocol.op_auth,
    "presence": RTWebSocketProtocol.op_presence,
}


class RTWebSocketFactory(WebSocketServerFactory):
    """The factory of every C{/ws} connection: limits, clients, batched flush."""

    protocol = RTWebSocketProtocol  # type: ignore[assignment]
    #: the C{transport} label of the events written, in the stats
    stat_name = "ws"

    def __init__(self, app: App) -> None:
        super().__init__(reactor=app.reactor)
        self.app = app
        ws = app.config.websocket
        self.max_send_buffer = ws.max_send_buffer_bytes
        self.max_message = ws.max_message_bytes
        self.clients: set[RTWebSocketProtocol] = set()
        self.per_ip: Counter[str] = Counter()
        # connections with something queued, for the next round of writes
        self._dirty: list[RTWebSocketProtocol] = []
        # the round being written, a chunk per reactor turn, and how far it got
        self._round: list[RTWebSocketProtocol] = []
        self._round_pos = 0
        self._round_started = 0.0
        self._round_events = 0
        # when the last round ended and how long it took (the adaptive hold)
        self._round_ended = -1e9
        self._round_took = 0.0
        self._flush_call: IDelayedCall | None = None
        # the event written at once to every connection with nothing queued (see _started)
        self._direct_event: Event | None = None
        self._events_out = app.stats.events_out
        # the frame of the event being fanned out right now (one lookup less per subscriber)
        self._last_event: Event | None = None
        self._last_frame = b""
        # the run of events being fanned out right now, and its frames joined (frames)
        self._run_events: list[Event] | None = None
        self._run_data = b""
        # deliveries queued in this reactor turn since the last write (FLUSH_EVERY),
        # and the call that starts the count again in the next turn
        self._pending = 0
        self._turn_call: IDelayedCall | None = None
        # the join/leave being sent to every watcher right now: encoded once
        self._presence_key: tuple[Any, ...] = ()
        self._presence_frames: tuple[bytes, bytes] = (b"", b"")
        options: dict[str, Any] = dict(
            maxFramePayloadSize=ws.max_message_bytes,
            maxMessagePayloadSize=ws.max_message_bytes,
            failByDrop=False,
            closeHandshakeTimeout=CLOSE_HANDSHAKE_TIMEOUT,
            openHandshakeTimeout=10,
            autoPingInterval=ws.ping_interval_seconds if ws.ping_interval_seconds > 0 else 0,
            autoPingTimeout=ws.ping_timeout_seconds,
            echoCloseCodeReason=True,
        )
        if ws.compression:
            options["perMessageCompressionAccept"] = _accept_deflate
        self.setProtocolOptions(**options)
        # Autobahn schedules every connection's auto-ping on one batched timer whose
        # buckets run up to 1,000 pings in one reactor turn: 1,000 connections opened
        # together are pinged in one ~40 ms burst every ping interval, a latency tail of
        # every event fanned out behind it.  The same timer in chunks of PING_CHUNK, with
        # the reactor running in between.  Missing public API: a chunk size option
        # (Autobahn 24.4-26.11 create WebSocketServerFactory._batched_timer with
        # chunk_size=1000 in __init__); without the attribute, Autobahn's stays.
        if hasattr(self, "_batched_timer"):
            # txaio.make_batched_timer exists once txaio.use_twisted() ran (autobahn.twisted does)
            self._batched_timer = txaio.make_batched_timer(  # type: ignore[attr-defined]
                bucket_seconds=0.2, chunk_size=PING_CHUNK)

    def frame(self, event: Event) -> bytes:
        """The event's WebSocket frame: built once, cached on the event."""
        frame: bytes | None = event.cached("ws")
        if frame is None:
            frame = event.cache("ws", self.prepareMessage(event.ws_json()).payloadHybi)
        self._last_event = event
        self._last_frame = frame
        return frame

    def frames(self, events: list[Event]) -> bytes:
        """The frames of C{events}, joined: once per run, for every connection it goes to."""
        if events is self._run_events:
            return self._run_data
        data = b"".join([self.frame(e) for e in events])
        self._run_events = events
        self._run_data = data
        return data

    def presence_frame(self, op: str, channel: str, user: str, info: Mapping[str, Any] | None, raw: bool) -> bytes:
        """
        A join or leave message: its JSON (C{raw}, for a compressing
        connection) or its frame, built once per join or leave for every watcher.
        """
        key = (op, channel, user, info)
        cached = self._presence_key
        if not (cached and cached[0] == op and cached[1] == channel and cached[2] == user and cached[3] is info):
            msg: dict[str, Any] = {"op": op, "channel": channel, "user": user}
            if op == "join" and info is not None:
                msg["info"] = info
            payload = dumps(msg)
            self._presence_key = key
            self._presence_frames = (payload, self.prepareMessage(payload).payloadHybi)
        return self._presence_frames[0 if raw else 1]

    def _started(self, event: Event) -> None:
        """
        A new event is being fanned out.  When it is the only one of its
        commit (C{event.alone}) and the daemon is idle (no round running,
        planned or held), every connection with nothing queued writes it at
        once, during the fan-out; the fan-out then counts as a round of
        L{DIRECT_HOLD} of its length for the adaptive hold (it ends with the
        turn, L{_direct_done}).  Otherwise it is queued and written by the
        next round.
        """
        if not event.alone or self._flush_call is not None or self._round:
            self._direct_event = None
            return
        now = self.reactor.seconds()
        if now < self._round_ended + min(self._round_took, MAX_HOLD):
            self._direct_event = None
            return
        self._direct_event = event
        self._round_started = now
        self._flush_call = self.reactor.callLater(0, self._direct_done)

    def _direct_done(self) -> None:
        """The turn of a direct fan-out is over: time it (see L{DIRECT_HOLD}); connections that could not take it get a round."""
        self._flush_call = None
        self._direct_event = None
        now = self.reactor.seconds()
        self._round_ended = now
        self._round_took = (now - self._round_started) * DIRECT_HOLD
        if self._dirty:
            self._schedule()

    def _count_turn(self) -> None:
        """
        The first delivery queued in this turn: the L{FLUSH_EVERY} count
        starts again in the next turn.  Deliveries queued over several
        turns (a busy round's hold, the broker's fan-out spread over turns)
        are the rounds' to write, a chunk per turn: writing every queue at
        once then was a turn of ~15 ms with 1,000 connections that held back
        the commits and acks behind it (publish ack p99 30-35 ms at 80 % of
        saturation, 20-23 ms without).
        """
        if self._turn_call is None:
            self._turn_call = self.reactor.callLater(0, self._new_turn)

    def _new_turn(self) -> None:
        self._turn_call = None
        self._pending = 0

    def mark(self, proto: RTWebSocketProtocol) -> None:
        """C{proto} has something queued: it is written in the next round."""
        self._dirty.append(proto)
        if self._flush_call is None:
            self._schedule()

    def _schedule(self) -> None:
        """
        Plan the next round: idle (the last round ended long ago), at once,
        i.e. at the end of this turn; busy, once as long as the last round
        took (at most L{MAX_HOLD}; a light round or a direct fan-out counts
        L{DIRECT_HOLD} of its length, L{BUSY_ROUND}) has passed since it
        ended, so that what is committed meanwhile leaves in the same write
        per connection.
        """
        wait = self._round_ended + min(self._round_took, MAX_HOLD) - self.reactor.seconds()
        self._flush_call = self.reactor.callLater(wait if wait > 0 else 0, self._flush_all)

    def _flush_all(self) -> None:
        """
        Write the next L{FLUSH_CHUNK} connections of the round (starting a
        round with every connection marked so far), then let the reactor
        run (requests, commits, acks) before the next chunk.  A connection
        of the round not yet written takes every frame queued meanwhile in
        its one write; one already written goes into the next round.
        """
        self._flush_call = None
        self._pending = 0
        rnd = self._round
        now = self.reactor.seconds()
        if not rnd:
            if not self._dirty:
                return
            rnd = self._round = self._dirty
            self._dirty = []
            self._round_pos = 0
            self._round_started = now
            self._round_events = 0
        start = self._round_pos
        end = self._round_pos = start + FLUSH_CHUNK
        n = 0
        for p in rnd[start:end] if start or end < len(rnd) else rnd:
            n += p._flush()
        if n:
            self.app.stats.events_out[self.stat_name] += n
            self._round_events += n
        if end < len(rnd):
            self._flush_call = self.reactor.callLater(0, self._flush_all)
            return
        self._round = []
        self._round_ended = now
        took = now - self._round_started
        self._round_took = took if self._round_events >= BUSY_ROUND * len(rnd) else took * DIRECT_HOLD
        if self._dirty:
            self._schedule()

    def flush_now(self) -> None:
        """Write every connection's queue now (a big fan-out, or the end of a test's turn)."""
        self._pending = 0
        rest = self._round[self._round_pos:]
        self._round = []
        dirty, self._dirty = self._dirty, []
        n = 0
        for p in rest:
            n += p._flush()
        for p in dirty:
            n += p._flush()
        if n:
            self.app.stats.events_out[self.stat_name] += n

    def shutdown(self) -> Deferred[None]:
        """Close every client with 1001 and wait (bounded) for them to go."""
        return ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        for p in list(self.clients):
            p.close_with(CLOSE_GOING_AWAY, "server shutting down")
        waited = 0.0
        while self.clients and waited < SHUTDOWN_WAIT:
            await deferLater(self.reactor, 0.02, lambda: None)
            waited += 0.02
        for p in list(self.clients):
            p.dropConnection(abort=True)
        self.doStop()


def _accept_deflate(offers: list[Any]) -> Any:
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


class WebSocketEndpoint(WebSocketResource):
    """
    L{WebSocketResource} that also takes the upgraded request out of the
    site's in-flight set (it never finishes as an HTTP request).
    """

    #: what a plain HTTP request to this endpoint is told (426)
    not_upgraded = "/ws is a WebSocket endpoint"

    def __init__(self, factory: RTWebSocketFactory) -> None:
        super().__init__(factory)
        self.rt_factory = factory

    def render(self, request: Request) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if request.method != b"GET":
            write_json(request, 405, {"error": "method_not_allowed", "message": "use GET with Upgrade: websocket"},
                       {"Allow": "GET"})
            return NOT_DONE_YET
        if b"websocket" not in upgrade:
            write_json(request, 426, {"error": "upgrade_required", "message": self.not_upgraded},
                       {"Upgrade": "websocket"})
            return NOT_DONE_YET
        if self.rt_factory.app.stopping:
            write_json(request, 503, {"error": "shutting_down", "message": "the server is shutting down"})
            return NOT_DONE_YET
        result = super().render(request)
        site = getattr(request.channel, "site", None)
        inflight = getattr(site, "inflight", None)
        if isinstance(inflight, set):
            inflight.discard(request)
        return result


def resource(app: App) -> IResource:
    """The C{/ws} resource; its factory starts and stops with the app."""
    factory = RTWebSocketFactory(app)

    def start() -> None:
        factory.doStart()

    app.on_startup(start)
    app.on_shutdown(factory.shutdown)
    r: IResource = WebSocketEndpoint(factory)
    return r

# -*- test-case-name: tests.test_subscriber -*-
"""
A client's subscriptions, and the resume rule shared by every transport.

Resume without gap or duplicate: when a subscription comes with C{since},
the subscriber first registers for live events I{but buffers them}, then
replays the journal after C{since}, then drains the buffer.  Every event
goes through L{Subscriber._emit}, which drops any event whose offset is not
above the last one this client saw on that channel.  Because the live
registration happens before the replay query, an event committed during the
replay is either in the replay or in the buffer (or both, and then dropped
once): no gap, no duplicate.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from twisted_rt.broker import Broker
from twisted_rt.event import Event
from twisted_rt.matcher import is_wildcard

__all__ = ["MAX_BUFFER", "REPLAY_PAGE", "Since", "Subscriber"]

Since = int | dict[str, int] | None
#: events read from the journal per replay query
REPLAY_PAGE = 1000
#: live events held while a replay runs before the client is given up on
MAX_BUFFER = 20000


class Subscriber:
    """
    One client's live subscriptions.

    @param send: called with each event to deliver, in order, exactly once.
    @param backlog: optional; returns a Deferred while the client's send
        queue is too full to take more replayed events (fires when it has
        drained), else C{None}.  Replays and buffer drains wait on it, so a
        long resume is paced by the client instead of filling memory.
    @param on_overflow: called when more than C{max_buffer} live events
        piled up during a replay (the transport closes the client, which
        resumes later with C{since}); default: L{close}.
    @ivar seen: the last offset delivered per channel.
    """

    log = Logger()

    def __init__(
        self,
        broker: Broker,
        send: Callable[[Event], None],
        backlog: Callable[[], Deferred[None] | None] | None = None,
        on_overflow: Callable[[], None] | None = None,
        max_buffer: int = MAX_BUFFER,
    ) -> None:
        self.broker = broker
        self.send = send
        self.backlog = backlog
        self.on_overflow = on_overflow
        self.max_buffer = max_buffer
        self.patterns: dict[str, None] = {}
        self.seen: dict[str, int] = {}
        self._buffer: list[Event] | None = None
        self._replaying = 0
        self._draining = False
        self.closed = False

    def deliver(self, event: Event) -> None:
        """A live event from the broker."""
        buf = self._buffer
        if buf is not None:
            buf.append(event)
            if len(buf) > self.max_buffer:
                self._overflow()
            return
        seen = self.seen
        ch = event.channel
        if event.offset <= seen.get(ch, 0):
            return
        seen[ch] = event.offset
        self.send(event)

    def _emit(self, event: Event) -> None:
        if self.closed:
            return
        ch = event.channel
        if event.offset <= self.seen.get(ch, 0):
            return
        self.seen[ch] = event.offset
        self.send(event)

    def add(self, pattern: str, since: Since = None) -> Deferred[None]:
        """
        Subscribe to C{pattern}; with C{since}, first replay what came after it.

        C{since} is the last offset seen: an int for an exact channel, or a
        mapping of channel to offset for a wildcard (channels not named
        replay from their start).  An int with a wildcard applies to every
        matching channel.  Fires when the replay has been sent; fails (and
        a new C{pattern} is not kept) when the replay query fails.
        """
        return ensureDeferred(self._add(pattern, since))

    async def _add(self, pattern: str, since: Since) -> None:
        fresh = pattern not in self.patterns
        if since is None:
            if fresh:
                self.patterns[pattern] = None
                self.broker.subscribe(pattern, self)
            return
        if isinstance(since, int):
            since_map: dict[str, int] = {} if is_wildcard(pattern) else {pattern: since}
            floor = since if is_wildcard(pattern) else 0
        else:
            since_map = dict(since)
            floor = 0
        for ch, off in since_map.items():
            if off > self.seen.get(ch, 0):
                self.seen[ch] = off
        if self._buffer is None:
            self._buffer = []
        self._replaying += 1
        if fresh:
            self.patterns[pattern] = None
            self.broker.subscribe(pattern, self)
        try:
            while not self.closed:
                cursor: dict[str, int] = _Floor(since_map, floor) if floor else dict(since_map)
                events = await self.broker.replay(pattern, cursor, REPLAY_PAGE)
                for e in events:
                    if self.closed:
                        return
                    self._emit(e)
                    since_map[e.channel] = e.offset
                    await self._pace()
                if len(events) < REPLAY_PAGE:
                    break
        except BaseException:
            # the replay failed (journal down): this pattern is not subscribed
            if fresh:
                self.remove(pattern)
            raise
        finally:
            self._replaying -= 1
            if not self.closed:
                # live events of the other patterns must not stay buffered
                await self._drain()

    async def _pace(self) -> None:
        """Wait while the client's send queue is full (replays only)."""
        if self.backlog is not None:
            w = self.backlog()
            if w is not None:
                await w

    async def _drain(self) -> None:
        """
        Send the live events buffered during replays, paced like a replay.
        Live events keep being buffered until the buffer is empty; a replay
        that starts meanwhile takes the rest over.
        """
        if self._draining:
            return  # the running drain picks up what is buffered now
        self._draining = True
        try:
            while self._replaying == 0 and self._buffer and not self.closed:
                buf = self._buffer
                self._buffer = []
                for i, e in enumerate(buf):
                    if self._replaying or self.closed:
                        if self._buffer is not None:
                            self._buffer[:0] = buf[i:]
                        return
                    self._emit(e)
                    await self._pace()
            if self._replaying == 0 and not self._buffer:
                self._buffer = None
        finally:
            self._draining = False

    def _overflow(self) -> None:
        self._buffer = []
        if self.on_overflow is not None:
            self.on_overflow()
        else:
            self.close()

    def remove(self, pattern: str) -> bool:
        """Unsubscribe from C{pattern}; C{False} if it was not subscribed."""
        if pattern not in self.patterns:
            return False
        del self.patterns[pattern]
        self.broker.unsubscribe(pattern, self)
        return True

    def close(self) -> None:
        """Drop every subscription (the connection has gone)."""
        self.closed = True
        for p in list(self.patterns):
            self.broker.unsubscribe(p, self)
        self.patterns.clear()
        self._buffer = None


class _Floor(dict[str, int]):
    """A since-map whose missing channels default to a floor offset."""

    def __init__(self, base: dict[str, int], floor: int) -> None:
        super().__init__(base)
        self.floor = floor

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, self.floor)

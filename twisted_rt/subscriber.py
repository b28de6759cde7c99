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

Bounds, whatever the client sends (each one a rule, each one tested):

  1. One replay runs at a time; the others wait in a queue, one entry per
     pattern (holding that pattern's C{since}).  A replay reads pages of at
     most L{REPLAY_PAGE} events and about C{page_bytes} of event JSON,
     paging by C{seq} until a page comes back empty, and holds one page at
     a time; between events it waits while the client's send queue is full
     (C{backlog}).
  2. A pattern already subscribed (or still replaying) is not subscribed or
     replayed again: L{add} answers at once and its C{since} is ignored (the
     client already receives every event of that pattern exactly once; to
     read history again it unsubscribes first).
  3. Live events held while replays run: at most C{max_buffer} events and
     C{max_buffer_bytes} of event JSON; past either the client is given up
     on (C{on_overflow}: the transport closes it, the client resumes later).
  4. C{seen} holds channels this client received events of, or named in a
     C{since} I{and} that the pattern matches (other names are not kept).
     After an unsubscribe, the next subscribe prunes the channels no
     current pattern matches once C{seen} has doubled since the last prune
     (at least L{PRUNE_MIN}), so subscribe/unsubscribe loops with made-up
     names cannot grow it, and the cost of a prune is paid by the entries
     added since the last one.  (The transport bounds how many channels one
     C{since} may name.)
  5. L{remove} stops its pattern's replay at once (a query in flight is
     abandoned, a wait on the client cancelled, a queued replay dropped),
     and buffered live events no remaining pattern matches are not sent.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rt.core.event import Event
from twisted_rt.core.matcher import PatternIndex, is_wildcard, matches
from twisted_rt.interfaces import Broker

__all__ = ["MAX_BUFFER", "MAX_BUFFER_BYTES", "REPLAY_PAGE", "REPLAY_PAGE_BYTES", "Since", "Subscriber"]

Since = int | dict[str, int] | None
#: events read from the journal per replay query
REPLAY_PAGE = 1000
#: about this much event JSON per replay query (one page is held at a time)
REPLAY_PAGE_BYTES = 1024 * 1024
#: live events held while a replay runs before the client is given up on
MAX_BUFFER = 10000
#: bytes of event JSON held while a replay runs before the client is given up on
MAX_BUFFER_BYTES = 4 * 1024 * 1024
#: C{seen} is not pruned below this many entries
PRUNE_MIN = 1024


class _Replay:
    """One pattern's pending or running replay."""

    __slots__ = ("after_seq", "done", "on_start", "pattern", "since", "stopped")

    def __init__(self, pattern: str, since: dict[str, int], after_seq: int,
                 on_start: Callable[[bool | None], None] | None = None) -> None:
        self.pattern = pattern
        self.since = since
        self.after_seq = after_seq
        self.done: Deferred[None] = Deferred()
        self.stopped = False
        self.on_start = on_start

    def started(self, recovered: bool | None) -> None:
        """
        Tell the transport (once) whether every event after C{since} is
        still kept (C{None}: the replay was stopped before it could tell).
        """
        cb, self.on_start = self.on_start, None
        if cb is not None:
            cb(recovered)


class Subscriber:
    """
    One client's live subscriptions.

    @param send: called with each event to deliver, in order, exactly once.
    @param backlog: optional; returns a Deferred while the client's send
        queue is too full to take more replayed events (fires when it has
        drained), else C{None}.  Replays and buffer drains wait on it, so a
        long resume is paced by the client instead of filling memory.
    @param on_overflow: called when more than C{max_buffer} live events (or
        C{max_buffer_bytes} of their JSON) piled up during a replay (the
        transport closes the client, which resumes later with C{since});
        default: L{close}.
    @param page_bytes: the C{max_bytes} of each replay query.
    @ivar send_many: optional; called instead of C{send} with several live
        events of one channel at once (L{deliver_many}), in order.
    @ivar seen: the last offset delivered (or claimed by a C{since}) per
        channel.
    @ivar patterns: the subscribed patterns, in subscription order.
    """

    __slots__ = (
        "_buffer",
        "_buffered",
        "_current",
        "_filter",
        "_index",
        "_prune_at",
        "_pumping",
        "_queue",
        "_stale",
        "_wait",
        "backlog",
        "broker",
        "closed",
        "max_buffer",
        "max_buffer_bytes",
        "on_overflow",
        "page_bytes",
        "patterns",
        "seen",
        "send",
        "send_many",
    )

    log = Logger()

    def __init__(
        self,
        broker: Broker,
        send: Callable[[Event], None],
        backlog: Callable[[], Deferred[None] | None] | None = None,
        on_overflow: Callable[[], None] | None = None,
        max_buffer: int = MAX_BUFFER,
        max_buffer_bytes: int = MAX_BUFFER_BYTES,
        page_bytes: int = REPLAY_PAGE_BYTES,
    ) -> None:
        self.broker = broker
        self.send = send
        #: optional: takes several live events of one channel at once (L{deliver_many})
        self.send_many: Callable[[list[Event]], None] | None = None
        self.backlog = backlog
        self.on_overflow = on_overflow
        self.max_buffer = max_buffer
        self.max_buffer_bytes = max_buffer_bytes
        self.page_bytes = page_bytes
        self.patterns: dict[str, None] = {}
        self.seen: dict[str, int] = {}
        self.closed = False
        # live events held while replays run (None: live events go out at once)
        self._buffer: deque[Event] | None = None
        self._buffered = 0
        self._queue: list[_Replay] = []  # a list: an empty deque costs ~600 bytes per connection
        self._current: _Replay | None = None
        # what the replay loop awaits now (a query or the client), cancellable
        self._wait: Deferred[Any] | None = None
        self._pumping = False
        # a pattern was removed while events were buffered: check them at drain
        self._filter = False
        # a pattern was removed since seen was last pruned
        self._stale = False
        self._prune_at = PRUNE_MIN
        self._index: PatternIndex[str] | None = None

    def deliver(self, event: Event) -> None:
        """A live event from the broker."""
        buf = self._buffer
        if buf is not None:
            if buf and buf[-1] is event:
                return  # the same event through another of our patterns
            buf.append(event)
            self._buffered += len(event.json())
            if len(buf) > self.max_buffer or self._buffered > self.max_buffer_bytes:
                self._overflow()
            return
        seen = self.seen
        ch = event.channel
        if event.offset <= seen.get(ch, 0):
            return
        seen[ch] = event.offset
        self.send(event)

    def deliver_many(self, events: list[Event]) -> None:
        """
        Live events of one channel from the broker, consecutive and in
        order: as L{deliver} of each, in one call (to C{send_many} when
        set, else C{send} of each).
        """
        if self._buffer is not None:
            for event in events:
                self.deliver(event)
            return
        seen = self.seen
        ch = events[0].channel
        last = seen.get(ch, 0)
        if events[0].offset <= last:
            events = [e for e in events if e.offset > last]
            if not events:
                return
        seen[ch] = events[-1].offset
        many = self.send_many
        if many is not None and len(events) > 1:
            many(events)
            return
        send = self.send
        for event in events:
            send(event)

    def _emit(self, event: Event) -> None:
        ch = event.channel
        if event.offset <= self.seen.get(ch, 0):
            return
        self.seen[ch] = event.offset
        self.send(event)

    def add(
        self,
        pattern: str,
        since: Since = None,
        *,
        after_seq: int = 0,
        on_start: Callable[[bool | None], None] | None = None,
    ) -> Deferred[None]:
        """
        Subscribe to C{pattern}; with C{since}, first replay what came after it.

        C{since} is the last offset seen: an int for an exact channel, or a
        mapping of channel to offset for a wildcard (channels not named
        replay from their start; names the pattern does not match are
        ignored).  An int with a wildcard applies to every matching channel.
        With C{after_seq}, only events of a journal C{seq} above it are
        replayed (with or without C{since}).

        With C{since}, C{on_start(recovered)} is called once, before the
        first replayed event is sent (or when the replay finds none):
        C{recovered} is C{False} when events after C{since} were already
        trimmed (the replay then starts at the oldest kept event).  It is
        judged on each channel's first replayed event (for a wildcard, those
        of the first page), and for an exact channel with nothing to replay,
        on its last offset.  When L{remove} stops the replay first, it is
        called with C{None} then (so every subscribe is answered before its
        unsubscribe); not when the subscriber is closed or the replay fails.

        A pattern already subscribed is left as it is (no second replay).
        Fires when the replay has been sent (or was stopped by L{remove});
        fails, and C{pattern} is not kept, when the replay query fails.
        """
        if self.closed or pattern in self.patterns:
            return succeed(None)
        if self._stale and len(self.seen) > self._prune_at:
            # before the new pattern counts: what only removed patterns matched goes
            self._prune()
        self.patterns[pattern] = None
        self._index = None
        if since is None and not after_seq:
            self.broker.subscribe(pattern, self)
            return succeed(None)
        since_map, floor = _since_map(pattern, since)
        if since_map:
            seen = self.seen
            for ch, off in since_map.items():
                if off > seen.get(ch, 0):
                    seen[ch] = off
        replay = _Replay(pattern, _Floor(since_map, floor) if floor else since_map, after_seq, on_start)
        if self._buffer is None:
            self._buffer = deque()
            self._buffered = 0
        self.broker.subscribe(pattern, self)  # live first (buffered), then the replay query
        self._queue.append(replay)
        if not self._pumping:
            self._pumping = True
            ensureDeferred(self._pump()).addErrback(self._pump_failed)
        return replay.done

    async def _pump(self) -> None:
        """Run the queued replays one after another, then drain the buffer."""
        try:
            while not self.closed:
                if not self._queue:
                    if await self._drain():
                        return
                    continue  # a replay was queued while draining
                r = self._queue.pop(0)
                self._current = r
                failure: Failure | None = None
                try:
                    await self._replay(r)
                except CancelledError:
                    pass  # stopped by remove() or close()
                except Exception:  # noqa: BLE001 - handed to the caller of add()
                    failure = Failure()
                self._current = None
                if failure is not None and not r.stopped and not self.closed:
                    # the replay failed (journal down): this pattern is not subscribed
                    self.remove(r.pattern)
                    r.done.errback(failure)
                else:
                    r.done.callback(None)
        finally:
            self._pumping = False

    def _pump_failed(self, f: Failure) -> None:  # pragma: no cover - _pump catches what replays raise
        self.log.failure("subscriber replay loop", f)

    async def _await(self, d: Deferred[Any]) -> Any:
        """Wait for C{d} in a way L{remove} and L{close} can cut short."""
        mine: Deferred[Any] = Deferred()
        d.chainDeferred(mine)
        self._wait = mine
        try:
            return await mine
        finally:
            self._wait = None

    async def _replay(self, r: _Replay) -> None:
        after = r.after_seq
        while True:
            page: list[Event] | None = await self._await(
                self.broker.replay(r.pattern, r.since, REPLAY_PAGE, after_seq=after, max_bytes=self.page_bytes)
            )
            if r.stopped or self.closed:
                return
            if r.on_start is not None:
                await self._judge(r, page)
                if r.stopped or self.closed:
                    return
            if not page:
                return
            last = page[-1].seq
            for e in page:
                self._emit(e)
                if self.backlog is not None:
                    w = self.backlog()
                    if w is not None:
                        await self._await(w)
                if r.stopped or self.closed:
                    return
            if last <= after:
                raise RuntimeError(f"the broker's replay of {r.pattern!r} does not advance past seq {after}")
            after = last
            page = None  # not held while the next page is read

    async def _judge(self, r: _Replay, page: list[Event] | None) -> None:
        """Whether the replay of C{r} recovers everything after its C{since} (see L{add})."""
        since = r.since
        recovered = True
        firsts: set[str] = set()
        for e in page or ():
            if e.channel not in firsts:
                firsts.add(e.channel)
                if e.offset > since.get(e.channel, 0) + 1:
                    recovered = False
                    break
        if not page and not is_wildcard(r.pattern):
            last = await self._await(self.broker.last_offset(r.pattern))
            recovered = last <= since.get(r.pattern, 0)
        r.started(recovered)

    async def _drain(self) -> bool:
        """
        Send the live events buffered during replays, paced like a replay.
        Live events keep being buffered until the buffer is empty.  C{True}
        when done (live events now go out at once); C{False} when a replay
        was queued meanwhile (it runs first, the rest stays buffered).
        """
        while True:
            buf = self._buffer
            if self.closed or buf is None:
                return True
            if self._queue:
                return False
            if not buf:
                self._buffer = None
                self._filter = False
                return True
            e = buf.popleft()
            self._buffered -= len(e.json())
            if self._filter and not self._readable(e.channel):
                continue  # only a removed pattern matched it
            self._emit(e)
            if self.backlog is not None:
                w = self.backlog()
                if w is not None:
                    try:
                        await self._await(w)
                    except CancelledError:
                        return True  # closed

    def _readable(self, channel: str) -> bool:
        for _ in self._patterns_index().match(channel):
            return True
        return False

    def _patterns_index(self) -> PatternIndex[str]:
        idx = self._index
        if idx is None:
            idx = self._index = PatternIndex()
            for p in self.patterns:
                idx.add(p, p)
        return idx

    def _prune(self) -> None:
        """Forget the channels no current pattern matches."""
        seen = self.seen
        for ch in [c for c in seen if not self._readable(c)]:
            del seen[ch]
        self._stale = False
        self._prune_at = max(PRUNE_MIN, 2 * len(seen))

    def _overflow(self) -> None:
        self._buffer = deque()
        self._buffered = 0
        if self.on_overflow is not None:
            self.on_overflow()
        else:
            self.close()

    def remove(self, pattern: str) -> bool:
        """
        Unsubscribe from C{pattern}; C{False} if it was not subscribed.  Its
        replay stops now, and what only it buffered is not sent.
        """
        return bool(self.remove_many([pattern]))

    def remove_many(self, patterns: Iterable[str]) -> list[str]:
        """
        Unsubscribe from several patterns at once (e.g. a narrowed token):
        all are gone before anything else is sent.  Returns those that were
        subscribed.
        """
        removed = [p for p in dict.fromkeys(patterns) if p in self.patterns]
        if not removed:
            return removed
        for p in removed:
            del self.patterns[p]
            self.broker.unsubscribe(p, self)
        self._index = None
        self._stale = True
        if self._buffer:
            self._filter = True
        gone = set(removed)
        for r in [r for r in self._queue if r.pattern in gone]:
            self._queue.remove(r)
            r.stopped = True
            r.started(None)  # every subscribe is answered, before its unsubscribe
            r.done.callback(None)
        cur = self._current
        if cur is not None and cur.pattern in gone:
            cur.stopped = True
            cur.started(None)
            self._cut()  # last: the replay loop may go on at once with the next replay
        return removed

    def _cut(self) -> None:
        """Cut short what the replay loop awaits (it then sees why and stops)."""
        w = self._wait
        if w is not None:
            w.cancel()

    def close(self) -> None:
        """Drop every subscription (the connection has gone)."""
        self.closed = True
        for p in list(self.patterns):
            self.broker.unsubscribe(p, self)
        self.patterns.clear()
        self._index = None
        self._buffer = None
        self._buffered = 0
        self.seen.clear()
        queued, self._queue = self._queue, []
        for r in queued:
            r.stopped = True
            r.done.callback(None)
        if self._current is not None:
            self._current.stopped = True
        self._cut()


def _since_map(pattern: str, since: Since) -> tuple[dict[str, int], int]:
    """
    The per-channel offsets of C{since} that concern C{pattern} (zero
    offsets left out: they are the default), and the floor for the others.
    """
    if since is None:
        return {}, 0
    wild = is_wildcard(pattern)
    if isinstance(since, int):
        if wild:
            return {}, since
        return ({pattern: since} if since > 0 else {}), 0
    if not wild:
        off = since.get(pattern, 0)
        return ({pattern: off} if off > 0 else {}), 0
    return {ch: off for ch, off in since.items() if off > 0 and matches(pattern, ch)}, 0


class _Floor(dict[str, int]):
    """A since-map whose missing channels default to a floor offset."""

    def __init__(self, base: dict[str, int], floor: int) -> None:
        super().__init__(base)
        self.floor = floor

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, self.floor)

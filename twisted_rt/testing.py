# -*- test-case-name: tests.test_testing -*-
"""
Test helpers: L{MemoryBroker}, the one in-memory broker every unit test
uses, and L{Recorder}, a listener that keeps what it is given.

It implements L{twisted_rt.interfaces.Broker} with the journal's rules, in
memory and synchronously:

  - C{publish} gives each new event the channel's next offset and the next
    C{seq}; a draft whose C{(scope or source, id)} is known (earlier, or
    earlier in the same call) answers the original event with
    C{duplicate=True}; data that cannot be written as JSON fails the whole
    call with L{UnencodableEvent} before anything is journaled.  New events
    are then fanned out through the real L{PatternIndex} of
    L{IndexedBroker}, in C{seq} order, duplicates never.
  - C{history} and C{replay} (one pattern or several, C{since} with its own
    C{get}, C{after_seq}) answer pages of at most C{limit} events and about
    C{max_bytes} of event JSON, at least one event when there is one.
  - C{position}, C{last_offset}, C{channels} as the local broker answers.

And it lets a test drive what a real store does on its own time:

  - L{MemoryBroker.unavailable}: a reason, and every durable call fails with
    L{JournalUnavailable} (C{ready} is false) until it is C{None} again.
  - L{MemoryBroker.hold_reads} / L{MemoryBroker.hold_publishes}: calls wait
    in L{MemoryBroker.held} until the test releases them; a held read
    answers from the journal as it is when released.
  - L{MemoryBroker.replays} and L{MemoryBroker.drafts} record what was asked.

No module of the package imports this one (the import contract in C{setup.cfg}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Mapping, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed

from twisted_rt.core.event import Accepted, Draft, Event, dumps, new_id, now_iso
from twisted_rt.core.matcher import matches
from twisted_rt.interfaces import PAGE_BYTES, ChannelInfo, JournalUnavailable, Reactor, UnencodableEvent
from twisted_rt.store.local import IndexedBroker

__all__ = ["Held", "MemoryBroker", "Recorder", "Replay"]

_T = TypeVar("_T")


class Recorder:
    """A L{twisted_rt.interfaces.Listener} that keeps every event it is given, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def deliver(self, event: Event) -> None:
        self.events.append(event)

    def offsets(self, channel: str | None = None) -> list[int]:
        """The offsets received (of one channel, or of all)."""
        return [e.offset for e in self.events if channel is None or e.channel == channel]


@dataclass
class Held(Generic[_T]):
    """
    A call the broker holds until the test settles it.

    @ivar kind: C{"publish"}, C{"history"}, C{"replay"}, C{"position"},
        C{"last_offset"} or C{"channels"}.
    @ivar deferred: what the caller got.
    @ivar answer: computes the call's result from the broker as it is now
        (for a publish: journals its drafts now).
    """

    kind: str
    deferred: Deferred[_T]
    answer: Callable[[], _T]
    drafts: Sequence[Draft] = ()

    def release(self) -> None:
        """Fire with what the call gives now (or its failure)."""
        try:
            result = self.answer()
        except Exception as e:  # noqa: BLE001 - handed to the caller, as the real broker does
            self.deferred.errback(e)
        else:
            self.deferred.callback(result)

    def fail(self, error: Exception) -> None:
        """Fail the call with C{error} (nothing is journaled)."""
        self.deferred.errback(error)


@dataclass(frozen=True)
class Replay:
    """The arguments of one C{replay} call."""

    pattern: str | Sequence[str]
    since: Mapping[str, int]
    limit: int
    after_seq: int
    max_bytes: int


class MemoryBroker(IndexedBroker):
    """
    An in-memory L{twisted_rt.interfaces.Broker} (see the module docstring).

    @ivar events: the journal, in C{seq} order (C{events[i].seq == i + 1}).
    @ivar drafts: every draft offered to C{publish}, in call order
        (duplicates, held and failed ones included).
    @ivar replays: every C{replay} call's arguments.
    @ivar held: the calls waiting for the test, oldest first.
    @ivar unavailable: when set, why every durable call fails.
    @ivar started: C{start} was called (and C{stop} not since).
    """

    def __init__(self, clock: Reactor | None = None) -> None:
        """
        @param clock: what stamps each event's C{time} (the wall clock when
            C{None}).
        """
        super().__init__()
        self.clock = clock
        self.events: list[Event] = []
        self.last_offsets: dict[str, int] = {}
        self.drafts: list[Draft] = []
        self.replays: list[Replay] = []
        self.held: list[Held[Any]] = []
        self.hold_reads = False
        self.hold_publishes = False
        self.unavailable: str | None = None
        self.started = False
        self._known: dict[tuple[str, str], Event] = {}

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Deferred[None]:
        self.started = True
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self.started = False
        return succeed(None)

    @property
    def ready(self) -> bool:
        return self.unavailable is None

    @property
    def not_ready_reason(self) -> str:
        return "" if self.unavailable is None else f"journal: {self.unavailable}"

    # -- writes --------------------------------------------------------------

    def publish(self, drafts: Sequence[Draft]) -> Deferred[list[Accepted]]:
        drafts = list(drafts)
        self.drafts.extend(drafts)
        try:  # encoded first, as the journal does: a bad event fails alone, before its batch
            for draft in drafts:
                if draft.text is None:
                    dumps(draft.data)
        except (TypeError, ValueError) as e:
            return fail(UnencodableEvent(f"the event data cannot be stored as JSON: {e}"))
        return self._maybe_hold("publish", lambda: self._journal(drafts), self.hold_publishes, drafts)

    def commit(self, channel: str, data: Any = None, **draft: Any) -> Event:
        """
        Publish one event now (not held) and return it: a shortcut for tests
        that play the journal's side.  C{draft} takes L{Draft}'s other fields.
        """
        offered = Draft(channel, data, **draft)
        self.drafts.append(offered)
        [accepted] = self._journal([offered])
        return accepted.event

    def _journal(self, drafts: Sequence[Draft]) -> list[Accepted]:
        self._check()
        stamp = now_iso(None if self.clock is None else self.clock.seconds())
        out: list[Accepted] = []
        for draft in drafts:
            key = (draft.scope or draft.source, draft.id) if draft.id is not None else None
            if key is not None and key in self._known:
                out.append(Accepted(self._known[key], duplicate=True))
                continue
            offset = self.last_offsets[draft.channel] = self.last_offsets.get(draft.channel, 0) + 1
            event = Event(
                id=draft.id if draft.id is not None else new_id(),
                channel=draft.channel,
                offset=offset,
                time=stamp,
                source=draft.source,
                type=draft.type,
                data=draft.data,
                raw=draft.raw,
                headers=draft.headers,
                seq=len(self.events) + 1,
            )
            self.events.append(event)
            if key is not None:
                self._known[key] = event
            out.append(Accepted(event))
        for accepted in out:
            if not accepted.duplicate:
                self.fanout(accepted.event)
        return out

    # -- reads ---------------------------------------------------------------

    def history(
        self, channel: str, after: int = 0, limit: int = 1000, *, max_bytes: int = PAGE_BYTES
    ) -> Deferred[list[Event]]:
        def answer() -> list[Event]:
            self._check()
            return _page((e for e in self.events if e.channel == channel and e.offset > after), limit, max_bytes)

        return self._maybe_hold("history", answer, self.hold_reads)

    def replay(
        self,
        pattern: str | Sequence[str],
        since: Mapping[str, int],
        limit: int = 1000,
        *,
        after_seq: int = 0,
        max_bytes: int = PAGE_BYTES,
    ) -> Deferred[list[Event]]:
        self.replays.append(Replay(pattern, since, limit, after_seq, max_bytes))
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)

        def answer() -> list[Event]:
            self._check()
            wanted = (
                e
                for e in self.events[max(after_seq, 0) :]
                if e.offset > since.get(e.channel, 0) and any(matches(p, e.channel) for p in patterns)
            )
            return _page(wanted, limit, max_bytes)

        return self._maybe_hold("replay", answer, self.hold_reads)

    def position(self) -> Deferred[int]:
        def answer() -> int:
            self._check()
            return len(self.events)

        return self._maybe_hold("position", answer, self.hold_reads)

    def last_offset(self, channel: str) -> Deferred[int]:
        def answer() -> int:
            self._check()
            return self.last_offsets.get(channel, 0)

        return self._maybe_hold("last_offset", answer, self.hold_reads)

    def channels(self) -> Deferred[list[ChannelInfo]]:
        def answer() -> list[ChannelInfo]:
            self._check()
            return [
                {"name": name, "subscribers": self.local_subscribers(name), "last_offset": last}
                for name, last in sorted(self.last_offsets.items())
            ]

        return self._maybe_hold("channels", answer, self.hold_reads)

    # -- held calls ------------------------------------------------------------

    def release_one(self) -> None:
        """Release the oldest held call."""
        self.held.pop(0).release()

    def release_all(self) -> None:
        """Release held calls, oldest first, until none is held (calls made meanwhile included)."""
        while self.held:
            self.release_one()

    def _maybe_hold(self, kind: str, answer: Callable[[], _T], hold: bool, drafts: Sequence[Draft] = ()) -> Deferred[_T]:
        if hold:
            d: Deferred[_T] = Deferred()
            self.held.append(Held(kind, d, answer, drafts))
            return d
        try:
            return succeed(answer())
        except Exception as e:  # noqa: BLE001 - handed to the caller, as the real broker does
            return fail(e)

    def _check(self) -> None:
        if self.unavailable is not None:
            raise JournalUnavailable(self.unavailable)


def _page(events: Iterable[Event], limit: int, max_bytes: int) -> list[Event]:
    """At most C{limit} of C{events} and about C{max_bytes} of their JSON (at least one)."""
    out: list[Event] = []
    size = 0
    if limit <= 0:
        return out
    for e in events:
        n = len(e.json())
        if out and size + n > max_bytes:
            break
        out.append(e)
        size += n
        if len(out) >= limit:
            break
    return out

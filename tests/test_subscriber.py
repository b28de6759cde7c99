"""The resume rule: replay after `since`, then live, with no gap and no duplicate."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from twisted_rt.broker import Listener
from twisted_rt.event import Event
from twisted_rt.matcher import PatternIndex, matches
from twisted_rt.subscriber import Subscriber


def ev(channel: str, offset: int) -> Event:
    return Event(f"{channel}-{offset}", channel, offset, "t", "test", "", {"n": offset})


class FakeBroker:
    """Just enough of a Broker: a journal list, an index, and replays the test fires by hand."""

    def __init__(self) -> None:
        self.journal: list[Event] = []
        self.index: PatternIndex[Listener] = PatternIndex()
        self.pending: list[tuple[Deferred[list[Event]], str, dict[str, int], int]] = []
        self.manual = False

    def subscribe(self, pattern: str, listener: Listener) -> None:
        self.index.add(pattern, listener)

    def unsubscribe(self, pattern: str, listener: Listener) -> None:
        self.index.remove(pattern, listener)

    def commit(self, channel: str) -> Event:
        off = 1 + sum(1 for e in self.journal if e.channel == channel)
        e = ev(channel, off)
        self.journal.append(e)
        for listener in self.index.match(channel):
            listener.deliver(e)
        return e

    def _query(self, pattern: str, since: dict[str, int], limit: int) -> list[Event]:
        out = [e for e in self.journal if matches(pattern, e.channel) and e.offset > since.get(e.channel, 0)]
        return out[:limit]

    def replay(self, pattern: str, since: dict[str, int], limit: int = 100000) -> Deferred[list[Event]]:
        if not self.manual:
            return succeed(self._query(pattern, since, limit))
        d: Deferred[list[Event]] = Deferred()
        self.pending.append((d, pattern, dict(since), limit))
        return d

    def run_pending(self) -> None:
        while self.pending:
            d, pattern, since, limit = self.pending.pop(0)
            d.callback(self._query(pattern, since, limit))


def make() -> tuple[FakeBroker, Subscriber, list[tuple[str, int]]]:
    broker = FakeBroker()
    got: list[tuple[str, int]] = []
    sub = Subscriber(broker, lambda e: got.append((e.channel, e.offset)))  # type: ignore[arg-type]
    return broker, sub, got


def test_live_only_without_since() -> None:
    """Without since, only events after the subscription arrive."""
    broker, sub, got = make()
    broker.commit("a")
    sub.add("a")
    broker.commit("a")
    assert got == [("a", 2)]


def test_replay_then_live() -> None:
    """since=N replays offsets > N, then live events follow in order."""
    broker, sub, got = make()
    for _ in range(3):
        broker.commit("a")
    sub.add("a", 1)
    broker.commit("a")
    assert got == [("a", 2), ("a", 3), ("a", 4)]


def test_events_during_replay_are_buffered_and_deduplicated() -> None:
    """Events committed while the replay query runs arrive once, after the replay, in order."""
    broker, sub, got = make()
    broker.manual = True
    broker.commit("a")
    broker.commit("a")
    d = sub.add("a", 0)
    broker.commit("a")  # before the query reads: in both replay and buffer
    broker.run_pending()
    broker.commit("a")
    assert got == [("a", 1), ("a", 2), ("a", 3), ("a", 4)]
    assert d.called


def test_event_after_query_but_before_replay_returns() -> None:
    """An event the query missed but the buffer caught is delivered right after the replay."""
    broker, sub, got = make()
    broker.manual = True
    broker.commit("a")
    sub.add("a", 0)
    d, pattern, since, limit = broker.pending.pop(0)
    snapshot = broker._query(pattern, since, limit)
    broker.commit("a")  # committed after the query read the journal
    d.callback(snapshot)
    assert got == [("a", 1), ("a", 2)]


def test_wildcard_since_object() -> None:
    """A wildcard with {channel: offset} resumes each named channel; unnamed ones replay from start."""
    broker, sub, got = make()
    for ch in ["g.push", "g.push", "g.pr", "g.pr", "g.new"]:
        broker.commit(ch)
    sub.add("g.*", {"g.push": 2, "g.pr": 1})
    assert sorted(got) == [("g.new", 1), ("g.pr", 2)]
    broker.commit("g.push")
    assert got[-1] == ("g.push", 3)


def test_wildcard_int_since_is_a_floor() -> None:
    """An int since with a wildcard applies to every matching channel."""
    broker, sub, got = make()
    for ch in ["g.a", "g.a", "g.b", "g.b", "g.b"]:
        broker.commit(ch)
    sub.add("g.*", 1)
    assert sorted(got) == [("g.a", 2), ("g.b", 2), ("g.b", 3)]


def test_overlapping_patterns_deliver_once() -> None:
    """An event matching two subscriptions of one client is sent once."""
    broker, sub, got = make()
    sub.add("a.b")
    sub.add("a.*")
    sub.add("a.>")
    broker.commit("a.b")
    assert got == [("a.b", 1)]


def test_remove_and_close() -> None:
    """remove() stops one pattern; close() stops all and drops later replays."""
    broker, sub, got = make()
    sub.add("a")
    sub.add("b")
    assert sub.remove("a") is True
    assert sub.remove("a") is False
    broker.commit("a")
    broker.commit("b")
    assert got == [("b", 1)]
    broker.manual = True
    broker.commit("c")
    sub.add("c", 0)
    sub.close()
    broker.run_pending()
    broker.commit("b")
    assert got == [("b", 1)]
    assert len(broker.index) == 0


def test_replay_pages(monkeypatch: Any) -> None:
    """A replay longer than one page is read page by page without loss."""
    import twisted_rt.subscriber as mod

    monkeypatch.setattr(mod, "REPLAY_PAGE", 3)
    broker, sub, got = make()
    for _ in range(10):
        broker.commit("a")
    sub.add("a", 0)
    assert got == [("a", i) for i in range(1, 11)]


def test_failed_replay_drops_the_new_pattern_and_releases_the_buffer() -> None:
    """When the replay query fails the new pattern is not kept, the failure is reported, and live delivery resumes."""
    broker, sub, got = make()
    sub.add("ok")
    broker.manual = True
    d = sub.add("bad", 0)
    broker.commit("ok")  # buffered while the replay runs
    failing, *_ = broker.pending.pop(0)
    failing.errback(RuntimeError("journal down"))
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    assert list(sub.patterns) == ["ok"]
    broker.commit("ok")
    broker.commit("bad")
    assert got == [("ok", 1), ("ok", 2)]


def test_backlog_paces_the_replay() -> None:
    """A replay waits on the backlog hook between events, and the buffer drains after it."""
    broker = FakeBroker()
    got: list[int] = []
    gate: list[Deferred[None]] = []

    def backlog() -> Deferred[None] | None:
        if len(got) % 2 == 0:
            d: Deferred[None] = Deferred()
            gate.append(d)
            return d
        return None

    sub = Subscriber(broker, lambda e: got.append(e.offset), backlog=backlog)  # type: ignore[arg-type]
    for _ in range(4):
        broker.commit("a")
    d = sub.add("a", 0)
    broker.commit("a")  # live, buffered until the replay has been sent
    assert got == [1, 2]
    gate.pop().callback(None)
    assert got == [1, 2, 3, 4]
    gate.pop().callback(None)
    assert got == [1, 2, 3, 4, 5]
    while gate:
        gate.pop().callback(None)
    assert d.called
    broker.commit("a")
    assert got == [1, 2, 3, 4, 5, 6]


def test_buffer_overflow_calls_back() -> None:
    """More than max_buffer live events during a replay calls on_overflow."""
    broker = FakeBroker()
    broker.manual = True
    overflowed: list[bool] = []
    sub = Subscriber(broker, lambda e: None, on_overflow=lambda: overflowed.append(True),  # type: ignore[arg-type]
                     max_buffer=3)
    sub.add("a", 0)
    for _ in range(4):
        broker.commit("a")
    assert overflowed == [True]

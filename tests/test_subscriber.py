"""The resume rule: replay after `since`, then live, with no gap and no duplicate."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from twisted_rt.subscriber import Subscriber
from twisted_rt.testing import MemoryBroker


def make() -> tuple[MemoryBroker, Subscriber, list[tuple[str, int]]]:
    broker = MemoryBroker()
    got: list[tuple[str, int]] = []
    sub = Subscriber(broker, lambda e: got.append((e.channel, e.offset)))
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
    broker.hold_reads = True
    broker.commit("a")
    broker.commit("a")
    d = sub.add("a", 0)
    broker.commit("a")  # before the query reads: in both replay and buffer
    broker.release_all()
    broker.commit("a")
    assert got == [("a", 1), ("a", 2), ("a", 3), ("a", 4)]
    assert d.called


def test_event_after_query_but_before_replay_returns() -> None:
    """An event the last (empty) page missed but the buffer caught is delivered right after the replay."""
    broker, sub, got = make()
    broker.hold_reads = True
    broker.commit("a")
    sub.add("a", 0)
    broker.release_one()  # the first page: a#1; the next query is in flight
    assert got == [("a", 1)]
    held = broker.held.pop(0)
    snapshot = held.answer()
    assert snapshot == []
    broker.commit("a")  # committed after the last query read the journal
    held.deferred.callback(snapshot)
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
    broker.hold_reads = True
    broker.commit("c")
    sub.add("c", 0)
    sub.close()
    broker.release_all()
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
    broker.hold_reads = True
    d = sub.add("bad", 0)
    broker.commit("ok")  # buffered while the replay runs
    broker.held.pop(0).fail(RuntimeError("journal down"))
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    assert list(sub.patterns) == ["ok"]
    broker.commit("ok")
    broker.commit("bad")
    assert got == [("ok", 1), ("ok", 2)]


def test_backlog_paces_the_replay() -> None:
    """A replay waits on the backlog hook between events, and the buffer drains after it."""
    broker = MemoryBroker()
    got: list[int] = []
    gate: list[Deferred[None]] = []

    def backlog() -> Deferred[None] | None:
        if len(got) % 2 == 0:
            d: Deferred[None] = Deferred()
            gate.append(d)
            return d
        return None

    sub = Subscriber(broker, lambda e: got.append(e.offset), backlog=backlog)
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
    broker = MemoryBroker()
    broker.hold_reads = True
    overflowed: list[bool] = []
    sub = Subscriber(broker, lambda e: None, on_overflow=lambda: overflowed.append(True),
                     max_buffer=3)
    sub.add("a", 0)
    for _ in range(4):
        broker.commit("a")
    assert overflowed == [True]


# ---------------------------------------------------------------------------
# bounds (issue 13: defects 3, 13 and 14)


def gated() -> tuple[MemoryBroker, Subscriber, list[tuple[str, int]], list[Deferred[None]]]:
    """A subscriber whose client is always 'full': every event waits for the test to open the gate."""
    broker = MemoryBroker()
    got: list[tuple[str, int]] = []
    gate: list[Deferred[None]] = []

    def backlog() -> Deferred[None]:
        d: Deferred[None] = Deferred()
        gate.append(d)
        return d

    sub = Subscriber(broker, lambda e: got.append((e.channel, e.offset)), backlog=backlog)
    return broker, sub, got, gate


def test_repeated_subscribe_does_not_replay_again() -> None:
    """A pattern already subscribed, or still replaying, is not replayed again, whatever its since."""
    broker, sub, got = make()
    for _ in range(5):
        broker.commit("a")
    broker.hold_reads = True
    first = sub.add("a", 0)
    for since in (0, 1, 3, None):
        assert sub.add("a", since).called  # answered at once, nothing started
    assert len(broker.held) == 1
    broker.release_all()
    assert first.called and got == [("a", i) for i in range(1, 6)]
    queries = len(broker.replays)
    for _ in range(50):
        sub.add("a", 0)
    assert len(broker.replays) == queries and broker.held == []
    broker.commit("a")
    assert got[-1] == ("a", 6) and len(got) == 6


def test_since_keeps_only_channels_the_pattern_matches() -> None:
    """Names in a since object that the pattern does not match are not kept (nor are zero offsets)."""
    _broker, sub, _got = make()
    since = {"g.a": 3, "g.b": 0, "x.y": 5, "g.a.b": 2, "g": 1, **{f"other.{i}": 1 for i in range(500)}}
    sub.add("g.*", since)
    assert sub.seen == {"g.a": 3}
    sub.add("h", {"h": 4, "h.x": 2})
    assert sub.seen == {"g.a": 3, "h": 4}


def test_seen_stays_bounded_through_subscribe_unsubscribe_loops() -> None:
    """Subscribing with made-up since names and unsubscribing, again and again, does not grow seen."""
    from twisted_rt.subscriber import PRUNE_MIN

    _broker, sub, _got = make()
    sub.add("keep.*", {"keep.a": 1})
    sizes = []
    for i in range(300):
        sub.add("p.>", {f"p.{i}.{j}": 7 for j in range(100)})
        sub.remove("p.>")
        sizes.append(len(sub.seen))
    assert max(sizes) <= 2 * PRUNE_MIN + 100
    sub.add("p.>", {"p.x": 1})
    assert sub.seen.get("keep.a") == 1  # what current patterns match is kept


def test_replays_run_one_at_a_time() -> None:
    """Several subscribes with since are replayed one after another, one query in flight."""
    broker, sub, got = make()
    for ch in ["a", "b", "c", "a"]:
        broker.commit(ch)
    broker.hold_reads = True
    ds = [sub.add(p, 0) for p in ("a", "b", "c")]
    while broker.held:
        assert len(broker.held) == 1
        broker.release_one()
    assert all(d.called for d in ds)
    assert got == [("a", 1), ("a", 2), ("b", 1), ("c", 1)]


def test_replay_pages_by_seq_until_an_empty_page() -> None:
    """Pages short because of max_bytes are followed with after_seq = the last seq until a page is empty."""
    broker = MemoryBroker()
    got: list[int] = []
    sub = Subscriber(broker, lambda e: got.append(e.offset), page_bytes=1)
    for _ in range(5):
        broker.commit("a", "x" * 100)
    broker.commit("b")
    sub.add("a", 1)
    assert got == [2, 3, 4, 5]
    assert [(r.pattern, r.after_seq) for r in broker.replays] == [("a", 0), ("a", 2), ("a", 3), ("a", 4), ("a", 5)]


def test_after_seq_replays_only_later_events() -> None:
    """add(after_seq=S) replays only events whose journal seq is above S, on every matching channel."""
    broker, sub, got = make()
    for ch in ["g.a", "g.b", "g.a", "g.b"]:
        broker.commit(ch)
    sub.add("g.*", after_seq=2)
    assert got == [("g.a", 2), ("g.b", 2)]


def test_live_buffer_is_bounded_in_bytes() -> None:
    """Live events held during a replay are bounded by max_buffer_bytes of JSON, not only by count."""
    broker = MemoryBroker()
    broker.hold_reads = True
    overflowed: list[bool] = []
    sub = Subscriber(broker, lambda e: None, on_overflow=lambda: overflowed.append(True),
                     max_buffer_bytes=10_000)
    sub.add("a", 0)
    for _ in range(9):
        assert len(broker.commit("a", "x" * 965).json()) == 1100
    assert overflowed == []
    broker.commit("a", "x" * 965)
    assert overflowed == [True]


def test_unsubscribe_stops_a_running_replay_and_drops_what_it_buffered() -> None:
    """remove() stops the replay at once (the wait is cut), and its buffered live events are never sent."""
    broker, sub, got, gate = gated()
    for _ in range(10):
        broker.commit("r")
    d = sub.add("r", 0)
    assert got == [("r", 1)] and len(gate) == 1  # waiting for the client
    broker.commit("r")  # live, buffered
    assert sub.remove("r")
    assert d.called and got == [("r", 1)]
    while gate:
        gate.pop().callback(None)  # the client drains: nothing more of r
    broker.commit("r")
    assert got == [("r", 1)]
    assert len(broker.index) == 0


def test_unsubscribe_keeps_buffered_events_another_pattern_matches() -> None:
    """Live events buffered during the replay go out if a remaining pattern matches them, not otherwise."""
    broker, sub, got, gate = gated()
    for _ in range(3):
        broker.commit("x.a")
    sub.add("x.b")  # live only
    sub.add("x.*", 0)  # replays x.a, waits on the client after the first event
    broker.commit("x.b")
    broker.commit("x.a")
    assert sub.remove("x.*")
    while gate:
        gate.pop().callback(None)
    assert got == [("x.a", 1), ("x.b", 1)]


def test_unsubscribe_during_a_query_discards_its_page() -> None:
    """A replay query in flight when its pattern is removed delivers nothing when it answers."""
    broker, sub, got = make()
    for _ in range(3):
        broker.commit("q")
    broker.hold_reads = True
    d = sub.add("q", 0)
    sub.remove("q")
    assert d.called
    broker.release_all()
    assert got == [] and broker.held == []


def test_unsubscribe_of_a_queued_replay_never_queries() -> None:
    """A replay still waiting for its turn is dropped by remove() without a query."""
    broker, sub, got = make()
    broker.commit("first")
    broker.commit("second")
    broker.hold_reads = True
    sub.add("first", 0)
    later = sub.add("second", 0)
    sub.remove("second")
    assert later.called
    broker.release_all()
    assert [r.pattern for r in broker.replays] == ["first", "first"]
    assert got == [("first", 1)]


def test_remove_many_stops_everything_before_going_on() -> None:
    """remove_many drops every pattern before the replay loop continues (a narrowed token)."""
    broker, sub, got, gate = gated()
    for ch in ["m.a", "m.b", "m.a", "m.b"]:
        broker.commit(ch)
    sub.add("m.a", 0)
    sub.add("m.b", 0)  # queued behind m.a
    broker.commit("m.b")  # live, buffered
    assert sub.remove_many(["m.a", "m.b", "nope"]) == ["m.a", "m.b"]
    while gate:
        gate.pop().callback(None)
    assert got == [("m.a", 1)]
    assert len(broker.index) == 0 and sub.patterns == {}


def test_close_during_a_paced_replay_releases_it() -> None:
    """close() cuts a replay waiting on the client: nothing more is sent and the buffer is gone."""
    broker, sub, got, gate = gated()
    for _ in range(5):
        broker.commit("c")
    d = sub.add("c", 0)
    broker.commit("c")
    sub.close()
    assert d.called and got == [("c", 1)]
    while gate:
        gate.pop().callback(None)
    assert got == [("c", 1)] and len(broker.index) == 0


def _run(channel: str, *offsets: int) -> list[Any]:
    """Live events of one channel with the given offsets, as the broker hands a run."""
    from twisted_rt.core.event import Event

    return [Event(f"e{o}", channel, o, "t", "api", "", o) for o in offsets]


def test_deliver_many_skips_what_was_seen_and_hands_the_rest_at_once() -> None:
    """A run is filtered against seen (a since, or another pattern's copy) and what is new goes to send_many in one call."""
    _broker, sub, got = make()
    runs: list[list[int]] = []
    sub.send_many = lambda events: runs.append([e.offset for e in events])
    sub.add("a", 2)  # since=2 on an empty journal: offsets up to 2 count as seen
    sub.deliver_many(_run("a", 1, 2, 3, 4))
    sub.deliver_many(_run("a", 3, 4))  # the same run through a second pattern: nothing new
    sub.deliver_many(_run("a", 4, 5))
    assert runs == [[3, 4]] and got == [("a", 5)]  # one new event left: through send
    assert sub.seen["a"] == 5


def test_deliver_many_without_send_many_sends_each() -> None:
    """A subscriber whose transport takes events one by one gets a run through send, in order."""
    _broker, sub, got = make()
    sub.add("a")
    sub.deliver_many(_run("a", 1, 2, 3))
    assert got == [("a", 1), ("a", 2), ("a", 3)]


def test_deliver_many_during_a_replay_is_buffered_and_deduplicated() -> None:
    """A run that arrives while the replay query runs is buffered per event and comes after the replay, once, in order."""
    broker, sub, got = make()
    runs: list[list[int]] = []
    sub.send_many = lambda events: runs.append([e.offset for e in events])
    broker.hold_reads = True
    broker.commit("a")
    broker.commit("a")
    sub.add("a", 0)
    sub.deliver_many(_run("a", 2, 3))  # a#2 is in both the replay and the run
    broker.release_all()
    assert got == [("a", 1), ("a", 2), ("a", 3)] and runs == []

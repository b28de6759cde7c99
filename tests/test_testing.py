"""twisted_rt.testing.MemoryBroker: the broker interface with the journal's rules, in memory, driven by the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twisted_rt.core.event import Accepted, Draft, Event
from twisted_rt.interfaces import Broker, JournalUnavailable, UnencodableEvent
from twisted_rt.store.local import IndexedBroker
from twisted_rt.testing import MemoryBroker, Recorder


def result(d: Deferred[Any]) -> Any:
    """What an already-fired Deferred holds (a failure is raised)."""
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "not fired"
    if isinstance(got[0], Failure):
        got[0].raiseException()
    return got[0]


def failure(d: Deferred[Any]) -> Failure:
    """The failure an already-fired Deferred holds."""
    got: list[Any] = []
    d.addBoth(got.append)
    assert got and isinstance(got[0], Failure), got
    return got[0]


def test_is_a_broker_on_the_real_index() -> None:
    """MemoryBroker implements every method of the Broker interface and fans out through IndexedBroker's index."""
    b = MemoryBroker()
    assert isinstance(b, Broker) and isinstance(b, IndexedBroker)
    assert not Broker.__abstractmethods__ - set(vars(MemoryBroker)) - set(vars(IndexedBroker))
    assert result(b.start()) is None and b.started
    assert b.ready and b.not_ready_reason == ""
    assert result(b.stop()) is None and not b.started


def test_publish_assigns_offsets_per_channel_and_one_seq() -> None:
    """Each new event gets its channel's next offset and the next global seq; receipts come back in order."""
    b = MemoryBroker()
    accepted = result(b.publish([Draft("a", 1), Draft("b", 2), Draft("a", 3, id="x", type="t", source="s")]))
    assert [(a.event.channel, a.event.offset, a.event.seq, a.duplicate) for a in accepted] == [
        ("a", 1, 1, False), ("b", 1, 2, False), ("a", 2, 3, False)]
    third = accepted[2].event
    assert (third.id, third.type, third.source, third.data) == ("x", "t", "s", 3)
    assert accepted[0].event.id and accepted[0].event.id != accepted[1].event.id
    assert b.events == [a.event for a in accepted]
    assert result(b.position()) == 3 and result(b.last_offset("a")) == 2 and result(b.last_offset("none")) == 0


def test_duplicates_by_scope_or_source_and_id() -> None:
    """A known (scope or source, id) answers the original event as a duplicate, also within one call; other scopes are new."""
    b = MemoryBroker()
    rec = Recorder()
    b.subscribe(">", rec)
    [first] = result(b.publish([Draft("c", 1, id="k", scope="pub:a")]))
    again = result(b.publish([Draft("c", 2, id="k", scope="pub:a"), Draft("c", 3, id="k", scope="pub:b"),
                              Draft("c", 4, id="k", source="gh"), Draft("c", 5, id="k", source="gh")]))
    assert [(a.event.offset, a.duplicate) for a in again] == [(1, True), (2, False), (3, False), (3, True)]
    assert again[0].event is first.event and again[0].receipt() == {"id": "k", "channel": "c", "offset": 1,
                                                                     "duplicate": True}
    assert [e.offset for e in rec.events] == [1, 2, 3]  # a duplicate is never fanned out
    assert len(b.events) == 3 and len(b.drafts) == 5


def test_unencodable_data_fails_the_whole_call_alone() -> None:
    """Data that is not JSON fails its publish with UnencodableEvent before anything of it is journaled."""
    b = MemoryBroker()
    f = failure(b.publish([Draft("a", 1), Draft("a", {1j})]))
    assert f.check(UnencodableEvent)
    assert b.events == [] and result(b.position()) == 0
    [ok] = result(b.publish([Draft("a", "fine")]))
    assert ok.event.offset == 1


def test_fanout_in_seq_order_through_the_index() -> None:
    """Live events reach the listeners whose patterns match, in seq order; unsubscribe stops them; a raising listener stops no other."""
    b = MemoryBroker()
    star, exact = Recorder(), Recorder()

    class Broken:
        def deliver(self, event: Event) -> None:
            raise RuntimeError("bad listener")

    b.subscribe("g.*", star)
    b.subscribe("g.a", exact)
    b.subscribe("g.a", Broken())
    assert b.local_subscribers("g.a") == 3 and b.local_subscribers("g.b") == 1 and b.local_subscribers("h") == 0
    b.publish([Draft("g.a", 1), Draft("g.b", 2), Draft("h", 3)])
    assert [e.seq for e in star.events] == [1, 2] and [e.seq for e in exact.events] == [1]
    b.unsubscribe("g.*", star)
    b.commit("g.b", 4)
    assert len(star.events) == 2
    assert len(b.index) == 2


def test_history_pages_by_offset_count_and_bytes() -> None:
    """history gives one channel's events after an offset, oldest first, at most limit and about max_bytes (at least one)."""
    b = MemoryBroker()
    for i in range(5):
        b.publish([Draft("h.a", {"s": "z" * 1000}), Draft("h.b", i)])
    assert [e.offset for e in result(b.history("h.a", 2, 2))] == [3, 4]
    assert [e.offset for e in result(b.history("h.a"))] == [1, 2, 3, 4, 5]
    assert len(result(b.history("h.a", 0, 100, max_bytes=1))) == 1
    assert len(result(b.history("h.a", 0, 100, max_bytes=2500))) == 2
    assert result(b.history("h.a", 5)) == [] and result(b.history("h.a", 0, 0)) == []


def test_replay_patterns_since_and_after_seq_in_seq_order() -> None:
    """replay takes one pattern or several, since per channel (its get may give a floor), after_seq, in seq order."""
    b = MemoryBroker()
    for i in range(5):
        b.publish([Draft("h.a", {"s": "z" * 1000}), Draft("h.b", i)])
    page = result(b.replay(["h.a", "h.b"], {"h.a": 4}, 100, after_seq=3))
    assert [(e.channel, e.offset, e.seq) for e in page] == [
        ("h.b", 2, 4), ("h.b", 3, 6), ("h.b", 4, 8), ("h.a", 5, 9), ("h.b", 5, 10)]
    assert len(result(b.replay("h.*", {}, 100, max_bytes=1))) == 1
    assert [e.seq for e in result(b.replay("h.*", {}, 3))] == [1, 2, 3]
    assert result(b.replay([], {})) == [] and result(b.replay("x.>", {})) == []

    class Floor(dict[str, int]):
        def get(self, key: str, default: Any = None) -> Any:
            return super().get(key, 4)

    assert [(e.channel, e.offset) for e in result(b.replay("h.*", Floor({"h.b": 3})))] == [
        ("h.b", 4), ("h.a", 5), ("h.b", 5)]
    assert [(r.pattern, r.after_seq) for r in b.replays][:2] == [(["h.a", "h.b"], 3), ("h.*", 0)]


def test_paging_with_after_seq_reads_everything_once() -> None:
    """Paging a byte-bounded replay with after_seq = the last seq until an empty page gives every event once, in order."""
    b = MemoryBroker()
    for i in range(30):
        b.commit(f"p.{i % 3}", "x" * (i * 50))
    seen: list[int] = []
    after = 0
    while page := result(b.replay("p.>", {"p.1": 4}, 4, after_seq=after, max_bytes=600)):
        seen += [e.seq for e in page]
        after = page[-1].seq
    assert seen == [e.seq for e in b.events if not (e.channel == "p.1" and e.offset <= 4)]


def test_channels_with_subscribers_and_last_offsets() -> None:
    """channels() lists every channel by name with its local subscriber count and last offset."""
    b = MemoryBroker()
    b.subscribe("b.>", Recorder())
    b.commit("b.x")
    b.commit("a")
    b.commit("b.x")
    assert result(b.channels()) == [{"name": "a", "subscribers": 0, "last_offset": 1},
                                    {"name": "b.x", "subscribers": 1, "last_offset": 2}]


def test_unavailable_fails_every_durable_call_until_healed() -> None:
    """With unavailable set, publish and every read fail with JournalUnavailable and ready is false; clearing it heals."""
    b = MemoryBroker()
    b.commit("a", 1)
    b.unavailable = "disk on fire"
    assert not b.ready and b.not_ready_reason == "journal: disk on fire"
    calls = [b.publish([Draft("a", 2)]), b.history("a"), b.replay("a", {}), b.position(), b.last_offset("a"),
             b.channels()]
    for d in calls:
        f = failure(d)
        assert f.check(JournalUnavailable) and f.getErrorMessage() == "disk on fire"
    with pytest.raises(JournalUnavailable):
        b.commit("a")
    assert len(b.events) == 1
    b.unavailable = None
    [a] = result(b.publish([Draft("a", 2)]))
    assert b.ready and a.event.offset == 2


def test_held_reads_answer_from_the_journal_at_release() -> None:
    """With hold_reads, a read waits in held; released, it answers with what was committed meanwhile; answer() and fail() too."""
    b = MemoryBroker()
    b.hold_reads = True
    b.commit("a")
    d = b.replay("a", {})
    assert not d.called and [h.kind for h in b.held] == ["replay"]
    b.commit("a")  # committed after the call, before its answer: in the page
    b.release_one()
    assert [e.offset for e in result(d)] == [1, 2]

    late = b.history("a")
    held = b.held.pop()
    snapshot = held.answer()  # what the read sees now
    b.commit("a")
    held.deferred.callback(snapshot)
    assert [e.offset for e in result(late)] == [1, 2]

    gone = b.position()
    b.held.pop().fail(RuntimeError("reader died"))
    assert failure(gone).check(RuntimeError)

    answers: list[int] = []
    b.position().addCallback(lambda n: answers.append(n) or b.position().addCallback(answers.append))
    b.release_all()  # calls made while releasing are released too
    assert answers == [3, 3] and b.held == []


def test_held_publishes_are_journaled_at_release() -> None:
    """With hold_publishes, a publish is journaled (offsets, fan-out) only when released; a failed one leaves nothing."""
    b = MemoryBroker()
    rec = Recorder()
    b.subscribe("p", rec)
    b.hold_publishes = True
    first = b.publish([Draft("p", 1)])
    second = b.publish([Draft("p", 2)])
    assert b.events == [] and rec.events == [] and [h.drafts[0].data for h in b.held] == [1, 2]
    b.held.pop(1).release()
    b.held.pop(0).fail(JournalUnavailable("disk full"))
    assert [a.event.offset for a in result(second)] == [1] and failure(first).check(JournalUnavailable)
    assert [e.data for e in rec.events] == [2] and [d.data for d in b.drafts] == [1, 2]
    b.unavailable = "gone"
    third = b.publish([Draft("p", 3)])
    b.release_all()  # the store went away meanwhile: the held publish fails with it
    assert failure(third).check(JournalUnavailable) and len(b.events) == 1


def test_clock_stamps_event_times() -> None:
    """Given a clock, each event's time is the clock's (RFC 3339 with milliseconds)."""
    clock = Clock()
    clock.advance(1795286715.123)
    b = MemoryBroker(clock)
    assert b.commit("t").time == "2026-11-21T18:45:15.123Z"
    clock.advance(1)
    assert b.commit("t").time == "2026-11-21T18:45:16.123Z"


@pytest_twisted.ensureDeferred
async def test_answers_like_the_local_broker(tmp_path: Path) -> None:
    """The same calls on a LocalBroker over a real journal and on a MemoryBroker give the same offsets, seqs, duplicates and pages."""
    from twisted.internet import reactor

    from twisted_rt.store.journal import Journal
    from twisted_rt.store.local import LocalBroker

    real = LocalBroker(Journal(reactor, str(tmp_path / "j.db")))  # type: ignore[arg-type]
    await real.start()
    fake = MemoryBroker()
    try:
        got: dict[str, list[Any]] = {"real": [], "fake": []}
        rec = {"real": Recorder(), "fake": Recorder()}
        for name, b in (("real", real), ("fake", fake)):
            b.subscribe("x.*", rec[name])
            out = got[name]
            for i in range(12):
                accepted: list[Accepted] = await b.publish(
                    [Draft(f"x.{i % 3}", {"i": i, "pad": "p" * (i * 40)}, id=f"k{i % 5}", scope=f"s{i % 2}"),
                     Draft("y", i, source="gh", id=str(i // 2))])
                out.append([(a.event.channel, a.event.offset, a.event.seq, a.duplicate, a.event.data)
                            for a in accepted])
            out.append([(e.offset, e.seq) for e in await b.history("x.1", 1, 3)])
            out.append([(e.offset, e.seq) for e in await b.history("y", 0, 100, max_bytes=1)])
            out.append([(e.channel, e.offset, e.seq) for e in await b.replay(["x.*", "y"], {"x.0": 2}, 7, after_seq=3)])
            out.append([(e.channel, e.offset) for e in await b.replay("x.>", {}, 100, max_bytes=1)])
            out.append([await b.position(), await b.last_offset("x.2"), await b.last_offset("nope")])
            out.append(await b.channels())
            out.append([(e.channel, e.offset, e.seq) for e in rec[name].events])
        assert got["real"] == got["fake"]
    finally:
        await real.stop()

"""The local broker over the SQLite journal: seq on everything it returns or fans out, position, bounded pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from twisted_rt.core.event import Accepted, Draft, Event
from twisted_rt.interfaces import PAGE_BYTES
from twisted_rt.store.journal import PAGE_BYTES as JOURNAL_PAGE_BYTES
from twisted_rt.store.journal import Journal
from twisted_rt.store.local import LocalBroker
from twisted_rt.testing import Recorder


async def _broker(tmp_path: Path) -> LocalBroker:
    b = LocalBroker(Journal(reactor, str(tmp_path / "j.db")))
    await b.start()
    return b


def test_page_bytes_is_four_mib() -> None:
    """PAGE_BYTES is the contract's 4 MiB, the same constant the journal uses."""
    assert PAGE_BYTES == JOURNAL_PAGE_BYTES == 4 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_fanout_is_in_seq_order_and_position_follows(tmp_path: Path) -> None:
    """Concurrent publishes fan out in increasing seq, each event with its seq; position is the last seq."""
    b = await _broker(tmp_path)
    try:
        rec = Recorder()
        b.subscribe(">", rec)
        assert await b.position() == 0
        results = await defer.gatherResults(
            [b.publish([Draft(f"f.c{i % 4}", i), Draft("f.x", i)]) for i in range(50)]
        )
        seqs = [a.event.seq for acc in results for a in acc]
        assert sorted(seqs) == list(range(1, 101))
        await task.deferLater(reactor, 0, lambda: None)  # a commit fans out right after its acks
        assert [e.seq for e in rec.events] == list(range(1, 101))
        assert await b.position() == 100
        [dup] = await b.publish([Draft("f.x", "d", source="s", id="same")])
        [again] = await b.publish([Draft("f.x", "d", source="s", id="same")])
        await task.deferLater(reactor, 0, lambda: None)
        assert again.duplicate and rec.events[-1].seq == dup.event.seq == 101
        assert len(rec.events) == 101  # a duplicate is not fanned out again
    finally:
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_history_and_replay_take_the_page_bounds(tmp_path: Path) -> None:
    """history(max_bytes=) and replay(after_seq=, max_bytes=) reach the journal with their bounds."""
    b = await _broker(tmp_path)
    try:
        for i in range(5):
            await b.publish([Draft("h.a", {"s": "z" * 1000}), Draft("h.b", i)])
        assert len(await b.history("h.a", 0, 100, max_bytes=1)) == 1
        assert [e.offset for e in await b.history("h.a", 2, 2)] == [3, 4]
        page = await b.replay(["h.a", "h.b"], {"h.a": 4}, 100, after_seq=3)
        assert [(e.channel, e.offset, e.seq) for e in page] == [
            ("h.b", 2, 4), ("h.b", 3, 6), ("h.b", 4, 8), ("h.a", 5, 9), ("h.b", 5, 10)]
        assert len(await b.replay("h.*", {}, 100, max_bytes=1)) == 1
    finally:
        await b.stop()


def test_local_broadcast_calls_this_nodes_handlers_and_survives_a_bad_one() -> None:
    """On one node a control message reaches its kind's handlers at once; a raising handler does not stop the next."""
    from twisted_rt.testing import MemoryBroker

    b = MemoryBroker()
    got: list[Any] = []

    def bad(m: Any, n: str) -> None:
        raise RuntimeError("boom")

    b.on_broadcast("k", bad)
    b.on_broadcast("k", lambda m, n: got.append((m, n)))
    d = b.broadcast("k", {"a": 1})
    assert d.called and got == [({"a": 1}, b.node_id)]
    assert b.broadcast("none", {}).called


@pytest_twisted.ensureDeferred
async def test_a_cancelled_publish_is_still_fanned_out(tmp_path: Path) -> None:
    """A publish cancelled during its commit (its publisher went away) still reaches live subscribers: no gap."""
    b = await _broker(tmp_path)
    try:
        rec = Recorder()
        b.subscribe("c", rec)
        first = b.publish([Draft("c", 1)])
        cancelled: list[Any] = []
        first.addErrback(lambda f: cancelled.append(f.type))
        first.cancel()
        assert cancelled == [defer.CancelledError]
        await b.publish([Draft("c", 2)])  # queued behind the first commit
        await task.deferLater(reactor, 0, lambda: None)
        assert [(e.offset, e.data) for e in rec.events] == [(1, 1), (2, 2)]
    finally:
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_big_commit_is_fanned_out_over_several_turns_in_order(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Past FANOUT_TURN deliveries the rest of a commit waits a turn; the next commit's events queue behind it, in order."""
    from twisted_rt.store import local

    monkeypatch.setattr(local, "FANOUT_TURN", 3)
    b = await _broker(tmp_path)
    try:
        recs = [Recorder(), Recorder()]
        for rec in recs:
            b.subscribe("c", rec)
        await b.publish([Draft("c", "first")])
        await task.deferLater(reactor, 0, lambda: None)
        big = [Accepted(Event(f"b{i}", "c", 10 + i, "t", "api", "", i)) for i in range(5)]
        later = [Accepted(Event("l", "c", 20, "t", "api", "", "later"))]
        b._fanout_commit([big])  # as the journal calls it: a commit of 5 events...
        seen = [len(recs[0].events)]
        b._fanout_commit([later])  # ...and the next commit, while the first is still going out
        seen.append(len(recs[0].events))
        for _ in range(3):
            await task.deferLater(reactor, 0, lambda: None)
            seen.append(len(recs[0].events))
        # 2 listeners: two events (4 deliveries) per turn; the later commit waits its turn
        assert seen == [1 + 2, 1 + 2, 1 + 4, 1 + 6, 1 + 6]
        for rec in recs:
            assert [e.data for e in rec.events] == ["first", 0, 1, 2, 3, 4, "later"]
    finally:
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_stop_drops_a_pending_fanout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker stopped while a big commit is still being fanned out leaves no call behind."""
    from twisted_rt.store import local

    monkeypatch.setattr(local, "FANOUT_TURN", 1)
    b = await _broker(tmp_path)
    rec = Recorder()
    b.subscribe("c", rec)
    await b.publish([Draft("c", i) for i in range(4)])
    await task.deferLater(reactor, 0, lambda: None)
    assert len(rec.events) == 1 and b._drain_call is not None
    call = b._drain_call
    await b.stop()
    assert not call.active() and b._drain_call is None
    await task.deferLater(reactor, 0, lambda: None)
    assert len(rec.events) == 1


class ManyRecorder(Recorder):
    """A listener with deliver_many: records the data of each call's events."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[Any]] = []

    def deliver_many(self, events: list[Event]) -> None:
        self.calls.append([e.data for e in events])
        self.events.extend(events)


@pytest_twisted.ensureDeferred
async def test_consecutive_events_of_one_channel_reach_a_listener_in_one_call(tmp_path: Path) -> None:
    """A commit's consecutive events of one channel go to a deliver_many listener in one call, in order; a listener without it gets them one by one."""
    b = await _broker(tmp_path)
    try:
        many, one = ManyRecorder(), Recorder()
        b.subscribe(">", many)
        b.subscribe(">", one)
        await b.publish([Draft("a", 1), Draft("a", 2), Draft("b", 3), Draft("a", 4), Draft("a", 5), Draft("a", 6)])
        await task.deferLater(reactor, 0, lambda: None)
        assert many.calls == [[1, 2], [4, 5, 6]]  # "b" in between: a run of its own, through deliver
        assert [e.data for e in many.events] == [e.data for e in one.events] == [1, 2, 3, 4, 5, 6]
        assert [e.seq for e in many.events] == list(range(1, 7))
    finally:
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_run_is_cut_to_the_turns_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of one channel takes at most FANOUT_TURN deliveries of a turn; the rest follows next turn, in order."""
    from twisted_rt.store import local

    monkeypatch.setattr(local, "FANOUT_TURN", 4)
    b = await _broker(tmp_path)
    try:
        recs = [ManyRecorder(), ManyRecorder()]
        for rec in recs:
            b.subscribe("c", rec)
        b._fanout_commit([[Accepted(Event(f"e{i}", "c", 1 + i, "t", "api", "", i)) for i in range(5)]])
        # 2 listeners: a run of 2 events is the turn's 4 deliveries
        assert [r.calls for r in recs] == [[[0, 1]]] * 2 and b._drain_call is not None
        for _ in range(3):
            await task.deferLater(reactor, 0, lambda: None)
        for rec in recs:  # the last event, alone, through deliver
            assert rec.calls == [[0, 1], [2, 3]] and [e.data for e in rec.events] == [0, 1, 2, 3, 4]
    finally:
        await b.stop()


def test_a_listener_that_raises_in_deliver_many_does_not_stop_the_others() -> None:
    """One listener failing on a run is logged; the other listeners still get the whole run."""
    from twisted_rt.testing import MemoryBroker

    class Bad:
        def deliver(self, event: Event) -> None:
            raise AssertionError("not this one")

        def deliver_many(self, events: list[Event]) -> None:
            raise RuntimeError("boom")

    broker = MemoryBroker()
    good = ManyRecorder()
    broker.subscribe("c", Bad())  # type: ignore[arg-type]
    broker.subscribe("c", good)
    run = [Event(f"e{i}", "c", i, "t", "api", "", i) for i in (1, 2)]
    broker.fanout_many(run)
    assert good.calls == [[1, 2]]

# -*- test-case-name: tests.test_perf_delivery -*-
"""
Issue 15: the batched delivery of /ws and the journal's commit path.

The rule pinned here (twisted_rt.routes.ws, the factory's rounds): every
connection with frames queued is written once per round, a chunk of
FLUSH_CHUNK connections per reactor turn; a connection of the round not yet
written takes every frame queued meanwhile in its one write; an idle daemon
starts a round at once (the end of the turn), a busy one waits as long as
the last round took (at most MAX_HOLD), so that what is committed meanwhile
leaves in the same write.  Resume, the slow-consumer close (1013) and
durability still hold with these batched writes.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import API_KEY, Daemon, http_json
from test_ws import client_frame, conn, fanout, frames, open_proto, recv, request
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock, StringTransport

import twisted_rt.routes.ws as ws
from twisted_rt.core.event import Draft, Event
from twisted_rt.store.journal import WRITER_AUTOCHECKPOINT_PAGES, Journal

HANDSHAKE = (b"GET /ws?token=key HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Writes(StringTransport):
    """A StringTransport that also keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.proto: Any = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def offsets(self) -> list[list[int]]:
        """The event offsets of each write."""
        return [[json.loads(p)["offset"] for op, p in frames(w) if op == 1 and b'"op":"event"' in p]
                for w in self.writes]


class TurnClock(MemoryReactorClock):
    """
    A clock that runs, per C{advance}, only the calls due when it was called:
    a call scheduled meanwhile (C{callLater(0)}) waits for the next one, as
    in the reactor's next turn (C{Clock} would run it in the same advance).
    """

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for call in due:
            if call in self.calls and not call.cancelled:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


def connections(n: int, pattern: bytes = b"p.>") -> tuple[Any, list[Writes], Any]:
    """C{n} /ws connections on one factory, each subscribed to C{pattern}: (clock, transports, broker)."""
    proto, clock, _transport, broker = open_proto(max_send=1 << 20)
    clock.__class__ = TurnClock
    factory = proto.factory
    transports: list[Writes] = []
    for _ in range(n):
        p = factory.buildProtocol(None)
        t = Writes()
        p.makeConnection(t)
        t.proto = p
        p.dataReceived(HANDSHAKE)
        p.dataReceived(client_frame(b'{"op":"subscribe","channel":"' + pattern + b'"}'))
        transports.append(t)
    for _ in range(n + 1):
        clock.advance(0)  # every chunk of the subscribe replies' round
    clock.advance(1)  # that round is long over: the daemon is idle
    for t in transports:
        t.writes.clear()
        t.clear()
    return clock, transports, broker


def test_unit_events_of_one_turn_leave_in_one_write_per_connection() -> None:
    """Several events fanned out in one turn reach every connection as one write, in order."""
    clock, transports, broker = connections(3)
    for off in (1, 2, 3):
        fanout(broker, "p.a", off)
    assert all(t.writes == [] for t in transports)
    clock.advance(0)
    assert [t.offsets() for t in transports] == [[[1, 2, 3]]] * 3


def test_unit_idle_daemon_sends_at_once() -> None:
    """On an idle daemon one event is written at the end of its turn: no timer holds it."""
    clock, transports, broker = connections(2)
    fanout(broker, "p.a", 1)
    [call] = [c for c in clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "_flush_all"]
    assert call.getTime() == clock.seconds()
    clock.advance(0)
    assert [t.offsets() for t in transports] == [[[1]]] * 2


def test_unit_busy_rounds_wait_as_long_as_the_last_took_and_coalesce(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a round of BUSY_ROUND events per connection that took T, the next waits T (at most MAX_HOLD); events committed meanwhile share its write."""
    assert ws.BUSY_ROUND == 2
    monkeypatch.setattr(ws, "FLUSH_CHUNK", 2)
    clock, transports, broker = connections(4)
    fanout(broker, "p.a", 1)
    fanout(broker, "p.a", 2)
    clock.advance(0)  # the first chunk: connections 0 and 1
    clock.advance(0.01)  # the reactor was busy 10 ms before the next chunk: 2 and 3
    assert [t.offsets() for t in transports] == [[[1, 2]]] * 4
    fanout(broker, "p.a", 3)
    clock.advance(0)
    assert all(len(t.writes) == 1 for t in transports)  # held: the last round took 10 ms
    fanout(broker, "p.a", 4)
    clock.advance(0.009)
    assert all(len(t.writes) == 1 for t in transports)
    clock.advance(0.001)
    clock.advance(0)
    assert [t.offsets() for t in transports] == [[[1, 2], [3, 4]]] * 4
    # however long a round took, the hold is at most MAX_HOLD
    factory = transports[0].proto.factory
    factory._round_took = 10.0
    factory._round_ended = clock.seconds()
    fanout(broker, "p.a", 5)
    clock.advance(ws.MAX_HOLD)
    clock.advance(0)
    assert [t.offsets()[-1] for t in transports] == [[5]] * 4


def test_unit_a_round_of_one_event_per_connection_holds_the_next_a_third_of_its_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round that wrote fewer than BUSY_ROUND events per connection holds the next one only DIRECT_HOLD of its length."""
    monkeypatch.setattr(ws, "FLUSH_CHUNK", 2)
    clock, transports, broker = connections(4)
    fanout(broker, "p.a", 1)
    clock.advance(0)
    clock.advance(0.03)  # a round of one event per connection that took 30 ms
    assert [t.offsets() for t in transports] == [[[1]]] * 4
    fanout(broker, "p.a", 2)
    clock.advance(0.009)  # held 10 ms, not 30
    assert all(len(t.writes) == 1 for t in transports)
    clock.advance(0.001)
    clock.advance(0)
    assert [t.offsets() for t in transports] == [[[1], [2]]] * 4


def test_unit_a_connection_not_yet_written_takes_new_frames_in_its_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds go a chunk per turn; a connection later in the round writes the events queued meanwhile at once, in order."""
    monkeypatch.setattr(ws, "FLUSH_CHUNK", 2)
    clock, transports, broker = connections(4)
    fanout(broker, "p.a", 1)
    clock.advance(0)
    assert [len(t.writes) for t in transports] == [1, 1, 0, 0]
    fanout(broker, "p.a", 2)  # committed between two chunks of the round
    clock.advance(0)
    assert [t.offsets() for t in transports[2:]] == [[[1, 2]]] * 2
    clock.advance(ws.MAX_HOLD)
    assert [t.offsets() for t in transports[:2]] == [[[1], [2]]] * 2
    assert transports[0].proto.factory.app.stats.events_out["ws"] == 8


def test_unit_flush_now_writes_the_rest_of_the_round_and_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """flush_now (a huge fan-out, FLUSH_EVERY) writes every queue at once, mid-round included."""
    monkeypatch.setattr(ws, "FLUSH_CHUNK", 1)
    clock, transports, broker = connections(3)
    fanout(broker, "p.a", 1)
    clock.advance(0)
    fanout(broker, "p.a", 2)
    transports[0].proto.factory.flush_now()
    assert [t.offsets() for t in transports] == [[[1], [2]], [[1, 2]], [[1, 2]]]
    clock.advance(1)  # the chunks still planned find nothing left
    assert [len(t.writes) for t in transports] == [2, 1, 1]


def test_unit_slow_consumer_closed_1013_while_a_round_is_held() -> None:
    """A queue past max_send_buffer_bytes is closed with 1013 at once, even while the next round is held."""
    proto, clock, transport, broker = open_proto(max_send=2000)
    proto.dataReceived(client_frame(b'{"op":"subscribe","channel":"u"}'))
    clock.advance(0)
    proto.factory._round_took = ws.MAX_HOLD
    proto.factory._round_ended = clock.seconds()  # busy: the next round waits
    transport.clear()
    for off in range(1, 30):
        fanout(broker, "u", off, 100)
        if transport.value():
            break
    (op, payload), = frames(transport.value())
    assert op == 8 and struct.unpack("!H", payload[:2])[0] == 1013
    assert off < 29 and proto.factory.app.stats.dropped["slow_consumer"] == 1


def test_unit_paused_connection_in_a_round_is_written_when_resumed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection paused by its transport skips the round and is written, in order, once it resumes."""
    monkeypatch.setattr(ws, "FLUSH_CHUNK", 1)
    clock, transports, broker = connections(2)
    transports[1].producer.pauseProducing()
    fanout(broker, "p.a", 1)
    fanout(broker, "p.a", 2)
    clock.advance(0)
    clock.advance(0)
    assert [len(t.writes) for t in transports] == [1, 0]
    transports[1].producer.resumeProducing()
    clock.advance(ws.MAX_HOLD)
    assert transports[1].offsets() == [[1, 2]]


def _alone(offset: int, channel: str = "p.a") -> Event:
    """An event that was the only one of its commit (as the journal marks it)."""
    e = Event(f"id{offset}", channel, offset, "t", "test", "", "x")
    e.alone = True
    return e


def test_unit_the_only_event_of_a_commit_is_written_during_the_fanout_when_idle() -> None:
    """An idle daemon writes the only event of a commit to each connection at once, while fanning out."""
    clock, transports, broker = connections(3)
    broker.fanout(_alone(1))
    assert [t.offsets() for t in transports] == [[[1]]] * 3
    assert transports[0].proto.factory.app.stats.events_out["ws"] == 3
    clock.advance(0)
    assert all(len(t.writes) == 1 for t in transports)


def test_unit_with_a_round_planned_the_only_event_is_queued_in_order() -> None:
    """With a round already planned (a reply queued), the event is queued: each connection writes it in its one write, after the reply."""
    clock, transports, broker = connections(2)
    transports[1].proto._reply({"op": "pong"})
    broker.fanout(_alone(1))
    assert all(t.writes == [] for t in transports)
    clock.advance(0)
    assert transports[0].offsets() == [[1]]
    assert [[json.loads(p)["op"] for _, p in frames(w)] for w in transports[1].writes] == [["pong", "event"]]


def test_unit_a_direct_fanout_counts_as_a_round_for_the_hold() -> None:
    """After a direct fan-out that took T, an event within T is queued and leaves with the next ones in one write."""
    clock, transports, broker = connections(2)
    broker.fanout(_alone(1))
    clock.advance(0.01)  # the direct fan-out's turn took 10 ms
    broker.fanout(_alone(2))
    broker.fanout(_alone(3))
    assert [t.offsets() for t in transports] == [[[1]]] * 2
    clock.advance(0.01)
    clock.advance(0)
    assert [t.offsets() for t in transports] == [[[1], [2, 3]]] * 2


def test_unit_after_a_direct_fanout_the_hold_is_a_third_of_its_length() -> None:
    """After a direct fan-out that took T, an event past DIRECT_HOLD x T goes out at once again; one before it waits until then."""
    assert ws.DIRECT_HOLD == pytest.approx(1 / 3)
    clock, transports, broker = connections(2)
    broker.fanout(_alone(1))
    clock.advance(0.03)  # the direct fan-out's turn took 30 ms: a hold of 10 ms after it
    clock.advance(0.004)
    broker.fanout(_alone(2))  # 4 ms after: queued, held until 10 ms after the fan-out
    assert [t.offsets() for t in transports] == [[[1]]] * 2
    clock.advance(0.005)
    assert [t.offsets() for t in transports] == [[[1]]] * 2
    clock.advance(0.002)
    assert [t.offsets() for t in transports] == [[[1], [2]]] * 2
    clock.advance(1)  # idle again
    broker.fanout(_alone(3))
    clock.advance(0.03)  # another 30 ms direct fan-out
    clock.advance(0.011)
    broker.fanout(_alone(4))  # 11 ms after it (within its length, past a third): at once
    assert [t.offsets() for t in transports] == [[[1], [2], [3], [4]]] * 2


def test_unit_paused_connection_queues_the_direct_event() -> None:
    """A connection paused by its transport queues even the direct event, and writes it once resumed."""
    clock, transports, broker = connections(2)
    transports[1].producer.pauseProducing()
    broker.fanout(_alone(1))
    assert [len(t.writes) for t in transports] == [1, 0]
    transports[1].producer.resumeProducing()
    clock.advance(0)
    clock.advance(0)
    assert transports[1].offsets() == [[1]]


@pytest_twisted.ensureDeferred
async def test_journal_marks_the_only_event_of_a_commit(tmp_path: Path) -> None:
    """The journal marks an event alone when its commit held no other draft (so /ws may write it at once)."""
    j = Journal(reactor, str(tmp_path / "j.db"))  # type: ignore[arg-type]
    await j.open()
    try:
        [one] = await j.append([Draft("c", 1)])
        two = await j.append([Draft("c", 2), Draft("c", 3)])
        assert one.event.alone and not any(a.event.alone for a in two)
    finally:
        await j.close()


# -- the journal's commit path -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_next_commit_starts_before_the_callbacks_of_the_last(tmp_path: Path) -> None:
    """While a commit's callbacks (acks, fan-out) run, the appends queued meanwhile are already being committed."""
    j = Journal(reactor, str(tmp_path / "j.db"))  # type: ignore[arg-type]
    await j.open()
    try:
        writing: list[bool] = []
        first = j.append([Draft("c", 1)])
        second = j.append([Draft("c", 2)])  # queued behind the first commit

        def seen(acc: Any) -> Any:
            writing.append(j._writing)
            return acc

        first.addCallback(seen)
        a, b = await defer.gatherResults([first, second])
        assert writing == [True]
        assert (a[0].event.offset, b[0].event.offset) == (1, 2)
    finally:
        await j.close()


async def _recorded_broker(tmp_path: Path) -> tuple[Any, Any]:
    """A started LocalBroker on a real journal, and a Recorder subscribed to everything."""
    from twisted_rt.store.local import LocalBroker
    from twisted_rt.testing import Recorder

    b = LocalBroker(Journal(reactor, str(tmp_path / "j.db")))  # type: ignore[arg-type]
    await b.start()
    rec = Recorder()
    b.subscribe(">", rec)
    return b, rec


@pytest_twisted.ensureDeferred
async def test_a_commit_of_one_or_more_events_is_acked_before_its_fanout(tmp_path: Path) -> None:
    """Every commit fires its publish Deferreds (the acks) first, then fans out its events in the same reactor call."""
    b, rec = await _recorded_broker(tmp_path)
    try:
        at_ack: list[int] = []

        def acked(acc: Any) -> Any:
            at_ack.append(len(rec.events))
            return acc

        await b.publish([Draft("a", 1)]).addCallback(acked)
        await _later(0)
        assert at_ack == [0] and [e.offset for e in rec.events] == [1]
        await b.publish([Draft("a", 2), Draft("a", 3)]).addCallback(acked)
        assert at_ack == [0, 1]  # a bigger commit is acked before its fan-out too
        await _later(0)
        assert [e.offset for e in rec.events] == [1, 2, 3]
        [dup] = await b.publish([Draft("a", "x", source="s", id="k")])
        [again] = await b.publish([Draft("a", "x", source="s", id="k")])
        await _later(0)
        assert again.duplicate and [e.offset for e in rec.events] == [1, 2, 3, dup.event.offset]
    finally:
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_every_publisher_of_a_commit_is_answered_before_its_fanout(tmp_path: Path) -> None:
    """Concurrent publishes sharing commits: each is acked before any event of its commit is fanned out; delivery stays in seq order."""
    from twisted.internet import defer

    b, rec = await _recorded_broker(tmp_path)
    try:
        seen_at_ack: list[tuple[int, int]] = []  # (this publish's seq, the highest seq delivered at its ack)

        def acked(acc: Any) -> Any:
            seen_at_ack.append((acc[0].event.seq, max((e.seq for e in rec.events), default=0)))
            return acc

        await defer.gatherResults([b.publish([Draft(f"c.{i % 3}", i)]).addCallback(acked) for i in range(40)])
        await _later(0)
        assert b.journal.commits < 40  # they did share commits
        assert all(delivered < seq for seq, delivered in seen_at_ack)
        assert [e.seq for e in rec.events] == list(range(1, 41))
    finally:
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_wal_checkpoints_run_in_their_own_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's automatic checkpoint is only a safety net; the WAL is checkpointed by another thread, at most once per interval."""
    import twisted_rt.store.journal as journal

    threads: list[str] = []
    real = Journal._c_checkpoint

    def spy(self: Journal) -> None:
        threads.append(threading.current_thread().name)
        real(self)

    monkeypatch.setattr(Journal, "_c_checkpoint", spy)
    monkeypatch.setattr(journal, "CHECKPOINT_INTERVAL", 0.0)
    path = tmp_path / "j.db"
    j = Journal(reactor, str(path))  # type: ignore[arg-type]
    await j.open()
    try:
        pages = await j._in_writer(lambda: j._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        assert pages == WRITER_AUTOCHECKPOINT_PAGES
        for i in range(20):
            await j.append([Draft("c", {"pad": "x" * 4000, "i": i})])
        while j._checkpointing:
            await defer.succeed(None)
            await _later(0.01)
        assert j.checkpoints >= 1 and threads and all(t.endswith("rt-journal-checkpoint-0") for t in threads)
        before = j.checkpoints
        monkeypatch.setattr(journal, "CHECKPOINT_INTERVAL", 3600.0)
        for i in range(5):
            await j.append([Draft("c", i)])
        assert j.checkpoints == before  # not more often than the interval
    finally:
        await j.close()
    assert not (tmp_path / "j.db-wal").exists() or (tmp_path / "j.db-wal").stat().st_size == 0


def test_memory_journal_has_no_checkpoint_thread() -> None:
    """An in-memory journal has nothing to checkpoint."""
    j = Journal(reactor, ":memory:")  # type: ignore[arg-type]
    assert j._cpool is None
    j._maybe_checkpoint()
    assert j.checkpoints == 0


def _later(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


# -- end to end: the daemon under single-event load ----------------------------------------


def _publish_many(d: Daemon, channel: str, n: int, threads: int, acked: list[int]) -> None:
    """n single-event POST /api/publish from `threads` threads at once; the acked offsets into `acked`."""
    def run(k: int) -> None:
        for i in range(k, n, threads):
            status, body = http_json("POST", d.url + "/api/publish", {"channel": channel, "data": {"i": i}},
                                     {"Authorization": f"Bearer {API_KEY}"})
            assert status == 202, body
            acked.append(body["offset"])

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)


def test_resume_and_durability_with_batched_writes(make_daemon: Callable[..., Daemon]) -> None:
    """Under concurrent single-event publishes (batched writes), a resuming subscriber gets every event once, in order, and every acked event survives kill -9."""
    d = make_daemon()
    subs = [conn(d) for _ in range(5)]
    for s in subs:
        assert request(s, op="subscribe", channel="perf.>")["op"] == "subscribed"
    acked: list[int] = []
    pub = threading.Thread(target=_publish_many, args=(d, "perf.a", 400, 8, acked))
    pub.start()
    # one subscriber leaves mid-way and resumes from the last offset it saw
    leaver = subs[0]
    got = [recv(leaver)["offset"] for _ in range(50)]
    leaver.close()
    time.sleep(0.2)
    back = conn(d)
    assert request(back, op="subscribe", channel="perf.>", since={"perf.a": got[-1]})["op"] == "subscribed"
    pub.join(120)
    assert sorted(acked) == list(range(1, 401))
    while len(got) < 400:
        got.append(recv(back)["offset"])
    assert got == list(range(1, 401))
    for s in subs[1:]:
        assert [recv(s)["offset"] for _ in range(400)] == list(range(1, 401))
    d.kill()
    d.start()
    status, body = d.get("/api/channels/perf.a/history?since=0&limit=1000",
                         headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and [e["offset"] for e in body["events"]] == list(range(1, 401))


def test_unit_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    """Once closed (its TCP transport lets go of it, as Twisted's does), a connection leaves no cycle for the GC: no full-collection pause after a round of closes."""
    import gc

    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    clock, transports, broker = connections(20)
    fanout(broker, "p.a", 1)
    clock.advance(0)
    gc.collect()
    closed: set[int] = set()
    for t in transports:
        p = t.proto
        closed.add(id(p))
        p.connectionLost(Failure(ConnectionDone()))
        t.proto = None
        t.protocol = None  # tcp.Connection.connectionLost: del self.protocol
        t.producer = None  # FileDescriptor.connectionLost: the producer is dropped
    del p, t
    transports.clear()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, ws.RTWebSocketProtocol) and id(o) in closed]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_unit_auto_pings_go_out_in_small_chunks() -> None:
    """Autobahn's auto-ping timer runs at most PING_CHUNK pings per reactor turn (its own runs 1,000: a burst every interval)."""
    proto, _clock, _transport, _broker = open_proto()
    timer = proto.factory._batched_timer
    assert timer._chunk_size == ws.PING_CHUNK <= 100


def test_unit_publish_body_encoded_again_only_when_not_ascii(monkeypatch: pytest.MonkeyPatch) -> None:
    """parse_publish re-encodes a body (the raw lone-surrogate check) only when it has a non-ASCII byte; both surrogate forms stay 400."""
    import twisted_rt.routes.api as api
    from twisted_rt.web.resource import JsonError

    calls: list[Any] = []
    real = api.dumps
    monkeypatch.setattr(api, "dumps", lambda obj: calls.append(obj) or real(obj))
    api.parse_publish(b'{"channel":"a","data":{"k":[1,2]}}')
    assert calls == []
    api.parse_publish('{"channel":"a","data":"caf\u00e9"}'.encode())
    assert len(calls) == 1
    for body in (b'{"channel":"a","data":"\\ud800"}', '{"channel":"a","data":"\ud800"}'.encode("utf-8", "surrogatepass")):
        with pytest.raises(JsonError) as e:
            api.parse_publish(body)
        assert (e.value.status, e.value.code) == (400, "invalid_json")


@pytest_twisted.ensureDeferred
async def test_a_failing_after_callbacks_hook_or_checkpoint_does_not_stop_commits(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook that raises after a commit is logged and the next commits go on; a failed checkpoint is logged and retried later."""
    import twisted_rt.store.journal as journal

    def boom(self: Journal) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(Journal, "_c_checkpoint", boom)
    monkeypatch.setattr(journal, "CHECKPOINT_INTERVAL", 0.0)
    j = Journal(reactor, str(tmp_path / "j.db"))  # type: ignore[arg-type]
    await j.open()
    calls: list[int] = []

    def hook(accepted: list[list[Any]]) -> None:
        calls.append(len(accepted))
        raise RuntimeError("hook")

    j.after_callbacks = hook
    try:
        [a] = await j.append([Draft("c", 1)])
        while j._checkpointing:
            await _later(0.01)
        [b] = await j.append([Draft("c", 2)])
        await _later(0)
        assert (a.event.offset, b.event.offset) == (1, 2) and len(calls) == 2
        while j._checkpointing:
            await _later(0.01)
        assert j.checkpoints == 0 and j.healthy
    finally:
        await j.close()


def test_unit_the_delivery_state_of_a_connection_is_in_slots_not_its_dict() -> None:
    """The attributes the per-(event, subscriber) step reads live in slots, set once the connection is made."""
    _clock, transports, _broker = connections(1)
    p = transports[0].proto
    hot = set(ws.RTWebSocketProtocol.__slots__)
    assert {"_queue", "_queued", "_paused", "_closing", "_compress", "_fac", "_tr"} <= hot
    assert not hot & set(vars(p))  # none of them went to the instance dictionary
    assert p._fac is p.factory and p._tr is p.transport is transports[0]


def test_unit_the_first_auto_ping_is_planned_at_a_random_point_of_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection's first auto-ping is re-planned at a random fraction of the interval, so connections opened together do not ping together."""
    from types import SimpleNamespace

    planned: list[tuple[float, Any]] = []

    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    p = ws.RTWebSocketProtocol()
    p.factory = SimpleNamespace(_batched_timer=SimpleNamespace(  # type: ignore[assignment]
        call_later=lambda delay, func: planned.append((delay, func)) or "replanned"))
    p.autoPingInterval = 20.0  # type: ignore[attr-defined]
    first = p.autoPingPendingCall = Call()  # type: ignore[attr-defined]
    monkeypatch.setattr(ws.random, "uniform", lambda a, b: 0.3 if (a, b) == (0.05, 1.0) else -1.0)
    p._spread_auto_ping()
    assert first.cancelled and p.autoPingPendingCall == "replanned"  # type: ignore[attr-defined]
    assert planned == [(pytest.approx(6.0), p._sendAutoPing)]
    p.autoPingInterval = 0  # type: ignore[attr-defined]
    p._spread_auto_ping()  # no auto-ping configured: nothing planned
    assert len(planned) == 1
    opened: list[Any] = []
    monkeypatch.setattr(ws.RTWebSocketProtocol, "_spread_auto_ping", lambda self: opened.append(self))
    proto, _clock, _transport, _broker = open_proto()
    assert opened == [proto]  # every connection re-plans its first ping when it opens


def _events(*offsets: int, channel: str = "p.a") -> list[Event]:
    """A run of live events of one channel (a commit's), with the given offsets."""
    return [Event(f"id{o}", channel, o, "t", "test", "", "x") for o in offsets]


def test_unit_a_run_of_events_is_queued_as_one_piece_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit's events reach each connection as one queued piece (frames built once per event, joined once), written in one write, in order."""
    clock, transports, broker = connections(3)
    factory = transports[0].proto.factory
    built: list[int] = []
    real_frame = factory.frame
    monkeypatch.setattr(factory, "frame", lambda e: (built.append(e.offset), real_frame(e))[1])
    broker.fanout_many(_events(1, 2, 3))
    assert built == [1, 2, 3]  # not once per connection
    assert all(t.writes == [] for t in transports) and len(transports[0].proto._queue) == 1
    clock.advance(0)
    assert [t.offsets() for t in transports] == [[[1, 2, 3]]] * 3
    assert factory.app.stats.events_out["ws"] == 9
    broker.fanout_many(_events(3, 4))  # a later run overlapping what a connection saw: only what is new
    clock.advance(1)
    assert [t.offsets()[-1] for t in transports] == [[4]] * 3


def test_unit_a_run_goes_one_by_one_to_a_compressing_connection() -> None:
    """A permessage-deflate connection takes a run event by event (each its own message), in order."""
    clock, transports, broker = connections(2)
    transports[1].proto._compress = True
    broker.fanout_many(_events(1, 2))
    assert list(transports[1].proto._queue) == [e.ws_json() for e in _events(1, 2)]
    clock.advance(0)
    assert transports[0].offsets() == [[1, 2]]  # one piece, one write
    assert transports[1].offsets() == [[1], [2]]  # one message each (sendMessage writes each)


def test_unit_a_run_past_the_send_buffer_closes_the_slow_consumer() -> None:
    """A run whose frames would put a queue past max_send_buffer_bytes closes that connection with 1013 at once."""
    proto, clock, transport, broker = open_proto(max_send=2000)
    proto.dataReceived(client_frame(b'{"op":"subscribe","channel":"u"}'))
    clock.advance(0)
    transport.clear()
    broker.fanout_many([Event(f"id{o}", "u", o, "t", "test", "", "x" * 300) for o in range(1, 9)])
    (op, payload), = frames(transport.value())
    assert op == 8 and struct.unpack("!H", payload[:2])[0] == 1013
    assert proto.factory.app.stats.dropped["slow_consumer"] == 1
    broker.fanout_many([Event(f"id{o}", "u", o, "t", "test", "", "x") for o in (9, 10)])
    clock.advance(1)
    assert frames(transport.value()) == [(op, payload)]  # closing: nothing more is queued


def test_unit_a_closed_connection_takes_no_run() -> None:
    """Once its connection is gone, a subscriber's runs go nowhere (no send_many left behind)."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    _clock, transports, _broker = connections(2)
    gone = transports[1].proto
    gone.connectionLost(Failure(ConnectionDone()))
    assert gone.subscriber.send_many is None
    gone.subscriber.deliver_many(_events(1, 2))
    assert gone._queue == []


def test_unit_runs_count_towards_flush_every(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs queued past FLUSH_EVERY events are written at once, as single events are, without waiting for the round."""
    monkeypatch.setattr(ws, "FLUSH_EVERY", 4)
    clock, transports, broker = connections(2)
    broker.fanout_many(_events(1, 2))  # 4 queued deliveries: flushed in the fan-out itself
    assert [t.offsets() for t in transports] == [[[1, 2]]] * 2
    broker.fanout_many(_events(3))
    assert all(len(t.writes) == 1 for t in transports)  # under the limit again: held for the round
    clock.advance(0)
    assert [t.offsets()[-1] for t in transports] == [[3]] * 2


def _one_held_connection() -> tuple[Any, Writes, Any]:
    """One /ws connection whose last round took 10 ms, so the next round is held that long: (clock, transport, broker)."""
    clock, transports, broker = connections(1)
    factory = transports[0].proto.factory
    factory._round_took = 0.01
    factory._round_ended = clock.seconds()
    return clock, transports[0], broker


def test_unit_deliveries_queued_over_several_turns_wait_for_their_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLUSH_EVERY counts the deliveries of one turn: more queued over several turns of a held round leave with the round, in one write."""
    monkeypatch.setattr(ws, "FLUSH_EVERY", 3)
    clock, t, broker = _one_held_connection()
    factory = t.proto.factory
    for turn in range(4):  # two deliveries a turn: 8 queued, never 3 in one turn
        fanout(broker, "p.a", 2 * turn + 1)
        fanout(broker, "p.a", 2 * turn + 2)
        clock.advance(0)
        assert t.writes == []
    clock.advance(0.01)
    assert t.offsets() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert factory.app.stats.events_out["ws"] == 8


def test_unit_flush_every_still_cuts_a_big_fanout_inside_one_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLUSH_EVERY deliveries queued in one turn are written at once even while a round is held; the count starts again after the write."""
    monkeypatch.setattr(ws, "FLUSH_EVERY", 3)
    clock, t, broker = _one_held_connection()
    fanout(broker, "p.a", 1)
    clock.advance(0)  # a new turn: its deliveries are counted from 0
    for off in (2, 3, 4):
        fanout(broker, "p.a", off)
    assert t.offsets() == [[1, 2, 3, 4]]  # the third of this turn wrote every queue
    fanout(broker, "p.a", 5)
    fanout(broker, "p.a", 6)
    assert len(t.writes) == 1  # two since that write: held for the round
    clock.advance(0.01)
    assert t.offsets()[-1] == [5, 6]


def test_unit_runs_queued_over_several_turns_wait_for_their_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs count towards FLUSH_EVERY per turn too: runs queued over several turns of a held round leave with the round."""
    monkeypatch.setattr(ws, "FLUSH_EVERY", 3)
    clock, t, broker = _one_held_connection()
    for turn in range(3):  # a run of two a turn: 6 queued, never 3 in one turn
        broker.fanout_many(_events(2 * turn + 1, 2 * turn + 2))
        clock.advance(0)
        assert t.writes == []
    clock.advance(0.01)
    assert t.offsets() == [[1, 2, 3, 4, 5, 6]]

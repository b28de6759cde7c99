"""
The Redis broker (several nodes): unit tests of L{RedisBroker} against a real
redis-server under pytest-twisted, and end-to-end tests of two real daemons
sharing one Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
import txredisapi
from conftest import API_KEY, Daemon, RedisServer, free_port, http
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock

from twisted_rt.core.config import BrokerConfig, Config, JournalConfig
from twisted_rt.core.event import Draft, Event
from twisted_rt.core.metrics import Stats
from twisted_rt.interfaces import JournalUnavailable
from twisted_rt.store import redis as rt_redis
from twisted_rt.store.redis import RedisBroker, backoff, parse_url
from twisted_rt.testing import Recorder

pytestmark = pytest.mark.redis


# -- helpers -----------------------------------------------------------------


async def until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll C{pred} on the reactor every 10 ms until it holds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


@pytest.fixture
def brokers(redis_server: RedisServer) -> Iterator[Callable[..., RedisBroker]]:
    """A factory of started-on-demand brokers on the test's redis, all stopped afterwards."""
    made: list[RedisBroker] = []

    def make(prefix: str = "t", url: str | None = None, **journal: Any) -> RedisBroker:
        cfg = Config(
            broker=BrokerConfig(kind="redis", url=url or redis_server.url, prefix=prefix),
            journal=JournalConfig(**journal),
        )
        b = RedisBroker(cfg, reactor, Stats())
        made.append(b)
        return b

    yield make
    for b in made:
        pytest_twisted.blockon(b.stop())


# -- pure functions ----------------------------------------------------------


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    """Reconnect delays double per attempt up to a cap, with half of each delay random."""
    assert backoff(1, rand=lambda: 0.0) == pytest.approx(0.05)
    assert backoff(1, rand=lambda: 1.0) == pytest.approx(0.1)
    assert backoff(3, rand=lambda: 1.0) == pytest.approx(0.4)
    assert backoff(50, rand=lambda: 1.0) == pytest.approx(2.0)
    assert backoff(50, rand=lambda: 0.0) == pytest.approx(1.0)
    assert len({backoff(4) for _ in range(20)}) > 1


def test_parse_url_reads_host_port_db_and_password() -> None:
    """redis:// and unix:// URLs give the host, port, database and credentials."""
    u = parse_url("redis://127.0.0.1:6380/2")
    assert (u.host, u.port, u.db, u.password) == ("127.0.0.1", 6380, 2, None)
    u = parse_url("redis://:s3cret@example.com")
    assert (u.host, u.port, u.db, u.password) == ("example.com", 6379, 0, "s3cret")
    u = parse_url("unix:///run/redis.sock?db=3")
    assert (u.path, u.db) == ("/run/redis.sock", 3)
    with pytest.raises(ValueError):
        parse_url("http://x")


# -- the live feed's ordering, on a fake Redis (no reactor) -----------------


class FakeRedis:
    """A command connection whose replies the test gives by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], Deferred[Any]]] = []

    def execute_command(self, *args: Any, **kw: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((args, d))
        return d

    def pop(self, command: str) -> tuple[tuple[Any, ...], Deferred[Any]]:
        for i, (args, d) in enumerate(self.calls):
            if args[0] == command:
                del self.calls[i]
                return args, d
        raise AssertionError(f"no {command} call in {[c[0][:3] for c in self.calls]}")


def fake_broker() -> tuple[RedisBroker, FakeRedis]:
    cfg = Config(broker=BrokerConfig(kind="redis", url="redis://127.0.0.1:1/0"))
    b = RedisBroker(cfg, MemoryReactorClock(), Stats())
    fake = FakeRedis()
    b.cmd.proto = fake
    b.sub.proto = object()
    b._subscribed = True
    b._baselined = True
    b._busy = False
    return b, fake


def body(i: int) -> str:
    return rt_redis._encode_body(Draft("c", {"i": i}), f"id{i}", "2026-11-21T00:00:00.000Z")


def test_gap_is_filled_before_later_messages_are_delivered() -> None:
    """A message past last+1 triggers an XRANGE; messages arriving meanwhile wait, then all go out in order."""
    b, fake = fake_broker()
    rec = Recorder()
    b.subscribe("c", rec)
    b._on_message(f"1 c {body(1)}")
    b._on_message(f"3 c {body(3)}")
    b._on_message(f"4 c {body(4)}")
    assert rec.offsets() == [1]
    args, d = fake.pop("XRANGE")
    assert args[1:4] == ("rt:s:c", "2", "2")
    d.callback([["2-0", ["e", body(2)]]])
    assert rec.offsets() == [1, 2, 3, 4]
    assert [e.data for e in rec.events] == [{"i": 1}, {"i": 2}, {"i": 3}, {"i": 4}]
    b._on_message(f"4 c {body(4)}")
    b._on_message(f"2 c {body(2)}")
    assert rec.offsets() == [1, 2, 3, 4]
    assert fake.calls == []


def test_gap_without_local_listeners_is_not_filled() -> None:
    """A node with no listener on a channel just moves its marker; it reads nothing from Redis."""
    b, fake = fake_broker()
    b._on_message(f"7 c {body(7)}")
    assert b.live_last["c"] == 7
    assert fake.calls == []


def test_resync_fills_only_channels_with_listeners_then_drains() -> None:
    """After a reconnect the snapshot drives fills for listened channels, then the buffered feed follows."""
    b, fake = fake_broker()
    rec = Recorder()
    b.subscribe("c", rec)
    b.live_last.update({"c": 1, "quiet": 4})
    b._request_sync()
    b._on_message(f"4 c {body(4)}")  # arrives while syncing: buffered
    assert rec.events == []
    args, d = fake.pop("EVALSHA")
    d.callback(["epoch-1", "c", "3", "quiet", "9", "new", "2"])
    args, d = fake.pop("XRANGE")
    assert args[1:4] == ("rt:s:c", "2", "3")
    d.callback([["2-0", ["e", body(2)]], ["3-0", ["e", body(3)]]])
    assert rec.offsets() == [2, 3, 4]
    assert b.live_last == {"c": 4, "quiet": 9, "new": 2}
    assert fake.calls == [] and not b._busy


def test_failed_resync_is_retried_after_a_backoff() -> None:
    """A resync that fails (Redis went away again) keeps the feed buffered and retries later."""
    b, fake = fake_broker()
    rec = Recorder()
    b.subscribe("c", rec)
    b._request_sync()
    _, d = fake.pop("EVALSHA")
    d.errback(txredisapi.ConnectionError("Lost connection"))
    b._on_message(f"1 c {body(1)}")
    assert rec.events == [] and b._busy
    b.reactor.advance(5)
    _, d = fake.pop("EVALSHA")
    d.callback(["epoch-1", "c", "0"])
    assert rec.offsets() == [1]


# -- one and two brokers on a real redis ------------------------------------


@pytest_twisted.ensureDeferred
async def test_publish_assigns_offsets_and_history_reads_them(brokers: Callable[..., RedisBroker]) -> None:
    """Offsets start at 1 per channel and grow by one; history and last_offset read them back."""
    a = brokers()
    await a.start()
    assert a.ready and a.not_ready_reason == ""
    acc = await a.publish([Draft("c.one", {"n": i}) for i in range(3)] + [Draft("c.two", "x")])
    assert [(x.event.channel, x.event.offset) for x in acc] == [
        ("c.one", 1), ("c.one", 2), ("c.one", 3), ("c.two", 1)]
    acc = await a.publish([Draft("c.one", {"n": 3})])
    assert acc[0].event.offset == 4
    hist = await a.history("c.one", after=1)
    assert [(e.offset, e.data) for e in hist] == [(2, {"n": 1}), (3, {"n": 2}), (4, {"n": 3})]
    assert [e.offset for e in await a.history("c.one", after=1, limit=2)] == [2, 3]
    assert hist[-1].public() == acc[0].event.public()
    assert await a.last_offset("c.one") == 4
    assert await a.last_offset("nope") == 0
    chans = await a.channels()
    assert chans == [{"name": "c.one", "subscribers": 0, "last_offset": 4},
                     {"name": "c.two", "subscribers": 0, "last_offset": 1}]


@pytest_twisted.ensureDeferred
async def test_delivery_id_is_deduplicated_across_nodes(brokers: Callable[..., RedisBroker]) -> None:
    """The same delivery id on the same source, on another node, is the same event (raw bytes kept)."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    raw = b'{"action":"opened"}\xff'
    draft = Draft("gh.push", {"action": "opened"}, source="github", type="push", id="d-1",
                  raw=raw, headers={"X-GitHub-Event": "push"})
    first = (await a.publish([draft]))[0]
    again = (await b.publish([draft, draft]))
    assert not first.duplicate and first.event.offset == 1
    for dup in again:
        assert dup.duplicate
        assert dup.event.offset == 1 and dup.event.id == "d-1"
        assert dup.event.data == {"action": "opened"} and dup.event.raw == raw
        assert dup.event.headers == {"X-GitHub-Event": "push"}
        assert dup.receipt() == {"id": "d-1", "channel": "gh.push", "offset": 1, "duplicate": True}
    other = (await b.publish([Draft("gh.push", {}, source="gitlab", id="d-1")]))[0]
    assert not other.duplicate and other.event.offset == 2
    [kept] = await b.history("gh.push", 0, 1)
    assert kept.raw == raw and kept.headers == {"X-GitHub-Event": "push"} and kept.source == "github"


@pytest_twisted.ensureDeferred
async def test_live_event_reaches_listener_on_other_node_in_order(brokers: Callable[..., RedisBroker]) -> None:
    """Events published on node A reach node B's listeners once each, in offset order."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    rec, other = Recorder(), Recorder()
    b.subscribe("chat.*", rec)
    b.subscribe("other", other)
    for i in range(5):
        await a.publish([Draft("chat.room1", i) for _ in range(10)] + [Draft("chat.room2", i)])
    await until(lambda: len(rec.events) == 55, what="55 events on B")
    assert rec.offsets("chat.room1") == list(range(1, 51))
    assert rec.offsets("chat.room2") == list(range(1, 6))
    assert other.events == []
    await a.publish([Draft("chat.raw", {"k": 1}, source="github", type="push", raw=b"k=1\x00",
                           headers={"X-GitHub-Event": "push"})])
    await until(lambda: len(rec.events) == 56, what="the raw event on B")
    raw_event = rec.events[-1]
    assert (raw_event.raw, raw_event.headers, raw_event.source, raw_event.type) == (
        b"k=1\x00", {"X-GitHub-Event": "push"}, "github", "push")
    b.unsubscribe("chat.*", rec)
    await a.publish([Draft("chat.room1", "late")])
    await a.publish([Draft("other", "x")])
    await until(lambda: len(other.events) == 1, what="the 'other' event")
    assert len(rec.events) == 56


@pytest_twisted.ensureDeferred
async def test_concurrent_publishing_on_two_nodes_is_gap_free(brokers: Callable[..., RedisBroker]) -> None:
    """Publishes racing on two nodes get unique, gap-free offsets per channel."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    ds = []
    for i in range(100):
        ds.append(a.publish([Draft("race", {"from": "a", "i": i})]))
        ds.append(b.publish([Draft("race", {"from": "b", "i": i}), Draft("race", {"from": "b2", "i": i})]))
    results = await gatherResults(ds)
    offsets = sorted(x.event.offset for acc in results for x in acc)
    assert offsets == list(range(1, 301))
    hist = await a.history("race", 0, 1000)
    assert [e.offset for e in hist] == list(range(1, 301))


@pytest_twisted.ensureDeferred
async def test_replay_merges_channels_and_keeps_each_in_order(brokers: Callable[..., RedisBroker]) -> None:
    """replay(pattern, since) returns every matching channel after its offset, each in order, cut at limit."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    for i in range(4):
        await a.publish([Draft("gh.push", i), Draft("gh.issue", i), Draft("other.x", i)])
    got = await b.replay("gh.*", {"gh.push": 2})
    assert sorted((e.channel, e.offset) for e in got) == [
        ("gh.issue", 1), ("gh.issue", 2), ("gh.issue", 3), ("gh.issue", 4), ("gh.push", 3), ("gh.push", 4)]
    for ch in ("gh.push", "gh.issue"):
        offs = [e.offset for e in got if e.channel == ch]
        assert offs == sorted(offs)
    cut = await b.replay("gh.>", {}, limit=5)
    assert len(cut) == 5
    for ch in ("gh.push", "gh.issue"):
        offs = [e.offset for e in cut if e.channel == ch]
        assert offs == list(range(1, len(offs) + 1))
    assert [e.offset for e in await b.replay("gh.push", {"gh.push": 3})] == [4]
    assert await b.replay("none.*", {}) == []


@pytest_twisted.ensureDeferred
async def test_missed_message_is_filled_from_the_stream(brokers: Callable[..., RedisBroker]) -> None:
    """A node that misses a pub/sub message fills the gap from the stream before delivering further."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    rec = Recorder()
    b.subscribe("g", rec)
    proto = b.sub.proto
    orig = proto.on_message
    proto.on_message = lambda c, m: None if m.startswith(("2 ", "3 ")) else orig(c, m)
    for i in range(5):
        await a.publish([Draft("g", i)])
    await until(lambda: len(rec.events) == 5, what="5 events")
    assert rec.offsets() == [1, 2, 3, 4, 5]
    assert [e.data for e in rec.events] == [0, 1, 2, 3, 4]


@pytest_twisted.ensureDeferred
async def test_pubsub_reconnect_fills_what_was_missed(brokers: Callable[..., RedisBroker]) -> None:
    """After its pub/sub link drops, a node resubscribes and delivers the missed events, no duplicates."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    rec, wild = Recorder(), Recorder()
    b.subscribe("r.1", rec)
    b.subscribe("r.>", wild)
    await a.publish([Draft("r.1", "before")])
    await until(lambda: len(rec.events) == 1, what="first event")
    proto = b.sub.proto
    proto.on_message = lambda c, m: None  # everything from now on is "lost" with this link
    await a.publish([Draft("r.1", i) for i in range(3)] + [Draft("r.new", "created while away")])
    proto.transport.loseConnection()
    await until(lambda: b.sub.proto is not None and b.sub.proto is not proto and b.ready, what="reconnect")
    await a.publish([Draft("r.1", "after")])
    await until(lambda: len(rec.events) == 5, what="5 events on r.1")
    assert rec.offsets() == [1, 2, 3, 4, 5]
    await until(lambda: len(wild.events) == 6, what="6 events on r.>")
    assert wild.offsets("r.new") == [1]
    assert wild.offsets("r.1") == [1, 2, 3, 4, 5]


@pytest_twisted.ensureDeferred
async def test_channels_counts_subscribers_of_every_node(brokers: Callable[..., RedisBroker]) -> None:
    """channels() lists every channel with subscriber counts summed over the nodes."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    await a.publish([Draft("room.1", 1), Draft("room.2", 2)])
    r1, r2, r3 = Recorder(), Recorder(), Recorder()
    b.subscribe("room.1", r1)
    b.subscribe("room.*", r2)
    a.subscribe("room.1", r3)
    await until(lambda: b.live_last.get("room.2") == 1 and a.live_last.get("room.2") == 1, what="nodes saw room.*")
    await gatherResults([a._write_counts(), b._write_counts()])

    def by_name(chans: list[dict[str, Any]]) -> dict[str, int]:
        return {c["name"]: c["subscribers"] for c in chans}

    assert by_name(await a.channels()) == {"room.1": 3, "room.2": 1}
    assert by_name(await b.channels()) == {"room.1": 3, "room.2": 1}
    await b.stop()
    assert by_name(await a.channels()) == {"room.1": 1, "room.2": 0}


@pytest_twisted.ensureDeferred
async def test_channels_lists_subscribed_channels_without_events(brokers: Callable[..., RedisBroker]) -> None:
    """A channel subscribed on any node but with no event yet is listed with its cluster count and offset 0."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    await a.publish([Draft("room.1", 1)])
    b.subscribe("quiet", Recorder())
    a.subscribe("quiet", Recorder())
    a.subscribe("lonely", Recorder())
    b.subscribe("wild.*", Recorder())  # a pattern is not a channel
    await gatherResults([a._write_counts(), b._write_counts()])
    for node in (a, b):
        chans = {c["name"]: (c["subscribers"], c["last_offset"]) for c in await node.channels()}
        assert chans == {"lonely": (1, 0), "quiet": (2, 0), "room.1": (0, 1)}


@pytest_twisted.ensureDeferred
async def test_pubsub_ping_is_answered_and_feed_continues(brokers: Callable[..., RedisBroker]) -> None:
    """The periodic PING on the subscribed link is answered and does not disturb the live feed."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    rec = Recorder()
    b.subscribe("p", rec)
    reply = await b.sub.proto.execute_command("PING")
    assert "pong" in [str(x).lower() for x in reply]
    await b._tick()
    await a.publish([Draft("p", 1)])
    await until(lambda: rec.offsets() == [1], what="event after ping")
    assert b.ready


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_is_not_ready_and_refuses_publish(
    brokers: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no Redis: start still fires, ready is False with a reason, publish and reads fail 'unavailable'."""
    monkeypatch.setattr(rt_redis, "START_WAIT", 0.2)
    b = brokers(url=f"redis://127.0.0.1:{free_port()}/0")
    await b.start()
    assert not b.ready
    assert "redis" in b.not_ready_reason
    for d in (b.publish([Draft("x", 1)]), b.history("x"), b.replay("x.*", {}), b.channels(), b.last_offset("x")):
        with pytest.raises(JournalUnavailable):
            await d


@pytest_twisted.ensureDeferred
async def test_node_started_before_redis_becomes_ready_when_it_appears(
    brokers: Callable[..., RedisBroker], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A node started while Redis is down serves unready, then connects (with backoff) once Redis is up."""
    monkeypatch.setattr(rt_redis, "START_WAIT", 0.1)
    late = RedisServer(tmp_path / "late-redis")
    b = brokers(url=late.url)
    await b.start()
    assert not b.ready
    late.start()
    try:
        await until(lambda: b.ready, timeout=15, what="ready once redis is up")
        rec = Recorder()
        b.subscribe("late", rec)
        assert (await b.publish([Draft("late", 1)]))[0].event.offset == 1
        await until(lambda: rec.offsets() == [1], what="live event")
    finally:
        await b.stop()
        late.stop()


@pytest_twisted.ensureDeferred
async def test_redis_restart_makes_node_unready_then_delivery_resumes(
    brokers: Callable[..., RedisBroker], redis_server: RedisServer
) -> None:
    """Redis going away: not ready, publish refused; when it returns on the same port delivery resumes."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    rec = Recorder()
    b.subscribe("k", rec)
    await a.publish([Draft("k", "one")])
    await until(lambda: len(rec.events) == 1, what="first event")
    redis_server.kill()
    await until(lambda: not a.ready and not b.ready, what="both nodes unready")
    with pytest.raises(JournalUnavailable):
        await a.publish([Draft("k", "lost")])
    redis_server.start()
    await until(lambda: a.ready and b.ready, timeout=15, what="both nodes ready again")
    # This redis has no persistence, so the channel starts over at offset 1.
    await a.publish([Draft("k", "two")])
    await until(lambda: any(e.data == "two" for e in rec.events), what="event after restart")
    assert [e.data for e in rec.events] == ["one", "two"]


# -- 0.2: seq, scoped idempotency, bounded pages, replay by seq --------------


@pytest_twisted.ensureDeferred
async def test_seq_is_global_and_set_everywhere(brokers: Callable[..., RedisBroker]) -> None:
    """Every published, stored, replayed and live event carries the cluster-wide seq, in publish order."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    rec = Recorder()
    b.subscribe("s.>", rec)
    assert await a.position() == 0
    acc = await a.publish([Draft("s.x", 1), Draft("s.y", 2)])
    acc += await b.publish([Draft("s.x", 3)])
    assert [x.event.seq for x in acc] == [1, 2, 3]
    assert await b.position() == 3
    assert [e.seq for e in await b.history("s.x")] == [1, 3]
    assert [(e.channel, e.seq) for e in await b.replay("s.*", {})] == [("s.x", 1), ("s.y", 2), ("s.x", 3)]
    await until(lambda: len(rec.events) == 3, what="live events")
    assert [e.seq for e in rec.events] == [1, 2, 3]
    [dup] = await a.publish([Draft("s.x", 9, source="gh", id="d1")])
    [again] = await b.publish([Draft("s.x", 9, source="gh", id="d1")])
    assert again.duplicate and again.event.seq == dup.event.seq == 4


@pytest_twisted.ensureDeferred
async def test_idempotency_is_scoped_per_publisher_in_redis(brokers: Callable[..., RedisBroker]) -> None:
    """The same id is one event within a scope, another in another scope; scopes with ':' never collide."""
    a = brokers()
    await a.start()
    [x] = await a.publish([Draft("i.a", 1, source="api", id="X", scope="pub:sub:alice")])
    [y] = await a.publish([Draft("i.b", 2, source="api", id="X", scope="pub:sub:bob")])
    [z] = await a.publish([Draft("i.c", 3, source="ws", id="X", scope="pub:sub:alice")])
    assert not x.duplicate and not y.duplicate and (y.event.channel, y.event.offset) == ("i.b", 1)
    assert z.duplicate and (z.event.channel, z.event.data) == ("i.a", 1)
    # ("pub:sub:a:b", "c") and ("pub:sub:a", "b:c") are different keys; so are a source and a scope
    [p] = await a.publish([Draft("i.d", 4, id="c", scope="pub:sub:a:b")])
    [q] = await a.publish([Draft("i.d", 5, id="b:c", scope="pub:sub:a")])
    [r] = await a.publish([Draft("i.d", 6, source="pub", id="sub:a:b:c")])
    assert not (p.duplicate or q.duplicate or r.duplicate)


@pytest_twisted.ensureDeferred
async def test_replay_pages_by_seq_across_patterns_each_event_once(brokers: Callable[..., RedisBroker]) -> None:
    """Replay of several patterns merges streams by seq; paging by after_seq (count or bytes) gives every event once."""
    a = brokers()
    await a.start()
    for i in range(25):
        await a.publish([Draft(f"gh.r{i % 3}", i), Draft(f"bill.x.{i % 2}", i), Draft("solo", i),
                         Draft("other.z", i), Draft("gh.deep.no", i)])
    since = {"gh.r0": 4, "solo": 23}
    patterns = ["gh.*", "bill.>", "solo"]
    everything = await a.replay(patterns, since, 100000)
    assert len(everything) == 25 - 4 + 25 + 2
    assert [e.seq for e in everything] == sorted(e.seq for e in everything)
    for limit, max_bytes in ((4, 1 << 20), (1000, 200), (9, 2000)):
        got: list[Event] = []
        after = 0
        while True:
            page = await a.replay(patterns, since, limit, after_seq=after, max_bytes=max_bytes)
            if not page:
                break
            assert len(page) <= limit
            got += page
            after = page[-1].seq
        assert [(e.channel, e.offset) for e in got] == [(e.channel, e.offset) for e in everything]
    assert await a.replay(["nope.*", "none"], {}) == []
    assert [(e.channel, e.offset) for e in await a.replay("*.r1", {"gh.r1": 7})] == [("gh.r1", 8)]


@pytest_twisted.ensureDeferred
async def test_history_pages_are_bounded_by_bytes(brokers: Callable[..., RedisBroker]) -> None:
    """A history page of large events stops at about max_bytes, with at least one event; paging reads them all."""
    a = brokers()
    await a.start()
    big = "x" * 50_000
    for i in range(30):
        await a.publish([Draft("big", {"i": i, "s": big})])
    page = await a.history("big", 0, 1000, max_bytes=500_000)
    assert 8 <= len(page) <= 10 and [e.offset for e in page] == list(range(1, len(page) + 1))
    assert len(await a.history("big", 0, 1000, max_bytes=1)) == 1
    assert len(await a.history("big", 0, 1000)) == 30
    assert [e.offset for e in await a.history("big", 27, 2)] == [28, 29]
    assert await a.history("big", 2**63 - 1) == [] and await a.history("big", 0, 0) == []


@pytest_twisted.ensureDeferred
async def test_replay_pages_start_where_the_last_page_left_each_channel(
    brokers: Callable[..., RedisBroker],
) -> None:
    """Paging a wildcard replay does not re-read each channel from since: entries read stay about linear."""
    a = brokers()
    await a.start()
    for i in range(300):
        await a.publish([Draft("lin.a", i), Draft("lin.b", i), Draft("lin.c", i)])
    read = [0]
    real = a._xrange

    def counting(channel: str, start: int, end: int | None, count: int) -> Deferred[list[Any]]:
        def add(entries: list[Any]) -> list[Any]:
            read[0] += len(entries)
            return entries

        return real(channel, start, end, count).addCallback(add)

    a._xrange = counting  # type: ignore[method-assign]
    total, after = 0, 0
    while True:
        page = await a.replay("lin.*", {}, 50, after_seq=after)
        if not page:
            break
        total += len(page)
        after = page[-1].seq
    assert total == 900
    assert read[0] < 2 * 900, read[0]


@pytest_twisted.ensureDeferred
async def test_entries_written_before_seq_are_history_only(
    brokers: Callable[..., RedisBroker], redis_server: RedisServer
) -> None:
    """A stream entry without a seq (written by 0.1) is served by history and skipped by seq-paged replays."""
    a = brokers()
    await a.start()
    conn = await txredisapi.Connection("127.0.0.1", redis_server.port, reconnect=False)
    legacy = rt_redis._encode_body(Draft("leg", "old"), "old-1", "2026-11-21T00:00:00.000Z")
    await conn.execute_command("XADD", "t:s:leg", "1-0", "e", legacy)
    await conn.execute_command("SET", "t:seq:leg", "1")
    await conn.execute_command("SADD", "t:channels", "leg")
    await conn.disconnect()
    [new] = await a.publish([Draft("leg", "new")])
    assert new.event.offset == 2 and new.event.seq == 1
    assert [(e.offset, e.seq) for e in await a.history("leg")] == [(1, 0), (2, 1)]
    assert [e.offset for e in await a.replay("leg", {})] == [2]
    assert [e.offset for e in await a.replay(["leg", "x.*"], {})] == [2]


# -- end to end: two daemons, one redis --------------------------------------


GITHUB_SECRET = "gh-secret-for-tests"


def redis_config(url: str, prefix: str = "rt") -> str:
    return f"""
    [journal]
    path = "var/journal.sqlite3"

    [broker]
    kind = "redis"
    url = "{url}"
    prefix = "{prefix}"

    [auth]
    api_keys = ["{API_KEY}"]
    anonymous_subscribe = ["public.>"]

    [[sources]]
    name = "github"
    verify = "github"
    secrets = ["{GITHUB_SECRET}"]
    channel = "github.{{header:X-GitHub-Event}}"
    """


class WSClient:
    """A blocking WebSocket client reading in a thread."""

    def __init__(self, url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(url + f"?token={API_KEY}", timeout=10)
        self.messages: list[dict[str, Any]] = []
        self.closed = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import websocket

        while True:
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                self.closed = True
                return
            if not raw:
                self.closed = True
                return
            with self.lock:
                self.messages.append(json.loads(raw))

    def send(self, msg: dict[str, Any]) -> None:
        self.ws.send(json.dumps(msg))

    def events(self, channel: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages if m.get("op") == "event" and (channel is None or m["channel"] == channel)]

    def wait(self, pred: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                with self.lock:
                    tail = self.messages[-5:]
                raise AssertionError(f"timed out waiting for {what}; last messages: {tail}")
            time.sleep(0.02)

    def subscribe(self, channel: str, since: Any = None, ref: int = 1) -> None:
        msg: dict[str, Any] = {"op": "subscribe", "channel": channel, "ref": ref}
        if since is not None:
            msg["since"] = since
        self.send(msg)
        self.wait(lambda: any(m.get("op") in ("subscribed", "error") and m.get("ref") == ref
                              for m in list(self.messages)), what="subscribed")
        with self.lock:
            reply = [m for m in self.messages if m.get("ref") == ref][-1]
        assert reply["op"] == "subscribed", reply

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


def two_nodes(make_daemon: Callable[..., Daemon], url: str) -> tuple[Daemon, Daemon]:
    a = make_daemon(redis_config(url), name="node-a")
    b = make_daemon(redis_config(url), name="node-b")
    for d in (a, b):
        d.wait_up("/readyz")
    return a, b


def routes_ready(d: Daemon) -> None:
    """Skip an end-to-end test while the routes it needs are not served yet."""
    status, body = d.publish("probe.e2e", {"probe": True})
    if status != 202:
        pytest.skip(f"/api/publish is not served yet ({status} {body})")
    try:
        c = WSClient(d.ws_url)
    except Exception as e:
        pytest.skip(f"/ws is not served yet ({e})")
    c.close()


def github_post(d: Daemon, event: str, delivery: str, payload: dict[str, Any]) -> tuple[int, Any]:
    body = json.dumps(payload).encode()
    sig = "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    status, _, raw = http("POST", d.url + "/hooks/github", body, {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": sig,
    })
    return status, json.loads(raw) if raw else None


@pytest.mark.slow
def test_e2e_webhook_on_node_a_reaches_websocket_on_node_b(
    make_daemon: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """A signed GitHub webhook accepted by node A is pushed to a WebSocket subscriber of node B; a redelivery is a duplicate."""
    a, b = two_nodes(make_daemon, redis_server.url)
    routes_ready(a)
    ws = WSClient(b.ws_url)
    try:
        ws.subscribe("github.push")
        status, receipt = github_post(a, "push", "delivery-1", {"ref": "refs/heads/main"})
        assert status == 202, receipt
        assert receipt["channel"] == "github.push" and receipt["offset"] == 1
        ws.wait(lambda: len(ws.events()) == 1, what="the webhook on node B")
        ev = ws.events()[0]
        assert ev["channel"] == "github.push" and ev["offset"] == 1 and ev["id"] == "delivery-1"
        assert ev["data"] == {"ref": "refs/heads/main"} and ev["source"] == "github"
        status, again = github_post(b, "push", "delivery-1", {"ref": "refs/heads/main"})
        assert status == 200 and again["duplicate"] is True and again["offset"] == 1
        # Node A counts node B's subscriber (cluster-wide /api/channels).
        deadline = time.monotonic() + 10
        while True:
            status, chans = a.get("/api/channels", headers={"Authorization": f"Bearer {API_KEY}"})
            assert status == 200
            row = [c for c in chans["channels"] if c["name"] == "github.push"]
            if row == [{"name": "github.push", "subscribers": 1, "last_offset": 1}]:
                break
            assert time.monotonic() < deadline, chans
            time.sleep(0.05)
    finally:
        ws.close()


@pytest.mark.slow
def test_e2e_concurrent_publishing_to_both_nodes_is_gap_free(
    make_daemon: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """Publishing concurrently through both nodes gives unique, gap-free offsets, seen alike from either node."""
    a, b = two_nodes(make_daemon, redis_server.url)
    routes_ready(a)
    offsets: list[int] = []
    errors: list[Any] = []
    lock = threading.Lock()

    def pump(d: Daemon, tag: str) -> None:
        for i in range(40):
            status, body = d.publish("race.e2e", {"tag": tag, "i": i})
            with lock:
                if status == 202:
                    offsets.append(body["offset"])
                else:
                    errors.append((status, body))

    threads = [threading.Thread(target=pump, args=(d, f"{d.port}-{k}")) for d in (a, b) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(offsets) == list(range(1, 161))
    for d in (a, b):
        status, hist = d.get("/api/channels/race.e2e/history?since=0&limit=1000",
                             headers={"Authorization": f"Bearer {API_KEY}"})
        assert status == 200
        assert [e["offset"] for e in hist["events"]] == list(range(1, 161))
        assert hist["last_offset"] == 160


@pytest.mark.slow
def test_e2e_client_resumes_on_the_other_node(
    make_daemon: Callable[..., Daemon], redis_server: RedisServer
) -> None:
    """A client that saw offsets up to N on node A resumes on node B with since=N: no gap, no duplicate."""
    a, b = two_nodes(make_daemon, redis_server.url)
    routes_ready(a)
    ws = WSClient(a.ws_url)
    try:
        ws.subscribe("resume.x")
        for i in range(3):
            assert a.publish("resume.x", i)[0] == 202
        ws.wait(lambda: len(ws.events()) == 3, what="3 events on A")
    finally:
        ws.close()
    last = ws.events()[-1]["offset"]
    for i in range(3, 6):
        assert a.publish("resume.x", i)[0] == 202
    ws2 = WSClient(b.ws_url)
    try:
        ws2.subscribe("resume.x", since=last)
        assert b.publish("resume.x", 6)[0] == 202
        ws2.wait(lambda: len(ws2.events()) == 4, what="resume on B")
        assert [e["offset"] for e in ws2.events()] == [4, 5, 6, 7]
        assert [e["data"] for e in ws2.events()] == [3, 4, 5, 6]
    finally:
        ws2.close()


class PersistentRedis(RedisServer):
    """A redis-server with an append-only file fsynced on every write."""

    persistence = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def persistent_redis(redis_server: RedisServer, tmp_path: Path) -> Iterator[PersistentRedis]:
    """A redis-server with appendonly yes + appendfsync always (needs the same binary as redis_server)."""
    r = PersistentRedis(tmp_path / "redis-aof").start()
    yield r
    r.stop()


@pytest.mark.slow
def test_e2e_redis_killed_and_restarted_mid_stream(
    make_daemon: Callable[..., Daemon], persistent_redis: PersistentRedis
) -> None:
    """Redis SIGKILLed mid-stream and restarted: 503s meanwhile, no acknowledged event lost, no duplicate, delivery resumes."""
    a, b = two_nodes(make_daemon, persistent_redis.url)
    routes_ready(a)
    acked: list[int] = []
    refused: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()

    def pump() -> None:
        i = 0
        while not stop.is_set():
            d = (a, b)[i % 2]
            try:
                status, body = d.publish("crash.x", {"i": i})
            except OSError:
                status, body = 0, None
            with lock:
                if status == 202:
                    acked.append(body["offset"])
                else:
                    assert status in (0, 503), (status, body)
                    refused.append(i)
            i += 1
            time.sleep(0.005)

    ws = WSClient(b.ws_url)
    try:
        ws.subscribe("crash.x")
        t = threading.Thread(target=pump, daemon=True)
        t.start()
        ws.wait(lambda: len(acked) >= 30, what="30 acknowledged events")
        persistent_redis.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not refused:
            time.sleep(0.02)
        assert refused, "publishing kept succeeding with redis down"
        assert http("GET", a.url + "/readyz")[0] == 503
        persistent_redis.start()
        for d in (a, b):
            d.wait_up("/readyz", timeout=20)
        n = len(acked)
        ws.wait(lambda: len(acked) >= n + 30, what="30 more acknowledged events after the restart")
        stop.set()
        t.join(10)
        assert not ws.closed, "the WebSocket subscriber was disconnected"
        top = max(acked)
        ws.wait(lambda: any(e["offset"] == top for e in ws.events()), what="the last acknowledged event")
        got = [e["offset"] for e in ws.events()]
        assert len(got) == len(set(got)), "an event was delivered twice"
        assert got == sorted(got)
        assert set(acked) <= set(got), "an acknowledged event was not delivered"
        status, hist = a.get("/api/channels/crash.x/history?since=0&limit=1000",
                             headers={"Authorization": f"Bearer {API_KEY}"})
        assert status == 200
        kept = [e["offset"] for e in hist["events"]]
        assert set(acked) <= set(kept), "an acknowledged event was lost"
        assert kept == list(range(1, len(kept) + 1))
    finally:
        stop.set()
        ws.close()


@pytest_twisted.ensureDeferred
async def test_broadcast_reaches_the_handlers_of_every_node_once(brokers: Callable[..., RedisBroker]) -> None:
    """A control message from one node reaches each node's handlers of its kind once, with the sender's id."""
    a, b = brokers(), brokers()
    await gatherResults([a.start(), b.start()])
    got_a: list[tuple[dict[str, Any], str]] = []
    got_b: list[tuple[dict[str, Any], str]] = []
    other: list[Any] = []
    a.on_broadcast("hello", lambda m, n: got_a.append((m, n)))
    b.on_broadcast("hello", lambda m, n: got_b.append((m, n)))
    b.on_broadcast("else", lambda m, n: other.append(m))
    await a.broadcast("hello", {"x": 1})
    await until(lambda: bool(got_a and got_b), what="the message on both nodes")
    assert got_a == got_b == [({"x": 1}, a.node_id)]
    assert other == []
    # the event feed is untouched by the control channel
    rec = Recorder()
    b.subscribe("c", rec)
    await a.publish([Draft("c", 1)])
    await until(lambda: len(rec.events) == 1, what="an event after a control message")

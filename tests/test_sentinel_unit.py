"""
Redis high availability, fast: the WAIT acknowledgement, the counters raised
after a failover to a primary that is behind, READONLY, the link's reconnect
and the Sentinel helpers, on fakes (no reactor), plus one real redis-server
playing a primary that lost its newest writes.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import txredisapi
from conftest import RedisServer
from test_redis import FakeRedis, body, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from twisted_rt.core.config import BrokerConfig, Config
from twisted_rt.core.event import Draft
from twisted_rt.core.metrics import Stats
from twisted_rt.interfaces import JournalUnavailable
from twisted_rt.store import redis as rt_redis
from twisted_rt.store.redis import RedisBroker, _Waiter
from twisted_rt.store.sentinel import SentinelLocator, SentinelWatcher, parse_hostport
from twisted_rt.testing import Recorder


def fake(min_replicas: int = 0, **broker: Any) -> tuple[RedisBroker, FakeRedis]:
    cfg = Config(broker=BrokerConfig(kind="redis", url="redis://127.0.0.1:1/0", min_replicas=min_replicas,
                                     replica_timeout_ms=250, **broker))
    b = RedisBroker(cfg, MemoryReactorClock(), Stats())
    f = FakeRedis()
    b.cmd.proto = f
    b.sub.proto = object()
    b._subscribed = True
    b._baselined = True
    b._busy = False
    return b, f


def appended(offset: int, dup: int = 0, seq: int = 0) -> list[Any]:
    """The APPEND script's answer for one draft on channel c."""
    return [str(offset), str(dup), "c", body(offset) if dup else "", str(seq)]


# -- min_replicas: WAIT after the append script -------------------------------


def test_publish_is_acknowledged_only_after_wait_confirms() -> None:
    """With min_replicas the answer waits for WAIT n timeout on the same connection, sent after the script's reply."""
    b, f = fake(min_replicas=1)
    got: list[Any] = []
    b.publish([Draft("c", 1)]).addBoth(got.append)
    _, script = f.pop("EVALSHA")
    assert f.calls == []  # no WAIT before the write is done
    script.callback(appended(1, seq=1))
    wait_args, wait = f.pop("WAIT")
    assert wait_args == ("WAIT", "1", "250")
    assert got == []
    wait.callback(1)
    accepted = got[0]
    assert [a.event.offset for a in accepted] == [1] and not accepted[0].duplicate


def test_too_few_replicas_is_journal_unavailable() -> None:
    """WAIT answering fewer replicas than asked fails the publish with JournalUnavailable (a 503)."""
    b, f = fake(min_replicas=2)
    d = b.publish([Draft("c", 1)])
    f.pop("EVALSHA")[1].callback(appended(1, seq=1))
    f.pop("WAIT")[1].callback(1)
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure, Failure) and failure.check(JournalUnavailable)
    assert "only 1 of 2 replicas confirmed" in failure.getErrorMessage()


def test_duplicate_writes_a_marker_before_its_wait() -> None:
    """A retry recognised as a duplicate writes a marker first, so its WAIT covers the first attempt's write."""
    b, f = fake(min_replicas=1)
    d = b.publish([Draft("c", 1, id="same")])
    f.pop("EVALSHA")[1].callback(appended(1, dup=1))
    assert [c[0] for c in f.calls] == [("INCR", "rt:wait"), ("WAIT", "1", "250")]
    f.pop("INCR")[1].callback(1)
    f.pop("WAIT")[1].callback(1)
    assert d.result[0].duplicate and d.result[0].event.offset == 1


def test_connection_lost_between_script_and_wait_is_unavailable() -> None:
    """A new command connection cannot confirm the old one's write: the publish fails, nothing is assumed."""
    b, f = fake(min_replicas=1)
    d = b.publish([Draft("c", 1)])
    _, script = f.pop("EVALSHA")
    b.cmd.proto = FakeRedis()
    script.callback(appended(1, seq=1))
    assert d.result.check(JournalUnavailable)
    d.addErrback(lambda _: None)


def test_one_wait_in_flight_requests_meanwhile_share_the_next() -> None:
    """Redis blocks a client in WAIT: requests made while one is in flight share one WAIT sent when it returns."""
    f = FakeRedis()
    w = _Waiter(f, 1, 100)
    first = w.request()
    assert len(f.calls) == 1
    second, third = w.request(), w.request()
    assert len(f.calls) == 1
    f.pop("WAIT")[1].callback(1)
    assert first.result == 1 and not second.called
    f.pop("WAIT")[1].callback(0)
    assert second.result == third.result == 0
    assert f.calls == []
    failing = w.request()
    f.pop("WAIT")[1].errback(txredisapi.ConnectionError("Lost connection"))
    assert failing.result.check(txredisapi.ConnectionError)
    failing.addErrback(lambda _: None)


def test_without_min_replicas_no_wait_is_sent() -> None:
    """min_replicas = 0 (the default): the script's reply is the acknowledgement, as before."""
    b, f = fake()
    d = b.publish([Draft("c", 1)])
    f.pop("EVALSHA")[1].callback(appended(1, seq=1))
    assert d.result[0].event.offset == 1 and f.calls == []


# -- a primary behind what a node delivered -----------------------------------


def test_resync_against_a_primary_behind_raises_its_counters() -> None:
    """Snapshot below live_last: the node raises the counters (and gseq) to what it handed out, never lowers its own."""
    b, f = fake()
    rec = Recorder()
    b.subscribe("c", rec)
    for i in (1, 2, 3, 4, 5):
        b._on_message(f"{i} c {body(i)}")
    assert rec.offsets() == [1, 2, 3, 4, 5]
    b._request_sync()
    f.pop("EVALSHA")[1].callback(["epoch-1", "c", "3", "other", "7"])
    args, raise_d = f.pop("EVALSHA")
    assert args[1] == rt_redis.RAISE.sha and args[3:] == ("rt", "0", "c", "5")
    raise_d.callback(["c", "3"])
    assert b.live_last == {"c": 5, "other": 7} and f.calls == [] and not b._busy
    # the next event on the raised counter is 6: delivered, nothing skipped or repeated
    b._on_message(f"6 c {body(6)}")
    assert rec.offsets() == [1, 2, 3, 4, 5, 6]


def test_readonly_answer_makes_the_command_link_find_the_primary_again() -> None:
    """READONLY (the primary was demoted under us) fails the publish as unavailable and drops the connection."""
    b, f = fake()
    moved: list[bool] = []
    b.cmd.reconnect = lambda: moved.append(True)  # type: ignore[method-assign]
    d = b.publish([Draft("c", 1)])
    f.pop("EVALSHA")[1].errback(txredisapi.ResponseError("READONLY You can't write against a read only replica."))
    assert d.result.check(JournalUnavailable) and moved == [True]
    d.addErrback(lambda _: None)


@pytest.mark.redis
@pytest_twisted.ensureDeferred
async def test_primary_that_lost_writes_does_not_make_a_node_skip_or_repeat(redis_server: RedisServer) -> None:
    """A primary whose history is behind (failover to a lagging replica): the next event gets a fresh offset, seen once."""
    cfg = Config(broker=BrokerConfig(kind="redis", url=redis_server.url, prefix="behind"))
    a, b = RedisBroker(cfg, reactor, Stats()), RedisBroker(cfg, reactor, Stats())
    try:
        await a.start()
        await b.start()
        rec = Recorder()
        b.subscribe("lag", rec)
        for i in range(5):
            await a.publish([Draft("lag", i)])
        await until(lambda: rec.offsets() == [1, 2, 3, 4, 5], what="five live events")
        # what a replica two writes behind holds: counters and stream at 3
        r = redis_server_client(redis_server)
        r.set("behind:seq:lag", 3)
        r.set("behind:gseq", 3)
        r.execute_command("XDEL", "behind:s:lag", "4-0", "5-0")
        r.client_kill_filter(_type="pubsub")
        r.client_kill_filter(_type="normal", skipme=True)
        await until(lambda: a.ready and b.ready and not b._busy and r.get("behind:seq:lag") == "5",
                    what="the counters raised after the resync")
        accepted = await a.publish([Draft("lag", 5)])
        assert accepted[0].event.offset == 6 and accepted[0].event.seq > 5
        await until(lambda: len(rec.events) == 6, what="the sixth event")
        assert rec.offsets() == [1, 2, 3, 4, 5, 6]
        assert [e.offset for e in await a.history("lag")] == [1, 2, 3, 6]
    finally:
        await a.stop()
        await b.stop()


def redis_server_client(server: RedisServer) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)


# -- the link and the Sentinel helpers -----------------------------------------


def test_link_reconnect_drops_a_connection_or_retries_at_once() -> None:
    """reconnect(): a connected link closes its connection; a waiting one restarts its ClientService right away."""
    b, _ = fake()
    link = b.cmd
    link.start()
    t = StringTransport()

    class P:
        transport = t

    link.proto = P()
    link.reconnect()
    assert t.disconnecting
    link.proto = None
    link.attempting = False
    stopped: list[bool] = []
    restarted: list[bool] = []
    d: Deferred[None] = Deferred()
    link.service.stopService = lambda: (stopped.append(True), d)[1]  # type: ignore[method-assign]
    link.service.startService = lambda: restarted.append(True)  # type: ignore[method-assign]
    link.reconnect()
    link.reconnect()  # a restart under way: nothing more
    assert stopped == [True] and restarted == []
    d.callback(None)
    assert restarted == [True]
    link.attempting = True
    link.reconnect()
    assert stopped == [True]


def test_parse_hostport_accepts_names_ipv4_and_bracketed_ipv6() -> None:
    """host:port for the [broker] sentinels: names, IPv4 and [IPv6]; anything else is a ValueError."""
    assert parse_hostport("10.0.0.1:26379") == ("10.0.0.1", 26379)
    assert parse_hostport("sentinel-a:1") == ("sentinel-a", 1)
    assert parse_hostport("[::1]:26379") == ("::1", 26379)
    for bad in ("nohost", ":1", "h:0", "h:65536", "h:x"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_watcher_acts_on_switch_master_of_its_master_only() -> None:
    """+switch-master of our master calls on_change; another master's or a malformed message is ignored."""
    calls: list[int] = []
    loc = SentinelLocator(MemoryReactorClock(), [("127.0.0.1", 1)], "rt")
    w = SentinelWatcher(loc, lambda: calls.append(1), rt_redis.backoff)
    w.switched("other 1.1.1.1 1 2.2.2.2 2")
    w.switched("rt garbage")
    assert calls == []
    w.switched("rt 127.0.0.1 6379 127.0.0.1 6380")
    assert calls == [1]
    assert 0 < w._retry_delay(1) <= rt_redis.backoff(1, rand=lambda: 1.0)


def test_locator_needs_at_least_one_sentinel() -> None:
    """A locator without Sentinels is a programming error (the config check refuses an empty list earlier)."""
    with pytest.raises(ValueError):
        SentinelLocator(MemoryReactorClock(), [], "rt")


def test_sentinel_broker_connects_both_links_through_the_locator() -> None:
    """[broker] sentinels: both links go through the Sentinel endpoint, check ROLE, and a watcher follows +switch-master."""
    cfg = Config(broker=BrokerConfig(kind="redis", sentinels=("127.0.0.1:26379", "127.0.0.1:26380"),
                                     sentinel_master="rt", password="pw"))
    b = RedisBroker(cfg, MemoryReactorClock(), Stats())
    assert b.sentinel is not None and b.sentinel.sentinels == [("127.0.0.1", 26379), ("127.0.0.1", 26380)]
    assert b.sentinel.password == "pw" and b.url.password == "pw"
    assert b.cmd.primary_only and b.sub.primary_only and b._watcher is not None

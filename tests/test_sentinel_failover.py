"""
Redis high availability end to end: a real Sentinel topology on loopback (one
primary, two replicas, three Sentinels from Debian's redis-server, fast
failover settings) and real daemons (C{twistd -n rt}) configured with
C{[broker] sentinels}.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
import redis as redis_py
from conftest import API_KEY, Daemon, free_port, http
from test_redis import WSClient
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from twisted_rt.core.config import BrokerConfig, Config
from twisted_rt.core.event import Draft
from twisted_rt.core.metrics import Stats
from twisted_rt.interfaces import JournalUnavailable
from twisted_rt.store.redis import RedisBroker
from twisted_rt.store.sentinel import NoPrimary, SentinelLocator
from twisted_rt.testing import Recorder

pytestmark = pytest.mark.redis

MASTER = "rt"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _exe() -> str:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(exe):
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (tests/run installs it)")
        pytest.skip("redis-server is not installed")
    return exe


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except (OSError, redis_py.RedisError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Node:
    """One redis-server process (data node or Sentinel) on a free loopback port."""

    def __init__(self, exe: str, workdir: Path, args: list[str], conf: str | None = None) -> None:
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.args = args
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        if self.conf is not None:
            conf = self.workdir / "sentinel.conf"
            conf.write_text(self.conf.format(port=self.port, dir=self.workdir))
            cmd = [self.exe, str(conf), "--sentinel"]
        else:
            cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                   "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait(lambda: self.client().ping(), 10, f"redis on {self.port}")
        return self

    def client(self) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, decode_responses=True)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


SENTINEL_CONF = """
port {port}
bind 127.0.0.1
dir {dir}
sentinel monitor rt 127.0.0.1 %d 2
sentinel down-after-milliseconds rt 1000
sentinel failover-timeout rt 5000
sentinel parallel-syncs rt 2
"""


class Topology:
    """A primary, two replicas and three Sentinels watching them as C{rt}."""

    def __init__(self, root: Path) -> None:
        exe = _exe()
        self.primary = Node(exe, root / "p", [])
        self.primary.start()
        self.replicas = [Node(exe, root / f"r{i}", ["--replicaof", "127.0.0.1", str(self.primary.port)])
                         for i in (1, 2)]
        for r in self.replicas:
            r.start()
        conf = SENTINEL_CONF % self.primary.port
        self.sentinels = [Node(exe, root / f"s{i}", [], conf=conf) for i in (1, 2, 3)]
        for s in self.sentinels:
            s.start()
        self.data = [self.primary, *self.replicas]

    @property
    def sentinel_list(self) -> str:
        return ", ".join(f'"127.0.0.1:{s.port}"' for s in self.sentinels)

    def current_primary(self) -> Node:
        for s in self.sentinels:
            try:
                _host, port = s.client().sentinel_get_master_addr_by_name(MASTER)
            except (OSError, redis_py.RedisError, TypeError):
                continue
            return next(n for n in self.data if n.port == int(port))
        raise AssertionError("no sentinel answered")

    def wait_replicated(self, timeout: float = 15) -> None:
        """Both replicas are online with the primary."""
        def synced() -> bool:
            info = self.primary.client().info("replication")
            return int(info["connected_slaves"]) == 2 and all(
                info[f"slave{i}"]["state"] == "online" for i in (0, 1))
        _wait(synced, timeout, "two online replicas")

    def wait_sentinels(self, timeout: float = 20) -> None:
        """Every Sentinel knows both replicas and the two other Sentinels (a failover can be elected)."""
        def known() -> bool:
            for s in self.sentinels:
                m = s.client().sentinel_master(MASTER)
                if int(m["num-slaves"]) < 2 or int(m["num-other-sentinels"]) < 2:
                    return False
            return True
        _wait(known, timeout, "sentinels to discover each other and the replicas")

    def stop(self) -> None:
        for n in (*self.sentinels, *self.data):
            n.stop()


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    """A fresh Sentinel topology for one test, every process killed afterwards."""
    t = Topology(tmp_path / "topology")
    try:
        t.wait_replicated()
        yield t
    finally:
        t.stop()


def ha_config(t: Topology, min_replicas: int = 1, timeout_ms: int = 500) -> str:
    return f"""
    [journal]
    path = "var/journal.sqlite3"

    [broker]
    kind = "redis"
    sentinels = [{t.sentinel_list}]
    sentinel_master = "{MASTER}"
    min_replicas = {min_replicas}
    replica_timeout_ms = {timeout_ms}

    [auth]
    api_keys = ["{API_KEY}"]
    """


def history(d: Daemon, channel: str) -> list[dict[str, Any]]:
    status, body = d.get(f"/api/channels/{channel}/history?since=0&limit=1000", headers=AUTH)
    assert status == 200, body
    events: list[dict[str, Any]] = body["events"]
    return events


# -- WAIT refusals -------------------------------------------------------------


@pytest.mark.slow
def test_wait_refusal_is_503_and_the_retry_is_the_same_event(
    topology: Topology, make_daemon: Callable[..., Daemon]
) -> None:
    """With the replicas stopped a publish is 503 (so is its retry); once they are back the retry is the same event."""
    d = make_daemon(ha_config(topology, min_replicas=1, timeout_ms=300), name="wait-node")
    d.wait_up("/readyz")
    status, body = d.publish("wait.x", "one", id="w1")
    assert status == 202 and body["offset"] == 1, body
    for r in topology.replicas:
        r.signal(signal.SIGSTOP)
    try:
        status, body = d.publish("wait.x", "two", id="w2")
        assert status == 503, body
        assert body["error"] == "journal_unavailable" and "replicas confirmed" in body["message"], body
        status, body = d.publish("wait.x", "two", id="w2")
        assert status == 503, body  # a duplicate is confirmed too: still not replicated
        assert http("GET", d.url + "/readyz")[0] == 200  # the primary is there: ready
    finally:
        for r in topology.replicas:
            r.signal(signal.SIGCONT)
    _wait(lambda: d.publish("wait.x", "two", id="w2")[0] == 202, 10, "the retry to be confirmed")
    status, body = d.publish("wait.x", "two", id="w2")
    assert status == 202 and body.get("duplicate") is True and body["offset"] == 2, body
    status, body = d.publish("wait.x", "three", id="w3")
    assert status == 202 and body["offset"] == 3, body
    assert [(e["offset"], e["id"]) for e in history(d, "wait.x")] == [(1, "w1"), (2, "w2"), (3, "w3")]


# -- kill -9 of the primary under load ---------------------------------------


class Publisher(threading.Thread):
    """Publishes ids p<tag>-<i> in turn, retrying each one (same id) until it is acknowledged."""

    def __init__(self, nodes: list[Daemon], tag: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.tag = tag
        self.channel = channel
        self.acked: dict[str, int] = {}
        self.refused = 0
        self.stop_after: int | None = None
        self.errors: list[Any] = []

    def run(self) -> None:
        i = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.stop_after is not None and i >= self.stop_after:
                return
            eid = f"p{self.tag}-{i}"
            node = self.nodes[i % len(self.nodes)]
            try:
                status, body = node.publish(self.channel, {"i": i, "tag": self.tag}, id=eid)
            except OSError:
                status, body = 0, None
            if status in (200, 202):
                self.acked[eid] = body["offset"]
                i += 1
            elif status in (0, 503):
                self.refused += 1
                time.sleep(0.02)
            else:
                self.errors.append((status, body))
                return
            time.sleep(0.003)


@pytest.mark.slow
def test_kill_primary_under_load_every_acknowledged_event_once_gap_free(
    topology: Topology, make_daemon: Callable[..., Daemon]
) -> None:
    """kill -9 of the primary while two nodes publish: 503 only meanwhile, every ack kept once, gap-free, resumable."""
    topology.wait_sentinels()
    a = make_daemon(ha_config(topology), name="node-a")
    b = make_daemon(ha_config(topology), name="node-b")
    for d in (a, b):
        d.wait_up("/readyz")
    channel = "ha.x"
    ws = WSClient(b.ws_url)
    ready_log: list[int] = []
    watching = threading.Event()

    def watch_ready() -> None:
        while not watching.is_set():
            try:
                ready_log.append(http("GET", a.url + "/readyz", timeout=2)[0])
            except OSError:
                ready_log.append(0)
            time.sleep(0.05)

    pubs = [Publisher([a, b], "x", channel), Publisher([b, a], "y", channel)]
    watcher = threading.Thread(target=watch_ready, daemon=True)
    try:
        ws.subscribe(channel)
        watcher.start()
        for p in pubs:
            p.start()
        _wait(lambda: sum(len(p.acked) for p in pubs) >= 40, 20, "40 acknowledged events")
        old = topology.primary
        old.signal(signal.SIGKILL)
        _wait(lambda: topology.current_primary() is not old, 20, "the sentinels to fail over")
        for d in (a, b):
            d.wait_up("/readyz", timeout=20)
        n = sum(len(p.acked) for p in pubs)
        _wait(lambda: sum(len(p.acked) for p in pubs) >= n + 40, 20, "40 more acknowledged events")
        for p in pubs:
            p.stop_after = len(p.acked) + 5
        for p in pubs:
            p.join(30)
        watching.set()
        watcher.join(5)
        assert [p.errors for p in pubs] == [[], []]
        assert sum(p.refused for p in pubs) > 0, "nothing was refused while the primary was gone"
        assert 503 in ready_log and ready_log[-1] == 200, "/readyz did not report the failover"

        acked = {eid: off for p in pubs for eid, off in p.acked.items()}
        kept = history(a, channel)
        assert history(b, channel) == kept
        offsets = [e["offset"] for e in kept]
        assert offsets == sorted(set(offsets)) and offsets[0] == 1, "offsets are not unique and increasing"
        # A hole is allowed only where README "Offsets across a failover" says: an event streamed
        # just before the crash whose WAIT never answered (its publisher got a 503, nothing acked
        # it) and that the new primary never had; the counter is raised past it, never reused.
        holes = sorted(set(range(1, offsets[-1] + 1)) - set(offsets))
        assert len(holes) <= sum(p.refused for p in pubs), f"holes {holes} beyond the refused publishes"
        ids = [e["id"] for e in kept]
        assert len(ids) == len(set(ids)), "an event is kept twice"
        by_id = {e["id"]: e["offset"] for e in kept}
        assert {eid: by_id.get(eid) for eid in acked} == acked, "an acknowledged event was lost or moved"
        # the live subscriber stayed connected and saw exactly the journal
        assert not ws.closed, "the WebSocket subscriber was disconnected"
        ws.wait(lambda: len(ws.events(channel)) >= len(kept), what="every journaled event live")
        live = [(e["offset"], e["id"]) for e in ws.events(channel)]
        assert [x for x in live if x[0] not in holes] == [(e["offset"], e["id"]) for e in kept]
        assert all(x[0] in holes for x in live if x not in {(e["offset"], e["id"]) for e in kept})
        # a subscriber resuming (on the other node) from the middle gets exactly the rest
        mid = offsets[len(offsets) // 3]
        ws2 = WSClient(a.ws_url)
        try:
            ws2.subscribe(channel, since=mid)
            rest = [o for o in offsets if o > mid]
            ws2.wait(lambda: len(ws2.events(channel)) >= len(rest), what="the resumed replay")
            time.sleep(0.2)
            assert [e["offset"] for e in ws2.events(channel)] == rest
        finally:
            ws2.close()
    finally:
        watching.set()
        for p in pubs:
            p.stop_after = 0
        ws.close()


# -- the broker against the topology, in process ------------------------------


def broker_for(t: Topology, sentinels: list[str] | None = None) -> RedisBroker:
    cfg = Config(broker=BrokerConfig(
        kind="redis", sentinels=tuple(sentinels or [f"127.0.0.1:{s.port}" for s in t.sentinels]),
        sentinel_master=MASTER,
    ))
    return RedisBroker(cfg, reactor, Stats())


@pytest_twisted.ensureDeferred
async def test_locator_skips_dead_sentinels_and_asks_the_answering_one_first(topology: Topology) -> None:
    """A dead Sentinel first in the list is skipped; the one that answered is asked first next time."""
    dead = ("127.0.0.1", free_port())
    live = [("127.0.0.1", s.port) for s in topology.sentinels]
    loc = SentinelLocator(reactor, [dead, *live], MASTER)
    assert await loc.primary() == ("127.0.0.1", topology.primary.port)
    assert loc.sentinels[0] == live[0] and loc.error == ""
    unknown = SentinelLocator(reactor, [dead, live[0]], "nosuchmaster")
    with pytest.raises(NoPrimary) as e:
        await unknown.primary()
    assert "knows no master named 'nosuchmaster'" in str(e.value) and "connection" in str(e.value).lower()


@pytest_twisted.ensureDeferred
async def test_broker_without_a_reachable_sentinel_is_unready_with_the_reason(topology: Topology) -> None:
    """No Sentinel answering: not ready, the reason names the Sentinels, publish is JournalUnavailable."""
    b = broker_for(topology, [f"127.0.0.1:{free_port()}"])
    from twisted_rt.store import redis as rt_redis

    old, rt_redis.START_WAIT = rt_redis.START_WAIT, 0.5
    try:
        await b.start()
        assert not b.ready
        assert "no Sentinel gave the primary" in b.not_ready_reason
        with pytest.raises(JournalUnavailable):
            await b.publish([Draft("x", 1)])
    finally:
        rt_redis.START_WAIT = old
        await b.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_switch_master_moves_both_links_and_live_delivery_continues(topology: Topology) -> None:
    """A Sentinel FAILOVER (old primary alive): +switch-master moves both links; listeners miss nothing."""
    topology.wait_sentinels()
    a, b = broker_for(topology), broker_for(topology)
    try:
        await gatherResults([a.start(), b.start()])
        assert a.ready and b.ready
        rec = Recorder()
        b.subscribe("sw", rec)
        for i in range(3):
            await a.publish([Draft("sw", i)])
        old = topology.primary
        assert a.cmd.addr == ("127.0.0.1", old.port)
        topology.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", MASTER)
        deadline = time.monotonic() + 20
        while True:
            new = topology.current_primary()
            if new is not old and a.ready and b.ready and a.cmd.addr == b.sub.addr == ("127.0.0.1", new.port):
                break
            assert time.monotonic() < deadline, (a.cmd.addr, b.sub.addr, a.not_ready_reason)
            await _sleep(0.05)
        while True:
            try:
                await a.publish([Draft("sw", 3)])
                break
            except JournalUnavailable:
                assert time.monotonic() < deadline
                await _sleep(0.05)
        while rec.offsets() != [1, 2, 3, 4]:
            assert time.monotonic() < deadline, rec.offsets()
            await _sleep(0.02)
        assert [e.data for e in rec.events] == [0, 1, 2, 3]
    finally:
        await gatherResults([a.stop(), b.stop()])


async def _sleep(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


def test_sample_sentinel_topology_in_conf_is_valid() -> None:
    """The sample files in conf/sentinel/ name the master the sample config uses, with the documented keys."""
    root = Path(__file__).resolve().parent.parent / "conf" / "sentinel"
    sentinel = (root / "sentinel.conf").read_text()
    assert "sentinel monitor rt " in sentinel and "down-after-milliseconds rt" in sentinel
    assert "replicaof" in (root / "replica.conf").read_text()
    assert sorted(p.name for p in root.glob("*.conf")) == ["primary.conf", "replica.conf", "sentinel.conf"]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_presence_members_and_a_destination_lease_survive_a_failover(topology: Topology) -> None:
    """kill -9 of the primary: members are still listed (re-announced) and the lease still has one holder."""
    from twisted_rt.store.deliveries import RedisDeliveries
    from twisted_rt.store.presence import make_presence

    topology.wait_sentinels()
    a, b = broker_for(topology), broker_for(topology)
    pa = make_presence(a, reactor, 0.3, 2.0)
    pb = make_presence(b, reactor, 0.3, 2.0)
    la, lb = RedisDeliveries(a), RedisDeliveries(b)
    try:
        await gatherResults([a.start(), b.start()])
        pa.start()
        pb.start()
        pa.add("room", "alice", {"n": 1}, object())
        pb.add("room", "bob", None, object())
        deadline = time.monotonic() + 10
        while [m["user"] for m in await pb.members("room")] != ["alice", "bob"]:
            assert time.monotonic() < deadline
            await _sleep(0.05)
        assert await la.acquire("hook", a.node_id, 10) is True
        assert await lb.acquire("hook", b.node_id, 10) is False
        old = topology.primary
        old.signal(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not (a.ready and b.ready and a.cmd.addr not in (None, ("127.0.0.1", old.port))
                   and b.cmd.addr not in (None, ("127.0.0.1", old.port))):
            assert time.monotonic() < deadline, (a.not_ready_reason, b.not_ready_reason)
            await _sleep(0.05)
        while True:
            try:
                members = await pa.members("room")
                if [m["user"] for m in members] == ["alice", "bob"]:
                    break
            except JournalUnavailable:
                pass
            assert time.monotonic() < deadline
            await _sleep(0.05)
        assert members[0].get("info") == {"n": 1}
        assert await la.acquire("hook", a.node_id, 10) is True  # the holder renews
        assert await lb.acquire("hook", b.node_id, 10) is False  # nobody else gets it
    finally:
        await gatherResults([pa.stop(), pb.stop()], consumeErrors=True).addErrback(lambda _: None)
        await gatherResults([a.stop(), b.stop()])

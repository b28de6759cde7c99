"""Presence bookkeeping on a fake clock: tabs, drops, node expiry, resync; the connection registry."""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.task import Clock

from twisted_rt.store.presence import ClusterPresence, Connections, MemoryMemberStore, make_presence
from twisted_rt.testing import MemoryBroker


class Watcher:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, Any]] = []

    def presence_changed(self, op: str, channel: str, user: str, info: Mapping[str, Any] | None) -> None:
        self.seen.append((op, channel, user, info))


class Bus(MemoryBroker):
    """A broker whose control messages reach every node sharing the bus."""

    def __init__(self, node: str, nodes: list[Bus]) -> None:
        super().__init__()
        self.node_id = node
        self.nodes = nodes
        nodes.append(self)
        self.down = False

    def broadcast(self, kind: str, message: dict[str, Any]) -> Any:
        from twisted.internet.defer import succeed

        for n in self.nodes:
            n.dispatch_control(kind, message, self.node_id)
        return succeed(None)


def cluster(n: int = 2) -> tuple[Clock, MemoryMemberStore, list[ClusterPresence]]:
    clock = Clock()
    store = MemoryMemberStore(clock)
    nodes: list[Bus] = []
    out = []
    for i in range(n):
        p = ClusterPresence(Bus(f"n{i}", nodes), store, clock, heartbeat_seconds=5, node_timeout_seconds=20)
        p.start()
        out.append(p)
    return clock, store, out


def members(p: ClusterPresence, channel: str) -> list[Any]:
    d = p.members(channel)
    result: list[Any] = []
    d.addCallback(result.append)
    return result[0]


def test_tabs_are_one_member() -> None:
    """Three tabs of one user are one member: one join at the first, one leave at the last."""
    _clock, _store, [a] = cluster(1)
    w = Watcher()
    a.watch("chat.1", w)
    tabs = [object(), object(), object()]
    for t in tabs:
        a.add("chat.1", "alice", {"name": "Alice"}, t)
    assert w.seen == [("join", "chat.1", "alice", {"name": "Alice"})]
    assert members(a, "chat.1") == [{"user": "alice", "info": {"name": "Alice"}}]
    a.remove("chat.1", "alice", tabs[0])
    a.remove("chat.1", "alice", tabs[0])  # twice: no-op
    a.remove("chat.1", "alice", tabs[1])
    assert len(w.seen) == 1
    a.remove("chat.1", "alice", tabs[2])
    assert w.seen[-1] == ("leave", "chat.1", "alice", None)
    assert members(a, "chat.1") == []


def test_user_on_two_nodes_joins_and_leaves_once() -> None:
    """A user with a tab on each of two nodes joins once and leaves once, seen on both nodes."""
    _clock, _store, [a, b] = cluster(2)
    wa, wb = Watcher(), Watcher()
    a.watch("c", wa)
    b.watch("c", wb)
    ta, tb = object(), object()
    a.add("c", "bob", None, ta)
    b.add("c", "bob", None, tb)
    assert wa.seen == wb.seen == [("join", "c", "bob", None)]
    a.remove("c", "bob", ta)
    assert len(wa.seen) == 1
    b.remove("c", "bob", tb)
    assert wa.seen[-1] == wb.seen[-1] == ("leave", "c", "bob", None)
    counts: list[Any] = []
    a.counts().addCallback(counts.append)
    assert counts == [{}]


def test_dead_node_members_leave_after_timeout() -> None:
    """A node that stops beating (kill -9) has its members reaped by another node within timeout + heartbeat."""
    clock, _store, [a, b] = cluster(2)
    w = Watcher()
    a.watch("c", w)
    b.add("c", "carol", {"x": 1}, object())
    b.add("c", "dave", None, object())
    a.add("c", "dave", None, object())  # also on a live node: stays
    assert [s[2] for s in w.seen] == ["carol", "dave"]
    b._loop.stop()  # b dies: no more beats
    b._stopped = True
    clock.advance(15)
    assert len(w.seen) == 2
    assert [m["user"] for m in members(a, "c")] == ["carol", "dave"]
    clock.advance(10)  # 25 s: past the timeout, and a beat of a has reaped b
    assert w.seen[2:] == [("leave", "c", "carol", None)]
    assert members(a, "c") == [{"user": "dave"}]
    assert a.gauge == {"c": 1}


def test_unwatch_and_unknown_removes() -> None:
    """An unwatched watcher hears nothing; removing an unknown connection or channel changes nothing."""
    _clock, _store, [a] = cluster(1)
    w = Watcher()
    a.watch("c", w)
    a.unwatch("c", w)
    a.unwatch("c", w)
    a.remove("nope", "x", object())
    a.add("c", "u", None, object())
    assert w.seen == []


def test_resync_after_store_lost_data() -> None:
    """A beat that finds the store lost this node (Redis restarted) puts its members back and announces them."""
    clock, store, [a, b] = cluster(2)
    w = Watcher()
    b.watch("c", w)
    a.add("c", "erin", None, object())
    store.alive.clear()
    store.data.clear()
    clock.advance(5)
    assert ("join", "c", "erin", None) in w.seen[1:]
    assert members(b, "c") == [{"user": "erin"}]


def test_stop_makes_members_leave() -> None:
    """A node that stops (daemon shutdown) has its members leave on every node."""
    _clock, _store, [a, b] = cluster(2)
    w = Watcher()
    b.watch("c", w)
    a.add("c", "frank", None, object())
    a.stop()
    assert w.seen[-1] == ("leave", "c", "frank", None)
    a.add("c", "late", None, object())  # after stop: not recorded
    assert members(b, "c") == []


def test_malformed_presence_message_ignored() -> None:
    """A presence control message that is not a join/leave is ignored, not fatal."""
    _clock, _store, [a] = cluster(1)
    w = Watcher()
    a.watch("c", w)
    a.broker.broadcast("presence", {"op": "dance", "channel": "c", "user": "u"})
    a.broker.broadcast("presence", {"op": "join", "channel": "c", "user": "u", "info": [1]})
    assert w.seen == [("join", "c", "u", None)]


def test_local_presence_is_memory() -> None:
    """With the local broker, presence keeps its members in this process."""
    p = make_presence(MemoryBroker(), Clock(), 5, 20)
    assert isinstance(p.store, MemoryMemberStore)


class Conn:
    def __init__(self) -> None:
        self.closed = 0

    def disconnect(self) -> None:
        self.closed += 1


def test_disconnect_reaches_every_node() -> None:
    """disconnect closes the user's connections on this node and, through the broadcast, on the others."""
    nodes: list[Bus] = []
    ra, rb = Connections(Bus("a", nodes)), Connections(Bus("b", nodes))
    c1, c2, c3, other = Conn(), Conn(), Conn(), Conn()
    ra.register("u", c1)
    ra.register("u", c2)
    rb.register("u", c3)
    rb.register("v", other)
    ra.register("w", Conn())
    ra.unregister("w", Conn())
    got: list[int] = []
    ra.disconnect("u").addCallback(got.append)
    assert got == [2]
    assert (c1.closed, c2.closed, c3.closed, other.closed) == (1, 1, 1, 0)
    assert "u" not in ra.by_user and "u" not in rb.by_user
    rb.unregister("v", other)
    assert rb.by_user == {}


def test_journal_limits_follow_the_first_matching_rule() -> None:
    """[[channels]] rules give max_events and retention per channel (first match; 0 and no match: [journal])."""
    from twisted_rt.core.config import ChannelRule
    from twisted_rt.store.journal import Journal

    j = Journal(Clock(), ":memory:", max_events_per_channel=100, retention_seconds=1000,  # type: ignore[arg-type]
                rules=[ChannelRule("chat.>", max_events=5), ChannelRule("chat.x", max_events=7),
                       ChannelRule("logs.*", retention_seconds=10)])
    assert j.limits("chat.x") == (5, 1000.0)
    assert j.limits("logs.a") == (100, 10.0)
    assert j.limits("other") == (100, 1000.0)

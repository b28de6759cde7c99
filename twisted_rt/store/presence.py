# -*- test-case-name: tests.test_presence_unit -*-
"""
Presence members and the connection registry (CONTRACT "Presence",
"Connection control"), shared by every protocol (C{/ws}, C{/sse}, Pusher).

Two halves:

  - this node's bookkeeping (L{ClusterPresence}): per presence channel, each
    user's connections.  A user's first connection on this node is a
    I{node join}, its last one a I{node leave}; other tabs change nothing.
  - the cluster's (a L{MemberStore}): per node, per channel, the users and
    their C{info}.  A node join is a I{cluster} join only when no other live
    node has that user in that channel; a node leave is a cluster leave only
    when no other live node still has it.  The store answers both
    atomically (one Lua script in Redis, L{RedisMemberStore}), so however
    many nodes and tabs, each join and leave is decided once, and the node
    that decided it sends it to every node through C{broker.broadcast}
    (kind C{"presence"}).  Every node hands what it hears to its local
    watchers (L{twisted_rt.interfaces.PresenceWatcher}), once per watcher.

Liveness: each node beats every C{[presence] heartbeat_seconds}, which
refreshes its alive mark (TTL C{node_timeout_seconds}).  A beat also reaps
nodes whose mark expired (a node killed with -9): their members are removed
and the users that no live node has any more leave (broadcast by the reaper;
the store is atomic, so one node reaps each dead node).  A dead node's
members are therefore gone within C{node_timeout_seconds + heartbeat_seconds}
(25 s with the defaults).  A beat that finds its own mark gone (Redis lost its data, or
this node was reaped during a partition), or that follows a failed store
call, re-synchronises: the store is made to hold exactly this node's
members, and the joins and leaves that makes are broadcast.

With the local broker the store is a L{MemoryMemberStore} in this process
(one node, nothing expires) and the broadcast is a direct call.

L{Connections} is the registry of this node's connections by user; its
C{disconnect} closes them and broadcasts C{"disconnect"} so every other node
closes its own.
"""

from __future__ import annotations

import abc
import json
from typing import Any, Callable, Mapping, Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rt.core.event import dumps
from twisted_rt.interfaces import (
    Broker,
    Closable,
    ConnectionRegistry,
    Control,
    JournalUnavailable,
    Member,
    Presence,
    PresenceWatcher,
    Reactor,
)

__all__ = [
    "MAX_MEMBERS_LISTED",
    "ClusterPresence",
    "Connections",
    "MemberStore",
    "MemoryMemberStore",
    "RedisMemberStore",
    "make_presence",
]

log = Logger()

#: members one C{members()} answer lists at most (the first by user name): every reply built
#: from it (C{op: presence}, C{/api/channels/<name>/presence}, Pusher's C{subscription_succeeded}
#: and C{/users}) stays bounded however large the channel (C{info} is at most 1 KiB each)
MAX_MEMBERS_LISTED = 1000

#: (channel, user, info as JSON text)
Entry = tuple[str, str, str]
#: (channel, user)
Key = tuple[str, str]


def _info(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:  # pragma: no cover - the store only holds what dumps wrote
        return None


class MemberStore(abc.ABC):
    """Where the cluster's members live; every call decides atomically (see the module docstring)."""

    @abc.abstractmethod
    def join(self, node: str, channel: str, user: str, info: str) -> Deferred[bool]:
        """C{node} has C{user} in C{channel}; C{True} when no other live node had it (a cluster join)."""

    @abc.abstractmethod
    def leave(self, node: str, channel: str, user: str) -> Deferred[bool]:
        """C{node} no longer has C{user}; C{True} when no other live node has it (a cluster leave)."""

    @abc.abstractmethod
    def beat(self, node: str, timeout: float) -> Deferred[tuple[bool, list[Key]]]:
        """
        C{node} is alive for C{timeout} more seconds.  Fires with whether it
        was alive before, and the cluster leaves of the dead nodes reaped.
        """

    @abc.abstractmethod
    def sync(self, node: str, entries: list[Entry]) -> Deferred[tuple[list[Entry], list[Key]]]:
        """Make C{node}'s members exactly C{entries}; fires with the cluster joins and leaves that made."""

    @abc.abstractmethod
    def forget(self, node: str) -> Deferred[list[Key]]:
        """C{node} stops: its members go; fires with the cluster leaves."""

    @abc.abstractmethod
    def members(self, channel: str) -> Deferred[dict[str, str]]:
        """User -> info text of every live node's members of C{channel}."""

    @abc.abstractmethod
    def counts(self) -> Deferred[dict[str, int]]:
        """Members per channel (with at least one), over the live nodes."""


class MemoryMemberStore(MemberStore):
    """
    The store in this process: the one of a single node, and the model the
    Redis scripts follow (its unit tests run several nodes on one clock).
    """

    def __init__(self, clock: Reactor) -> None:
        self.clock = clock
        self.alive: dict[str, float] = {}  # node -> deadline
        self.data: dict[str, dict[str, dict[str, str]]] = {}  # node -> channel -> user -> info

    def _live(self, node: str) -> bool:
        return self.alive.get(node, float("-inf")) > self.clock.seconds()

    def _elsewhere(self, node: str, channel: str, user: str) -> bool:
        return any(
            n != node and self._live(n) and user in chans.get(channel, {}) for n, chans in self.data.items()
        )

    def _add(self, node: str, channel: str, user: str, info: str) -> bool:
        users = self.data.setdefault(node, {}).setdefault(channel, {})
        had = user in users
        users[user] = info
        return not had and not self._elsewhere(node, channel, user)

    def _remove(self, node: str, channel: str, user: str) -> bool:
        chans = self.data.get(node, {})
        users = chans.get(channel)
        if users is None or user not in users:
            return False
        del users[user]
        if not users:
            del chans[channel]
        return not self._elsewhere(node, channel, user)

    def join(self, node: str, channel: str, user: str, info: str) -> Deferred[bool]:
        return succeed(self._add(node, channel, user, info))

    def leave(self, node: str, channel: str, user: str) -> Deferred[bool]:
        return succeed(self._remove(node, channel, user))

    def beat(self, node: str, timeout: float) -> Deferred[tuple[bool, list[Key]]]:
        was = self._live(node)
        self.alive[node] = self.clock.seconds() + timeout
        leaves: list[Key] = []
        for dead in [n for n in set(self.data) | set(self.alive) if not self._live(n)]:
            self.alive.pop(dead, None)
            for channel, users in sorted(self.data.pop(dead, {}).items()):
                leaves += [(channel, u) for u in sorted(users) if not self._elsewhere(dead, channel, u)]
        return succeed((was, leaves))

    def sync(self, node: str, entries: list[Entry]) -> Deferred[tuple[list[Entry], list[Key]]]:
        want = {(c, u): i for c, u, i in entries}
        leaves = [
            (c, u)
            for c, users in list(self.data.get(node, {}).items())
            for u in list(users)
            if (c, u) not in want and self._remove(node, c, u)
        ]
        joins = [(c, u, i) for (c, u), i in want.items() if self._add(node, c, u, i)]
        return succeed((joins, leaves))

    def forget(self, node: str) -> Deferred[list[Key]]:
        self.alive.pop(node, None)
        leaves: list[Key] = []
        for channel, users in sorted(self.data.pop(node, {}).items()):
            leaves += [(channel, u) for u in sorted(users) if not self._elsewhere(node, channel, u)]
        return succeed(leaves)

    def members(self, channel: str) -> Deferred[dict[str, str]]:
        out: dict[str, str] = {}
        for n, chans in self.data.items():
            if self._live(n):
                for u, i in chans.get(channel, {}).items():
                    out.setdefault(u, i)
        return succeed(out)

    def counts(self) -> Deferred[dict[str, int]]:
        users: dict[str, set[str]] = {}
        for n, chans in self.data.items():
            if self._live(n):
                for c, us in chans.items():
                    if us:
                        users.setdefault(c, set()).update(us)
        return succeed({c: len(us) for c, us in sorted(users.items())})


class RedisCommands(Protocol):
    """What L{RedisMemberStore} needs of L{twisted_rt.store.redis.RedisBroker}: its command connection."""

    def command(self, *args: Any) -> Deferred[Any]:
        """Run one command."""

    def key(self, kind: str, name: str = "") -> str:
        """A key of this cluster."""


# Keys (p = the cluster prefix): p:pa:<node> alive mark (PX timeout);
# p:pnodes set of nodes; p:pn:<node> set of the node's channels;
# p:pm:<node>:<channel> hash user -> info; p:pc:<channel> set of nodes with
# members there; p:pchs set of channels with members.  pn and pm expire
# (GC) after 3 timeouts without a beat.
_LUA_COMMON = """
local p = ARGV[1]
local function elsewhere(ch, user, me)
  for _, n in ipairs(redis.call('SMEMBERS', p .. ':pc:' .. ch)) do
    if n ~= me and redis.call('EXISTS', p .. ':pa:' .. n) == 1
       and redis.call('HEXISTS', p .. ':pm:' .. n .. ':' .. ch, user) == 1 then
      return true
    end
  end
  return false
end
local function add(node, ch, user, info, gc)
  local pm = p .. ':pm:' .. node .. ':' .. ch
  local had = redis.call('HEXISTS', pm, user)
  redis.call('HSET', pm, user, info)
  redis.call('PEXPIRE', pm, gc)
  redis.call('SADD', p .. ':pn:' .. node, ch)
  redis.call('PEXPIRE', p .. ':pn:' .. node, gc)
  redis.call('SADD', p .. ':pc:' .. ch, node)
  redis.call('SADD', p .. ':pchs', ch)
  redis.call('SADD', p .. ':pnodes', node)
  return had == 0 and not elsewhere(ch, user, node)
end
local function drop_channel(node, ch)
  redis.call('DEL', p .. ':pm:' .. node .. ':' .. ch)
  redis.call('SREM', p .. ':pn:' .. node, ch)
  redis.call('SREM', p .. ':pc:' .. ch, node)
  if redis.call('SCARD', p .. ':pc:' .. ch) == 0 then
    redis.call('SREM', p .. ':pchs', ch)
  end
end
local function remove(node, ch, user)
  local pm = p .. ':pm:' .. node .. ':' .. ch
  if redis.call('HDEL', pm, user) == 0 then
    return false
  end
  if redis.call('HLEN', pm) == 0 then
    drop_channel(node, ch)
  end
  return not elsewhere(ch, user, node)
end
local function bury(node, out)
  for _, ch in ipairs(redis.call('SMEMBERS', p .. ':pn:' .. node)) do
    local users = redis.call('HKEYS', p .. ':pm:' .. node .. ':' .. ch)
    drop_channel(node, ch)
    for _, u in ipairs(users) do
      if not elsewhere(ch, u, node) then
        out[#out + 1] = ch
        out[#out + 1] = u
      end
    end
  end
  redis.call('DEL', p .. ':pn:' .. node, p .. ':pa:' .. node)
  redis.call('SREM', p .. ':pnodes', node)
end
"""

# ARGV: p, node, channel, user, info, gc_ms
_JOIN = _LUA_COMMON + """
if add(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]) then return 1 end
return 0
"""

# ARGV: p, node, channel, user
_LEAVE = _LUA_COMMON + """
if remove(ARGV[2], ARGV[3], ARGV[4]) then return 1 end
return 0
"""

# ARGV: p, node, timeout_ms, gc_ms -> {was alive, ch, user, ...}
_BEAT = _LUA_COMMON + """
local me = ARGV[2]
local was = redis.call('EXISTS', p .. ':pa:' .. me)
redis.call('SET', p .. ':pa:' .. me, '1', 'PX', ARGV[3])
redis.call('SADD', p .. ':pnodes', me)
for _, ch in ipairs(redis.call('SMEMBERS', p .. ':pn:' .. me)) do
  redis.call('PEXPIRE', p .. ':pm:' .. me .. ':' .. ch, ARGV[4])
end
redis.call('PEXPIRE', p .. ':pn:' .. me, ARGV[4])
local out = {was}
for _, n in ipairs(redis.call('SMEMBERS', p .. ':pnodes')) do
  if n ~= me and redis.call('EXISTS', p .. ':pa:' .. n) == 0 then
    bury(n, out)
  end
end
return out
"""

# ARGV: p, node, gc_ms, n, then n times (channel, user, info) -> {#joins, joins (ch, user, info)..., leaves (ch, user)...}
_SYNC = _LUA_COMMON + """
local me, gc, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local want = {}
for k = 0, n - 1 do
  local ch, u = ARGV[5 + 3 * k], ARGV[6 + 3 * k]
  want[ch .. '\\n' .. u] = true
end
local leaves = {}
for _, ch in ipairs(redis.call('SMEMBERS', p .. ':pn:' .. me)) do
  for _, u in ipairs(redis.call('HKEYS', p .. ':pm:' .. me .. ':' .. ch)) do
    if not want[ch .. '\\n' .. u] and remove(me, ch, u) then
      leaves[#leaves + 1] = ch
      leaves[#leaves + 1] = u
    end
  end
end
local out = {0}
for k = 0, n - 1 do
  local ch, u, info = ARGV[5 + 3 * k], ARGV[6 + 3 * k], ARGV[7 + 3 * k]
  if add(me, ch, u, info, gc) then
    out[#out + 1] = ch
    out[#out + 1] = u
    out[#out + 1] = info
    out[1] = out[1] + 1
  end
end
for _, v in ipairs(leaves) do out[#out + 1] = v end
return out
"""

# ARGV: p, node -> {ch, user, ...}
_FORGET = _LUA_COMMON + """
local out = {}
bury(ARGV[2], out)
return out
"""

# ARGV: p, channel -> {user, info, ...}
_MEMBERS = _LUA_COMMON + """
local ch = ARGV[2]
local seen = {}
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', p .. ':pc:' .. ch)) do
  if redis.call('EXISTS', p .. ':pa:' .. n) == 1 then
    local flat = redis.call('HGETALL', p .. ':pm:' .. n .. ':' .. ch)
    for i = 1, #flat, 2 do
      if not seen[flat[i]] then
        seen[flat[i]] = true
        out[#out + 1] = flat[i]
        out[#out + 1] = flat[i + 1]
      end
    end
  end
end
return out
"""

# ARGV: p -> {ch, count, ...}
_COUNTS = _LUA_COMMON + """
local out = {}
for _, ch in ipairs(redis.call('SMEMBERS', p .. ':pchs')) do
  local seen, count = {}, 0
  for _, n in ipairs(redis.call('SMEMBERS', p .. ':pc:' .. ch)) do
    if redis.call('EXISTS', p .. ':pa:' .. n) == 1 then
      for _, u in ipairs(redis.call('HKEYS', p .. ':pm:' .. n .. ':' .. ch)) do
        if not seen[u] then
          seen[u] = true
          count = count + 1
        end
      end
    end
  end
  if count > 0 then
    out[#out + 1] = ch
    out[#out + 1] = count
  end
end
return out
"""


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _pairs(flat: Any) -> list[Key]:
    items = [_s(v) for v in flat or []]
    return [(items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]


class RedisMemberStore(MemberStore):
    """The cluster's members in Redis: the scripts above, on the broker's command connection."""

    def __init__(self, redis: RedisCommands, gc_seconds: float) -> None:
        self.redis = redis
        self.prefix = redis.key("x").rsplit(":", 1)[0]
        self.gc_ms = str(max(1000, int(gc_seconds * 1000)))

    def _eval(self, script: str, *args: Any) -> Deferred[Any]:
        return self.redis.command("EVAL", script, "0", self.prefix, *[str(a) for a in args])

    def join(self, node: str, channel: str, user: str, info: str) -> Deferred[bool]:
        return self._eval(_JOIN, node, channel, user, info, self.gc_ms).addCallback(lambda r: int(r) == 1)

    def leave(self, node: str, channel: str, user: str) -> Deferred[bool]:
        return self._eval(_LEAVE, node, channel, user).addCallback(lambda r: int(r) == 1)

    def beat(self, node: str, timeout: float) -> Deferred[tuple[bool, list[Key]]]:
        def parsed(flat: list[Any]) -> tuple[bool, list[Key]]:
            return int(flat[0]) == 1, _pairs(flat[1:])

        return self._eval(_BEAT, node, max(1, int(timeout * 1000)), self.gc_ms).addCallback(parsed)

    def sync(self, node: str, entries: list[Entry]) -> Deferred[tuple[list[Entry], list[Key]]]:
        args: list[str] = [node, self.gc_ms, str(len(entries))]
        for e in entries:
            args += e

        def parsed(flat: list[Any]) -> tuple[list[Entry], list[Key]]:
            items = [_s(v) for v in flat[1:]]
            n = int(flat[0])
            joins = [(items[3 * k], items[3 * k + 1], items[3 * k + 2]) for k in range(n)]
            rest = items[3 * n:]
            return joins, [(rest[i], rest[i + 1]) for i in range(0, len(rest) - 1, 2)]

        return self._eval(_SYNC, *args).addCallback(parsed)

    def forget(self, node: str) -> Deferred[list[Key]]:
        return self._eval(_FORGET, node).addCallback(_pairs)

    def members(self, channel: str) -> Deferred[dict[str, str]]:
        return self._eval(_MEMBERS, channel).addCallback(lambda flat: dict(_pairs(flat)))

    def counts(self) -> Deferred[dict[str, int]]:
        return self._eval(_COUNTS).addCallback(lambda flat: {c: int(n) for c, n in sorted(_pairs(flat))})


class ClusterPresence(Presence):
    """
    L{twisted_rt.interfaces.Presence} over a L{MemberStore} and the broker's
    control plane (see the module docstring).

    @ivar gauge: members per channel, cluster-wide, as last counted (every
        beat, and after each join and leave heard): what C{/metrics} shows.
    """

    def __init__(
        self,
        broker: Broker,
        store: MemberStore,
        reactor: Reactor,
        heartbeat_seconds: float = 5.0,
        node_timeout_seconds: float = 20.0,
    ) -> None:
        self.broker = broker
        self.store = store
        self.reactor = reactor
        self.heartbeat_seconds = heartbeat_seconds
        self.node_timeout_seconds = node_timeout_seconds
        # channel -> user -> its connections on this node (insertion-ordered sets)
        self.local: dict[str, dict[str, dict[object, None]]] = {}
        self.infos: dict[Key, Mapping[str, Any] | None] = {}
        self.watchers: dict[str, dict[PresenceWatcher, None]] = {}
        self.gauge: dict[str, int] = {}
        self._dirty = True  # the store may not hold this node's members: resync on the next beat
        self._stopped = False
        self._beating = False
        self._loop = LoopingCall(self._beat)
        self._loop.clock = cast(IReactorTime, reactor)
        broker.on_broadcast("presence", self._heard)

    @property
    def node(self) -> str:
        return self.broker.node_id

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Beat now and every C{heartbeat_seconds}."""
        if not self._loop.running:
            self._stopped = False
            self._loop.start(self.heartbeat_seconds, now=True).addErrback(
                lambda f: log.failure("presence heartbeat stopped", f)
            )

    def stop(self) -> Deferred[None]:
        """Every member of this node leaves (the daemon stops); fires when the others were told."""
        self._stopped = True
        self.local.clear()
        self.infos.clear()
        if not self._loop.running:
            return succeed(None)  # never started: no presence channels, nothing in the store
        self._loop.stop()
        d = self.store.forget(self.node)
        d.addCallback(self._send_leaves)
        d.addErrback(self._store_failed, "forgetting this node's members")
        return d.addCallback(lambda _: None)

    # -- the Presence interface ----------------------------------------------

    def add(self, channel: str, user: str, info: Mapping[str, Any] | None, conn: object) -> None:
        users = self.local.setdefault(channel, {})
        conns = users.get(user)
        if conns is not None:
            conns[conn] = None
            return
        users[user] = {conn: None}
        self.infos[(channel, user)] = info
        if self._stopped:
            return
        d = self.store.join(self.node, channel, user, dumps(info).decode("utf-8") if info is not None else "")

        def joined(new: bool) -> Deferred[None] | None:
            if new:
                return self._send("join", channel, user, info)
            return None

        d.addCallback(joined).addErrback(self._store_failed, "recording a join")

    def remove(self, channel: str, user: str, conn: object) -> None:
        users = self.local.get(channel)
        conns = users.get(user) if users is not None else None
        if conns is None or conn not in conns:
            return
        del conns[conn]
        if conns:
            return
        assert users is not None
        del users[user]
        if not users:
            del self.local[channel]
        self.infos.pop((channel, user), None)
        if self._stopped:
            return
        d = self.store.leave(self.node, channel, user)

        def left(gone: bool) -> Deferred[None] | None:
            if gone:
                return self._send("leave", channel, user, None)
            return None

        d.addCallback(left).addErrback(self._store_failed, "recording a leave")

    def members(self, channel: str) -> Deferred[list[Member]]:
        def listed(found: dict[str, str]) -> list[Member]:
            out: list[Member] = []
            users = sorted(found)
            for user in users[:MAX_MEMBERS_LISTED]:
                m: Member = {"user": user}
                info = _info(found[user])
                if info is not None:
                    m["info"] = info
                out.append(m)
            return out

        return self.store.members(channel).addCallback(listed)

    def counts(self) -> Deferred[dict[str, int]]:
        def counted(c: dict[str, int]) -> dict[str, int]:
            self.gauge = c
            return c

        return self.store.counts().addCallback(counted)

    def watch(self, channel: str, watcher: PresenceWatcher) -> None:
        self.watchers.setdefault(channel, {})[watcher] = None

    def unwatch(self, channel: str, watcher: PresenceWatcher) -> None:
        ws = self.watchers.get(channel)
        if ws is not None:
            ws.pop(watcher, None)
            if not ws:
                del self.watchers[channel]

    # -- join and leave between nodes -----------------------------------------

    def _send(self, op: str, channel: str, user: str, info: Mapping[str, Any] | None) -> Deferred[None]:
        msg: Control = {"op": op, "channel": channel, "user": user}
        if info is not None:
            msg["info"] = info
        d = self.broker.broadcast("presence", msg)
        d.addErrback(self._store_failed, f"sending a {op}")
        return d

    def _send_leaves(self, leaves: list[Key]) -> None:
        for channel, user in leaves:
            self._send("leave", channel, user, None)

    def _heard(self, message: Control, sender: str) -> None:
        """A join or leave from any node (this one included): tell this node's watchers of the channel."""
        op, channel, user = message.get("op"), message.get("channel"), message.get("user")
        if op not in ("join", "leave") or not isinstance(channel, str) or not isinstance(user, str):
            log.warn("ignoring a malformed presence message {m!r}", m=message)
            return
        info = message.get("info") if op == "join" else None
        if info is not None and not isinstance(info, dict):
            info = None
        if channel in self.gauge or op == "join":
            self.gauge[channel] = max(0, self.gauge.get(channel, 0) + (1 if op == "join" else -1))
            if not self.gauge[channel]:
                del self.gauge[channel]
        for w in list(self.watchers.get(channel, ())):
            try:
                w.presence_changed(op, channel, user, info)
            except Exception:  # noqa: BLE001 - one bad watcher must not stop the others
                log.failure("presence {op} to {w}", op=op, w=w)

    # -- liveness --------------------------------------------------------------

    def _beat(self) -> Deferred[None] | None:
        if self._beating or self._stopped:
            return None
        self._beating = True
        d = self.store.beat(self.node, self.node_timeout_seconds)

        def beaten(result: tuple[bool, list[Key]]) -> Deferred[Any] | None:
            was, leaves = result
            self._send_leaves(leaves)
            if was and not self._dirty:
                return None
            if was:
                log.info("presence: re-synchronising this node's members", log_category="RT-P02")
            self._dirty = False
            entries = [
                (c, u, dumps(self.infos.get((c, u))).decode("utf-8") if self.infos.get((c, u)) is not None else "")
                for c, users in self.local.items()
                for u in users
            ]
            return self.store.sync(self.node, entries).addCallback(self._synced)

        def done(_: object) -> Deferred[Any]:
            return self.counts()

        def finished(_: object) -> None:
            self._beating = False

        d.addCallback(beaten).addCallback(done)
        d.addErrback(self._store_failed, "the presence heartbeat")
        d.addBoth(finished)
        return None

    def _synced(self, result: tuple[list[Entry], list[Key]]) -> None:
        joins, leaves = result
        for channel, user, info in joins:
            self._send("join", channel, user, _info(info))
        self._send_leaves(leaves)

    def _store_failed(self, f: Failure, doing: str) -> None:
        self._dirty = True
        if f.check(JournalUnavailable):
            log.warn("presence: {doing} failed: {e} (re-synchronised on the next beat)", doing=doing,
                     e=f.getErrorMessage(), log_category="RT-P01")
        else:
            log.failure("presence: {doing}", f, doing=doing, log_category="RT-P01")


class Connections(ConnectionRegistry):
    """
    This node's connections by user (a JWT C{sub}, a Pusher C{user_id}),
    and the cluster-wide disconnect (kind C{"disconnect"} on the broker's
    control plane: each node closes its own).
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.by_user: dict[str, dict[Closable, None]] = {}
        broker.on_broadcast("disconnect", self._heard)

    def register(self, user: str, conn: Closable) -> None:
        self.by_user.setdefault(user, {})[conn] = None

    def unregister(self, user: str, conn: Closable) -> None:
        conns = self.by_user.get(user)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self.by_user[user]

    def close_local(self, user: str) -> int:
        """Close this node's connections of C{user}; how many."""
        conns = list(self.by_user.pop(user, ()))
        for c in conns:
            try:
                c.disconnect()
            except Exception:  # noqa: BLE001 - the others are still closed
                log.failure("disconnecting {c}", c=c)
        return len(conns)

    def disconnect(self, user: str) -> Deferred[int]:
        """
        Close C{user}'s connections here, then tell every other node.  Fails
        with L{JournalUnavailable} (after closing this node's) when the
        other nodes cannot be told.
        """
        n = self.close_local(user)
        return self.broker.broadcast("disconnect", {"user": user}).addCallback(lambda _: n)

    def _heard(self, message: Control, sender: str) -> None:
        if sender == self.broker.node_id:
            return  # closed before it was sent
        user = message.get("user")
        if isinstance(user, str):
            self.close_local(user)


def make_presence(broker: Broker, reactor: Reactor, heartbeat_seconds: float,
                  node_timeout_seconds: float) -> ClusterPresence:
    """The presence of a broker: members in Redis for the Redis broker, else in this process."""
    store: MemberStore
    command: Callable[..., Deferred[Any]] | None = getattr(broker, "command", None)
    if command is not None and hasattr(broker, "key"):
        store = RedisMemberStore(cast(RedisCommands, broker), 3 * node_timeout_seconds)
    else:
        store = MemoryMemberStore(reactor)
    return ClusterPresence(broker, store, reactor, heartbeat_seconds, node_timeout_seconds)

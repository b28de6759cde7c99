# -*- test-case-name: tests.test_redis -*-
"""
The Redis broker: several daemons serving the same channels.

Every node talks to one Redis (reached with C{txredisapi}, so the reactor
never blocks) over two connections of its own:

  - the I{command} connection runs one Lua script per publish batch.  For
    each draft the script checks the idempotency key (C{<p>:dl:<source>:<id>}
    for a webhook source, C{<p>:dk:<length>:<scope>:<id>} for a publisher's
    scope; shared by all nodes, kept C{retention_seconds}), C{INCR}s the
    channel's counter (C{<p>:seq:<channel>}) and the global one
    (C{<p>:gseq}, the event's C{seq}, written into its body), C{XADD}s the
    event to the channel's stream (C{<p>:s:<channel>}, entry id
    C{<offset>-0}, trimmed to about C{max_events_per_channel}), records the
    channel (C{<p>:channels}) and C{PUBLISH}es it on C{<p>:ev}.  The script
    is atomic, so offsets are unique and gap-free per channel across nodes,
    seqs increase in publish order, and a 2xx is sent only after Redis
    answered.  History and resume read the streams (C{XRANGE}) in chunks
    bounded by count and bytes, so a client may resume on any node; a
    replay of several channels merges their streams by C{seq}, and
    remembers (for the next page) where each channel's events pass the
    page's last seq.  Entries written before seqs existed read as seq 0:
    history serves them, seq-paged replays skip them.
  - the I{pub/sub} connection receives every event on C{<p>:ev}, in offset
    order per channel.  A node remembers the last offset it delivered per
    channel; an event past C{last + 1} (a missed message) makes it fill the
    gap from the stream first, buffering what arrives meanwhile.  On every
    (re)subscribe it takes a snapshot of all counters and fills, from the
    streams, whatever its listeners missed while it was disconnected.

Subscriber counts are cluster-wide: each node writes its local counts to a
hash with a TTL (C{<p>:node:<id>}) every few seconds and when they change;
C{channels()} sums them.

Redis down: L{RedisBroker.ready} is C{False} (C{/readyz} 503), C{publish}
fails with L{JournalUnavailable} (503, nothing acknowledged), subscribers stay
connected, and both connections come back with exponential backoff and
jitter.  A publish whose connection drops after the script was sent is
answered 503 although Redis may have applied it: a retry with the same
delivery id is then answered as a duplicate.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import random
import re
import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable, Mapping, Sequence, cast
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import protocol
from twisted.internet.defer import Deferred, ensureDeferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rt.core.config import Config
from twisted_rt.core.event import Accepted, Draft, Event, dumps, new_id, now_iso
from twisted_rt.core.matcher import matches
from twisted_rt.core.metrics import Stats
from twisted_rt.interfaces import PAGE_BYTES, ChannelInfo, Control, JournalUnavailable, Listener, Reactor
from twisted_rt.store.journal import pattern_prefix
from twisted_rt.store.local import IndexedBroker
from twisted_rt.store.sentinel import SentinelEndpoint, SentinelLocator, SentinelWatcher, parse_hostport

__all__ = ["RedisBroker", "backoff", "parse_url"]

#: Seconds to wait for Redis in L{RedisBroker.start} before serving anyway.
START_WAIT = 5.0
#: Seconds between writes of this node's subscriber counts.
COUNTS_INTERVAL = 5.0
#: Events per XRANGE page when filling a gap.
FILL_PAGE = 1000
#: Pub/sub messages buffered while filling; past it they are dropped and a
#: full resync (snapshot + fill from the streams) replaces them.
MAX_QUEUE = 100000
#: Seconds a command may wait for its reply before the connection is dropped.
REPLY_TIMEOUT = 10.0
#: Entries of a stream's first XRANGE of a history or replay page; later ones
#: grow, sized down so that one holds about a page's bytes.
HISTORY_CHUNK = 32
#: Replay pages whose per-channel floors are remembered, and the most
#: channels one page may remember.
FLOOR_PAGES = 64
MAX_FLOORS = 1024
#: the largest offset (a signed 64-bit integer)
_MAX_OFFSET = 2**63 - 1
#: a stored body begins with its seq (entries written before seqs existed do not)
_SEQ = re.compile(r'\{"seq":(\d+),')


# The append script.  ARGV: prefix, maxlen, ttl, n, then n times
# (channel, idempotency key or "", body: a JSON object, the channel's maxlen
# and ttl: its [[channels]] rule's, else the two defaults).  Returns 5 values per
# draft: offset, duplicate (0/1), channel, stored body ("" unless duplicate),
# seq (0 for a duplicate: its body has it).  The stored and published body is
# the given one with "seq" first.
_APPEND = """
local p = ARGV[1]
local maxlen = ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local out = {}
local i = 5
for k = 1, n do
  local ch, dkey, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  maxlen, ttl = ARGV[i + 3], tonumber(ARGV[i + 4])
  i = i + 5
  local prior = false
  if dkey ~= '' then
    prior = redis.call('GET', dkey)
  end
  if prior then
    local sp = string.find(prior, ' ', 1, true)
    local off = string.sub(prior, 1, sp - 1)
    local pch = string.sub(prior, sp + 1)
    local e = redis.call('XRANGE', p .. ':s:' .. pch, off, off)
    local b = ''
    if #e > 0 then
      b = e[1][2][2]
    end
    out[#out + 1] = tonumber(off)
    out[#out + 1] = 1
    out[#out + 1] = pch
    out[#out + 1] = b
    out[#out + 1] = 0
  else
    local off = redis.call('INCR', p .. ':seq:' .. ch)
    local g = redis.call('INCR', p .. ':gseq')
    local stored = '{"seq":' .. g .. ',' .. string.sub(body, 2)
    local skey = p .. ':s:' .. ch
    redis.call('XADD', skey, 'MAXLEN', '~', maxlen, off .. '-0', 'e', stored)
    redis.call('EXPIRE', skey, ttl)
    redis.call('SADD', p .. ':channels', ch)
    if dkey ~= '' then
      redis.call('SET', dkey, off .. ' ' .. ch, 'EX', ttl)
    end
    redis.call('PUBLISH', p .. ':ev', off .. ' ' .. ch .. ' ' .. stored)
    out[#out + 1] = off
    out[#out + 1] = 0
    out[#out + 1] = ch
    out[#out + 1] = ''
    out[#out + 1] = g
  end
end
return out
"""

# Every channel with its last offset.  ARGV: prefix, a fresh epoch id.
# Returns the epoch (set once per Redis data set, so a Redis that lost its
# data is noticed), then ch, last, ...
_SNAPSHOT = """
local p = ARGV[1]
redis.call('SET', p .. ':epoch', ARGV[2], 'NX')
local out = {redis.call('GET', p .. ':epoch')}
for _, ch in ipairs(redis.call('SMEMBERS', p .. ':channels')) do
  out[#out + 1] = ch
  out[#out + 1] = redis.call('GET', p .. ':seq:' .. ch) or '0'
end
return out
"""

# The channels some patterns may match, with their last offsets.  ARGV:
# prefix, then terms: "=name" (an exact pattern), "^prefix" (a wildcard's
# part before its first wildcard) or "*" (a pattern starting with one).
# Returns ch, last, ...  (Python applies the patterns themselves.)
_CHANNELS = """
local p = ARGV[1]
local out = {}
local all = false
local exact = {}
local prefixes = {}
for i = 2, #ARGV do
  local t = ARGV[i]
  local kind = string.sub(t, 1, 1)
  if kind == '*' then
    all = true
  elseif kind == '=' then
    exact[#exact + 1] = string.sub(t, 2)
  else
    prefixes[#prefixes + 1] = string.sub(t, 2)
  end
end
if all or #prefixes > 0 then
  for _, ch in ipairs(redis.call('SMEMBERS', p .. ':channels')) do
    local keep = all
    if not keep then
      for _, pre in ipairs(prefixes) do
        if string.sub(ch, 1, #pre) == pre then
          keep = true
          break
        end
      end
    end
    if keep then
      out[#out + 1] = ch
      out[#out + 1] = redis.call('GET', p .. ':seq:' .. ch) or '0'
    end
  end
end
for _, ch in ipairs(exact) do
  local last = redis.call('GET', p .. ':seq:' .. ch)
  if last then
    out[#out + 1] = ch
    out[#out + 1] = last
  end
end
return out
"""

# Write this node's subscriber counts.  ARGV: prefix, node, ttl, then
# channel, count pairs.
_COUNTS = """
local p, node, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = p .. ':node:' .. node
local now = redis.call('TIME')[1]
redis.call('DEL', key)
if #ARGV > 3 then
  for i = 4, #ARGV - 1, 2 do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
  redis.call('EXPIRE', key, ttl)
end
redis.call('ZADD', p .. ':nodes', now, node)
return 1
"""

# The other nodes' counts, summed.  ARGV: prefix, this node, max age.
# Returns ch, count, ...
_REMOTE_COUNTS = """
local p, me, age = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', p .. ':nodes', '-inf', now - age)
local sums = {}
for _, node in ipairs(redis.call('ZRANGE', p .. ':nodes', 0, -1)) do
  if node ~= me then
    local h = redis.call('HGETALL', p .. ':node:' .. node)
    for i = 1, #h, 2 do
      sums[h[i]] = (sums[h[i]] or 0) + tonumber(h[i + 1])
    end
  end
end
local out = {}
for ch, n in pairs(sums) do
  out[#out + 1] = ch
  out[#out + 1] = n
end
return out
"""


class _Script:
    """A Lua script run with EVALSHA, falling back to EVAL when unknown."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def run(self, proto: Any, args: Sequence[Any]) -> Deferred[Any]:
        d: Deferred[Any] = maybeDeferred(proto.execute_command, "EVALSHA", self.sha, 0, *args)

        def noscript(f: Failure) -> Any:
            if isinstance(f.value, txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
                return proto.execute_command("EVAL", self.source, 0, *args)
            return f

        return d.addErrback(noscript)


# Raise counters that are below what a node handed out (after a failover to
# a replica that lacked the newest writes).  ARGV: prefix, the least gseq,
# then channel, least offset pairs.  Never lowers.  Returns ch, old value, ...
# for each counter raised.
_RAISE = """
local p = ARGV[1]
local out = {}
local g = tonumber(redis.call('GET', p .. ':gseq') or '0')
if g < tonumber(ARGV[2]) then
  redis.call('SET', p .. ':gseq', ARGV[2])
end
for i = 3, #ARGV - 1, 2 do
  local ch, least = ARGV[i], tonumber(ARGV[i + 1])
  local cur = tonumber(redis.call('GET', p .. ':seq:' .. ch) or '0')
  if cur < least then
    redis.call('SET', p .. ':seq:' .. ch, ARGV[i + 1])
    redis.call('SADD', p .. ':channels', ch)
    out[#out + 1] = ch
    out[#out + 1] = cur
  end
end
return out
"""


APPEND = _Script(_APPEND)
RAISE = _Script(_RAISE)
SNAPSHOT = _Script(_SNAPSHOT)
CHANNELS = _Script(_CHANNELS)
COUNTS = _Script(_COUNTS)
REMOTE_COUNTS = _Script(_REMOTE_COUNTS)


def backoff(attempt: int, rand: Callable[[], float] = random.random,
            initial: float = 0.1, cap: float = 2.0) -> float:
    """
    Seconds before reconnect attempt C{attempt} (1 = first retry):
    exponential up to C{cap}, with "equal jitter" (half fixed, half random)
    so that many nodes do not reconnect in lockstep.
    """
    base = min(cap, initial * float(2 ** min(max(attempt - 1, 0), 30)))
    return base / 2 + rand() * base / 2


class RedisURL:
    """A parsed C{redis://} or C{unix://} URL."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, path: str = "",
                 db: int = 0, username: str | None = None, password: str | None = None) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.db = db
        self.username = username
        self.password = password

    def endpoint(self, reactor: Reactor, timeout: float = 5.0) -> IStreamClientEndpoint:
        """A client endpoint for this URL."""
        if self.path:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def parse_url(url: str) -> RedisURL:
    """
    Parse C{redis://[[user]:password@]host[:port][/db]} or
    C{unix:///path/to/socket[?db=N&password=P]}.
    """
    u = urlsplit(url)
    q = parse_qs(u.query)
    password = unquote(u.password) if u.password else (q.get("password", [None])[0])
    username = unquote(u.username) if u.username else None
    if u.scheme == "unix":
        db = int(q.get("db", ["0"])[0])
        return RedisURL(path=u.path, db=db, username=username, password=password)
    if u.scheme != "redis":
        raise ValueError(f"expected a redis:// or unix:// URL, got {url!r}")
    path = u.path.strip("/")
    db = int(path) if path else int(q.get("db", ["0"])[0])
    return RedisURL(host=u.hostname or "127.0.0.1", port=u.port or 6379, db=db,
                    username=username or None, password=password)


class _CommandProtocol(txredisapi.BaseRedisProtocol):  # type: ignore[misc]
    """The command connection's protocol; tells its link when it is lost."""

    link: _Link

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.link.lost(self, why)


class _SubProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """The pub/sub connection's protocol; hands messages to the broker."""

    link: _Link
    on_message: Callable[[str, str], None]

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        self.on_message(channel, message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.link.lost(self, why)


class _Factory(protocol.Factory):
    """Builds one link's protocols (and takes txredisapi's callbacks)."""

    isLazy = True
    noisy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Any:
        link = self.link
        url = link.url
        p = link.protocol_class(
            charset="utf-8",
            replyTimeout=link.reply_timeout,
            password=url.password,
            dbid=url.db or None,
            convertNumbers=False,
            username=url.username,
        )
        p.factory = self
        p.link = link
        p.callLater = link.reactor.callLater
        if link.on_message is not None:
            p.on_message = link.on_message
        return p

    def stopTrying(self) -> None:
        """txredisapi calls this when AUTH or SELECT fails; we keep retrying."""

    def connectionError(self, why: str) -> None:
        """txredisapi reports AUTH or SELECT failures here."""
        self.link.error = why


class _Link:
    """
    One connection to Redis kept up by a L{ClientService}: reconnects with
    L{backoff}, calls C{on_up(protocol)} once the connection is usable (after
    AUTH/SELECT, and, behind Sentinel, once C{ROLE} says it reached the
    primary) and C{on_down(reason)} when it is lost.

    @ivar addr: the (host, port) of the server the link is connected to.
    """

    log = Logger()

    def __init__(self, reactor: Reactor, url: RedisURL, name: str, protocol_class: type,
                 on_up: Callable[[Any], None], on_down: Callable[[str], None],
                 on_message: Callable[[str, str], None] | None = None,
                 endpoint: IStreamClientEndpoint | None = None, primary_only: bool = False,
                 reply_timeout: float = REPLY_TIMEOUT) -> None:
        self.reactor = reactor
        self.url = url
        self.name = name
        self.protocol_class = protocol_class
        self.on_up = on_up
        self.on_down = on_down
        self.on_message = on_message
        self.primary_only = primary_only
        self.reply_timeout = reply_timeout
        self.proto: Any = None
        self.addr: tuple[str, int] | None = None
        self.error = "not connected yet"
        self._restarting = False
        self._stopped = False
        self.refused = 0  # connections in a row that never became usable
        self.attempting = False  # an attempt is under way (asking Sentinel, connecting, AUTH, ROLE)
        self.service = ClientService(
            _ReportingEndpoint(endpoint or url.endpoint(reactor), self),
            _Factory(self),
            retryPolicy=self._retry_delay,
            clock=cast(IReactorTime, reactor),
            prepareConnection=self._prepare,
        )

    def start(self) -> None:
        self.service.startService()

    def stop(self) -> Deferred[None]:
        self._stopped = True
        return self.service.stopService()

    def reconnect(self) -> None:
        """
        Find the server again now (a failover): drop the connection, or, while
        waiting for the next attempt, make that attempt at once.
        """
        proto = self.proto
        if proto is not None:
            if proto.transport is not None:
                proto.transport.loseConnection()
            return
        if self._restarting or self._stopped or self.attempting:
            return  # an attempt under way asks again anyway
        self._restarting = True

        def again(_: object) -> None:
            self._restarting = False
            if not self._stopped:
                self.service.startService()

        self.service.stopService().addBoth(again)

    def _retry_delay(self, attempt: int) -> float:
        # A connection that was made but never became usable (AUTH, SELECT,
        # ROLE refused it) resets ClientService's count: ours goes on.
        return backoff(attempt + self.refused)

    def _prepare(self, proxy: Any) -> None:
        """
        ClientService calls this with a proxy once TCP is up; we answer at
        once (ClientService has no transition for a connection lost while
        it waits for us) and call L{_up} once txredisapi's AUTH/SELECT (and
        our ROLE check) made it usable, or close it, which counts as a
        refused attempt for the backoff.
        """

        def usable(proto: Any) -> None:
            d: Deferred[Any] = self._check_role(proto) if self.primary_only else succeed(proto)
            d.addCallback(self._up).addErrback(self._refuse, proto)

        def gone(proto: Any) -> None:
            if self.proto is not proto:
                self.refused += 1
                self.attempting = False

        proxy.whenConnected().addCallback(usable)
        proxy.whenDisconnected().addCallback(gone)

    def _refuse(self, f: Failure, proto: Any) -> None:
        if not f.check(txredisapi.ConnectionError):
            self.error = f"{self.name} connection refused: {f.getErrorMessage()}"
        self.log.warn("redis {error}", error=self.error, log_category="RT-R01")
        if proto.transport is not None:
            proto.transport.loseConnection()

    def _check_role(self, proto: Any) -> Deferred[Any]:
        """Refuse a server that is not (or no longer) the primary: a stale answer, or a demoted primary."""
        d: Deferred[Any] = maybeDeferred(proto.execute_command, "ROLE")

        def role(reply: Any) -> Any:
            kind = _s(reply[0]) if reply else "?"
            if kind != "master":
                self.error = f"{self.name} connection reached a {kind}, not the primary (failover in progress?)"
                if proto.transport is not None:
                    proto.transport.loseConnection()
                raise txredisapi.ConnectionError(self.error)
            return proto

        return d.addCallback(role)

    def _up(self, proto: Any) -> None:
        if proto.transport is None or not proto.connected:
            return  # lost while its ROLE was asked
        self.proto = proto
        self.error = ""
        self.refused = 0
        self.attempting = False
        peer: Any = proto.transport.getPeer() if proto.transport is not None else None
        self.addr = (peer.host, peer.port) if hasattr(peer, "port") else None
        self.log.info("redis {name} connection ready ({addr})", name=self.name,
                      addr="{}:{}".format(*self.addr) if self.addr else self.url.path, log_category="RT-R02")
        try:
            self.on_up(proto)
        except Exception:  # noqa: BLE001 - a bug in a callback must not kill the link
            self.log.failure("redis {name} on_up", name=self.name)

    def lost(self, proto: Any, why: Failure) -> None:
        if self.proto is not proto:
            return
        self.proto = None
        self.addr = None
        self.error = f"{self.name} connection lost: {why.getErrorMessage()}"
        self.log.error("redis {error}", error=self.error, log_category="RT-R01")
        try:
            self.on_down(self.error)
        except Exception:  # noqa: BLE001 - a bug in a callback must not kill the link
            self.log.failure("redis {name} on_down", name=self.name)


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """A link's endpoint; a failed attempt (refused, no Sentinel answer) becomes the link's error."""

    def __init__(self, inner: IStreamClientEndpoint, link: _Link) -> None:
        self.inner = inner
        self.link = link

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        self.link.attempting = True

        def failed(f: Failure) -> Failure:
            self.link.attempting = False
            if self.link.proto is None:
                self.link.error = f"{self.link.name} connection failed: {f.getErrorMessage()}"
            return f

        return self.inner.connect(protocolFactory).addErrback(failed)


class _Waiter:
    """
    The C{WAIT}s of one command connection.  Redis blocks a client in
    C{WAIT}, so at most one is in flight: requests made meanwhile share the
    next one, sent when it returns (it covers every write sent before it).
    Every reply on the connection is thus delayed by at most one WAIT.
    """

    def __init__(self, proto: Any, replicas: int, timeout_ms: int) -> None:
        self.proto = proto
        self.args = ("WAIT", str(replicas), str(timeout_ms))
        self.in_flight = False
        self.next: list[Deferred[int]] = []

    def request(self) -> Deferred[int]:
        """The number of replicas that have every write this connection sent before now."""
        d: Deferred[int] = Deferred()
        self.next.append(d)
        if not self.in_flight:
            self._send()
        return d

    def _send(self) -> None:
        group, self.next = self.next, []
        self.in_flight = True

        def done(result: Any) -> None:
            self.in_flight = False
            for d in group:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(int(result))
            if self.next:
                self._send()

        maybeDeferred(self.proto.execute_command, *self.args).addBoth(done)


def _encode_body(draft: Draft, eid: str, stamp: str) -> str:
    return dumps(
        {
            "id": eid,
            "time": stamp,
            "source": draft.source,
            "type": draft.type,
            "data": draft.data,
            "raw": base64.b64encode(draft.raw).decode("ascii") if draft.raw is not None else None,
            "headers": draft.headers,
        }
    ).decode("utf-8")


def _dedup_key(prefix: str, scope: str, eid: str) -> str:
    """
    The Redis key of an idempotency key: a source name has no C{:}, so
    C{dl:<source>:<id>} is unambiguous (and what 0.1 wrote); a publisher's
    scope may contain C{:} (a JWT C{sub}), so it is length-prefixed.
    """
    if ":" not in scope:
        return f"{prefix}:dl:{scope}:{eid}"
    return f"{prefix}:dk:{len(scope)}:{scope}:{eid}"


def _decode(channel: str, offset: int, body: str | bytes) -> Event:
    o = json.loads(body)
    raw = o.get("raw")
    return Event(
        id=o["id"],
        channel=channel,
        offset=offset,
        time=o["time"],
        source=o["source"],
        type=o["type"],
        data=o["data"],
        raw=base64.b64decode(raw) if raw is not None else None,
        headers=o.get("headers"),
        seq=o.get("seq", 0),
    )


def _pairs(flat: Sequence[Any]) -> list[tuple[str, Any]]:
    return [(_s(flat[i]), flat[i + 1]) for i in range(0, len(flat) - 1, 2)]


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _entry_offset(entry_id: Any) -> int:
    return int(_s(entry_id).split("-", 1)[0])


class RedisBroker(IndexedBroker):
    """
    The L{Broker} of a cluster of nodes sharing one Redis.

    @ivar node_id: this node's name in the cluster-wide subscriber counts.
    @ivar live_last: the last offset delivered live, per channel, on this node.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: Reactor, stats: Stats, node_id: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.stats = stats
        self.prefix = config.broker.prefix
        self.node_id = node_id or uuid.uuid4().hex[:16]  # new_id() starts with the time
        broker = config.broker
        self.url = parse_url(broker.effective_url)
        if self.url.password is None and broker.password:
            self.url.password = broker.password
        self.min_replicas = broker.min_replicas
        self.replica_timeout_ms = broker.replica_timeout_ms
        self._seq_seen = 0  # the highest seq delivered or acknowledged by this node
        self.maxlen = config.journal.max_events_per_channel
        self.ttl = max(1, int(config.journal.retention_seconds))
        self._limit_cache: dict[str, tuple[str, str]] = {}
        self.live_last: dict[str, int] = {}
        self._floors: OrderedDict[int, dict[str, int]] = OrderedDict()
        self._epoch: str | None = None
        self._queue: deque[tuple[str, int, str]] = deque()
        self._busy = True  # live messages are queued, not processed
        self._subscribed = False
        self._subscribing = False
        self._baselined = False
        self._sync_running = False
        self._sync_again = False
        self._need_sync = False
        self._retry_call: IDelayedCall | None = None
        self._counts_call: IDelayedCall | None = None
        self._waiters: list[Deferred[None]] = []
        self._stopped = False
        self._ev_channel = self._key("ev")
        endpoint: IStreamClientEndpoint | None = None
        self.sentinel: SentinelLocator | None = None
        self._watcher: SentinelWatcher | None = None
        if broker.sentinels:
            self.sentinel = SentinelLocator(reactor, [parse_hostport(h) for h in broker.sentinels],
                                            broker.sentinel_master, broker.password or None)
            endpoint = SentinelEndpoint(self.sentinel)
            self._watcher = SentinelWatcher(self.sentinel, self._check_primary, backoff)
        # Replies queue behind a WAIT (at most one per connection, see _Waiter).
        reply_timeout = REPLY_TIMEOUT + (broker.replica_timeout_ms / 1000.0 if broker.min_replicas else 0.0)
        self.cmd = _Link(reactor, self.url, "command", _CommandProtocol, self._cmd_up, self._cmd_down,
                         endpoint=endpoint, primary_only=endpoint is not None, reply_timeout=reply_timeout)
        self.sub = _Link(reactor, self.url, "pubsub", _SubProtocol, self._sub_up, self._sub_down,
                         on_message=self._on_pubsub, endpoint=endpoint, primary_only=endpoint is not None)
        self._counts_loop = LoopingCall(self._tick)
        self._counts_loop.clock = cast(IReactorTime, reactor)

    # -- keys --------------------------------------------------------------

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}:{kind}:{name}" if name else f"{self.prefix}:{kind}"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect; fires when ready, or after L{START_WAIT} seconds regardless."""
        self.cmd.start()
        self.sub.start()
        if self._watcher is not None:
            self._watcher.start()
        self._counts_loop.start(COUNTS_INTERVAL, now=False).addErrback(
            lambda f: self.log.failure("redis counts loop stopped", f)
        )
        if self.ready:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)

        def give_up() -> None:
            if not d.called:
                self._waiters.remove(d)
                self.log.warn("redis not ready after {t}s: {why}; serving anyway",
                              t=START_WAIT, why=self.not_ready_reason, log_category="RT-R03")
                d.callback(None)

        call = self.reactor.callLater(START_WAIT, give_up)

        def done(result: None) -> None:
            if call.active():
                call.cancel()

        return d.addCallback(done)

    def stop(self) -> Deferred[None]:
        """Forget this node's counts and close both connections."""
        self._stopped = True
        if self._counts_loop.running:
            self._counts_loop.stop()
        for call in (self._retry_call, self._counts_call):
            if call is not None and call.active():
                call.cancel()
        proto = self.cmd.proto
        if proto is not None:
            d: Deferred[Any] = maybeDeferred(proto.execute_command, "DEL", self._key("node", self.node_id))
            d.addErrback(lambda f: None)
        else:
            d = succeed(None)

        def close(_: object) -> Deferred[Any]:
            links = [self.cmd.stop(), self.sub.stop()]
            if self._watcher is not None:
                links.append(self._watcher.stop())
            return gatherResults(links, consumeErrors=True)

        d.addCallback(close)
        d.addErrback(lambda f: None)
        return d.addCallback(lambda _: None)

    @property
    def ready(self) -> bool:
        return self.cmd.proto is not None and self.sub.proto is not None and self._subscribed

    @property
    def not_ready_reason(self) -> str:
        if self.ready:
            return ""
        if self.cmd.proto is None:
            return f"redis: {self.cmd.error or 'command connection down'}"
        if self.sub.proto is None:
            return f"redis: {self.sub.error or 'pubsub connection down'}"
        return "redis: subscribing"

    def _check_ready(self) -> None:
        if self.ready and self._waiters:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    # -- connection events -------------------------------------------------

    def _cmd_up(self, proto: Any) -> None:
        sub = self.sub.proto
        if sub is not None and not self._subscribed and not self._subscribing:
            self._sub_up(sub)
        if self._subscribed and (self._busy or self._need_sync):
            self._request_sync()
        self._schedule_counts()
        self._check_ready()

    def _cmd_down(self, why: str) -> None:
        pass

    def _check_primary(self) -> None:
        """
        Sentinel announced a failover (or the watch reconnected): ask for
        the primary and move every link that is elsewhere.
        """
        if self.sentinel is None or self._stopped:
            return

        def found(addr: tuple[str, int]) -> None:
            for link in (self.cmd, self.sub):
                if link.addr != addr:
                    link.reconnect()

        self.sentinel.primary().addCallback(found).addErrback(
            lambda f: self.log.warn("sentinel: {e}", e=f.getErrorMessage(), log_category="RT-S03")
        )

    def _sub_up(self, proto: Any) -> None:
        if self._subscribing or (not self._baselined and self.cmd.proto is None):
            return  # the command link's return subscribes
        self._subscribing = True
        ensureDeferred(self._subscribe(proto)).addErrback(self._subscribe_failed, proto)

    async def _subscribe(self, proto: Any) -> None:
        """
        Subscribe to the live feed.  The very first time, first take every
        channel's last offset as the baseline: whatever comes after it is
        delivered (from the feed or, when missed, from the streams).
        """
        if not self._baselined:
            for ch, last in (await self._snapshot()).items():
                self.live_last.setdefault(ch, last)
            self._baselined = True
        # one channel per SUBSCRIBE: txredisapi pairs each reply with one request
        await proto.subscribe(self._key("ev"))
        await proto.subscribe(self._key("ctl"))
        self._subscribing = False
        if self.sub.proto is not proto:
            self._resubscribe(proto)
            return
        self._subscribed = True
        self._request_sync()
        self._check_ready()

    def _subscribe_failed(self, f: Failure, proto: Any) -> None:
        self._subscribing = False
        self.log.warn("redis subscribe failed: {e}", e=f.getErrorMessage())
        if proto.transport is not None:
            proto.transport.loseConnection()
        self._resubscribe(proto)

    def _resubscribe(self, old: Any) -> None:
        cur = self.sub.proto
        if cur is not None and cur is not old and not self._subscribed:
            self._sub_up(cur)

    def _sub_down(self, why: str) -> None:
        self._subscribed = False
        self._busy = True
        self._queue.clear()

    # -- live feed ---------------------------------------------------------

    def _on_pubsub(self, channel: str, message: str) -> None:
        if channel == self._ev_channel:
            self._on_message(message)
        else:
            self._on_control(message)

    def _on_message(self, message: str) -> None:
        try:
            off_s, channel, body = message.split(" ", 2)
            offset = int(off_s)
        except ValueError:
            self.log.warn("redis: ignoring a malformed message {m!r}", m=message[:80])
            return
        if self._busy:
            if len(self._queue) >= MAX_QUEUE:
                # The streams have them all: a resync replaces the buffer.
                self._queue.clear()
                self._need_sync = True
                self._sync_again = True
            self._queue.append((channel, offset, body))
            return
        self._process(channel, offset, body)

    def _has_listeners(self, channel: str) -> bool:
        for _ in self.index.match(channel):
            return True
        return False

    def _process(self, channel: str, offset: int, body: str) -> None:
        last = self.live_last.get(channel, 0)
        if offset <= last:
            return
        if offset == last + 1 or not self._has_listeners(channel):
            self._deliver(channel, offset, body)
            return
        # A gap: fill it from the stream before anything else.
        self.log.info("redis: gap on {channel} ({last} -> {offset}), filling from the stream",
                      channel=channel, last=last, offset=offset, log_category="RT-R04")
        self._busy = True
        self._queue.appendleft((channel, offset, body))
        d = ensureDeferred(self._fill(channel, last, offset - 1))

        def filled(_: object) -> None:
            if not self._subscribed or self._sync_running:
                return  # the pub/sub link's return, or the running sync, drains
            if self._need_sync:
                self._request_sync()
                return
            self._busy = False
            self._drain()

        def failed(f: Failure) -> None:
            self.log.warn("redis: filling {channel} failed: {e}", channel=channel, e=f.getErrorMessage())
            self._need_sync = True
            self._request_sync()

        d.addCallbacks(filled, failed)

    def _drain(self) -> None:
        q = self._queue
        while q and not self._busy:
            self._process(*q.popleft())

    def _deliver(self, channel: str, offset: int, body: str) -> None:
        self.live_last[channel] = offset
        if not self._has_listeners(channel):
            return
        try:
            event = _decode(channel, offset, body)
        except (ValueError, KeyError, TypeError):
            self.log.warn("redis: undecodable event {channel}#{offset}", channel=channel, offset=offset)
            return
        if event.seq > self._seq_seen:
            self._seq_seen = event.seq
        self.fanout(event)

    async def _fill(self, channel: str, after: int, upto: int) -> None:
        """Deliver the stream's events of C{channel} in C{(after, upto]}."""
        while after < upto:
            entries = await self._xrange(channel, after + 1, upto, FILL_PAGE)
            for entry_id, fields in entries:
                offset = _entry_offset(entry_id)
                if offset > self.live_last.get(channel, 0):
                    self._deliver(channel, offset, _field(fields, "e"))
            if len(entries) < FILL_PAGE:
                break
            after = _entry_offset(entries[-1][0])
        if upto > self.live_last.get(channel, 0):
            self.live_last[channel] = upto

    # -- resync ------------------------------------------------------------

    def _request_sync(self) -> None:
        if self._stopped:
            return
        if self._sync_running:
            self._sync_again = True
            return
        self._busy = True
        self._sync_running = True
        ensureDeferred(self._sync()).addErrback(self._sync_failed)

    async def _sync(self) -> None:
        """
        Catch up with Redis: snapshot every counter, fill from the streams
        what this node's listeners missed, then process the buffered feed.
        """
        while True:
            self._sync_again = False
            self._need_sync = False
            snapshot = await self._snapshot()
            behind = {ch: self.live_last[ch] for ch, last in snapshot.items() if last < self.live_last.get(ch, 0)}
            if behind:
                await self._raise(behind, snapshot)
            for ch, last in snapshot.items():
                # A channel never seen was created after the baseline.
                prev = self.live_last.get(ch, 0)
                self.live_last[ch] = prev
                if last > prev and self._has_listeners(ch):
                    await self._fill(ch, prev, last)
                self.live_last[ch] = max(self.live_last[ch], last)
            if not self._sync_again:
                break
        self._sync_running = False
        if not self._subscribed:
            return  # the pub/sub link went down meanwhile; its return syncs again
        self._busy = False
        self.log.info("redis: live feed in sync ({n} channels)", n=len(self.live_last), log_category="RT-R06")
        self._drain()

    async def _raise(self, behind: dict[str, int], snapshot: dict[str, int]) -> None:
        """
        The primary's history is behind what this node delivered (a
        failover to a replica that lacked the newest writes, or an older
        AOF): raise its counters to the offsets (and the seq) this node
        handed out, so that none is given to another event.  The lost ones
        stay a hole in the history; subscribers, live or resuming, miss
        nothing that comes after.
        """
        args = [self.prefix, str(self._seq_seen)]
        for ch, prev in behind.items():
            args += [ch, str(prev)]
        raised = await self._script(RAISE, args)
        for ch, was in _pairs(raised or []):
            self.log.warn(
                "redis: {channel} went back from {prev} to {last} (a failover lost writes?); its counter is"
                " raised back to {prev}", channel=ch, prev=behind[ch], last=int(_s(was)), log_category="RT-R05",
            )
        for ch, prev in behind.items():
            snapshot[ch] = max(snapshot[ch], prev)

    def _sync_failed(self, f: Failure) -> None:
        self._sync_running = False
        self._need_sync = True
        self.log.warn("redis: resync failed ({e}); will retry", e=f.getErrorMessage())
        if self._stopped or self.cmd.proto is None:
            return  # the command link's return retries
        if self._retry_call is None or not self._retry_call.active():
            self._retry_call = self.reactor.callLater(backoff(2), self._retry_sync)

    def _retry_sync(self) -> None:
        if self._subscribed and self._need_sync:
            self._request_sync()

    # -- Redis commands ----------------------------------------------------

    def _proto(self) -> Any:
        proto = self.cmd.proto
        if proto is None:
            raise JournalUnavailable(f"redis unavailable: {self.cmd.error or 'not connected'}")
        return proto

    def _command(self, *args: Any) -> Deferred[Any]:
        try:
            proto = self._proto()
        except JournalUnavailable as e:
            return fail(e)
        return maybeDeferred(proto.execute_command, *args).addErrback(self._failed, proto)

    def _script(self, script: _Script, args: Sequence[Any]) -> Deferred[Any]:
        try:
            proto = self._proto()
        except JournalUnavailable as e:
            return fail(e)
        return script.run(proto, args).addErrback(self._failed, proto)

    def _failed(self, f: Failure, proto: Any) -> Failure:
        """
        A command failed: L{JournalUnavailable}.  C{READONLY} means the
        primary was demoted under us (a failover): the link finds the new one.
        """
        if isinstance(f.value, txredisapi.ResponseError) and str(f.value).startswith("READONLY"):
            if self.cmd.proto is proto:
                self.log.warn("redis: the command connection reached a replica; finding the primary again",
                              log_category="RT-R09")
                self.cmd.reconnect()
        return _unavailable(f)

    def _confirm(self, flat: list[Any], proto: Any, duplicate: bool) -> Deferred[list[Any]]:
        """
        C{WAIT} until L{min_replicas} replicas have this connection's
        writes, then answer C{flat}; fewer: L{JournalUnavailable}.  A
        batch with a duplicate first writes a marker, so that the WAIT also
        covers the first attempt's write (made on any connection before).
        """
        if self.cmd.proto is not proto:
            return fail(JournalUnavailable("redis: the connection was lost before the write was confirmed"))
        if duplicate:
            maybeDeferred(proto.execute_command, "INCR", self._key("wait")).addErrback(lambda f: None)
        waiter: _Waiter | None = getattr(proto, "rt_waiter", None)
        if waiter is None:
            waiter = proto.rt_waiter = _Waiter(proto, self.min_replicas, self.replica_timeout_ms)
        n, t = self.min_replicas, self.replica_timeout_ms

        def counted(acks: int) -> list[Any]:
            if acks < n:
                self.log.warn("redis: {acks} of {n} replicas confirmed a write within {t} ms",
                              acks=acks, n=n, t=t, log_category="RT-R08")
                raise JournalUnavailable(
                    f"redis: only {acks} of {n} replicas confirmed the write within {t} ms"
                    " (retry with the same id)"
                )
            return flat

        return waiter.request().addErrback(_unavailable).addCallback(counted)

    def command(self, *args: Any) -> Deferred[Any]:
        """
        Run one Redis command on the command connection (for the presence,
        delivery and lease code that shares this broker's connections).
        Fails with L{JournalUnavailable} while Redis is unreachable.
        """
        return self._command(*args)

    def key(self, kind: str, name: str = "") -> str:
        """A Redis key of this cluster: C{<prefix>:<kind>[:<name>]}."""
        return self._key(kind, name)

    # -- the control plane ---------------------------------------------------

    def broadcast(self, kind: str, message: Control) -> Deferred[None]:
        """PUBLISH on C{<p>:ctl}; every node's pub/sub connection hands it to its handlers."""
        body = dumps({"k": kind, "n": self.node_id, "m": message})
        return self._command("PUBLISH", self._key("ctl"), body).addCallback(lambda _: None)

    def _on_control(self, body: str) -> None:
        try:
            msg = json.loads(body)
            kind, sender, message = msg["k"], msg["n"], msg["m"]
        except (ValueError, KeyError, TypeError):
            self.log.warn("redis: ignoring a malformed control message {m!r}", m=body[:80])
            return
        if isinstance(kind, str) and isinstance(sender, str) and isinstance(message, dict):
            self.dispatch_control(kind, message, sender)

    def _xrange(self, channel: str, start: int, end: int | None, count: int) -> Deferred[list[Any]]:
        d = self._command("XRANGE", self._key("s", channel), str(start), "+" if end is None else str(end),
                          "COUNT", str(count))
        return d.addCallback(lambda r: r or [])

    def _snapshot(self) -> Deferred[dict[str, int]]:
        d = self._script(SNAPSHOT, [self.prefix, new_id()])

        def parsed(flat: list[Any]) -> dict[str, int]:
            epoch = _s(flat[0])
            if self._epoch is not None and epoch != self._epoch:
                self.log.error(
                    "redis lost its data (restarted without persistence?): offsets start over",
                    log_category="RT-R05",
                )
                self.live_last.clear()
                self._floors.clear()
                self._seq_seen = 0
            self._epoch = epoch
            return {ch: int(_s(v)) for ch, v in _pairs(flat[1:])}

        return d.addCallback(parsed)

    # -- the Broker interface ----------------------------------------------

    def subscribe(self, pattern: str, listener: Listener) -> None:
        super().subscribe(pattern, listener)
        self._schedule_counts()

    def unsubscribe(self, pattern: str, listener: Listener) -> None:
        super().unsubscribe(pattern, listener)
        self._schedule_counts()

    def publish(self, drafts: Sequence[Draft]) -> Deferred[list[Accepted]]:
        if not drafts:
            return succeed([])
        stamp = now_iso(time.time())
        args: list[Any] = [self.prefix, str(self.maxlen), str(self.ttl), str(len(drafts))]
        ids: list[str] = []
        prefix = self.prefix
        for draft in drafts:
            if draft.id is not None:
                eid = draft.id
                dkey = _dedup_key(prefix, draft.scope or draft.source, eid)
            else:
                eid = new_id()
                dkey = ""
            ids.append(eid)
            args += [draft.channel, dkey, _encode_body(draft, eid, stamp), *self._limits(draft.channel)]
        started = time.perf_counter()
        d = self._script(APPEND, args)
        if self.min_replicas:
            proto = self.cmd.proto

            def confirm(flat: list[Any]) -> Deferred[list[Any]]:
                dup = any(int(flat[5 * i + 1]) for i in range(len(drafts)))
                return self._confirm(flat, proto, dup)

            d.addCallback(confirm)

        def appended(flat: list[Any]) -> list[Accepted]:
            out: list[Accepted] = []
            for i, draft in enumerate(drafts):
                offset, dup, channel, body, seq = flat[5 * i: 5 * i + 5]
                offset = int(offset)
                channel = _s(channel)
                if int(dup):
                    if body:
                        event = _decode(channel, offset, body)
                    else:
                        event = Event(id=ids[i], channel=channel, offset=offset, time="",
                                      source=draft.source, type="", data=None)
                    out.append(Accepted(event, duplicate=True))
                else:
                    seq = int(seq)
                    if seq > self._seq_seen:
                        self._seq_seen = seq
                    out.append(Accepted(Event(
                        id=ids[i], channel=channel, offset=offset, time=stamp, source=draft.source,
                        type=draft.type, data=draft.data, raw=draft.raw, headers=draft.headers,
                        seq=seq,
                    )))
            self.stats.on_commit(len(drafts), time.perf_counter() - started)
            return out

        def failed(f: Failure) -> Failure:
            self.log.warn("redis publish failed: {e}", e=f.getErrorMessage(), log_category="RT-R07")
            return f

        return d.addCallbacks(appended, failed)

    def _limits(self, channel: str) -> tuple[str, str]:
        """
        The stream MAXLEN and key TTL of C{channel}: its first matching
        C{[[channels]]} rule's C{max_events} and C{retention_seconds} (0
        there: the C{[journal]} values), cached per channel (bounded).
        """
        lim = self._limit_cache.get(channel)
        if lim is None:
            rule = self.config.rule(channel)
            maxlen, ttl = self.maxlen, self.ttl
            if rule is not None:
                maxlen = rule.max_events or maxlen
                ttl = max(1, rule.retention_seconds) if rule.retention_seconds else ttl
            if len(self._limit_cache) >= 10000:
                self._limit_cache.clear()
            lim = self._limit_cache[channel] = (str(maxlen), str(ttl))
        return lim

    def history(
        self, channel: str, after: int = 0, limit: int = 1000, *, max_bytes: int = PAGE_BYTES
    ) -> Deferred[list[Event]]:
        if limit <= 0 or after >= _MAX_OFFSET:
            return succeed([])
        reader = _StreamReader(self, channel, max(after, 0), None, min(limit, HISTORY_CHUNK), max_bytes, limit)
        return ensureDeferred(self._merge([reader], limit, None, max_bytes))

    def replay(
        self,
        pattern: str | Sequence[str],
        since: Mapping[str, int],
        limit: int = 1000,
        *,
        after_seq: int = 0,
        max_bytes: int = PAGE_BYTES,
    ) -> Deferred[list[Event]]:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        if limit <= 0 or not patterns:
            return succeed([])
        return ensureDeferred(self._replay(patterns, since, limit, after_seq, max_bytes))

    async def _replay(
        self, patterns: list[str], since: Mapping[str, int], limit: int, after_seq: int, max_bytes: int
    ) -> list[Event]:
        """
        The channels with something to replay (a script filters the channel
        set by the patterns' prefixes), each read from where the previous
        page left it (L{_floors}) or from C{since}, merged by seq.
        """
        terms = _terms(patterns)
        flat = await self._script(CHANNELS, [self.prefix, *terms])
        floors = self._floors.get(after_seq, {}) if after_seq else {}
        wanted: dict[str, int] = {}
        for ch, last_s in _pairs(flat or []):
            last = int(_s(last_s))
            after = max(min(since.get(ch, 0), _MAX_OFFSET), floors.get(ch, 0), 0)
            if last > after and ch not in wanted and any(matches(p, ch) for p in patterns):
                wanted[ch] = after
        if not wanted:
            return []
        chunk = max(1, min(limit, HISTORY_CHUNK, FILL_PAGE // len(wanted)))
        readers = [_StreamReader(self, ch, after, after_seq, chunk, max(max_bytes // len(wanted), 1))
                   for ch, after in wanted.items()]
        page = await self._merge(readers, limit, after_seq, max_bytes)
        if page and len(readers) <= MAX_FLOORS:
            # Every entry of a channel up to its floor has a seq at or below
            # the page's last: the next page (after_seq = that seq) starts there.
            self._floors[page[-1].seq] = {r.channel: r.floor for r in readers if r.floor}
            while len(self._floors) > FLOOR_PAGES:
                self._floors.popitem(last=False)
        return page

    async def _merge(
        self, readers: list[_StreamReader], limit: int, after_seq: int | None, max_bytes: int
    ) -> list[Event]:
        """Take events from C{readers} in seq order (one reader: in offset order) up to the page's bounds."""
        await gatherResults([ensureDeferred(r.ready()) for r in readers], consumeErrors=True).addErrback(_first_error)
        heap = [(r.head_seq(), i) for i, r in enumerate(readers) if r.buffer]
        heapq.heapify(heap)
        out: list[Event] = []
        size = 0
        while heap:
            _, i = heapq.heappop(heap)
            r = readers[i]
            event, n = r.buffer[0]
            size += n
            if out and size > max_bytes:
                break
            r.take()
            out.append(event)
            if len(out) >= limit or size >= max_bytes:
                break
            await r.ready()
            if r.buffer:
                heapq.heappush(heap, (r.head_seq(), i))
        return out

    def position(self) -> Deferred[int]:
        return self._command("GET", self._key("gseq")).addCallback(lambda v: int(_s(v)) if v else 0)

    def last_offset(self, channel: str) -> Deferred[int]:
        return self._command("GET", self._key("seq", channel)).addCallback(lambda v: int(_s(v)) if v else 0)

    def channels(self) -> Deferred[list[ChannelInfo]]:
        return ensureDeferred(self._channels())

    async def _channels(self) -> list[ChannelInfo]:
        snapshot, remote = await gatherResults(
            [
                self._snapshot(),
                self._script(REMOTE_COUNTS, [self.prefix, self.node_id, str(int(COUNTS_INTERVAL * 3))]),
            ],
            consumeErrors=True,
        ).addErrback(_first_error)
        counts: dict[str, int] = {ch: int(_s(n)) for ch, n in _pairs(remote or [])}
        out = [
            {"name": ch, "subscribers": self.local_subscribers(ch) + counts.get(ch, 0), "last_offset": last}
            for ch, last in snapshot.items()
        ]
        # channels subscribed on some node that have no event yet (an occupied Pusher channel)
        unjournaled = {ch for ch in counts if ch not in snapshot}
        unjournaled.update(ch for ch in self.index.patterns_exact() if ch not in snapshot)
        for ch in unjournaled:
            n = self.local_subscribers(ch) + counts.get(ch, 0)
            if n > 0:
                out.append({"name": ch, "subscribers": n, "last_offset": 0})
        out.sort(key=lambda c: c["name"])
        return out

    # -- cluster-wide subscriber counts ------------------------------------

    def _schedule_counts(self) -> None:
        if self._stopped or (self._counts_call is not None and self._counts_call.active()):
            return
        self._counts_call = self.reactor.callLater(0.2, self._write_counts)

    def _tick(self) -> Deferred[None]:
        """Every L{COUNTS_INTERVAL}: ping the pub/sub link, write the counts."""
        sub = self.sub.proto
        if sub is not None and self._subscribed:
            # A Redis that stopped answering is noticed by the reply timeout,
            # which drops the link: it reconnects and resyncs.
            maybeDeferred(sub.execute_command, "PING").addErrback(lambda f: None)
        return self._write_counts()

    def _write_counts(self) -> Deferred[None]:
        """Write this node's per-channel subscriber counts (best effort)."""
        if self.cmd.proto is None or self._stopped:
            return succeed(None)
        args: list[str] = [self.prefix, self.node_id, str(int(COUNTS_INTERVAL * 3))]
        for ch in self.live_last:
            n = self.local_subscribers(ch)
            if n:
                args += [ch, str(n)]
        for ch in self.index.patterns_exact():
            if ch not in self.live_last:
                args += [ch, str(self.local_subscribers(ch))]
        d = self._script(COUNTS, args)

        def failed(f: Failure) -> None:
            self.log.debug("redis: writing counts failed: {e}", e=f.getErrorMessage())

        return d.addCallbacks(lambda _: None, failed)


class _StreamReader:
    """
    One channel's stream after an offset, read in chunks: the first of
    C{chunk} entries, later ones growing but sized down so that a chunk
    holds about C{budget} bytes.  With C{after_seq}, entries whose seq is at
    or below it are skipped (seq 0: written before seqs existed).

    @ivar floor: the last offset whose seq is known to be at or below the
        last event taken (0: none).
    """

    def __init__(self, broker: RedisBroker, channel: str, after: int, after_seq: int | None,
                 chunk: int, budget: int, cap: int = FILL_PAGE) -> None:
        self.broker = broker
        self.channel = channel
        self.after = after
        self.after_seq = after_seq
        self.chunk = chunk
        self.budget = budget
        self.cap = cap
        self.buffer: deque[tuple[Event, int]] = deque()
        self.done = False
        self.floor = 0

    def head_seq(self) -> int:
        return self.buffer[0][0].seq

    def take(self) -> Event:
        event = self.buffer.popleft()[0]
        self.floor = event.offset
        return event

    async def ready(self) -> None:
        """Read until an event is buffered or the stream has no more."""
        while not self.buffer and not self.done:
            await self._read()

    async def _read(self) -> None:
        entries = await self.broker._xrange(self.channel, self.after + 1, None, self.chunk)
        if len(entries) < self.chunk:
            self.done = True
        size = 0
        for entry_id, fields in entries:
            offset = _entry_offset(entry_id)
            body = _field(fields, "e")
            self.after = offset
            size += len(body)
            if self.after_seq is not None:
                m = _SEQ.match(body)
                if m is None or int(m.group(1)) <= self.after_seq:
                    self.floor = offset
                    continue
            try:
                event = _decode(self.channel, offset, body)
            except (ValueError, KeyError, TypeError):
                self.broker.log.warn("redis: undecodable event {channel}#{offset}", channel=self.channel,
                                     offset=offset)
                continue
            self.buffer.append((event, len(body)))
        if entries:
            per_entry = size // len(entries) + 1
            self.chunk = max(1, min(self.cap, FILL_PAGE, self.chunk * 2, self.budget // per_entry))


def _terms(patterns: Sequence[str]) -> list[str]:
    """The L{CHANNELS} script's terms for C{patterns}."""
    terms: list[str] = []
    for pattern in dict.fromkeys(patterns):
        prefix = pattern_prefix(pattern)
        if prefix is None:
            terms.append("=" + pattern)
        elif not prefix:
            return ["*"]
        else:
            terms.append("^" + prefix)
    return terms


def _field(fields: Sequence[Any], name: str) -> str:
    for i in range(0, len(fields) - 1, 2):
        if _s(fields[i]) == name:
            return _s(fields[i + 1])
    raise KeyError(name)


def _unavailable(f: Failure) -> Failure:
    if isinstance(f.value, JournalUnavailable):
        return f
    raise JournalUnavailable(f"redis: {f.getErrorMessage()}")


def _first_error(f: Failure) -> Failure:
    from twisted.internet.defer import FirstError

    if isinstance(f.value, FirstError):
        sub: Failure = f.value.subFailure
        return sub
    return f

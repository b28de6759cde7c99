# -*- test-case-name: tests.test_dest_store -*-
"""
The durable state of outgoing webhooks (C{[[destinations]]}), per destination:

  - a I{state} row: the C{position} (the journal C{seq} every matching event
    at or below which was delivered or moved to the queue), whether it is
    paused and why, and its counters (delivered, failed attempts, last
    success, last error);
  - a I{queue} of deliveries that failed at least once: each row keeps a
    copy of what is sent (body bytes and headers), so a retry never needs
    the journal's copy (trimming cannot lose it); a row is either waiting
    for its next attempt (C{next_at}) or dead-lettered (C{dead}).

Three implementations of L{DeliveryStore}:

  - L{SqliteDeliveries}: tables C{dest_state} and C{dest_queue} in the
    journal's SQLite file, written in the journal's writer thread
    (L{twisted_rt.store.journal.Journal.run_in_writer}).  Writes are queued
    and each flush runs everything queued in one transaction (a group
    commit of their own: one fsync for many state changes, none on a timer).
  - L{RedisDeliveries}: a hash per destination (C{<p>:dest:<name>}), its
    queue rows in C{<p>:destq:<name>} with two sorted sets (C{<p>:destdue}
    by next attempt, C{<p>:destdead} by death), on the broker's command
    connection; and a I{lease} (C{<p>:destlease:<name>}, C{SET NX PX} and a
    renew script) so that one node at a time delivers a destination.
  - L{MemoryDeliveries}: the same in a dict (unit tests, and ":memory:").

Every method returns a Deferred; writes of one store apply in call order.
"""

from __future__ import annotations

import abc
import base64
import json
import sqlite3
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from twisted_rt.interfaces import JournalUnavailable

if TYPE_CHECKING:
    from twisted_rt.store.journal import Journal
    from twisted_rt.store.redis import RedisBroker

__all__ = [
    "Delivery",
    "DeliveryStore",
    "DestState",
    "MemoryDeliveries",
    "RedisDeliveries",
    "SqliteDeliveries",
]


@dataclass
class Delivery:
    """
    One request to make to a destination, and where it stands.

    @ivar id: the C{webhook-id} (the event id, or the caller's id of an ad-hoc payload).
    @ivar seq: the event's journal seq (0 for an ad-hoc payload).
    @ivar sign: add the Standard Webhooks headers when sending (format "event").
    @ivar attempts: attempts made so far.
    @ivar next_at: when the next attempt is due (epoch seconds).
    @ivar dead: dead-lettered (no more attempts until retried).
    """

    id: str
    body: bytes
    headers: tuple[tuple[str, str], ...]
    sign: bool = True
    seq: int = 0
    channel: str = ""
    offset: int = 0
    attempts: int = 0
    next_at: float = 0.0
    created: float = 0.0
    last_error: str = ""
    dead: bool = False

    def summary(self) -> dict[str, Any]:
        """The API's view of a queued delivery (no body)."""
        return {
            "id": self.id,
            "channel": self.channel,
            "offset": self.offset,
            "attempts": self.attempts,
            "created": self.created,
            "next_at": None if self.dead else self.next_at,
            "last_error": self.last_error,
        }

    def to_json(self) -> str:
        """The Redis encoding of this row."""
        d = {
            "id": self.id,
            "b": base64.b64encode(self.body).decode("ascii"),
            "h": [list(h) for h in self.headers],
            "s": self.sign,
            "q": self.seq,
            "c": self.channel,
            "o": self.offset,
            "a": self.attempts,
            "n": self.next_at,
            "t": self.created,
            "e": self.last_error,
            "d": self.dead,
        }
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Delivery:
        """The inverse of L{to_json}."""
        d = json.loads(text)
        return cls(
            id=d["id"],
            body=base64.b64decode(d["b"]),
            headers=tuple((str(k), str(v)) for k, v in d["h"]),
            sign=bool(d["s"]),
            seq=int(d["q"]),
            channel=d["c"],
            offset=int(d["o"]),
            attempts=int(d["a"]),
            next_at=float(d["n"]),
            created=float(d["t"]),
            last_error=d["e"],
            dead=bool(d["d"]),
        )


@dataclass
class DestState:
    """
    A destination's durable state row.

    @ivar position: the journal seq delivery has passed (C{None}: never
        started; the engine starts at the journal's current position).
    @ivar failing_since: when the current run of failures began (0: none).
    """

    position: int | None = None
    paused: bool = False
    reason: str = ""
    delivered: int = 0
    failed: int = 0
    last_success: float = 0.0
    last_error: str = ""
    failing_since: float = 0.0
    #: counts of the queue (filled by L{DeliveryStore.load}, not saved)
    retrying: int = 0
    dead: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class DeliveryStore(abc.ABC):
    """Where the delivery state of every destination is kept."""

    #: whether several nodes share this store (then L{acquire} matters)
    shared = False

    def start(self) -> Deferred[None]:
        """Create what is needed (tables); fires when ready."""
        return succeed(None)

    @abc.abstractmethod
    def load(self, dest: str) -> Deferred[DestState]:
        """The state of C{dest} with its queue counts (a fresh state if none was saved)."""

    @abc.abstractmethod
    def save(self, dest: str, state: DestState) -> Deferred[None]:
        """Write the state row of C{dest}."""

    @abc.abstractmethod
    def put(self, dest: str, deliveries: Sequence[Delivery]) -> Deferred[None]:
        """Insert or replace queue rows (a retry's new attempt count and time, a dead letter)."""

    @abc.abstractmethod
    def delete(self, dest: str, ids: Sequence[str]) -> Deferred[None]:
        """Remove queue rows (delivered)."""

    @abc.abstractmethod
    def due(self, dest: str, now: float, limit: int, skip: Iterable[str] = ()) -> Deferred[list[Delivery]]:
        """Up to C{limit} waiting rows due at C{now}, earliest first, leaving out the ids in C{skip}."""

    @abc.abstractmethod
    def next_due(self, dest: str) -> Deferred[float | None]:
        """When the earliest waiting row is due (C{None}: none waits)."""

    @abc.abstractmethod
    def dead_letters(self, dest: str, limit: int) -> Deferred[list[Delivery]]:
        """Dead-lettered rows, the most recent first."""

    @abc.abstractmethod
    def revive(self, dest: str, ids: Sequence[str] | None, now: float) -> Deferred[int]:
        """Dead rows (all, or those of C{ids}) waiting again, due at C{now} with no attempts; how many."""

    def acquire(self, dest: str, node: str, ttl: float) -> Deferred[bool]:
        """Take or renew the lease of delivering C{dest} for C{ttl} seconds; whether this node holds it."""
        return succeed(True)

    def release(self, dest: str, node: str) -> Deferred[None]:
        """Give up the lease of C{dest} (if this node holds it)."""
        return succeed(None)


# -- in memory ---------------------------------------------------------------------


class MemoryDeliveries(DeliveryStore):
    """Everything in dicts: synchronous Deferreds (unit tests)."""

    def __init__(self) -> None:
        self.states: dict[str, DestState] = {}
        self.queues: dict[str, dict[str, Delivery]] = {}
        #: when set, every call fails with it (a store that is down)
        self.broken: Exception | None = None

    def _check(self) -> Deferred[Any] | None:
        return fail(self.broken) if self.broken is not None else None

    def load(self, dest: str) -> Deferred[DestState]:
        broken = self._check()
        if broken is not None:
            return broken
        state = replace(self.states.get(dest) or DestState())
        q = self.queues.get(dest, {})
        state.dead = sum(1 for d in q.values() if d.dead)
        state.retrying = len(q) - state.dead
        return succeed(state)

    def save(self, dest: str, state: DestState) -> Deferred[None]:
        broken = self._check()
        if broken is not None:
            return broken
        self.states[dest] = replace(state)
        return succeed(None)

    def put(self, dest: str, deliveries: Sequence[Delivery]) -> Deferred[None]:
        broken = self._check()
        if broken is not None:
            return broken
        q = self.queues.setdefault(dest, {})
        for d in deliveries:
            q[d.id] = replace(d)
        return succeed(None)

    def delete(self, dest: str, ids: Sequence[str]) -> Deferred[None]:
        broken = self._check()
        if broken is not None:
            return broken
        q = self.queues.get(dest, {})
        for i in ids:
            q.pop(i, None)
        return succeed(None)

    def due(self, dest: str, now: float, limit: int, skip: Iterable[str] = ()) -> Deferred[list[Delivery]]:
        broken = self._check()
        if broken is not None:
            return broken
        skipped = set(skip)
        rows = sorted(
            (d for d in self.queues.get(dest, {}).values() if not d.dead and d.next_at <= now and d.id not in skipped),
            key=lambda d: (d.next_at, d.seq),
        )
        return succeed([replace(d) for d in rows[:limit]])

    def next_due(self, dest: str) -> Deferred[float | None]:
        broken = self._check()
        if broken is not None:
            return broken
        times = [d.next_at for d in self.queues.get(dest, {}).values() if not d.dead]
        return succeed(min(times) if times else None)

    def dead_letters(self, dest: str, limit: int) -> Deferred[list[Delivery]]:
        rows = sorted((d for d in self.queues.get(dest, {}).values() if d.dead), key=lambda d: -d.next_at)
        return succeed([replace(d) for d in rows[:limit]])

    def revive(self, dest: str, ids: Sequence[str] | None, now: float) -> Deferred[int]:
        n = 0
        wanted = None if ids is None else set(ids)
        for d in self.queues.get(dest, {}).values():
            if d.dead and (wanted is None or d.id in wanted):
                d.dead, d.attempts, d.next_at = False, 0, now
                n += 1
        return succeed(n)


# -- SQLite, in the journal's file and writer thread --------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dest_state (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dest_queue (
    name TEXT NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    channel TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    body BLOB NOT NULL,
    headers TEXT NOT NULL,
    sign INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    next_at REAL NOT NULL,
    created REAL NOT NULL,
    last_error TEXT NOT NULL,
    dead INTEGER NOT NULL,
    PRIMARY KEY (name, id)
);
CREATE INDEX IF NOT EXISTS dest_queue_due ON dest_queue (name, dead, next_at);
"""

_QCOLS = 'id, body, headers, sign, seq, channel, "offset", attempts, next_at, created, last_error, dead'

_STATE_KEYS = ("position", "paused", "reason", "delivered", "failed", "last_success", "last_error", "failing_since")


def _state_json(state: DestState) -> str:
    return json.dumps({k: getattr(state, k) for k in _STATE_KEYS}, separators=(",", ":"))


def _state_from(text: str | bytes | None) -> DestState:
    state = DestState()
    if not text:
        return state
    d = json.loads(text)
    for k in _STATE_KEYS:
        if k in d:
            setattr(state, k, d[k])
    return state


def _row(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=row[0],
        body=bytes(row[1]),
        headers=tuple((str(k), str(v)) for k, v in json.loads(row[2])),
        sign=bool(row[3]),
        seq=row[4],
        channel=row[5],
        offset=row[6],
        attempts=row[7],
        next_at=row[8],
        created=row[9],
        last_error=row[10],
        dead=bool(row[11]),
    )


Op = Callable[[sqlite3.Connection], Any]


class SqliteDeliveries(DeliveryStore):
    """
    The tables C{dest_state} and C{dest_queue} of the journal's file.

    Every call is queued as one operation; whenever no flush is running,
    everything queued runs in one transaction of the writer thread, and
    each call's Deferred fires after that commit (or fails with
    L{JournalUnavailable} with the whole flush).
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._queue: list[tuple[Op, Deferred[Any]]] = []
        self._flushing = False
        self.flushes = 0

    def start(self) -> Deferred[None]:
        def create(conn: sqlite3.Connection) -> None:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

        return self._op(create)

    def _op(self, op: Op) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue.append((op, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._flushing or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._flushing = True
        self.flushes += 1
        ops = [op for op, _ in batch]

        def run(conn: sqlite3.Connection) -> list[Any]:
            return [op(conn) for op in ops]

        def done(results: list[Any]) -> None:
            self._flushing = False
            for (_, d), r in zip(batch, results, strict=True):
                d.callback(r)
            self._kick()

        def failed(f: Failure) -> None:
            self._flushing = False
            e = f.value if f.check(JournalUnavailable) else JournalUnavailable(f"delivery state: {f.getErrorMessage()}")
            for _, d in batch:
                d.errback(e)
            self._kick()

        self.journal.run_in_writer(run).addCallback(done).addErrback(failed)

    def load(self, dest: str) -> Deferred[DestState]:
        def q(conn: sqlite3.Connection) -> DestState:
            row = conn.execute("SELECT state FROM dest_state WHERE name = ?", (dest,)).fetchone()
            state = _state_from(row[0] if row else None)
            for dead, n in conn.execute("SELECT dead, COUNT(*) FROM dest_queue WHERE name = ? GROUP BY dead", (dest,)):
                if dead:
                    state.dead = n
                else:
                    state.retrying = n
            return state

        return self._op(q)

    def save(self, dest: str, state: DestState) -> Deferred[None]:
        text = _state_json(state)
        return self._op(
            lambda conn: conn.execute(
                "INSERT INTO dest_state (name, state) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET state = excluded.state",
                (dest, text),
            )
            and None
        )

    def put(self, dest: str, deliveries: Sequence[Delivery]) -> Deferred[None]:
        rows = [
            (
                dest, d.id, d.body, json.dumps(d.headers), int(d.sign), d.seq, d.channel, d.offset,
                d.attempts, d.next_at, d.created, d.last_error, int(d.dead),
            )
            for d in deliveries
        ]
        return self._op(
            lambda conn: conn.executemany(
                f"INSERT OR REPLACE INTO dest_queue (name, {_QCOLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            and None
        )

    def delete(self, dest: str, ids: Sequence[str]) -> Deferred[None]:
        pairs = [(dest, i) for i in ids]
        return self._op(
            lambda conn: conn.executemany("DELETE FROM dest_queue WHERE name = ? AND id = ?", pairs) and None
        )

    def due(self, dest: str, now: float, limit: int, skip: Iterable[str] = ()) -> Deferred[list[Delivery]]:
        skipped = set(skip)

        def q(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                f"SELECT {_QCOLS} FROM dest_queue WHERE name = ? AND dead = 0 AND next_at <= ?"
                " ORDER BY next_at, seq LIMIT ?",
                (dest, now, limit + len(skipped)),
            ).fetchall()
            return [d for d in map(_row, rows) if d.id not in skipped][:limit]

        return self._op(q)

    def next_due(self, dest: str) -> Deferred[float | None]:
        def q(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(next_at) FROM dest_queue WHERE name = ? AND dead = 0", (dest,)
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return self._op(q)

    def dead_letters(self, dest: str, limit: int) -> Deferred[list[Delivery]]:
        def q(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                f"SELECT {_QCOLS} FROM dest_queue WHERE name = ? AND dead = 1 ORDER BY next_at DESC LIMIT ?",
                (dest, limit),
            ).fetchall()
            return [_row(r) for r in rows]

        return self._op(q)

    def revive(self, dest: str, ids: Sequence[str] | None, now: float) -> Deferred[int]:
        def q(conn: sqlite3.Connection) -> int:
            if ids is None:
                cur = conn.execute(
                    "UPDATE dest_queue SET dead = 0, attempts = 0, next_at = ? WHERE name = ? AND dead = 1",
                    (now, dest),
                )
                return int(cur.rowcount)
            n = 0
            for i in ids:
                n += conn.execute(
                    "UPDATE dest_queue SET dead = 0, attempts = 0, next_at = ? WHERE name = ? AND id = ? AND dead = 1",
                    (now, dest, i),
                ).rowcount
            return n

        return self._op(q)


# -- Redis ---------------------------------------------------------------------------

#: renew the lease only if this node still holds it
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class RedisDeliveries(DeliveryStore):
    """
    The delivery state in Redis, through the broker's command connection
    (commands on one connection apply in the order they are sent).
    """

    shared = True

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker

    def _k(self, kind: str, dest: str) -> str:
        return self.broker.key(kind, dest)

    def load(self, dest: str) -> Deferred[DestState]:
        b = self.broker
        d1 = b.command("GET", self._k("dest", dest))
        d2 = b.command("ZCARD", self._k("destdue", dest))
        d3 = b.command("ZCARD", self._k("destdead", dest))

        async def go() -> DestState:
            state = _state_from(await d1)
            state.retrying = int(await d2 or 0)
            state.dead = int(await d3 or 0)
            return state

        return Deferred.fromCoroutine(go())

    def save(self, dest: str, state: DestState) -> Deferred[None]:
        return self.broker.command("SET", self._k("dest", dest), _state_json(state)).addCallback(lambda _: None)

    def put(self, dest: str, deliveries: Sequence[Delivery]) -> Deferred[None]:
        if not deliveries:
            return succeed(None)
        b = self.broker
        rows: list[Any] = []
        due: list[Any] = []
        dead: list[Any] = []
        for d in deliveries:
            rows += [d.id, d.to_json()]
            (dead if d.dead else due).append(d)
        ds = [b.command("HSET", self._k("destq", dest), *rows)]
        if due:
            ds.append(b.command("ZADD", self._k("destdue", dest), *[x for d in due for x in (repr(d.next_at), d.id)]))
            ds.append(b.command("ZREM", self._k("destdead", dest), *[d.id for d in due]))
        if dead:
            ds.append(b.command("ZADD", self._k("destdead", dest), *[x for d in dead for x in (repr(d.next_at), d.id)]))
            ds.append(b.command("ZREM", self._k("destdue", dest), *[d.id for d in dead]))
        return _all(ds)

    def delete(self, dest: str, ids: Sequence[str]) -> Deferred[None]:
        if not ids:
            return succeed(None)
        b = self.broker
        return _all([
            b.command("HDEL", self._k("destq", dest), *ids),
            b.command("ZREM", self._k("destdue", dest), *ids),
            b.command("ZREM", self._k("destdead", dest), *ids),
        ])

    def _rows(self, dest: str, ids: Sequence[Any]) -> Deferred[list[Delivery]]:
        if not ids:
            return succeed([])
        d = self.broker.command("HMGET", self._k("destq", dest), *[_text(i) for i in ids])
        return d.addCallback(lambda vals: [Delivery.from_json(v) for v in vals if v])

    def due(self, dest: str, now: float, limit: int, skip: Iterable[str] = ()) -> Deferred[list[Delivery]]:
        skipped = set(skip)
        d = self.broker.command(
            "ZRANGEBYSCORE", self._k("destdue", dest), "-inf", repr(now), "LIMIT", "0", str(limit + len(skipped))
        )

        def rows(ids: list[Any]) -> Deferred[list[Delivery]]:
            wanted = [i for i in (_text(x) for x in ids or []) if i not in skipped][:limit]
            return self._rows(dest, wanted)

        return d.addCallback(rows)

    def next_due(self, dest: str) -> Deferred[float | None]:
        d = self.broker.command("ZRANGE", self._k("destdue", dest), "0", "0", "WITHSCORES")
        return d.addCallback(lambda r: float(_text(r[1])) if r else None)

    def dead_letters(self, dest: str, limit: int) -> Deferred[list[Delivery]]:
        d = self.broker.command("ZREVRANGE", self._k("destdead", dest), "0", str(max(0, limit - 1)))
        return d.addCallback(lambda ids: self._rows(dest, ids or []))

    def revive(self, dest: str, ids: Sequence[str] | None, now: float) -> Deferred[int]:
        async def go() -> int:
            if ids is None:
                wanted = [_text(i) for i in await self.broker.command("ZRANGE", self._k("destdead", dest), "0", "-1")]
            else:
                wanted = list(ids)
            rows = [r for r in await self._rows(dest, wanted) if r.dead]
            for r in rows:
                r.dead, r.attempts, r.next_at = False, 0, now
            await self.put(dest, rows)
            return len(rows)

        return Deferred.fromCoroutine(go())

    def acquire(self, dest: str, node: str, ttl: float) -> Deferred[bool]:
        d = self.broker.command("EVAL", _RENEW, "1", self._k("destlease", dest), node, str(int(ttl * 1000)))
        return d.addCallback(lambda r: bool(int(r)))

    def release(self, dest: str, node: str) -> Deferred[None]:
        d = self.broker.command("EVAL", _RELEASE, "1", self._k("destlease", dest), node)
        return d.addCallback(lambda _: None)


def _all(ds: list[Deferred[Any]]) -> Deferred[None]:
    from twisted.internet.defer import gatherResults

    def first(f: Failure) -> Failure:
        inner = getattr(f.value, "subFailure", None)
        return inner if isinstance(inner, Failure) else f

    return gatherResults(ds, consumeErrors=True).addCallback(lambda _: None).addErrback(first)

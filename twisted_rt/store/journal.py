# -*- test-case-name: tests.test_journal -*-
"""
The durable journal: every accepted event, in SQLite, before it is
acknowledged.

Design:
  - One writer thread owns the write connection (WAL mode, C{synchronous=FULL},
    so a commit is on disk when it returns).  Appends queue on the reactor
    thread; whenever the writer is idle it takes I{everything} queued (up to
    C{max_batch} events) into one transaction: group commit, one fsync for
    many events, with no timer delay when the load is light.
  - Offsets are assigned in the writer thread inside the transaction from a
    cache of each channel's last offset, applied to the cache only after the
    commit succeeds, so offsets start at 1, have no gaps and are never reused.
    The C{channels} table remembers the last offset even after trimming.
  - Every event also gets a C{seq}: its place in one journal-wide order,
    which I{is} the events table's rowid.  The writer assigns it from a
    counter (never from SQLite's "largest rowid + 1"), persisted as each
    channel's C{last_seq} in the same commit, so a seq is never reused even
    after every row was trimmed.  Older files (no C{last_seq} yet) start the
    counter above their largest rowid, which is already in insertion order.
  - Delivery ids are unique per idempotency scope (C{Draft.scope}, or the
    source for webhooks; table C{deliveries}, kept for
    C{retention_seconds}); a repeated id answers the original event.
  - Reads (history, resume) use their own thread and connection, so a long
    replay never delays a commit.  A page holds at most C{limit} events and
    about C{max_bytes} of event JSON: the reader stops stepping its cursor
    at the cap instead of fetching every row.  A replay (one or several
    patterns) is one query in seq order, keyset-paged by C{after_seq}.
  - A failed commit fails every append of its batch with L{JournalUnavailable},
    marks the journal unhealthy (C{/readyz} answers 503) and drops the
    connection; the next batch reopens it, and health returns when a commit
    succeeds again.
  - Whenever the writer (re)opens the database (a failed open at start, a
    dropped connection), it hands the state it loaded (every channel's last
    offset, the seq counter) to the reactor thread with the batch it
    commits, so C{last_offsets} and C{seq} are what a healthy open loads.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twisted_rt.core.config import ChannelRule
from twisted_rt.core.event import Accepted, Draft, Event, dumps, new_id, now_iso
from twisted_rt.core.matcher import is_wildcard, matches
from twisted_rt.interfaces import PAGE_BYTES, JournalUnavailable, Reactor, UnencodableEvent

__all__ = ["PAGE_BYTES", "Journal", "JournalUnavailable", "ThreadedReactor", "UnencodableEvent", "pattern_prefix"]


class ThreadedReactor(Reactor, Protocol):
    """
    The reactor as the journal uses it: time (the trim loop) and
    C{callFromThread} (its thread pools hand their answers back), as a real
    reactor provides them (C{IReactorTime} + C{IReactorFromThreads}).
    """

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Call C{callable} in the reactor thread, from any thread."""


# events.seq is the rowid (files made before it have the implicit rowid, which
# every query names instead).  deliveries.source holds the idempotency scope.
# events.data is the event's data as JSON text, or '' (never valid JSON) when
# it is the raw body itself (a webhook's UTF-8 JSON body): then the bytes are
# stored once, in events.raw.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    id TEXT NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    time TEXT NOT NULL,
    ts REAL NOT NULL,
    data TEXT NOT NULL,
    raw BLOB,
    headers TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS events_channel_offset ON events (channel, "offset");
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    last_offset INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS deliveries (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    channel TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (source, id)
);
-- No index on ts: rows are trimmed by age in insertion (rowid) order, so
-- each append updates two fewer B-trees (files made before this dropped them
-- on open).
DROP INDEX IF EXISTS events_ts;
DROP INDEX IF EXISTS deliveries_ts;
"""

_COLUMNS = 'id, channel, "offset", time, source, type, data, raw, headers, rowid'
#: seconds of writing between two WAL checkpoints (run in their own thread)
CHECKPOINT_INTERVAL = 1.0
#: the writer's own automatic checkpoint, only a safety net (pages of 4 KiB: 80 MiB)
WRITER_AUTOCHECKPOINT_PAGES = 20000
#: the writer's page cache in KiB (SQLite's default is 2 MiB): more index pages of a big journal stay in memory
WRITER_CACHE_KIB = 8192
#: delivery ids looked up per query (SQLite's variable limit is 32766 since 3.32, 999 before)
_IN_CHUNK = 500


#: what the writer loads when it opens the database: each channel's last offset, the seq counter
_State = tuple[dict[str, int], int]


def _row_event(row: Sequence[Any]) -> Event:
    return Event(
        id=row[0],
        channel=row[1],
        offset=row[2],
        time=row[3],
        source=row[4],
        type=row[5],
        data=json.loads(row[6] or row[7]),
        raw=row[7],
        headers=json.loads(row[8]) if row[8] else None,
        seq=row[9],
    )


def _row_size(row: Sequence[Any]) -> int:
    """About the size of a row's event JSON (its data text or raw body, plus the fields)."""
    return len(row[6] or row[7] or b"") + len(row[0]) + len(row[1]) + len(row[5]) + 96


class Journal:
    """
    An SQLite journal used from thread pools.

    @ivar last_offsets: each channel's last committed offset, as seen from
        the reactor thread (updated when a commit's Deferred fires).
    @ivar seq: the largest seq committed, as seen from the reactor thread.
    @ivar healthy: C{False} after a failed open or commit, until a commit
        succeeds again.
    """

    log = Logger()

    def __init__(
        self,
        reactor: ThreadedReactor,
        path: str,
        max_events_per_channel: int = 10000,
        retention_seconds: float = 604800,
        max_batch: int = 1000,
        trim_interval_seconds: float = 60.0,
        on_commit: Callable[[int, float], None] | None = None,
        rules: Sequence[ChannelRule] = (),
    ) -> None:
        self._reactor = reactor
        # [[channels]] rules: per-channel max_events / retention_seconds (first match wins)
        self.rules = tuple(rules)
        self._limits: dict[str, tuple[int, float]] = {}  # writer thread only: channel -> (keep, retention)
        self.path = path
        self.max_events_per_channel = max_events_per_channel
        self.retention_seconds = retention_seconds
        self.max_batch = max_batch
        self.trim_interval_seconds = trim_interval_seconds
        self._on_commit = on_commit
        #: called with a commit's accepted events (one list per append, in order)
        #: once every callback of the commit has run: the broker's fan-out, after
        #: the publishers' acks; it does not depend on any append's Deferred (a
        #: cancelled one, whose publisher went away, is still fanned out)
        self.after_callbacks: Callable[[list[list[Accepted]]], None] | None = None
        self._memory = path == ":memory:"
        self._wpool = ThreadPool(minthreads=1, maxthreads=1, name="rt-journal-writer")
        # WAL checkpoints, off the writer's path (None: in memory, nothing to checkpoint)
        self._cpool = None if self._memory else ThreadPool(minthreads=0, maxthreads=1, name="rt-journal-checkpoint")
        self._checkpointing = False
        self._checkpointed_at = 0.0
        self.checkpoints = 0
        self._rpool = (
            self._wpool
            if self._memory
            else ThreadPool(minthreads=1, maxthreads=2, name="rt-journal-reader")
        )
        self._conn: sqlite3.Connection | None = None  # writer thread only
        self._wlast: dict[str, int] = {}  # writer thread only
        self._wseq = 0  # writer thread only: the last seq committed
        self._wfresh: _State | None = None  # writer thread only: what the last (re)open loaded
        self._local = threading.local()
        self._pending: list[tuple[tuple[Sequence[Draft], list[str]], Deferred[list[Accepted]]]] = []
        self._writing = False
        self._flushed: list[Deferred[None]] = []
        self._closed = False
        self._trimmer: LoopingCall | None = None
        self.last_offsets: dict[str, int] = {}
        self.seq = 0
        self.healthy = False
        self.error: str | None = "not opened"
        self.commits = 0

    # -- lifecycle (reactor thread) --------------------------------------

    @property
    def reactor(self) -> ThreadedReactor:
        """The reactor the journal answers in (the broker schedules its fan-out on it)."""
        return self._reactor

    def open(self) -> Deferred[None]:
        """
        Start the threads and open the database.  The Deferred fires either
        way; on failure the journal stays unhealthy and retries per batch.
        """
        self._wpool.start()
        if self._rpool is not self._wpool:
            self._rpool.start()
        if self._cpool is not None:
            self._cpool.start()
        self._trimmer = LoopingCall(self.trim)
        self._trimmer.clock = cast(IReactorTime, self._reactor)
        self._trimmer.start(self.trim_interval_seconds, now=False).addErrback(
            lambda f: self.log.failure("journal trimmer stopped", f)
        )
        d = self._in_writer(self._w_start)

        def opened(fresh: _State | None) -> None:
            self._loaded(fresh)
            self._set_health(None)

        def failed(f: Failure) -> None:
            self._set_health(f.getErrorMessage())

        return d.addCallbacks(opened, failed)

    def close(self) -> Deferred[None]:
        """Flush what is queued, then close the connections and threads."""
        if self._closed:
            return succeed(None)
        self._closed = True
        if self._trimmer is not None and self._trimmer.running:
            self._trimmer.stop()
        d = self.flush()

        def stop(_: object) -> Deferred[None]:
            return self._in_writer(self._w_close)

        def stop_pools(_: object) -> None:
            self._wpool.stop()
            if self._rpool is not self._wpool:
                self._rpool.stop()
            if self._cpool is not None:
                self._cpool.stop()

        d.addCallback(stop)
        d.addBoth(stop_pools)
        return d

    def flush(self) -> Deferred[None]:
        """Fires when every append queued so far has been committed or failed."""
        if not self._writing and not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._flushed.append(d)
        return d

    def _loaded(self, fresh: _State | None) -> None:
        """Take the state the writer loaded when it (re)opened the database."""
        if fresh is not None:
            self.last_offsets, self.seq = fresh

    def _set_health(self, error: str | None) -> None:
        was = self.healthy
        self.healthy = error is None
        self.error = error
        if was and error is not None:
            self.log.error("journal unavailable: {error}", error=error, log_category="RT-J01")
        elif not was and error is None:
            self.log.info("journal ready: {path}", path=self.path, log_category="RT-J02")
        elif error is not None and self.error != error:
            self.log.warn("journal still unavailable: {error}", error=error)

    def _in_writer(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(cast(IReactorFromThreads, self._reactor), self._wpool, f, *args)

    def run_in_writer(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{fn(conn, *args)} in the writer thread, in a transaction of its
        own on the write connection (for tables other modules keep in this
        file: L{twisted_rt.store.deliveries}); fires with its result after
        the commit, or fails with L{JournalUnavailable}.
        """
        if self._closed:
            return _fail(JournalUnavailable("the journal is closed"))
        return self._in_writer(self._w_run, fn, args).addErrback(_unavailable)

    def _w_run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._conn is None:
            self._w_open()
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            self._w_abort()
            raise
        return result

    def _in_reader(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._closed:
            return _fail(JournalUnavailable("the journal is closed"))
        return deferToThreadPool(cast(IReactorFromThreads, self._reactor), self._rpool, f, *args)

    # -- appends (reactor thread) ----------------------------------------

    def append(self, drafts: Sequence[Draft]) -> Deferred[list[Accepted]]:
        """
        Journal C{drafts} in one transaction with whatever else is queued.

        Fires with one L{Accepted} per draft, in order, once the commit is
        durable; fails with L{JournalUnavailable} if it could not be made.
        """
        if self._closed:
            return _fail(JournalUnavailable("the journal is closed"))
        # Encode here, so that one bad event fails alone, not the batch it would join.
        try:
            texts = [_text(draft) for draft in drafts]
        except (TypeError, ValueError) as e:
            return _fail(UnencodableEvent(f"the event data cannot be stored as JSON: {e}"))
        d: Deferred[list[Accepted]] = Deferred()
        self._pending.append(((drafts, texts), d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._writing or not self._pending:
            if not self._writing:
                flushed, self._flushed = self._flushed, []
                for fd in flushed:
                    fd.callback(None)
            return
        batch: list[tuple[tuple[Sequence[Draft], list[str]], Deferred[list[Accepted]]]] = []
        count = 0
        while self._pending and (not batch or count + len(self._pending[0][0][0]) <= self.max_batch):
            item = self._pending.pop(0)
            batch.append(item)
            count += len(item[0][0])
        self._writing = True
        started = time.perf_counter()
        d = self._in_writer(self._w_append, [req for req, _ in batch], time.time())
        d.addCallbacks(
            self._appended,
            self._append_failed,
            callbackArgs=(batch, count, started),
            errbackArgs=(batch,),
        )

    def _appended(
        self,
        result: tuple[list[list[Accepted]], dict[str, int], int, _State | None],
        batch: list[tuple[tuple[Sequence[Draft], list[str]], Deferred[list[Accepted]]]],
        count: int,
        started: float,
    ) -> None:
        accepted, last, seq, fresh = result
        self._loaded(fresh)
        self.last_offsets.update(last)
        self.seq = seq
        self.commits += 1
        self._writing = False
        if not self.healthy:
            self._set_health(None)
        if self._on_commit is not None:
            self._on_commit(count, time.perf_counter() - started)
        if self._pending:
            # the next commit runs in the writer while this one's callbacks (acks, fan-out) do
            self._kick()
        if count == 1 and accepted[0]:
            accepted[0][0].event.alone = True
        for (_, d), acc in zip(batch, accepted, strict=True):
            d.callback(acc)
        if not self._writing:
            self._kick()
        if self.after_callbacks is not None:
            try:
                self.after_callbacks(accepted)
            except Exception:  # noqa: BLE001 - the commit path goes on
                self.log.failure("after the callbacks of a commit")
        self._maybe_checkpoint()

    def _append_failed(
        self, f: Failure, batch: list[tuple[tuple[Sequence[Draft], list[str]], Deferred[list[Accepted]]]]
    ) -> None:
        self._writing = False
        self._set_health(f.getErrorMessage())
        for _, d in batch:
            d.errback(JournalUnavailable(f"journal write failed: {f.getErrorMessage()}"))
        self._kick()

    # -- checkpoints (reactor thread, then the checkpoint thread) ------------

    def _maybe_checkpoint(self) -> None:
        """
        After a commit: copy the WAL into the database (a PASSIVE checkpoint,
        which never blocks the writer or readers) in the checkpoint thread,
        at most once per L{CHECKPOINT_INTERVAL} seconds of writing.
        """
        if self._cpool is None or self._checkpointing or self._closed:
            return
        now = time.monotonic()
        if now - self._checkpointed_at < CHECKPOINT_INTERVAL:
            return
        self._checkpointing = True
        self._checkpointed_at = now
        d = deferToThreadPool(cast(IReactorFromThreads, self._reactor), self._cpool, self._c_checkpoint)

        def done(result: object) -> None:
            self._checkpointing = False
            self.checkpoints += 1

        def failed(f: Failure) -> None:
            self._checkpointing = False
            # the writer's own checkpoint (WRITER_AUTOCHECKPOINT_PAGES) still bounds the WAL
            self.log.warn("journal checkpoint failed: {error}", error=f.getErrorMessage(), log_category="RT-J03")

        d.addCallback(done).addErrback(failed)

    def _c_checkpoint(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            self._local.conn = conn
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- writer thread ---------------------------------------------------

    def _w_connect(self) -> sqlite3.Connection:
        if not self._memory:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, cached_statements=512)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            if not self._memory:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot use WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            if not self._memory:
                # checkpoints run in their own thread (_maybe_checkpoint): the writer's own
                # automatic one (a copy and an fsync of the database, tens of ms, in the middle
                # of a commit) is only the safety net, far above what one interval writes
                conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
                conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(channels)")}
            if "last_seq" not in columns:  # a file made before seq existed
                conn.execute("ALTER TABLE channels ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0")
        except BaseException:
            conn.close()
            raise
        return conn

    def _w_open(self) -> None:
        """Connect if needed; a fresh connection reloads the writer's state (and keeps a copy for the reactor)."""
        if self._conn is not None:
            return
        conn = self._w_connect()
        try:
            last = dict(conn.execute("SELECT name, last_offset FROM channels").fetchall())
            seq = max(
                conn.execute("SELECT COALESCE(MAX(last_seq), 0) FROM channels").fetchone()[0],
                conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()[0],
            )
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._wlast = last
        self._wseq = int(seq)
        self._wfresh = (dict(last), self._wseq)

    def _w_take_fresh(self) -> _State | None:
        fresh, self._wfresh = self._wfresh, None
        return fresh

    def _w_start(self) -> _State | None:
        self._w_open()
        return self._w_take_fresh()

    def _w_close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") if not self._memory else None
            finally:
                self._conn.close()
                self._conn = None

    def _w_append(
        self, requests: list[tuple[Sequence[Draft], list[str]]], now: float
    ) -> tuple[list[list[Accepted]], dict[str, int], int, _State | None]:
        if self._conn is None:
            self._w_open()
        conn = self._conn
        assert conn is not None
        last: dict[str, int] = {}
        last_seq: dict[str, int] = {}
        seq = self._wseq
        seen: dict[tuple[str, str], Event] = {}
        out: list[list[Accepted]] = []
        stamp = now_iso(now)
        ev_rows: list[tuple[Any, ...]] = []
        dl_rows: list[tuple[Any, ...]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            known = self._w_known(conn, requests)
            for drafts, texts in requests:
                acc: list[Accepted] = []
                for draft, text in zip(drafts, texts, strict=True):
                    scope = draft.scope or draft.source
                    if draft.id is not None:
                        key = (scope, draft.id)
                        prior = seen.get(key)
                        if prior is None and key in known:
                            prior = self._w_delivery(conn, draft.source, draft.id, known[key])
                        if prior is not None:
                            acc.append(Accepted(prior, duplicate=True))
                            continue
                        eid = draft.id
                    else:
                        eid = new_id()
                    channel = draft.channel
                    offset = last.get(channel, self._wlast.get(channel, 0)) + 1
                    last[channel] = offset
                    seq += 1
                    last_seq[channel] = seq
                    event = Event(
                        id=eid,
                        channel=channel,
                        offset=offset,
                        time=stamp,
                        source=draft.source,
                        type=draft.type,
                        data=draft.data,
                        raw=draft.raw,
                        headers=draft.headers,
                        seq=seq,
                    )
                    ev_rows.append(
                        (
                            seq,
                            channel,
                            offset,
                            eid,
                            draft.source,
                            draft.type,
                            stamp,
                            now,
                            text,
                            draft.raw,
                            _headers_json(draft.headers) if draft.headers is not None else None,
                        )
                    )
                    dl_rows.append((scope, eid, channel, offset, now))
                    seen[(scope, eid)] = event
                    acc.append(Accepted(event))
                out.append(acc)
            _insert(
                conn,
                'INSERT INTO events (rowid, channel, "offset", id, source, type, time, ts, data, raw, headers) VALUES ',
                ev_rows,
            )
            _insert(conn, 'INSERT INTO deliveries (source, id, channel, "offset", ts) VALUES ', dl_rows)
            _insert(
                conn,
                "INSERT INTO channels (name, last_offset, last_seq) VALUES ",
                [(name, off, last_seq[name]) for name, off in last.items()],
                " ON CONFLICT (name) DO UPDATE SET last_offset = excluded.last_offset, last_seq = excluded.last_seq",
            )
            conn.execute("COMMIT")
        except BaseException:
            self._w_abort()
            raise
        self._wlast.update(last)
        self._wseq = seq
        return out, last, seq, self._w_take_fresh()

    def _w_abort(self) -> None:
        conn = self._conn
        self._conn = None
        if conn is None:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        try:
            conn.close()
        except sqlite3.Error:  # pragma: no cover
            pass

    def _w_known(
        self, conn: sqlite3.Connection, requests: list[tuple[Sequence[Draft], list[str]]]
    ) -> dict[tuple[str, str], tuple[str, int]]:
        """The delivery ids of this batch already journaled: one query per scope, not per event."""
        wanted: dict[str, list[str]] = {}
        for drafts, _ in requests:
            for draft in drafts:
                if draft.id is not None:
                    wanted.setdefault(draft.scope or draft.source, []).append(draft.id)
        known: dict[tuple[str, str], tuple[str, int]] = {}
        for scope, ids in wanted.items():
            for i in range(0, len(ids), _IN_CHUNK):
                part = ids[i : i + _IN_CHUNK]
                rows = conn.execute(
                    'SELECT id, channel, "offset" FROM deliveries WHERE source = ? AND id IN'
                    f" ({', '.join('?' * len(part))})",
                    (scope, *part),
                )
                for eid, channel, offset in rows:
                    known[(scope, eid)] = (channel, offset)
        return known

    def _w_delivery(self, conn: sqlite3.Connection, source: str, eid: str, row: tuple[str, int]) -> Event:
        full = conn.execute(
            f'SELECT {_COLUMNS} FROM events WHERE channel = ? AND "offset" = ?', row
        ).fetchone()
        if full is not None:
            return _row_event(full)
        return Event(id=eid, channel=row[0], offset=row[1], time="", source=source, type="", data=None)

    # -- trimming ----------------------------------------------------------

    def limits(self, channel: str) -> tuple[int, float]:
        """
        C{(max events, retention seconds)} of C{channel}: its first matching
        C{[[channels]]} rule's (0 there: the journal's), else the journal's.
        """
        keep, retention = self.max_events_per_channel, float(self.retention_seconds)
        for rule in self.rules:
            if matches(rule.pattern, channel):
                return (rule.max_events or keep, float(rule.retention_seconds or retention))
        return keep, retention

    def trim(self) -> Deferred[int]:
        """Delete events past each channel's max events or retention (L{limits})."""
        if self._closed:
            return succeed(0)
        d = self._in_writer(self._w_trim, time.time())

        def trimmed(result: tuple[int, _State | None]) -> int:
            deleted, fresh = result
            self._loaded(fresh)
            return deleted

        def failed(f: Failure) -> int:
            self.log.warn("journal trim failed: {e}", e=f.getErrorMessage())
            return 0

        return d.addCallback(trimmed).addErrback(failed)

    def _w_trim(self, now: float) -> tuple[int, _State | None]:
        """
        One pass: each channel past its max events, then by age: every row
        older than the longest retention in one sweep in insertion order,
        and (only with rules of shorter retentions) those channels' older rows.
        """
        if self._conn is None:
            self._w_open()
        conn = self._conn
        assert conn is not None
        deleted = 0
        limits = self._limits
        longest = max([float(self.retention_seconds)] + [float(r.retention_seconds) for r in self.rules])
        try:
            conn.execute("BEGIN IMMEDIATE")
            for channel, last in self._wlast.items():
                lim = limits.get(channel)
                if lim is None:
                    lim = limits[channel] = self.limits(channel)
                keep, retention = lim
                if last > keep:
                    cur = conn.execute(
                        'DELETE FROM events WHERE channel = ? AND "offset" <= ?', (channel, last - keep)
                    )
                    deleted += cur.rowcount
                if retention < longest:
                    cur = conn.execute("DELETE FROM events WHERE channel = ? AND ts < ?", (channel, now - retention))
                    deleted += cur.rowcount
            deleted += _delete_older(conn, "events", now - longest)
            _delete_older(conn, "deliveries", now - longest)
            conn.execute("COMMIT")
        except BaseException:
            self._w_abort()
            raise
        return deleted, self._w_take_fresh()

    # -- reads -------------------------------------------------------------

    def _r_conn(self) -> sqlite3.Connection:
        if self._memory:
            if self._conn is None:
                self._w_open()
            assert self._conn is not None
            return self._conn
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, cached_statements=512)
            conn.execute("PRAGMA busy_timeout=5000")
            self._local.conn = conn
        return conn

    def history(
        self, channel: str, after: int = 0, limit: int = 1000, *, max_bytes: int = PAGE_BYTES
    ) -> Deferred[list[Event]]:
        """
        Events of C{channel} with offsets above C{after}, oldest first: at
        most C{limit} of them and about C{max_bytes} of event JSON (at least
        one when there is one).
        """
        if limit <= 0:
            return succeed([])
        return self._in_reader(
            self._r_read, self._r_history, channel, _clamp(after), _clamp(limit), 0, max_bytes
        ).addErrback(_unavailable)

    def replay(
        self,
        pattern: str | Sequence[str],
        since: Mapping[str, int],
        limit: int = 1000,
        *,
        after_seq: int = 0,
        max_bytes: int = PAGE_BYTES,
    ) -> Deferred[list[Event]]:
        """
        Events of every channel matching C{pattern} (or any of several
        patterns) with offsets above C{since.get(channel, 0)} and seqs above
        C{after_seq}, in seq order: at most C{limit} of them and about
        C{max_bytes} of event JSON (at least one when there is one).  Page
        with C{after_seq = page[-1].seq} until a page is empty.

        C{since} is read in the reader thread (its C{get} may give a floor
        for channels it does not name): do not change it until this fires.
        """
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        if limit <= 0 or not patterns:
            return succeed([])
        return self._in_reader(
            self._r_read, self._r_replay, patterns, since, _clamp(limit), _clamp(after_seq), max_bytes
        ).addErrback(_unavailable)

    def _r_read(self, f: Callable[..., list[Event]], *args: Any) -> list[Event]:
        """Run a read in one snapshot (a read transaction), so its queries agree with each other."""
        conn = self._r_conn()
        if self._memory:  # one connection, one thread: nothing commits meanwhile
            return f(conn, *args)
        conn.execute("BEGIN")
        try:
            return f(conn, *args)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _r_history(
        self, conn: sqlite3.Connection, channel: str, after: int, limit: int, after_seq: int, max_bytes: int
    ) -> list[Event]:
        cur = conn.execute(
            f'SELECT {_COLUMNS} FROM events WHERE channel = ? AND "offset" > ? AND rowid > ?'
            ' ORDER BY "offset" LIMIT ?',
            (channel, after, after_seq, limit),
        )
        try:
            return _page(cur, max_bytes)
        finally:
            cur.close()

    def _r_replay(
        self,
        conn: sqlite3.Connection,
        patterns: list[str],
        since: Mapping[str, int],
        limit: int,
        after_seq: int,
        max_bytes: int,
    ) -> list[Event]:
        """
        The channels that have something to replay come from the channels
        table (by name range: the part of each pattern before its first
        wildcard), then one query in rowid (= seq) order reads their events.
        """
        where, params = _ranges(patterns, "name")
        wanted: list[tuple[str, int, int]] = []  # channel, offset to read after, last seq (0: unknown)
        for name, last, last_seq in conn.execute(f"SELECT name, last_offset, last_seq FROM channels{where}", params):
            if last_seq and last_seq <= after_seq:
                continue
            after = _clamp(since.get(name, 0))
            if last > after and any(matches(p, name) for p in patterns):
                wanted.append((name, after, last_seq))
        if not wanted:
            return []
        if len(wanted) == 1:
            name, after, _ = wanted[0]
            return self._r_history(conn, name, after, limit, after_seq, max_bytes)
        # Rows past the newest of these channels' last events cannot match.
        end = max(w[2] for w in wanted) if all(w[2] for w in wanted) else _MAX_INT
        if len(wanted) <= _NAMED_MAX:
            return self._r_named(conn, wanted, limit, after_seq, end, max_bytes)
        return self._r_scan(conn, patterns, wanted, limit, after_seq, end, max_bytes)

    def _r_named(
        self,
        conn: sqlite3.Connection,
        wanted: list[tuple[str, int, int]],
        limit: int,
        after_seq: int,
        end: int,
        max_bytes: int,
    ) -> list[Event]:
        """A few channels: every filter in SQL, from the first row any of them needs."""
        firsts: list[tuple[int, str, int]] = []
        for name, after, _ in wanted:
            if not after:
                # from the channel's start: its first row here is past after_seq, and finding it by the
                # (channel, offset) index would walk the channel's whole history (a destination reading
                # a busy journal in pages: each page's cost grew with the journal)
                firsts.append((after_seq + 1, name, after))
                continue
            row = conn.execute(
                'SELECT rowid FROM events WHERE channel = ? AND "offset" > ? AND rowid > ? ORDER BY "offset" LIMIT 1',
                (name, after, after_seq),
            ).fetchone()
            if row is not None:
                firsts.append((row[0], name, after))
        if not firsts:
            return []
        start = min(f[0] for f in firsts) - 1
        names = ", ".join("?" * len(firsts))
        cases = " ".join(["WHEN ? THEN ?"] * len(firsts))
        # "+channel": never the (channel, offset) index, whose order would need a sort.
        cur = conn.execute(
            f"SELECT {_COLUMNS} FROM events WHERE rowid > ? AND rowid <= ? AND +channel IN ({names})"
            f' AND "offset" > CASE channel {cases} END ORDER BY rowid LIMIT ?',
            [start, end, *(f[1] for f in firsts), *(v for f in firsts for v in (f[1], f[2])), limit],
        )
        try:
            return _page(cur, max_bytes)
        finally:
            cur.close()

    def _r_scan(
        self,
        conn: sqlite3.Connection,
        patterns: list[str],
        wanted: list[tuple[str, int, int]],
        limit: int,
        after_seq: int,
        end: int,
        max_bytes: int,
    ) -> list[Event]:
        """
        Many channels: scan (seq, channel, offset) in seq order within the
        patterns' name ranges, and read a whole row only for the events
        that are replayed.
        """
        after_of = {name: after for name, after, _ in wanted}
        where, params = _ranges(patterns, "+channel")
        where = where.replace(" WHERE ", " AND (", 1) + ")" if where else ""
        cur = conn.execute(
            f'SELECT rowid, channel, "offset" FROM events WHERE rowid > ? AND rowid <= ?{where} ORDER BY rowid',
            [after_seq, end, *params],
        )
        whole = f"SELECT {_COLUMNS} FROM events WHERE rowid = ?"
        out: list[Event] = []
        size = 0
        try:
            for rowid, channel, offset in cur:
                after = after_of.get(channel)
                if after is None or offset <= after:
                    continue
                row = conn.execute(whole, (rowid,)).fetchone()
                size += _row_size(row)
                if out and size > max_bytes:
                    break
                out.append(_row_event(row))
                if len(out) >= limit or size >= max_bytes:
                    break
        finally:
            cur.close()
        return out

    def first_offset(self, channel: str) -> Deferred[int]:
        """The oldest offset still kept for C{channel} (0 when none)."""

        def q() -> int:
            row = self._r_conn().execute(
                'SELECT MIN("offset") FROM events WHERE channel = ?', (channel,)
            ).fetchone()
            return int(row[0] or 0)

        return self._in_reader(q).addErrback(_unavailable)


_MAX_INT = 2**63 - 1  # SQLite's INTEGER
#: up to this many channels to replay, every filter is in the one SQL query
_NAMED_MAX = 200


_quote = json.encoder.encode_basestring_ascii


def _headers_json(headers: dict[str, str]) -> str:
    """C{json.dumps} of a str-to-str dict, in one C call per string (this runs once per webhook)."""
    return "{" + ",".join([_quote(k) + ":" + _quote(v) for k, v in headers.items()]) + "}"


def _text(draft: Draft) -> str:
    """What events.data stores for C{draft}: '' when that is its raw body, else its JSON."""
    text = draft.text
    if text is None:
        return dumps(draft.data).decode("utf-8")
    if draft.raw is not None and text.encode("utf-8") == draft.raw:
        return ""
    return text


def _page(rows: Iterable[Sequence[Any]], max_bytes: int) -> list[Event]:
    """
    Events from C{rows} until about C{max_bytes} of them (at least one):
    the cursor is stepped no further, so the rest is never read.
    """
    out: list[Event] = []
    size = 0
    for row in rows:
        size += _row_size(row)
        if out and size > max_bytes:
            break
        out.append(_row_event(row))
        if size >= max_bytes:
            break
    return out


def pattern_prefix(pattern: str) -> str | None:
    """
    What every channel C{pattern} matches starts with: its segments before
    the first wildcard and a C{.} (C{""}: it starts with a wildcard;
    C{None}: it is one exact name).
    """
    if not is_wildcard(pattern):
        return None
    head: list[str] = []
    for segment in pattern.split("."):
        if segment in ("*", ">"):
            break
        head.append(segment)
    return ".".join(head) + "." if head else ""


def _ranges(patterns: Sequence[str], column: str) -> tuple[str, list[str]]:
    """
    A C{WHERE} clause keeping the names C{patterns} may match: one name per
    exact pattern, one name range per wildcard's prefix (C{"gh."} to
    C{"gh/"}: C{/} follows C{.}); none when a pattern starts with a wildcard.
    """
    terms: list[str] = []
    params: list[str] = []
    for pattern in dict.fromkeys(patterns):
        prefix = pattern_prefix(pattern)
        if prefix is None:
            terms.append(f"{column} = ?")
            params.append(pattern)
        elif not prefix:
            return "", []
        else:
            terms.append(f"({column} >= ? AND {column} < ?)")
            params += [prefix, prefix[:-1] + "/"]
    return " WHERE " + " OR ".join(terms), params


def _delete_older(conn: sqlite3.Connection, table: str, cutoff: float) -> int:
    """
    Delete the rows of C{table} older than C{cutoff}, oldest first: rows are
    appended in time order, so everything before the first row at or after
    the cutoff goes.  Finding it reads only the rows being deleted (there is
    no index on ts).  If the clock stepped back, a few rows may outlive the
    retention until the rows before them expire.
    """
    first = conn.execute(f"SELECT rowid FROM {table} WHERE ts >= ? ORDER BY rowid LIMIT 1", (cutoff,)).fetchone()
    if first is None:
        return conn.execute(f"DELETE FROM {table}").rowcount
    return conn.execute(f"DELETE FROM {table} WHERE rowid < ?", (first[0],)).rowcount


#: rows per multi-row INSERT (64 x 10 columns stays under SQLite's old 999-variable limit)
_ROWS_PER_INSERT = 64


def _insert(conn: sqlite3.Connection, head: str, rows: list[tuple[Any, ...]], tail: str = "") -> None:
    """
    Insert C{rows} with multi-row C{VALUES} statements.  C{executemany} steps
    the statement once per row, releasing and re-taking the GIL each time;
    with the reactor busy on the same core, every re-take waited for a
    switch interval.  One statement per 64 rows takes the GIL a few times
    per commit instead.
    """
    if not rows:
        return
    width = len(rows[0])
    one = "(" + ", ".join("?" * width) + ")"
    for i in range(0, len(rows), _ROWS_PER_INSERT):
        part = rows[i : i + _ROWS_PER_INSERT]
        conn.execute(head + ", ".join([one] * len(part)) + tail, [v for row in part for v in row])


def _clamp(n: int) -> int:
    """An offset or limit as SQLite can bind it (clients may send any integer)."""
    return max(-_MAX_INT, min(n, _MAX_INT))


def _fail(e: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(e)
    return d


def _unavailable(f: Failure) -> Failure:
    if f.check(JournalUnavailable):
        return f
    return Failure(JournalUnavailable(f"journal read failed: {f.getErrorMessage()}"))

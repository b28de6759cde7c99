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
  - Delivery ids are unique per source (table C{deliveries}, kept for
    C{retention_seconds}); a repeated id answers the original event.
  - Reads (history, resume) use their own thread and connection, so a long
    replay never delays a commit.
  - A failed commit fails every append of its batch with L{JournalUnavailable},
    marks the journal unhealthy (C{/readyz} answers 503) and drops the
    connection; the next batch reopens it, and health returns when a commit
    succeeds again.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twisted_rt.event import Accepted, Draft, Event, dumps, new_id, now_iso
from twisted_rt.matcher import matches

__all__ = ["Journal", "JournalUnavailable", "UnencodableEvent"]

# events.data is the event's data as JSON text, or '' (never valid JSON) when
# it is the raw body itself (a webhook's UTF-8 JSON body): then the bytes are
# stored once, in events.raw.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
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
    last_offset INTEGER NOT NULL
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

_COLUMNS = 'id, channel, "offset", time, source, type, data, raw, headers'
#: delivery ids looked up per query (SQLite's variable limit is 32766 since 3.32, 999 before)
_IN_CHUNK = 500


class JournalUnavailable(Exception):
    """The journal cannot take or give events right now."""


class UnencodableEvent(ValueError):
    """An event whose data cannot be written as JSON (refused alone, before its batch)."""


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
    )


class Journal:
    """
    An SQLite journal used from thread pools.

    @ivar last_offsets: each channel's last committed offset, as seen from
        the reactor thread (updated when a commit's Deferred fires).
    @ivar healthy: C{False} after a failed open or commit, until a commit
        succeeds again.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: str,
        max_events_per_channel: int = 10000,
        retention_seconds: float = 604800,
        max_batch: int = 1000,
        trim_interval_seconds: float = 60.0,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self.max_events_per_channel = max_events_per_channel
        self.retention_seconds = retention_seconds
        self.max_batch = max_batch
        self.trim_interval_seconds = trim_interval_seconds
        self._on_commit = on_commit
        self._memory = path == ":memory:"
        self._wpool = ThreadPool(minthreads=1, maxthreads=1, name="rt-journal-writer")
        self._rpool = (
            self._wpool
            if self._memory
            else ThreadPool(minthreads=1, maxthreads=2, name="rt-journal-reader")
        )
        self._conn: sqlite3.Connection | None = None  # writer thread only
        self._wlast: dict[str, int] = {}  # writer thread only
        self._local = threading.local()
        self._pending: list[tuple[tuple[Sequence[Draft], list[str]], Deferred[list[Accepted]]]] = []
        self._writing = False
        self._flushed: list[Deferred[None]] = []
        self._closed = False
        self._trimmer: LoopingCall | None = None
        self.last_offsets: dict[str, int] = {}
        self.healthy = False
        self.error: str | None = "not opened"
        self.commits = 0

    # -- lifecycle (reactor thread) --------------------------------------

    def open(self) -> Deferred[None]:
        """
        Start the threads and open the database.  The Deferred fires either
        way; on failure the journal stays unhealthy and retries per batch.
        """
        self._wpool.start()
        if self._rpool is not self._wpool:
            self._rpool.start()
        self._trimmer = LoopingCall(self.trim)
        self._trimmer.clock = self._reactor
        self._trimmer.start(self.trim_interval_seconds, now=False).addErrback(
            lambda f: self.log.failure("journal trimmer stopped", f)
        )
        d = self._in_writer(self._w_open)

        def opened(last: dict[str, int]) -> None:
            self.last_offsets = dict(last)
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
        return deferToThreadPool(self._reactor, self._wpool, f, *args)

    def _in_reader(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._closed:
            return _fail(JournalUnavailable("the journal is closed"))
        return deferToThreadPool(self._reactor, self._rpool, f, *args)

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
        result: tuple[list[list[Accepted]], dict[str, int]],
        batch: list[tuple[tuple[Sequence[Draft], list[str]], Deferred[list[Accepted]]]],
        count: int,
        started: float,
    ) -> None:
        accepted, last = result
        self.last_offsets.update(last)
        self.commits += 1
        self._writing = False
        if not self.healthy:
            self._set_health(None)
        if self._on_commit is not None:
            self._on_commit(count, time.perf_counter() - started)
        for (_, d), acc in zip(batch, accepted, strict=True):
            d.callback(acc)
        self._kick()

    def _append_failed(
        self, f: Failure, batch: list[tuple[tuple[Sequence[Draft], list[str]], Deferred[list[Accepted]]]]
    ) -> None:
        self._writing = False
        self._set_health(f.getErrorMessage())
        for _, d in batch:
            d.errback(JournalUnavailable(f"journal write failed: {f.getErrorMessage()}"))
        self._kick()

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
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _w_open(self) -> dict[str, int]:
        if self._conn is None:
            self._conn = self._w_connect()
            self._wlast = dict(self._conn.execute("SELECT name, last_offset FROM channels").fetchall())
        return dict(self._wlast)

    def _w_close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") if not self._memory else None
            finally:
                self._conn.close()
                self._conn = None

    def _w_append(
        self, requests: list[tuple[Sequence[Draft], list[str]]], now: float
    ) -> tuple[list[list[Accepted]], dict[str, int]]:
        if self._conn is None:
            self._w_open()
        conn = self._conn
        assert conn is not None
        last: dict[str, int] = {}
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
                    if draft.id is not None:
                        key = (draft.source, draft.id)
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
                    )
                    ev_rows.append(
                        (
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
                    dl_rows.append((draft.source, eid, channel, offset, now))
                    seen[(draft.source, eid)] = event
                    acc.append(Accepted(event))
                out.append(acc)
            _insert(
                conn,
                'INSERT INTO events (channel, "offset", id, source, type, time, ts, data, raw, headers) VALUES ',
                ev_rows,
            )
            _insert(conn, 'INSERT INTO deliveries (source, id, channel, "offset", ts) VALUES ', dl_rows)
            _insert(
                conn,
                "INSERT INTO channels (name, last_offset) VALUES ",
                list(last.items()),
                " ON CONFLICT (name) DO UPDATE SET last_offset = excluded.last_offset",
            )
            conn.execute("COMMIT")
        except BaseException:
            self._w_abort()
            raise
        self._wlast.update(last)
        return out, last

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
        """The delivery ids of this batch already journaled: one query per source, not per event."""
        wanted: dict[str, list[str]] = {}
        for drafts, _ in requests:
            for draft in drafts:
                if draft.id is not None:
                    wanted.setdefault(draft.source, []).append(draft.id)
        known: dict[tuple[str, str], tuple[str, int]] = {}
        for source, ids in wanted.items():
            for i in range(0, len(ids), _IN_CHUNK):
                part = ids[i : i + _IN_CHUNK]
                rows = conn.execute(
                    'SELECT id, channel, "offset" FROM deliveries WHERE source = ? AND id IN'
                    f" ({', '.join('?' * len(part))})",
                    (source, *part),
                )
                for eid, channel, offset in rows:
                    known[(source, eid)] = (channel, offset)
        return known

    def _w_delivery(self, conn: sqlite3.Connection, source: str, eid: str, row: tuple[str, int]) -> Event:
        full = conn.execute(
            f'SELECT {_COLUMNS} FROM events WHERE channel = ? AND "offset" = ?', row
        ).fetchone()
        if full is not None:
            return _row_event(full)
        return Event(id=eid, channel=row[0], offset=row[1], time="", source=source, type="", data=None)

    # -- trimming ----------------------------------------------------------

    def trim(self) -> Deferred[int]:
        """Delete events past C{max_events_per_channel} or C{retention_seconds}."""
        if self._closed:
            return succeed(0)
        d = self._in_writer(self._w_trim, time.time() - self.retention_seconds)

        def failed(f: Failure) -> int:
            self.log.warn("journal trim failed: {e}", e=f.getErrorMessage())
            return 0

        return d.addErrback(failed)

    def _w_trim(self, cutoff: float) -> int:
        if self._conn is None:
            self._w_open()
        conn = self._conn
        assert conn is not None
        deleted = 0
        keep = self.max_events_per_channel
        try:
            conn.execute("BEGIN IMMEDIATE")
            for channel, last in self._wlast.items():
                if last > keep:
                    cur = conn.execute(
                        'DELETE FROM events WHERE channel = ? AND "offset" <= ?', (channel, last - keep)
                    )
                    deleted += cur.rowcount
            deleted += _delete_older(conn, "events", cutoff)
            _delete_older(conn, "deliveries", cutoff)
            conn.execute("COMMIT")
        except BaseException:
            self._w_abort()
            raise
        return deleted

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

    def history(self, channel: str, after: int = 0, limit: int = 1000) -> Deferred[list[Event]]:
        """Events of C{channel} with offsets above C{after}, oldest first."""
        return self._in_reader(self._r_history, [(channel, _clamp(after))], _clamp(limit)).addErrback(_unavailable)

    def replay(self, pattern: str, since: dict[str, int], limit: int = 100000) -> Deferred[list[Event]]:
        """
        Events of every channel matching C{pattern} after C{since[channel]}
        (0 for a channel not named), in acceptance order.
        """
        wanted = [(c, _clamp(since.get(c, 0))) for c, last in self.last_offsets.items() if matches(pattern, c) and last > since.get(c, 0)]
        if not wanted:
            return succeed([])
        return self._in_reader(self._r_history, wanted, _clamp(limit)).addErrback(_unavailable)

    def _r_history(self, wanted: list[tuple[str, int]], limit: int) -> list[Event]:
        conn = self._r_conn()
        if len(wanted) == 1:
            channel, after = wanted[0]
            rows = conn.execute(
                f'SELECT {_COLUMNS} FROM events WHERE channel = ? AND "offset" > ?'
                ' ORDER BY "offset" LIMIT ?',
                (channel, after, limit),
            ).fetchall()
            return [_row_event(r) for r in rows]
        keyed: list[tuple[int, Sequence[Any]]] = []
        for channel, after in wanted:
            keyed.extend(
                (r[-1], r[:-1])
                for r in conn.execute(
                    f'SELECT {_COLUMNS}, rowid FROM events WHERE channel = ? AND "offset" > ?'
                    ' ORDER BY "offset" LIMIT ?',
                    (channel, after, limit),
                )
            )
        keyed.sort(key=lambda kr: kr[0])
        return [_row_event(r) for _, r in keyed[:limit]]

    def first_offset(self, channel: str) -> Deferred[int]:
        """The oldest offset still kept for C{channel} (0 when none)."""

        def q() -> int:
            row = self._r_conn().execute(
                'SELECT MIN("offset") FROM events WHERE channel = ?', (channel,)
            ).fetchone()
            return int(row[0] or 0)

        return self._in_reader(q).addErrback(_unavailable)


_MAX_INT = 2**63 - 1  # SQLite's INTEGER


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

"""The SQLite journal: offsets, group commit, dedup, history, trim, reopen, failure, crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from twisted_rt.core.event import Draft, now_iso
from twisted_rt.interfaces import JournalUnavailable
from twisted_rt.store.journal import Journal


async def _journal(path: str, **kw: object) -> Journal:
    j = Journal(reactor, path, **kw)  # type: ignore[arg-type]
    await j.open()
    return j


@pytest_twisted.ensureDeferred
async def test_offsets_start_at_one_and_are_gap_free_per_channel(tmp_path: Path) -> None:
    """Each channel's offsets are 1, 2, 3... independently of other channels."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        out = []
        for i in range(5):
            out += await j.append([Draft("a", {"i": i}), Draft("b", {"i": i})])
        assert [a.event.offset for a in out if a.event.channel == "a"] == [1, 2, 3, 4, 5]
        assert [a.event.offset for a in out if a.event.channel == "b"] == [1, 2, 3, 4, 5]
        assert j.last_offsets == {"a": 5, "b": 5}
        assert all(not a.duplicate for a in out)
        assert all(len(a.event.id) == 32 for a in out)
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    """Many appends queued at once are committed in far fewer transactions (group commit), gap-free."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        results = await defer.gatherResults([j.append([Draft("c", {"i": i})]) for i in range(500)])
        offsets = [r[0].event.offset for r in results]
        assert offsets == list(range(1, 501))
        assert j.commits < 100, j.commits
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_max_batch_bounds_one_transaction(tmp_path: Path) -> None:
    """No commit takes more than max_batch events, and order is kept across batches."""
    sizes: list[int] = []
    j = await _journal(str(tmp_path / "j.db"), max_batch=10, on_commit=lambda n, s: sizes.append(n))
    try:
        results = await defer.gatherResults([j.append([Draft("c", i)]) for i in range(95)])
        assert [r[0].event.offset for r in results] == list(range(1, 96))
        assert max(sizes) <= 10 and sum(sizes) == 95
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_duplicate_ids_answer_the_original(tmp_path: Path) -> None:
    """The same id on the same source is the same event: no second offset, duplicate=True."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        [first] = await j.append([Draft("x", {"n": 1}, source="github", id="d-1")])
        [again, other_source] = await j.append(
            [Draft("x", {"n": 2}, source="github", id="d-1"), Draft("x", {"n": 3}, source="stripe", id="d-1")]
        )
        assert again.duplicate and again.event.offset == first.event.offset == 1
        assert again.event.data == {"n": 1}
        assert not other_source.duplicate and other_source.event.offset == 2
        [a, b] = await j.append([Draft("y", 1, source="s", id="same"), Draft("y", 2, source="s", id="same")])
        assert not a.duplicate and b.duplicate and b.event.offset == a.event.offset == 1
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_duplicates_found_in_large_mixed_batches(tmp_path: Path) -> None:
    """Known ids are found across sources and beyond one lookup query's size, in one transaction."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        await j.append([Draft("m", i, source="a", id=f"id-{i}") for i in range(0, 1200, 2)])
        mixed = [Draft("m", i, source=src, id=f"id-{i}") for i in range(1200) for src in ("a", "b")]
        got = await j.append(mixed)
        dup = {(d.source, d.id) for d, a in zip(mixed, got, strict=True) if a.duplicate}
        assert dup == {("a", f"id-{i}") for i in range(0, 1200, 2)}
        assert all(a.event.data == int(a.event.id[3:]) for a in got)
        assert max(a.event.offset for a in got) == 600 + 1800
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_webhook_body_is_stored_once(tmp_path: Path) -> None:
    """When the event's JSON is its raw body, the bytes are stored once and read back as the same data."""
    j = await _journal(str(tmp_path / "j.db"))
    body = '{"a": [1, 2.5], "b": "\u00e9"}'.encode()
    try:
        await j.append([Draft("w", {"a": [1, 2.5], "b": "\u00e9"}, raw=body, text=body.decode())])
        [e] = await j.history("w")
        assert e.data == {"a": [1, 2.5], "b": "\u00e9"} and e.raw == body
    finally:
        await j.close()
    row = sqlite3.connect(str(tmp_path / "j.db")).execute("SELECT data, raw FROM events").fetchone()
    assert row == ("", body)


@pytest_twisted.ensureDeferred
async def test_history_and_replay(tmp_path: Path) -> None:
    """history reads (channel, after, limit) oldest first; replay spans the channels a pattern matches."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        for i in range(10):
            await j.append([Draft("gh.push", i), Draft("gh.issues", i), Draft("other", i)])
        h = await j.history("gh.push", after=3, limit=4)
        assert [e.offset for e in h] == [4, 5, 6, 7]
        assert [e.data for e in h] == [3, 4, 5, 6]
        assert await j.history("nope") == []
        r = await j.replay("gh.*", {"gh.push": 8})
        assert sorted((e.channel, e.offset) for e in r) == [("gh.issues", i) for i in range(1, 11)] + [
            ("gh.push", 9), ("gh.push", 10)]
        assert (r[-1].channel, r[-1].offset) == ("gh.issues", 10)  # acceptance order across channels
        assert (r[-2].channel, r[-2].offset) == ("gh.push", 10)
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_raw_body_and_headers_are_kept(tmp_path: Path) -> None:
    """The raw bytes and provider headers of an event come back from history unchanged."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        raw = b'{"a": 1,  "b":"\xc3\xa9"}'
        await j.append([Draft("h", {"a": 1}, source="github", type="push", raw=raw, headers={"X-GitHub-Event": "push"})])
        [e] = await j.history("h")
        assert e.raw == raw and e.headers == {"X-GitHub-Event": "push"}
        assert e.source == "github" and e.type == "push"
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_trim_keeps_offsets_and_recent_events(tmp_path: Path) -> None:
    """Trimming by count and age deletes old events, yet offsets continue and are never reused."""
    j = await _journal(str(tmp_path / "j.db"), max_events_per_channel=3)
    try:
        for i in range(10):
            await j.append([Draft("t", i)])
        await j.trim()
        assert [e.offset for e in await j.history("t")] == [8, 9, 10]
        assert await j.first_offset("t") == 8
        [a] = await j.append([Draft("t", 10)])
        assert a.event.offset == 11
        j.retention_seconds = -1  # everything is older than "now + 1s"
        await j.trim()
        assert await j.history("t") == []
        [b] = await j.append([Draft("t", 11)])
        assert b.event.offset == 12
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_age_trim_deletes_oldest_first_and_keeps_newer(tmp_path: Path) -> None:
    """Trimming by age deletes events and delivery ids older than the cutoff, and nothing newer."""
    path = str(tmp_path / "j.db")
    j = await _journal(path, retention_seconds=100)
    try:
        await j.append([Draft("a", i, source="s", id=f"d{i}") for i in range(5)])
        db = sqlite3.connect(path)
        db.execute("UPDATE events SET ts = ts - 1000 WHERE \"offset\" <= 3")
        db.execute("UPDATE deliveries SET ts = ts - 1000 WHERE \"offset\" <= 3")
        db.commit()
        db.close()
        assert await j.trim() == 3
        assert [e.data for e in await j.history("a")] == [3, 4]
        again = await j.append([Draft("a", 0, source="s", id="d0"), Draft("a", 4, source="s", id="d4")])
        assert [a.duplicate for a in again] == [False, True]  # d0's id expired with its event
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_old_ts_indexes_are_dropped_on_open(tmp_path: Path) -> None:
    """A journal file made with the former ts indexes loses them when opened (appends no longer maintain them)."""
    path = str(tmp_path / "j.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (channel TEXT NOT NULL, \"offset\" INTEGER NOT NULL, id TEXT NOT NULL,"
               " source TEXT NOT NULL, type TEXT NOT NULL, time TEXT NOT NULL, ts REAL NOT NULL, data TEXT NOT NULL,"
               " raw BLOB, headers TEXT)")
    db.execute("CREATE INDEX events_ts ON events (ts)")
    db.commit()
    db.close()
    j = await _journal(path)
    try:
        await j.append([Draft("x", 1)])
    finally:
        await j.close()
    names = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "events_ts" not in names and "deliveries_ts" not in names


@pytest_twisted.ensureDeferred
async def test_reopen_continues_offsets_and_dedup(tmp_path: Path) -> None:
    """After close and reopen, offsets continue and known delivery ids are still duplicates."""
    path = str(tmp_path / "j.db")
    j = await _journal(path)
    await j.append([Draft("r", 1, source="s", id="x1"), Draft("r", 2)])
    await j.close()
    j = await _journal(path)
    try:
        [dup, new] = await j.append([Draft("r", 9, source="s", id="x1"), Draft("r", 3)])
        assert dup.duplicate and dup.event.offset == 1
        assert new.event.offset == 3
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_memory_journal(tmp_path: Path) -> None:
    """':memory:' works for appends and reads."""
    j = await _journal(":memory:")
    try:
        await j.append([Draft("m", 1), Draft("m", 2)])
        assert [e.data for e in await j.history("m")] == [1, 2]
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_corrupt_file_fails_appends_cleanly_and_recovers(tmp_path: Path) -> None:
    """A journal file that is not a database: unhealthy, appends fail with JournalUnavailable; healthy again once fixed."""
    path = tmp_path / "j.db"
    path.write_bytes(b"this is not an sqlite database" * 200)
    j = await _journal(str(path))
    try:
        assert not j.healthy and j.error
        with pytest.raises(JournalUnavailable):
            await j.append([Draft("c", 1)])
        assert not j.healthy
        path.unlink()
        [a] = await j.append([Draft("c", 1)])
        assert a.event.offset == 1 and j.healthy
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_failed_commit_fails_the_batch_and_assigns_no_offset(tmp_path: Path) -> None:
    """A commit that fails (an unwritable database, simulated with query_only) fails all its appends; no offset is used up."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        await j.append([Draft("f", "x")])

        def shrink() -> None:
            assert j._conn is not None
            j._conn.execute("PRAGMA query_only = 1")

        await j._in_writer(shrink)
        health: list[bool] = []
        failed = j.append([Draft("f", "lost")])
        failed.addErrback(lambda f: health.append(j.healthy) or f)
        queued = [j.append([Draft("f", i)]) for i in range(2)]
        with pytest.raises(JournalUnavailable):
            await failed
        assert health == [False]
        # the failed connection was dropped; the queued batch reconnects and commits
        assert [(await d)[0].event.offset for d in queued] == [2, 3]
        assert j.healthy
        assert [e.data for e in await j.history("f")] == ["x", 0, 1]
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_closed_journal_refuses(tmp_path: Path) -> None:
    """After close, appends and reads fail with JournalUnavailable instead of hanging."""
    j = await _journal(str(tmp_path / "j.db"))
    await j.close()
    with pytest.raises(JournalUnavailable):
        await j.append([Draft("c", 1)])
    with pytest.raises(JournalUnavailable):
        await j.history("c")


WRITER = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor, defer
    from twisted_rt.store.journal import Journal
    from twisted_rt.core.event import Draft

    j = Journal(reactor, sys.argv[1])

    async def main():
        await j.open()
        n = 0
        while True:
            batch = [j.append([Draft("crash", {"n": n + i}, source="w", id=f"id-{n + i}")]) for i in range(20)]
            for d in batch:
                [a] = await d
                sys.stdout.write(f"{a.event.offset} {a.event.id}\\n")
                sys.stdout.flush()
            n += 20

    defer.ensureDeferred(main()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.run()
    """
)


def test_kill_9_loses_no_acknowledged_event(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-stream: every event it saw acknowledged is in the journal, gap-free."""
    path = tmp_path / "crash.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    acked: list[tuple[int, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        off, eid = line.split()
        acked.append((int(off), eid))
        if len(acked) >= 3000:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read()
    for line in rest.splitlines():
        if line.strip():
            off, eid = line.split()
            acked.append((int(off), eid))
    db = sqlite3.connect(str(path))
    rows = db.execute('SELECT "offset", id FROM events WHERE channel = ? ORDER BY "offset"', ("crash",)).fetchall()
    last = db.execute("SELECT last_offset FROM channels WHERE name = 'crash'").fetchone()[0]
    db.close()
    stored = dict(rows)
    for off, eid in acked:
        assert stored.get(off) == eid
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert last == len(rows) >= len(acked)


def test_now_iso_format() -> None:
    """Event times are RFC 3339 UTC with milliseconds."""
    assert now_iso(0) == "1970-01-01T00:00:00.000Z"
    assert now_iso(1.5) == "1970-01-01T00:00:01.500Z"


@pytest_twisted.ensureDeferred
async def test_unencodable_event_fails_alone(tmp_path: Path) -> None:
    """An event whose data cannot be JSON-encoded is refused by itself; the appends queued with it commit."""
    from twisted_rt.interfaces import UnencodableEvent

    j = await _journal(str(tmp_path / "j.db"))
    try:
        good = [j.append([Draft("u", i)]) for i in range(3)]
        with pytest.raises(UnencodableEvent):
            await j.append([Draft("u", "\ud800")])
        with pytest.raises(UnencodableEvent):
            await j.append([Draft("u", {1, 2})])
        assert [(await d)[0].event.offset for d in good] == [1, 2, 3]
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_pre_encoded_text_is_stored_as_given(tmp_path: Path) -> None:
    """A draft's own JSON text (a webhook body) is what the journal stores, and reads back as the same data."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        text = '{ "a" : [1, 2.5],\n  "b": "\u00e9" }'
        await j.append([Draft("t", {"a": [1, 2.5], "b": "\u00e9"}, text=text), Draft("t", {"c": 1})])
        first, second = await j.history("t")
        assert first.data == {"a": [1, 2.5], "b": "\u00e9"} and second.data == {"c": 1}
    finally:
        await j.close()
    rows = sqlite3.connect(str(tmp_path / "j.db")).execute('SELECT data FROM events ORDER BY "offset"').fetchall()
    assert rows == [(text,), ('{"c":1}',)]


def test_strict_json_loads() -> None:
    """event.loads refuses what cannot be written back: NaN, 1e999, lone surrogates, deep nesting."""
    from twisted_rt.core.event import loads

    assert loads(b'{"a":[1,2.5,"\\ud83d\\ude00"]}') == {"a": [1, 2.5, "\U0001f600"]}
    assert loads(b"\xef\xbb\xbf[1]") == [1]  # a UTF-8 BOM, as json.loads takes it
    assert loads('{"x": "y"}'.encode("utf-16")) == {"x": "y"}
    for bad in (b"NaN", b"[Infinity]", b"[1e999]", b'"\\ud800"', b'"\\uDFFF"', b"[" * 100000, b"{", "\ufeff[1]"):
        with pytest.raises(ValueError):
            loads(bad)


@pytest_twisted.ensureDeferred
async def test_huge_offsets_read_as_nothing_newer(tmp_path: Path) -> None:
    """A client's since beyond SQLite's integer range reads as 'nothing newer', not as a journal failure."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        await j.append([Draft("h", 1)])
        assert await j.history("h", after=10**30, limit=10**30) == []
        assert await j.replay("h", {"h": 10**30}) == []
        assert [e.offset for e in await j.history("h", after=-(10**30))] == [1]
    finally:
        await j.close()


# -- 0.2: seq, scoped idempotency, bounded pages, replay by seq, reopen state ---------------


class _Floored(dict[str, int]):
    """A since-map whose unnamed channels read as a floor (as the subscriber's)."""

    def __init__(self, base: dict[str, int], floor: int) -> None:
        super().__init__(base)
        self.floor = floor

    def get(self, key: str, default: object = None) -> int:  # type: ignore[override]
        return super().get(key, self.floor)


async def _pages(j: Journal, patterns: object, since: object, limit: int, max_bytes: int = 4 << 20) -> list[list[object]]:
    """Every page of a replay, paged by after_seq until an empty page."""
    pages: list[list[object]] = []
    after = 0
    while True:
        page = await j.replay(patterns, since, limit, after_seq=after, max_bytes=max_bytes)  # type: ignore[arg-type]
        if not page:
            return pages
        pages.append(page)  # type: ignore[arg-type]
        after = page[-1].seq
        assert len(pages) < 10000


@pytest_twisted.ensureDeferred
async def test_seq_is_one_global_order_never_reused_after_trim_and_reopen(tmp_path: Path) -> None:
    """Every event gets the next journal-wide seq (= its rowid); trimming all rows and reopening never reuses one."""
    path = str(tmp_path / "j.db")
    j = await _journal(path)
    try:
        assert j.seq == 0
        out = []
        for i in range(3):
            out += await j.append([Draft("a", i), Draft("b", i)])
        assert [a.event.seq for a in out] == list(range(1, 7))
        assert j.seq == 6
        assert [(e.channel, e.seq) for e in await j.history("b")] == [("b", 2), ("b", 4), ("b", 6)]
        [dup] = await j.append([Draft("a", 9, source="s", id="k")])
        [again] = await j.append([Draft("a", 9, source="s", id="k")])
        assert again.duplicate and again.event.seq == dup.event.seq == 7
        j.retention_seconds = -1
        await j.trim()
        assert await j.history("a") == []
    finally:
        await j.close()
    rows = sqlite3.connect(path).execute("SELECT rowid FROM events").fetchall()
    assert rows == []
    j = await _journal(path)
    try:
        assert j.seq == 7 and j.last_offsets == {"a": 4, "b": 3}
        [a] = await j.append([Draft("b", "after")])
        assert (a.event.offset, a.event.seq) == (4, 8)
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_file_from_before_seq_keeps_working(tmp_path: Path) -> None:
    """A 0.1 journal (implicit rowid, no last_seq) opens: its rows read with their rowid as seq, new seqs follow."""
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE events (channel TEXT NOT NULL, "offset" INTEGER NOT NULL, id TEXT NOT NULL,
            source TEXT NOT NULL, type TEXT NOT NULL, time TEXT NOT NULL, ts REAL NOT NULL,
            data TEXT NOT NULL, raw BLOB, headers TEXT);
        CREATE UNIQUE INDEX events_channel_offset ON events (channel, "offset");
        CREATE TABLE channels (name TEXT PRIMARY KEY, last_offset INTEGER NOT NULL);
        CREATE TABLE deliveries (source TEXT NOT NULL, id TEXT NOT NULL, channel TEXT NOT NULL,
            "offset" INTEGER NOT NULL, ts REAL NOT NULL, PRIMARY KEY (source, id));
        """
    )
    for i in range(1, 4):
        db.execute("INSERT INTO events VALUES ('old.x', ?, ?, 'api', '', 't', 1e12, ?, NULL, NULL)", (i, f"e{i}", str(i)))
    db.execute("INSERT INTO channels VALUES ('old.x', 3)")
    db.commit()
    db.close()
    j = await _journal(path)
    try:
        assert j.seq == 3 and j.last_offsets == {"old.x": 3}
        [a] = await j.append([Draft("old.y", "new")])
        assert a.event.seq == 4
        got = await j.replay("old.*", {})
        assert [(e.channel, e.offset, e.seq) for e in got] == [
            ("old.x", 1, 1), ("old.x", 2, 2), ("old.x", 3, 3), ("old.y", 1, 4)]
        assert [e.seq for e in await j.replay("old.*", {}, after_seq=2)] == [3, 4]
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_idempotency_is_scoped_per_publisher(tmp_path: Path) -> None:
    """The same id is one event within a scope (whatever the source), another event in another scope."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        [a] = await j.append([Draft("t.a", 1, source="api", id="X", scope="pub:sub:alice")])
        [b] = await j.append([Draft("t.b", 2, source="api", id="X", scope="pub:sub:bob")])
        [ws] = await j.append([Draft("t.c", 3, source="ws", id="X", scope="pub:sub:alice")])
        [hook] = await j.append([Draft("t.d", 4, source="github", id="X")])
        [hook2] = await j.append([Draft("t.e", 5, source="github", id="X", scope=None)])
        assert not a.duplicate and not b.duplicate and not hook.duplicate
        assert (b.event.channel, b.event.offset) == ("t.b", 1)
        assert ws.duplicate and (ws.event.channel, ws.event.data) == ("t.a", 1)
        assert hook2.duplicate and hook2.event.channel == "t.d"
        # one batch mixing scopes: the in-batch duplicate is found per scope too
        got = await j.append([Draft("t.f", 6, id="Y", scope="s1"), Draft("t.f", 7, id="Y", scope="s2"),
                              Draft("t.f", 8, id="Y", scope="s1")])
        assert [x.duplicate for x in got] == [False, False, True]
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_replay_by_seq_over_several_patterns_pages_every_event_once(tmp_path: Path) -> None:
    """Replay of several patterns (a few and many channels) is in seq order; paging by after_seq gives each event once."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        for i in range(30):
            await j.append([Draft(f"gh.r{i % 3}", i), Draft(f"bill.x.{i % 2}", i), Draft("solo", i),
                            Draft("other.z", i), Draft("gh.deep.no", i)])
        for n in range(260):  # past the named-channel limit: the scan path
            await j.append([Draft(f"many.c{n}", n)])
        since = {"gh.r0": 5, "solo": 28}
        expected = [
            (e.channel, e.offset)
            for e in await j.replay(["gh.*", "bill.>", "solo", "many.*"], since, 100000)
        ]
        assert len(expected) == 3 * 10 - 5 + 30 + 2 + 260
        for limit, max_bytes in ((7, 1 << 20), (1000, 300), (50, 5000)):
            pages = await _pages(j, ["gh.*", "bill.>", "solo", "many.*"], since, limit, max_bytes)
            flat = [e for p in pages for e in p]  # type: ignore[attr-defined]
            assert [(e.channel, e.offset) for e in flat] == expected  # type: ignore[attr-defined]
            seqs = [e.seq for e in flat]  # type: ignore[attr-defined]
            assert seqs == sorted(set(seqs))
            assert all(len(p) <= limit for p in pages)
        # a floor for channels the mapping does not name
        got = await j.replay("gh.*", _Floored({"gh.r1": 0}, 9), 1000)
        assert {(e.channel, e.offset) for e in got} == (
            {("gh.r1", o) for o in range(1, 11)} | {(c, 10) for c in ("gh.r0", "gh.r2")})
        assert await j.replay(["nope.*", "none"], {}, 10) == []
        assert [(e.channel, e.offset) for e in await j.replay("*.c1", {}, 10)] == [("many.c1", 1)]
        assert len(await j.replay(">", {}, 10)) == 10
        assert await j.replay("gh.*", {}, 0) == []
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_pages_are_bounded_by_bytes_and_hold_at_least_one_event(tmp_path: Path) -> None:
    """History and replay pages stop at about max_bytes of event JSON; an event bigger than that still comes alone."""
    j = await _journal(str(tmp_path / "j.db"))
    big = "x" * 100_000
    try:
        for i in range(40):
            await j.append([Draft("big.a", {"i": i, "s": big}), Draft("big.b", {"i": i, "s": big})])
        h = await j.history("big.a", 0, 1000, max_bytes=1_000_000)
        assert 8 <= len(h) <= 10 and [e.offset for e in h] == list(range(1, len(h) + 1))
        assert len(await j.history("big.a", 0, 1000, max_bytes=10)) == 1
        assert len(await j.history("big.a", 0, 1000)) == 40  # 4 MiB default
        r = await j.replay("big.*", {}, 1000, max_bytes=1_000_000)
        assert 8 <= len(r) <= 10
        pages = await _pages(j, "big.*", {}, 1000, 10)
        assert [len(p) for p in pages] == [1] * 80
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_wildcard_replay_is_one_events_query_and_ignores_reactor_state(tmp_path: Path) -> None:
    """A wildcard page reads the events in one query in rowid order (a LIMIT-1 probe only per channel with a since offset)."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        for i in range(20):
            await j.append([Draft(f"w.c{n}", i) for n in range(40)])
        statements: list[str] = []
        real = j._r_conn

        def traced() -> sqlite3.Connection:
            conn = real()
            conn.set_trace_callback(statements.append)
            return conn

        j._r_conn = traced  # type: ignore[method-assign]
        j.last_offsets = {}  # the reactor-side map plays no part in a replay
        page = await j.replay("w.*", {}, 1000)
        assert len(page) == 800 and [e.seq for e in page] == list(range(1, 801))
        probes = [s for s in statements if s.startswith("SELECT rowid FROM events WHERE channel =")]
        reads = [s for s in statements if "FROM events" in s and s not in probes]
        assert len(reads) == 1 and reads[0].endswith("ORDER BY rowid LIMIT 1000")
        assert probes == []  # from each channel's start (a destination's pages): no walk of its history
        statements.clear()
        page = await j.replay("w.*", {f"w.c{n}": 10 for n in range(40)}, 1000)
        assert len(page) == 400 and all(e.offset > 10 for e in page)
        probes = [s for s in statements if s.startswith("SELECT rowid FROM events WHERE channel =")]
        reads = [s for s in statements if "FROM events" in s and s not in probes]
        assert len(reads) == 1 and reads[0].endswith("ORDER BY rowid LIMIT 1000")
        assert len(probes) == 40 and all(s.endswith(' ORDER BY "offset" LIMIT 1') for s in probes)
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_state_after_a_failed_open_is_what_a_healthy_open_loads(tmp_path: Path) -> None:
    """Journal unusable at start, then fixed: the first commit brings every old channel's offset and the seq counter."""
    home = tmp_path / "var"
    path = str(home / "j.db")
    j = await _journal(path)
    for i in range(3):
        await j.append([Draft("old.a", i), Draft("old.b", i)])
    healthy_last, healthy_seq = dict(j.last_offsets), j.seq
    await j.close()
    home.rename(tmp_path / "var.away")
    home.write_text("not a directory")  # the journal's directory cannot be made
    j = await _journal(path)
    try:
        assert not j.healthy and j.last_offsets == {} and j.seq == 0
        with pytest.raises(JournalUnavailable):
            await j.append([Draft("new", 1)])
        home.unlink()
        (tmp_path / "var.away").rename(home)
        [a] = await j.append([Draft("new", 1)])
        assert j.healthy
        assert a.event.seq == healthy_seq + 1
        assert j.last_offsets == {**healthy_last, "new": 1} and j.seq == healthy_seq + 1
        [b] = await j.append([Draft("old.a", 3)])
        assert b.event.offset == 4
        assert [e.offset for e in await j.replay("old.*", {"old.a": 3})] == [1, 2, 3, 4]
    finally:
        await j.close()


@pytest_twisted.ensureDeferred
async def test_reopen_after_a_dropped_connection_reloads_the_reactor_state(tmp_path: Path) -> None:
    """A connection dropped after a failed commit reopens with the state it loads handed to the reactor thread."""
    j = await _journal(str(tmp_path / "j.db"))
    try:
        await j.append([Draft("r.a", 1), Draft("r.b", 1)])

        def shrink() -> None:
            assert j._conn is not None
            j._conn.execute("PRAGMA query_only = 1")

        await j._in_writer(shrink)
        with pytest.raises(JournalUnavailable):
            await j.append([Draft("r.a", 2)])
        j.last_offsets = {"stale": 99}  # whatever the reactor side held is replaced by what the reopen loaded
        await j.trim()
        assert j.last_offsets == {"r.a": 1, "r.b": 1} and j.seq == 2
    finally:
        await j.close()


def test_generated_ids_are_uuid7_in_time_order() -> None:
    """A generated id is a UUID version 7 whose first 48 bits are the time in ms: later ids sort after earlier ones."""
    import time as _t
    import uuid

    from twisted_rt.core.event import new_id

    before = _t.time_ns() // 1_000_000
    first = new_id()
    _t.sleep(0.002)
    later = [new_id() for _ in range(2000)]
    after = _t.time_ns() // 1_000_000
    for eid in (first, *later[:50]):
        u = uuid.UUID(eid)
        assert len(eid) == 32 and eid == u.hex
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert before <= int(eid[:12], 16) <= after
    assert all(first < eid for eid in later)
    assert len(set(later)) == len(later)


def test_a_commit_of_generated_ids_appends_to_the_idempotency_index(tmp_path: Path) -> None:
    """25 events with generated ids, after 5,000 others, write a few pages to the WAL, not one deliveries-index leaf per event."""
    from twisted_rt.store import journal as journal_module

    path = tmp_path / "j.db"
    j = Journal(reactor, str(path))  # type: ignore[arg-type]
    j._w_open()
    try:

        def commit() -> None:
            drafts = [Draft("c", {"n": i}) for i in range(25)]
            j._w_append([(drafts, [journal_module._text(d) for d in drafts])], 1.0)

        for _ in range(200):
            commit()
        wal = Path(f"{path}-wal")
        frames: list[int] = []
        for _ in range(10):
            size = wal.stat().st_size
            commit()
            frames.append((wal.stat().st_size - size) // (4096 + 24))
        # random (uuid4) ids: ~30 frames per commit, one per index leaf; appended: ~12
        assert max(frames) <= 16, frames
    finally:
        j._w_close()

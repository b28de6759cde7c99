"""
The publish and history API attacked over real HTTP, as a second tenant and
as an anonymous client (issue 13): other tenants' idempotency keys, history
of large events requested concurrently (the daemon's RSS measured), junk in
every integer parameter, oversized batches, ids, types and channels at and
over every limit, and the daemon still answering /healthz afterwards.
"""

from __future__ import annotations

import json
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import jwt
import psutil
import pytest
import websocket
from conftest import API_KEY, DEFAULT_CONFIG, JWT_SECRET, Daemon, http, http_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_OFFSET = 2**63 - 1


def token(sub: str, **rights: Any) -> str:
    """An HS256 JWT of the test daemon."""
    return jwt.encode({"sub": sub, "exp": time.time() + 600, **rights}, JWT_SECRET, algorithm="HS256")


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


@pytest.fixture(scope="module")
def daemon_m(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests of this module that use their own channels."""
    d = Daemon(tmp_path_factory.mktemp("abuse-api"), textwrap.dedent(DEFAULT_CONFIG))
    d.start()
    yield d
    d.stop()


def publish(d: Daemon, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return http_json("POST", d.url + "/api/publish", body, AUTH if headers is None else headers)


def is_error(status: int, body: Any, expected: int, code: str) -> None:
    assert status == expected, body
    assert isinstance(body, dict) and set(body) == {"error", "message"} and body["error"] == code, body


def healthy(d: Daemon) -> None:
    status, body = http_json("GET", d.url + "/healthz", timeout=5)
    assert status == 200, body


# -- another tenant's idempotency keys (defects 5 and 17) -------------------


def test_another_tenants_id_is_a_new_event_and_reveals_nothing(daemon_m: Daemon) -> None:
    """Tenant B publishing tenant A's id gets its own event (202, its channel, offset 1), never A's receipt."""
    alice = bearer(token("alice", publish=["t5.>"], subscribe=["t5.alice"]))
    bob = bearer(token("bob", publish=["t5.>"], subscribe=["t5.bob"]))
    status, a = publish(daemon_m, {"channel": "t5.alice", "data": "secret", "id": "order-1"}, alice)
    assert status == 202 and (a["channel"], a["offset"]) == ("t5.alice", 1), a
    status, b = publish(daemon_m, {"channel": "t5.bob", "data": "mine", "id": "order-1"}, bob)
    assert status == 202 and b == {"id": "order-1", "channel": "t5.bob", "offset": 1}, b
    status, b2 = publish(daemon_m, {"events": [{"channel": "t5.bob", "data": 2, "id": "order-1"}]}, bob)
    assert b2["events"] == [{"id": "order-1", "channel": "t5.bob", "offset": 1, "duplicate": True}]
    # the API keys are one more scope
    status, k = publish(daemon_m, {"channel": "t5.key", "data": 3, "id": "order-1"})
    assert status == 202 and (k["channel"], k["offset"]) == ("t5.key", 1) and "duplicate" not in k
    # the owner's own retry is still the same event
    status, again = publish(daemon_m, {"channel": "t5.alice", "data": "retry", "id": "order-1"}, alice)
    assert again == {"id": "order-1", "channel": "t5.alice", "offset": 1, "duplicate": True}
    status, hist = daemon_m.get("/api/channels/t5.alice/history", headers=alice)
    assert [e["data"] for e in hist["events"]] == ["secret"]


def test_same_key_over_http_and_websocket_is_one_event(daemon_m: Daemon) -> None:
    """One publisher's idempotency key over HTTP and then over WebSocket (same token) is one event."""
    tok = token("carol", publish=["t17.>"], subscribe=["t17.>"])
    status, first = publish(daemon_m, {"channel": "t17.a", "data": "http", "id": "k-17"}, bearer(tok))
    assert status == 202 and first["offset"] == 1, first
    ws = websocket.create_connection(daemon_m.ws_url + f"?token={tok}", timeout=10)
    try:
        ws.send(json.dumps({"op": "publish", "channel": "t17.a", "data": "ws", "id": "k-17", "ref": 1}))
        reply = json.loads(ws.recv())
    finally:
        ws.close()
    assert reply["op"] == "published" and (reply["channel"], reply["offset"]) == ("t17.a", 1), reply
    status, hist = daemon_m.get("/api/channels/t17.a/history", headers=AUTH)
    assert [e["data"] for e in hist["events"]] == ["http"] and hist["last_offset"] == 1


# -- large events: pages bounded by bytes, memory bounded (defect 11) -------


BIG = 60_000
BIG_EVENTS = 600


def _rss(d: Daemon) -> int:
    assert d.proc is not None
    return int(psutil.Process(d.proc.pid).memory_info().rss)


def test_concurrent_history_of_large_events_keeps_memory_bounded(make_daemon: Callable[..., Daemon]) -> None:
    """Four anonymous history?limit=1000 of 60 KB events at once: pages of at most ~4 MiB, RSS growth bounded."""
    d = make_daemon()
    pad = "x" * BIG
    for start in range(0, BIG_EVENTS, 15):
        events = [{"channel": "public.big", "data": {"i": i, "pad": pad}} for i in range(start, start + 15)]
        status, body = publish(d, {"events": events})
        assert status == 202, body
    assert d.get("/api/channels/public.big/history?limit=2")[0] == 200  # reader threads up
    before = _rss(d)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss(d))
            time.sleep(0.005)

    answers: list[tuple[int, int, Any]] = []

    def fetch() -> None:
        status, _, raw = http("GET", d.url + "/api/channels/public.big/history?limit=1000", timeout=60)
        answers.append((status, len(raw), json.loads(raw)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    fetchers = [threading.Thread(target=fetch) for _ in range(4)]
    for t in fetchers:
        t.start()
    healthy(d)
    for t in fetchers:
        t.join(120)
    done.set()
    sampler.join()
    assert len(answers) == 4
    grown = (peak[0] - before) / 2**20
    print(f"RSS {before / 2**20:.0f} MiB, peak +{grown:.0f} MiB")
    # The whole history is ~36 MB of JSON: four unbounded answers held several copies of it each.
    assert grown < 100, f"RSS grew {grown:.0f} MiB"
    for status, size, body in answers:
        assert status == 200
        assert size <= 4 * 1024 * 1024 + BIG + 1024, size
        assert 0 < len(body["events"]) < BIG_EVENTS and body["more"] is True
        assert body["last_offset"] == BIG_EVENTS
    healthy(d)


def test_history_more_pages_every_event_exactly_once(make_daemon: Callable[..., Daemon]) -> None:
    """Paging history with since = the page's last offset while more is true returns every event once."""
    d = make_daemon()
    pad = "y" * 200_000
    for start in range(0, 60, 4):
        events = [{"channel": "pg.big", "data": {"i": i, "pad": pad}} for i in range(start, start + 4)]
        assert publish(d, {"events": events})[0] == 202
    seen: list[int] = []
    since = 0
    pages = 0
    while True:
        status, body = d.get(f"/api/channels/pg.big/history?since={since}&limit=1000", headers=AUTH)
        assert status == 200 and body["last_offset"] == 60
        pages += 1
        seen += [e["data"]["i"] for e in body["events"]]
        if not body["more"]:
            break
        since = body["events"][-1]["offset"]
    assert seen == list(range(60)) and pages >= 3
    status, body = d.get("/api/channels/pg.big/history?since=60", headers=AUTH)
    assert body["events"] == [] and body["more"] is False


# -- junk in integer parameters --------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["\u00b2", "\u0661", "\uff11", "1" * 5000, "-1", "+1", " 1", "1 ", "0x10", "1e3", "1.0", "", "9" * 20,
     str(MAX_OFFSET + 1), "%00", "1%00"],
)
def test_since_junk_is_400(daemon_m: Daemon, value: str) -> None:
    """A since that is not 1-19 ASCII digits within range is 400 invalid_parameter, never a 500."""
    status, body = daemon_m.get(f"/api/channels/public.x/history?since={quote(value, safe='%')}")
    is_error(status, body, 400, "invalid_parameter")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["since", "limit"]),
    value=st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
        st.integers(-10, 2**64).map(str),
        st.sampled_from(["0", "1", "1000", "1001", str(MAX_OFFSET), str(MAX_OFFSET + 1), "0" * 19, "0" * 20]),
    ),
)
def test_integer_parameters_accept_exactly_ascii_digits_in_range(daemon_m: Daemon, name: str, value: str) -> None:
    """since and limit: 200 iff the value is 1-19 ASCII digits within the parameter's range, else 400."""
    status, body = daemon_m.get(f"/api/channels/public.x/history?{name}={quote(value, safe='')}")
    low, high = (0, MAX_OFFSET) if name == "since" else (1, 1000)
    ok = 0 < len(value) <= 19 and value.isascii() and value.isdigit() and low <= int(value) <= high
    if ok:
        assert status == 200 and body["events"] == [], body
    else:
        is_error(status, body, 400, "invalid_parameter")


# -- oversized and malformed publishes, every limit -------------------------


def _chunked_post(d: Daemon, payload: bytes) -> tuple[bytes, bytes]:
    """POST C{payload} to /api/publish in 64 KiB chunks (no Content-Length); the answer's head and body."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for i in range(0, len(payload), 65536):
                part = payload[i : i + 65536]
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the daemon answered and closed before the end: read its answer
        data = b""
        while not (b"\r\n\r\n" in data and data.endswith(b"}")):
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_huge_batches_and_bodies_are_refused_whole(daemon_m: Daemon) -> None:
    """101 events, an empty batch, a body over max_body_bytes, one bad event in a batch: refused, nothing journaled."""
    one = {"channel": "big.batch", "data": 1}
    is_error(*publish(daemon_m, {"events": [one] * 101}), 400, "too_many_events")
    is_error(*publish(daemon_m, {"events": []}), 400, "invalid_body")
    head, body = _chunked_post(daemon_m, b'{"events":[' + b"1," * 700_000 + b"1]}")
    assert head.startswith(b"HTTP/1.1 413"), head
    is_error(413, json.loads(body), 413, "body_too_large")
    is_error(*publish(daemon_m, {"events": [one] * 99 + [{"channel": "bad..name", "data": 1}]}), 400,
             "invalid_channel")
    assert publish(daemon_m, {"channel": "big.batch", "data": None})[0] == 202
    status, _, raw = http("POST", daemon_m.url + "/api/publish", b'{"channel":"big.batch","data":' + b"[" * 100_000
                          + b"]" * 100_000 + b"}", {**AUTH, "Content-Type": "application/json"})
    assert status == 400, raw
    status, body = publish(daemon_m, {"events": [one] * 100})
    assert status == 202 and [e["offset"] for e in body["events"]] == list(range(2, 102))
    status, body = daemon_m.get("/api/channels/big.batch/history?limit=1", headers=AUTH)
    assert body["last_offset"] == 101
    healthy(daemon_m)


@pytest.mark.parametrize(
    ("event", "status", "code"),
    [
        ({"channel": "c" * 200, "data": 1}, 202, None),
        ({"channel": "c" * 201, "data": 1}, 400, "invalid_channel"),
        ({"channel": "lim.nl\n", "data": 1}, 400, "invalid_channel"),
        ({"channel": "lim.a\u0660", "data": 1}, 400, "invalid_channel"),
        ({"channel": "", "data": 1}, 400, "invalid_channel"),
        ({"channel": "lim.*", "data": 1}, 400, "invalid_channel"),
        ({"channel": "lim.id", "data": 1, "id": "i" * 200}, 202, None),
        ({"channel": "lim.id", "data": 1, "id": "i" * 201}, 400, "invalid_field"),
        ({"channel": "lim.id", "data": 1, "id": ""}, 400, "invalid_field"),
        ({"channel": "lim.id", "data": 1, "id": 7}, 400, "invalid_field"),
        ({"channel": "lim.type", "data": 1, "type": "t" * 100}, 202, None),
        ({"channel": "lim.type", "data": 1, "type": "t" * 101}, 400, "invalid_field"),
        ({"channel": "lim.x", "data": 1, "extra": True}, 400, "invalid_body"),
        ({"channel": "lim.x"}, 400, "missing_field"),
    ],
)
def test_limits_of_ids_types_and_channels(daemon_m: Daemon, event: dict[str, Any], status: int,
                                          code: str | None) -> None:
    """Channels of 200 characters, ids of 200 and types of 100 pass; one more, or a bad character, is 400."""
    got_status, body = publish(daemon_m, event)
    if code is None:
        assert got_status == status, body
    else:
        is_error(got_status, body, status, code)


def test_anonymous_and_other_tenants_reach_nothing_of_others(daemon_m: Daemon) -> None:
    """Anonymous: no publish, no channel list, no private history; a tenant sees only its own channels."""
    publish(daemon_m, {"channel": "ten.alice.x", "data": "a"})
    publish(daemon_m, {"channel": "ten.bob.x", "data": "b"})
    is_error(*publish(daemon_m, {"channel": "public.x", "data": 1}, {}), 401, "missing_token")
    is_error(*daemon_m.get("/api/channels"), 401, "missing_token")
    is_error(*daemon_m.get("/api/channels/ten.alice.x/history"), 401, "missing_token")
    bob = bearer(token("bob", subscribe=["ten.bob.>"], publish=["ten.bob.>"]))
    is_error(*daemon_m.get("/api/channels/ten.alice.x/history", headers=bob), 403, "forbidden")
    is_error(*publish(daemon_m, {"channel": "ten.alice.x", "data": "forged"}, bob), 403, "forbidden")
    status, body = daemon_m.get("/api/channels", headers=bob)
    assert status == 200 and [c["name"] for c in body["channels"]] == ["ten.bob.x"]
    healthy(daemon_m)


def test_daemon_log_has_no_critical_errors(daemon_m: Daemon, tmp_path: Path) -> None:
    """After every attack of this module the daemon logged no unhandled error and still answers /healthz."""
    healthy(daemon_m)
    log = daemon_m.log()
    assert "Unhandled" not in log and "Traceback" not in log, log[-3000:]


def test_publishers_that_hang_up_during_the_commit_leave_no_gap_live(daemon: Daemon) -> None:
    """Publishes whose connection closes before the 202 are still sent live: a subscriber sees every offset once."""
    ws = websocket.create_connection(daemon.ws_url + f"?token={API_KEY}", timeout=10)
    try:
        ws.send(json.dumps({"op": "subscribe", "channel": "hang.up", "ref": 1}))
        assert json.loads(ws.recv())["op"] == "subscribed"
        body = json.dumps({"channel": "hang.up", "data": "gone"}).encode()
        head = (f"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        socks = []
        for _ in range(30):  # the close reaches the daemon while most of these commits are in flight
            s = socket.create_connection(("127.0.0.1", daemon.port))
            s.sendall(head + body)
            socks.append(s)
        for s in socks:
            s.close()
        time.sleep(0.5)
        status, receipt = daemon.publish("hang.up", "last")
        assert status == 202, receipt
        offsets = []
        while not offsets or offsets[-1] < receipt["offset"]:
            m = json.loads(ws.recv())
            assert m["op"] == "event", m
            offsets.append(m["offset"])
        assert offsets == list(range(1, receipt["offset"] + 1))  # every accepted event, live, once
        _, stats = daemon.get("/api/stats", headers=AUTH)
        assert stats["events_in_by_source"]["api"] == receipt["offset"]  # and each one counted
    finally:
        ws.close()

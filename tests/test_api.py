"""
The JSON API against the real daemon: every route's success and every error
code of the contract, plus in-memory tests (StubTreq, MemoryBroker) for the
failures a live daemon cannot be made to show on demand.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jwt
import pytest
from conftest import API_KEY, DEFAULT_CONFIG, JWT_SECRET, Daemon, http, http_json
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher

from twisted_rt.app import App
from twisted_rt.core.auth import Authenticator
from twisted_rt.core.config import AuthConfig, Config
from twisted_rt.core.event import Accepted, Draft
from twisted_rt.core.metrics import Stats
from twisted_rt.routes import api
from twisted_rt.testing import MemoryBroker
from twisted_rt.web.resource import Root

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def token(sub: str = "alice", ttl: float = 600, **rights: Any) -> str:
    """An HS256 JWT for the test daemon."""
    return jwt.encode({"sub": sub, "exp": time.time() + ttl, **rights}, JWT_SECRET, algorithm="HS256")


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests of this module that do not disturb each other (unique channels)."""
    import textwrap

    d = Daemon(tmp_path_factory.mktemp("api"), textwrap.dedent(DEFAULT_CONFIG))
    d.start()
    yield d
    d.stop()


def publish(d: Daemon, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return http_json("POST", d.url + "/api/publish", body, AUTH if headers is None else headers)


def raw_post(d: Daemon, body: bytes, content_type: str | None = "application/json") -> tuple[int, Any]:
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    status, _, raw = http("POST", d.url + "/api/publish", body, headers)
    return status, json.loads(raw)


def assert_error(status: int, body: Any, expected: int, code: str | None = None) -> None:
    assert status == expected, body
    assert isinstance(body, dict) and set(body) == {"error", "message"}, body
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code, body


# -- POST /api/publish -----------------------------------------------------


def test_publish_one(shared: Daemon) -> None:
    """One event is journaled and answered 202 with id, channel and offset (1, 2, ...)."""
    status, r1 = publish(shared, {"channel": "pub.one", "data": {"n": 1}, "type": "greeting"})
    assert status == 202 and r1["channel"] == "pub.one" and r1["offset"] == 1 and r1["id"]
    assert "duplicate" not in r1
    status, r2 = publish(shared, {"channel": "pub.one", "data": [1, "two", None]})
    assert status == 202 and r2["offset"] == 2 and r2["id"] != r1["id"]
    status, hist = shared.get("/api/channels/pub.one/history", headers=AUTH)
    assert status == 200
    e = hist["events"][0]
    assert (e["id"], e["source"], e["type"], e["data"]) == (r1["id"], "api", "greeting", {"n": 1})
    assert hist["events"][1]["data"] == [1, "two", None]


def test_publish_idempotent_by_id(shared: Daemon) -> None:
    """The same id twice is one event: the second answer has the original offset and duplicate: true."""
    body = {"channel": "pub.idem", "data": 1, "id": "order-42"}
    s1, r1 = publish(shared, body)
    s2, r2 = publish(shared, {**body, "data": "ignored"})
    assert (s1, s2) == (202, 202)
    assert r1 == {"id": "order-42", "channel": "pub.idem", "offset": 1}
    assert r2 == {**r1, "duplicate": True}
    _, hist = shared.get("/api/channels/pub.idem/history", headers=AUTH)
    assert [e["data"] for e in hist["events"]] == [1]


def _family_value(d: Daemon, name: str, sample: str, labels: dict[str, str] | None = None) -> float:
    status, _, raw = http("GET", d.url + "/metrics")
    assert status == 200
    for fam in text_string_to_metric_families(raw.decode()):
        if fam.name == name:
            for s in fam.samples:
                if s.name == sample and (labels is None or s.labels == labels):
                    return float(s.value)
    return 0.0


def test_publish_batch_is_one_commit(shared: Daemon) -> None:
    """A batch gets receipts in order, consecutive offsets, and is journaled in one commit."""
    count0 = _family_value(shared, "rt_journal_batch_events", "rt_journal_batch_events_count")
    sum0 = _family_value(shared, "rt_journal_batch_events", "rt_journal_batch_events_sum")
    events = [{"channel": "pub.batch", "data": i} for i in range(5)] + [{"channel": "pub.batch2", "data": "x"}]
    status, body = publish(shared, {"events": events})
    assert status == 202
    receipts = body["events"]
    assert [(r["channel"], r["offset"]) for r in receipts] == [("pub.batch", i) for i in range(1, 6)] + [
        ("pub.batch2", 1)
    ]
    assert _family_value(shared, "rt_journal_batch_events", "rt_journal_batch_events_count") == count0 + 1
    assert _family_value(shared, "rt_journal_batch_events", "rt_journal_batch_events_sum") == sum0 + 6


def test_publish_batch_duplicates(shared: Daemon) -> None:
    """In a batch, a known id (or one repeated in the batch) answers the original offset with duplicate."""
    publish(shared, {"channel": "pub.bdup", "data": 0, "id": "a"})
    status, body = publish(
        shared,
        {"events": [
            {"channel": "pub.bdup", "data": 1, "id": "a"},
            {"channel": "pub.bdup", "data": 2, "id": "b"},
            {"channel": "pub.bdup", "data": 3, "id": "b"},
        ]},
    )
    assert status == 202
    r = body["events"]
    assert (r[0]["offset"], r[0].get("duplicate")) == (1, True)
    assert (r[1]["offset"], r[1].get("duplicate")) == (2, None)
    assert (r[2]["offset"], r[2].get("duplicate")) == (2, True)


def test_publish_counts_events_in(shared: Daemon) -> None:
    """Accepted API events (not duplicates) count in /api/stats and rt_events_in_total{source=api}."""
    _, s0 = shared.get("/api/stats", headers=AUTH)
    m0 = _family_value(shared, "rt_events_in", "rt_events_in_total", {"source": "api"})
    publish(shared, {"events": [{"channel": "pub.count", "data": i} for i in range(3)]})
    publish(shared, {"channel": "pub.count", "data": 0, "id": "c1"})
    publish(shared, {"channel": "pub.count", "data": 0, "id": "c1"})
    _, s1 = shared.get("/api/stats", headers=AUTH)
    assert s1["events_in"] - s0["events_in"] == 4
    assert s1["events_in_by_source"]["api"] - s0["events_in_by_source"].get("api", 0) == 4
    assert _family_value(shared, "rt_events_in", "rt_events_in_total", {"source": "api"}) == m0 + 4


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"data": 1}, "missing_field"),
        ({"channel": "pub.x"}, "missing_field"),
        ({"channel": "a..b", "data": 1}, "invalid_channel"),
        ({"channel": "has space", "data": 1}, "invalid_channel"),
        ({"channel": "x" * 201, "data": 1}, "invalid_channel"),
        ({"channel": "wild.*", "data": 1}, "invalid_channel"),
        ({"channel": "wild.>", "data": 1}, "invalid_channel"),
        ({"channel": "", "data": 1}, "invalid_channel"),
        ({"channel": 5, "data": 1}, "invalid_channel"),
        ({"channel": "pub.x", "data": 1, "id": 5}, "invalid_field"),
        ({"channel": "pub.x", "data": 1, "id": ""}, "invalid_field"),
        ({"channel": "pub.x", "data": 1, "id": None}, "invalid_field"),
        ({"channel": "pub.x", "data": 1, "id": "i" * 201}, "invalid_field"),
        ({"channel": "pub.x", "data": 1, "type": 7}, "invalid_field"),
        ({"channel": "pub.x", "data": 1, "type": "t" * 101}, "invalid_field"),
        ({"channel": "pub.x", "data": 1, "chanel": "typo"}, "invalid_body"),
        ({"events": []}, "invalid_body"),
        ({"events": {"channel": "pub.x"}}, "invalid_body"),
        ({"events": [1]}, "invalid_body"),
        ({"events": [{"channel": "pub.x", "data": 1}], "channel": "pub.y"}, "invalid_body"),
        ({"events": [{"channel": "pub.x", "data": i} for i in range(api.MAX_BATCH + 1)]}, "too_many_events"),
        ({"events": [{"channel": "pub.x", "data": 1}, {"channel": "bad channel", "data": 1}]}, "invalid_channel"),
        ([{"channel": "pub.x", "data": 1}], "invalid_body"),
    ],
)
def test_publish_400(shared: Daemon, body: Any, code: str) -> None:
    """Malformed publish bodies are refused 400 with a specific error code."""
    status, got = publish(shared, body)
    assert_error(status, got, 400, code)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b'{"channel":"pub.x","data":NaN}', b'{"channel":"pub.x","data":-Infinity}',
     b'{"channel":"pub.x","data":1e999}', b'{"channel":"pub.x","data":' + b"9" * 5000 + b"}",
     b"\xff\xfe", b"[" * 100000 + b"]" * 100000],
)
def test_publish_unparsable(shared: Daemon, raw: bytes) -> None:
    """A body that is not JSON (NaN, infinities, absurd numbers or nesting) is 400 invalid_json."""
    status, got = raw_post(shared, raw)
    assert_error(status, got, 400, "invalid_json")


def test_publish_batch_limit_accepts_max(shared: Daemon) -> None:
    """Exactly MAX_BATCH events are accepted."""
    status, body = publish(shared, {"events": [{"channel": "pub.max", "data": i} for i in range(api.MAX_BATCH)]})
    assert status == 202 and len(body["events"]) == api.MAX_BATCH


def test_publish_401(shared: Daemon) -> None:
    """No token, an unknown key, or an expired JWT: 401 with WWW-Authenticate."""
    body = {"channel": "pub.auth", "data": 1}
    for headers in ({}, bearer("wrong-key"), bearer(token(ttl=-5, publish=[">"])), {"Authorization": "Basic eDp5"}):
        status, hdrs, raw = http("POST", shared.url + "/api/publish", body, headers)
        assert_error(status, json.loads(raw), 401)
        assert hdrs.get("www-authenticate", "").startswith("Bearer")
    _, hist = shared.get("/api/channels/pub.auth/history", headers=AUTH)
    assert hist == {"events": [], "last_offset": 0, "more": False}


def test_publish_403_without_right(shared: Daemon) -> None:
    """A JWT may publish only where its publish rights (with wildcards) allow; a batch is all or nothing."""
    t = token(publish=["chat.*", "billing.>"])
    assert publish(shared, {"channel": "chat.room1", "data": 1}, bearer(t))[0] == 202
    assert publish(shared, {"channel": "billing.invoice.paid", "data": 1}, bearer(t))[0] == 202
    for channel in ("chat.room1.sub", "chat", "other.x", "billing"):
        status, got = publish(shared, {"channel": channel, "data": 1}, bearer(t))
        assert_error(status, got, 403, "forbidden")
    status, got = publish(
        shared, {"events": [{"channel": "chat.room2", "data": 1}, {"channel": "nope.x", "data": 2}]}, bearer(t)
    )
    assert_error(status, got, 403, "forbidden")
    _, hist = shared.get("/api/channels/chat.room2/history", headers=AUTH)
    assert hist["events"] == []
    subscribe_only = token(subscribe=[">"])
    assert publish(shared, {"channel": "chat.room1", "data": 1}, bearer(subscribe_only))[0] == 403


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_publish_415(shared: Daemon, ctype: str | None) -> None:
    """A body that is not declared as JSON is refused 415."""
    status, got = raw_post(shared, b'{"channel":"pub.ct","data":1}', ctype)
    assert_error(status, got, 415, "unsupported_media_type")


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.rt+json"])
def test_publish_json_content_types(shared: Daemon, ctype: str) -> None:
    """application/json with parameters, in any case, and +json types are accepted."""
    status, _ = raw_post(shared, b'{"channel":"pub.ct","data":1}', ctype)
    assert status == 202


def test_publish_413(shared: Daemon) -> None:
    """A body announced over max_body_bytes is refused 413 with a JSON error before it is read."""
    with socket.create_connection(("127.0.0.1", shared.port), timeout=10) as s:
        s.sendall(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 5000000\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert_error(413, json.loads(body), 413, "body_too_large")


def test_publish_405(shared: Daemon) -> None:
    """GET on /api/publish is a JSON 405 with Allow: POST."""
    status, hdrs, raw = http("GET", shared.url + "/api/publish", headers=AUTH)
    assert_error(status, json.loads(raw), 405, "method_not_allowed")
    assert hdrs["allow"] == "POST"


def test_publish_503_journal_down(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """With the journal unavailable, publish is 503 with Retry-After (nothing acknowledged), history 503 too."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    d = make_daemon(DEFAULT_CONFIG.replace('"var/journal.sqlite3"', f'"{blocker}/journal.sqlite3"'))
    status, hdrs, raw = http("POST", d.url + "/api/publish", {"channel": "a", "data": 1}, AUTH)
    assert_error(status, json.loads(raw), 503, "journal_unavailable")
    assert hdrs.get("retry-after")
    status, got = d.get("/api/channels/a/history", headers=AUTH)
    assert_error(status, got, 503, "journal_unavailable")
    status, _, raw = http("GET", d.url + "/metrics")
    ready = [s for f in text_string_to_metric_families(raw.decode()) if f.name == "rt_ready" for s in f.samples]
    assert ready and ready[0].value == 0


# -- GET /api/channels -----------------------------------------------------


def test_channels(shared: Daemon) -> None:
    """An API key sees every channel with subscribers and last_offset; a JWT only those it may read."""
    publish(shared, {"events": [{"channel": "ch.alpha", "data": 1}, {"channel": "ch.alpha", "data": 2},
                                {"channel": "other.beta", "data": 1}]})
    status, body = shared.get("/api/channels", headers=AUTH)
    assert status == 200
    by_name = {c["name"]: c for c in body["channels"]}
    assert by_name["ch.alpha"] == {"name": "ch.alpha", "subscribers": 0, "last_offset": 2}
    assert "other.beta" in by_name
    status, body = shared.get("/api/channels", headers=bearer(token(subscribe=["ch.*"])))
    assert status == 200
    names = {c["name"] for c in body["channels"]}
    assert "ch.alpha" in names and "other.beta" not in names
    assert all(n.startswith("ch.") and n.count(".") == 1 for n in names)
    status, body = shared.get("/api/channels", headers=bearer(token(publish=[">"])))
    assert (status, body) == (200, {"channels": []})


def test_channels_401(shared: Daemon) -> None:
    """/api/channels needs a token: none or a bad one is 401."""
    for headers in ({}, bearer("bad"), bearer(token(ttl=-1))):
        status, got = shared.get("/api/channels", headers=headers)
        assert_error(status, got, 401)


# -- GET /api/channels/<name>/history --------------------------------------


def test_history_since_and_limit(shared: Daemon) -> None:
    """History is oldest first, offsets > since, at most limit, with the channel's last_offset."""
    publish(shared, {"events": [{"channel": "hist.a", "data": i} for i in range(1, 11)]})
    status, body = shared.get("/api/channels/hist.a/history", headers=AUTH)
    assert status == 200 and [e["offset"] for e in body["events"]] == list(range(1, 11))
    assert body["last_offset"] == 10
    _, body = shared.get("/api/channels/hist.a/history?since=4&limit=3", headers=AUTH)
    assert [e["offset"] for e in body["events"]] == [5, 6, 7] and body["last_offset"] == 10
    assert [e["data"] for e in body["events"]] == [5, 6, 7] and body["more"] is True
    assert set(body["events"][0]) == {"id", "channel", "offset", "time", "source", "type", "data"}
    _, body = shared.get("/api/channels/hist.a/history?since=7", headers=AUTH)
    assert [e["offset"] for e in body["events"]] == [8, 9, 10] and body["more"] is False
    _, body = shared.get("/api/channels/hist.a/history?since=10", headers=AUTH)
    assert body == {"events": [], "last_offset": 10, "more": False}
    _, body = shared.get("/api/channels/hist.never/history", headers=AUTH)
    assert body == {"events": [], "last_offset": 0, "more": False}


def test_history_odd_channel_names(shared: Daemon) -> None:
    """Channel names with : @ - _ work in the path, percent-encoded or not."""
    publish(shared, {"channel": "user:42@example.com_x-y", "data": 1})
    for path in ("user:42@example.com_x-y", "user%3A42%40example.com_x-y"):
        status, body = shared.get(f"/api/channels/{path}/history", headers=AUTH)
        assert status == 200 and body["last_offset"] == 1, path


@pytest.mark.parametrize(
    "query",
    ["since=-1", "since=x", "since=1.5", "since=", "since=99999999999999999999", "limit=0",
     f"limit={api.MAX_HISTORY_LIMIT + 1}", "limit=ten", "limit=-3"],
)
def test_history_400_bad_params(shared: Daemon, query: str) -> None:
    """Bad since/limit values are 400 invalid_parameter."""
    status, got = shared.get(f"/api/channels/hist.a/history?{query}", headers=AUTH)
    assert_error(status, got, 400, "invalid_parameter")


@pytest.mark.parametrize("name", ["a..b", "has%20space", "x" * 201, "wild.*", "a%2Fb", ".lead"])
def test_history_400_bad_channel(shared: Daemon, name: str) -> None:
    """A bad channel name in the path is 400 invalid_channel."""
    status, got = shared.get(f"/api/channels/{name}/history", headers=AUTH)
    assert_error(status, got, 400, "invalid_channel")


def test_history_rights(shared: Daemon) -> None:
    """History: 401 without a token (except anonymous_subscribe channels), 403 without a subscribe right."""
    publish(shared, {"channel": "public.news", "data": "hi"})
    publish(shared, {"channel": "secret.plans", "data": "x"})
    status, body = shared.get("/api/channels/public.news/history")
    assert status == 200 and body["events"][0]["data"] == "hi"
    status, got = shared.get("/api/channels/secret.plans/history")
    assert_error(status, got, 401, "missing_token")
    status, got = shared.get("/api/channels/secret.plans/history", headers=bearer("bad"))
    assert_error(status, got, 401, "invalid_token")
    status, got = shared.get("/api/channels/secret.plans/history", headers=bearer(token(subscribe=["public.>"])))
    assert_error(status, got, 403, "forbidden")
    status, body = shared.get("/api/channels/secret.plans/history", headers=bearer(token(subscribe=["secret.*"])))
    assert status == 200 and body["last_offset"] == 1
    status, body = shared.get(f"/api/channels/secret.plans/history?token={token(subscribe=['>'])}")
    assert status == 200


# -- GET /api/stats, unknown routes ----------------------------------------


def test_stats(shared: Daemon) -> None:
    """/api/stats answers the counters of the contract to any valid token."""
    status, body = shared.get("/api/stats", headers=AUTH)
    assert status == 200
    for key in ("connections", "subscriptions", "events_in", "events_out", "dropped"):
        assert isinstance(body[key], int) and body[key] >= 0
    status, body = shared.get("/api/stats", headers=bearer(token()))
    assert status == 200


def test_stats_401(shared: Daemon) -> None:
    """/api/stats without a token, or with a bad one, is 401."""
    for headers in ({}, bearer("nope")):
        status, got = shared.get("/api/stats", headers=headers)
        assert_error(status, got, 401)


@pytest.mark.parametrize(
    "path", ["/api", "/api/", "/api/nope", "/api/channels/a/b", "/api/channels/a/history/x", "/api/stats/x",
             "/metrics/x", "/openapi.json/x", "/no/such/route"],
)
def test_unknown_routes_404(shared: Daemon, path: str) -> None:
    """Unknown routes are a JSON 404."""
    status, got = shared.get(path, headers=AUTH)
    assert_error(status, got, 404)


def test_head_is_served(shared: Daemon) -> None:
    """HEAD on GET routes answers like GET without a body."""
    status, _, raw = http("HEAD", shared.url + "/api/stats", headers=AUTH)
    assert status == 200 and raw == b""


# -- failures a live daemon will not show: in memory ------------------------


def _stub(broker: MemoryBroker) -> Any:
    from treq.testing import StubTreq

    app = App(
        config=Config(),
        reactor=MemoryReactorClock(),
        broker=broker,
        auth=Authenticator(AuthConfig(api_keys=("k",))),
        stats=Stats(),
    )
    root = Root()
    api.mount(root, app)
    return StubTreq(root)


def _call(stub: Any, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    headers = {"Authorization": ["Bearer k"], "Content-Type": ["application/json"]}
    d = stub.request(method, "http://127.0.0.1" + path, data=body or None, headers=headers)
    stub.flush()
    results: list[Any] = []
    d.addCallback(lambda r: r.content().addCallback(lambda c: results.append((r.code, json.loads(c)))))
    stub.flush()
    assert results, "no answer"
    return results[0]  # type: ignore[no-any-return]


def test_unexpected_error_is_logged_500_without_traceback() -> None:
    """An unexpected exception is logged with its traceback and answered 500 JSON with no details."""
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        broker = MemoryBroker()
        broker.channels = lambda: fail(RuntimeError("boom: secret internals"))  # type: ignore[method-assign]
        status, body = _call(_stub(broker), "GET", "/api/channels")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert_error(status, body, 500, "internal_error")
    assert "boom" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    failures = [e for e in observer if "log_failure" in e]
    assert failures and failures[0]["log_failure"].check(RuntimeError)
    for f in failures:
        f["log_failure"].cleanFailure()


def test_journal_unavailable_is_503_in_memory() -> None:
    """A publish failing with JournalUnavailable is 503 journal_unavailable."""
    broker = MemoryBroker()
    broker.unavailable = "disk full"
    status, body = _call(_stub(broker), "POST", "/api/publish", b'{"channel":"a","data":1}')
    assert_error(status, body, 503, "journal_unavailable")
    assert broker.events == []


def test_publish_passes_drafts_in_one_call() -> None:
    """A batch reaches the broker as one publish call of drafts with source api."""
    broker = MemoryBroker()
    calls: list[int] = []
    original = broker.publish

    def counting(drafts: Sequence[Draft]) -> Deferred[list[Accepted]]:
        calls.append(len(drafts))
        return original(drafts)

    broker.publish = counting  # type: ignore[method-assign]
    body = json.dumps({"events": [{"channel": "a", "data": 1, "id": "x"}, {"channel": "b", "data": 2, "type": "t"}]})
    status, got = _call(_stub(broker), "POST", "/api/publish", body.encode())
    assert status == 202 and len(got["events"]) == 2
    assert calls == [2]
    assert [(d.channel, d.source, d.id, d.type, d.scope) for d in broker.drafts] == [
        ("a", "api", "x", "", "pub:key"),
        ("b", "api", None, "t", "pub:key"),
    ]


def test_parse_publish_rejects_lone_surrogates() -> None:
    """A body with a lone surrogate escape (not encodable as UTF-8) is 400, not a crash later."""
    from twisted_rt.web.resource import JsonError

    with pytest.raises(JsonError) as e:
        api.parse_publish(b'{"channel":"a","data":"\\ud800"}')
    assert (e.value.status, e.value.code) == (400, "invalid_json")


@pytest.mark.parametrize(("ctype", "is_json"), [
    ("application/json", True),
    ("Application/JSON; charset=utf-8", True),
    (b" application/vnd.rt+json ; q=1", True),
    ("application/problem+json", True),
    ("application/jsonx", False),
    ("text/plain", False),
    ("application/x-www-form-urlencoded", False),
    ("", False),
    (None, False),
])
def test_one_media_type_rule(ctype: str | bytes | None, is_json: bool) -> None:
    """The publish API and the webhook ingest read a Content-Type as JSON by one rule (web.resource)."""
    from twisted_rt.routes.hooks import parse_body
    from twisted_rt.web.resource import JsonError, is_json_media, media_type

    assert is_json_media(media_type(ctype)) is is_json
    text = ctype.decode() if isinstance(ctype, bytes) else ctype
    try:
        data = parse_body(text, b'{"a":1}')
    except JsonError:
        data = None
    assert (data == {"a": 1}) is (is_json or not text)  # webhooks: no type means JSON too

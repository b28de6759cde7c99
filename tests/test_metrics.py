"""
Counters and the Prometheus exposition: the collector in memory, and
C{/metrics} of the live daemon parsed with prometheus_client's own parser,
moving when events flow in and out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Callable, Iterator

import pytest
from conftest import API_KEY, DEFAULT_CONFIG, Daemon, http
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from twisted_rt.core.metrics import Stats

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the read-only tests of this module."""
    import textwrap

    d = Daemon(tmp_path_factory.mktemp("metrics"), textwrap.dedent(DEFAULT_CONFIG))
    d.start()
    yield d
    d.stop()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def scrape(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, raw = http("GET", d.url + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    return samples(raw.decode())


def test_collector_exposes_every_counter() -> None:
    """Every Stats counter appears with its labels in the exposition, and it parses."""
    clock = [100.0]
    s = Stats(clock=lambda: clock[0])
    s.connections["ws"] += 2
    s.subscriptions["sse"] += 3
    s.events_in["api"] += 4
    s.events_in["github"] += 1
    s.events_out["ws"] += 5
    s.dropped["slow_consumer"] += 1
    s.webhook("github", "accepted")
    s.webhook("github", "invalid_signature")
    s.webhook("github", "invalid_signature")
    s.webhook("stripe", "duplicate")
    s.on_commit(3, 0.004)
    s.ready = lambda: True
    clock[0] = 112.5
    got = samples(generate_latest(s.registry).decode())
    assert got[("rt_connections", (("transport", "ws"),))] == 2
    assert got[("rt_subscriptions", (("transport", "sse"),))] == 3
    assert got[("rt_events_in_total", (("source", "api"),))] == 4
    assert got[("rt_events_in_total", (("source", "github"),))] == 1
    assert got[("rt_events_out_total", (("transport", "ws"),))] == 5
    assert got[("rt_dropped_total", (("reason", "slow_consumer"),))] == 1
    assert got[("rt_slow_consumers_closed_total", ())] == 1
    assert got[("rt_webhooks_total", (("outcome", "accepted"), ("source", "github")))] == 1
    assert got[("rt_webhooks_rejected_total", (("reason", "invalid_signature"), ("source", "github")))] == 2
    assert ("rt_webhooks_rejected_total", (("reason", "duplicate"), ("source", "stripe"))) not in got
    assert got[("rt_journal_commit_seconds_count", ())] == 1
    assert got[("rt_journal_commit_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("rt_journal_commit_seconds_bucket", (("le", "0.0025"),))] == 0
    assert got[("rt_journal_batch_events_sum", ())] == 3
    assert got[("rt_ready", ())] == 1
    assert got[("rt_uptime_seconds", ())] == 12.5


def test_snapshot() -> None:
    """The /api/stats body sums the counters and breaks them down."""
    s = Stats(clock=lambda: 10.0)
    s.connections["ws"] += 1
    s.connections["sse"] += 2
    s.events_out["poll"] += 7
    s.webhook("gh", "accepted")
    s.webhook("gh", "rate_limited")
    snap = s.snapshot()
    assert snap["connections"] == 3 and snap["connections_by_transport"] == {"ws": 1, "sse": 2}
    assert snap["events_out"] == 7 and snap["subscriptions"] == 0 and snap["dropped"] == 0
    assert snap["webhooks"] == {"gh": {"accepted": 1, "rate_limited": 1}}
    assert snap["webhooks_rejected"] == 1
    assert snap["uptime_seconds"] == 0
    json.dumps(snap)


def test_separate_registries() -> None:
    """Two Stats (two daemons in one test process) do not share or clash."""
    a, b = Stats(), Stats()
    a.events_in["api"] += 1
    assert samples(generate_latest(b.registry).decode()).get(("rt_events_in_total", (("source", "api"),))) is None


def test_metrics_endpoint_parses_and_has_the_families(shared: Daemon) -> None:
    """/metrics is the Prometheus text format with the documented families, without a token."""
    status, headers, raw = http("GET", shared.url + "/metrics")
    assert status == 200 and "version=0.0.4" in headers["content-type"]
    names = {f.name for f in text_string_to_metric_families(raw.decode())}
    for name in ("rt_connections", "rt_subscriptions", "rt_events_in", "rt_events_out", "rt_dropped",
                 "rt_webhooks", "rt_webhooks_rejected", "rt_journal_commit_seconds", "rt_journal_batch_events",
                 "rt_slow_consumers_closed", "rt_ready", "process_resident_memory_bytes"):
        assert name in names, name
    assert scrape(shared)[("rt_ready", ())] == 1


def test_metrics_move_when_events_flow(make_daemon: Callable[..., Daemon]) -> None:
    """Publishing, a WebSocket subscriber and a rejected webhook move their counters."""
    import websocket

    d = make_daemon(f"""
        [journal]
        path = "var/journal.sqlite3"
        [auth]
        api_keys = ["{API_KEY}"]
        [[sources]]
        name = "inhouse"
        verify = "hmac-sha256"
        secrets = ["hook-secret"]
        channel = "inhouse.{{json:type}}"
    """)
    before = scrape(d)
    ws = websocket.create_connection(d.ws_url, header=[f"Authorization: Bearer {API_KEY}"], timeout=10)
    try:
        ws.send(json.dumps({"op": "subscribe", "channel": "m.>", "ref": 1}))
        reply: Any = json.loads(ws.recv())
        assert reply["op"] == "subscribed"
        mid = scrape(d)
        assert mid[("rt_connections", (("transport", "ws"),))] == 1
        assert mid[("rt_subscriptions", (("transport", "ws"),))] == 1
        for i in range(3):
            status, _, _ = http("POST", d.url + "/api/publish", {"channel": f"m.c{i}", "data": i}, AUTH)
            assert status == 202
        got = [json.loads(ws.recv()) for _ in range(3)]
        assert [e["data"] for e in got] == [0, 1, 2]
    finally:
        ws.close()
    body = json.dumps({"type": "created"}).encode()
    good = hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
    status, _, _ = http("POST", d.url + "/hooks/inhouse", body,
                        {"Content-Type": "application/json", "X-Signature": good})
    assert status == 202
    status, _, _ = http("POST", d.url + "/hooks/inhouse", body,
                        {"Content-Type": "application/json", "X-Signature": "0" * 64})
    assert status == 401

    deadline = time.monotonic() + 10
    while True:
        after = scrape(d)
        if after.get(("rt_connections", (("transport", "ws"),)), 0) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def moved(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("rt_events_in_total", (("source", "api"),)) == 3
    assert moved("rt_events_in_total", (("source", "inhouse"),)) == 1
    assert moved("rt_events_out_total", (("transport", "ws"),)) == 3
    assert moved("rt_journal_commit_seconds_count") >= 2
    assert moved("rt_journal_batch_events_sum") == 4
    assert moved("rt_webhooks_total", (("outcome", "accepted"), ("source", "inhouse"))) == 1
    assert moved("rt_webhooks_rejected_total", (("reason", "invalid_signature"), ("source", "inhouse"))) == 1
    assert after[("rt_connections", (("transport", "ws"),))] == 0
    assert after[("rt_subscriptions", (("transport", "ws"),))] == 0


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_metrics_other_methods_405(shared: Daemon, method: str) -> None:
    """/metrics answers only GET (and HEAD): others are a JSON 405."""
    status, headers, raw = http(method, shared.url + "/metrics", b"")
    assert status == 405 and json.loads(raw)["error"] == "method_not_allowed"
    assert headers["allow"] == "GET"


def test_metrics_openmetrics_on_request(shared: Daemon) -> None:
    """A scraper that asks for OpenMetrics gets it (and it parses with the OpenMetrics parser)."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    status, headers, raw = http("GET", shared.url + "/metrics",
                                headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert "rt_events_in" in {f.name for f in om_parse(raw.decode())}

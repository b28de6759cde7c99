"""
The delivery engine on a fake clock: testing.MemoryBroker as the journal,
store.deliveries.MemoryDeliveries as the state, a scripted sender whose
answers the test gives (no network, no wall-clock waits).
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any, Sequence

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twisted_rt.core.config import Config, DestinationConfig, SourceConfig
from twisted_rt.core.metrics import Stats
from twisted_rt.outbound import Outbound, Outcome, UnknownDestination
from twisted_rt.outbound._policy import SCHEDULE
from twisted_rt.store.deliveries import MemoryDeliveries
from twisted_rt.testing import MemoryBroker

KEY = base64.b64encode(b"k" * 24).decode()


class FakeSender:
    """Records each attempt; the test answers them (in any order)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, list[tuple[str, str]], Deferred[Outcome]]] = []
        self.auto: Outcome | None = None

    def send(self, body: bytes, headers: Sequence[tuple[str, str]]) -> Deferred[Outcome]:
        d: Deferred[Outcome] = Deferred()
        self.calls.append((body, list(headers), d))
        if self.auto is not None:
            d.callback(replace(self.auto))
        return d

    def close(self) -> Deferred[None]:
        return succeed(None)

    def open(self) -> list[Deferred[Outcome]]:
        return [d for _, _, d in self.calls if not d.called]

    def answer_all(self, outcome: Outcome) -> int:
        ds = self.open()
        for d in ds:
            d.callback(replace(outcome))
        return len(ds)


OK = Outcome("ok", 204)
FAIL = Outcome("status", 500, "HTTP 500")


def make(**dest: Any) -> tuple[Outbound, MemoryBroker, MemoryDeliveries, FakeSender, Clock]:
    clock = Clock()
    clock.advance(1_000_000)
    broker = MemoryBroker(clock)
    store = MemoryDeliveries()
    sender = FakeSender()
    d = DestinationConfig(name="b", url="http://127.0.0.1:1/h", channels=("o.>",), secret="whsec_" + KEY)
    d = replace(d, **dest)
    cfg = Config(destinations=(d,), sources=(SourceConfig(name="gh", verify="github", redact_headers=("X-Api-Key",)),))
    ob = Outbound(cfg, clock, broker, store, Stats().destinations, sender_factory=lambda _: sender, rand=lambda: 0.5)
    ob.start()
    return ob, broker, store, sender, clock


def test_every_matching_event_is_sent_once_and_the_position_moves() -> None:
    """Matching events are sent in seq order, others not; the saved position passes them once answered."""
    _ob, broker, store, sender, _clock = make()
    broker.commit("o.1", {"n": 1})
    broker.commit("x.1", {"n": 2})
    e3 = broker.commit("o.2", {"n": 3})
    assert len(sender.calls) == 2
    assert store.states["b"].position == 0
    sender.answer_all(OK)
    assert store.states["b"].position == e3.seq
    assert store.states["b"].delivered == 2


def test_max_in_flight_bounds_concurrent_requests() -> None:
    """No more than max_in_flight requests are open at once; answering one starts the next."""
    _ob, broker, _store, sender, _clock = make(max_in_flight=3)
    for i in range(10):
        broker.commit("o.a", i)
    assert len(sender.open()) == 3
    sender.open()[0].callback(OK)
    assert len(sender.open()) == 3 and len(sender.calls) == 4


def test_failed_event_does_not_block_the_others_and_is_retried_with_backoff() -> None:
    """A failing event goes to the retry queue (the position passes it); later events are still delivered."""
    ob, broker, store, sender, clock = make()
    broker.commit("o.a", 1)
    broker.commit("o.a", 2)
    first, second = sender.open()
    first.callback(FAIL)
    second.callback(OK)
    assert store.states["b"].position == 2
    (row,) = store.queues["b"].values()
    assert row.attempts == 1 and not row.dead
    assert row.next_at == pytest.approx(clock.seconds() + SCHEDULE[0])
    clock.advance(SCHEDULE[0] - 0.1)
    assert not sender.open()
    clock.advance(0.2)
    assert len(sender.open()) == 1
    sender.answer_all(OK)
    assert store.queues["b"] == {}
    assert ob.workers["b"].state.retrying == 0


def test_retry_after_is_honoured() -> None:
    """A Retry-After in a failed answer sets the next attempt's time instead of the schedule."""
    _ob, broker, store, sender, clock = make()
    broker.commit("o.a", 1)
    sender.answer_all(Outcome("status", 429, "HTTP 429", retry_after="120"))
    (row,) = store.queues["b"].values()
    assert row.next_at == clock.seconds() + 120


def test_dead_letter_after_max_attempts_then_retry_revives_it() -> None:
    """After max_attempts failures the event is dead-lettered (RT-D04); the retry API sends it again."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        ob, broker, store, sender, clock = make(max_attempts=3)
        broker.commit("o.a", 1)
        for _ in range(3):
            assert sender.answer_all(FAIL) == 1
            clock.advance(8000)
        assert sender.open() == []
    finally:
        globalLogPublisher.removeObserver(events.append)
    (row,) = store.queues["b"].values()
    assert row.dead and row.attempts == 3
    assert any(e.get("log_category") == "RT-D04" for e in events)
    assert any(e.get("log_category") == "RT-D03" for e in events)
    w = ob.workers["b"]
    assert w.state.dead == 1 and w.state.retrying == 0
    dead = _result(Deferred.fromCoroutine(ob.dead("b", 10)))
    assert [d["id"] for d in dead] == [row.id] and dead[0]["last_error"] == "HTTP 500"
    assert _result(Deferred.fromCoroutine(ob.retry("b", None))) == 1
    clock.advance(0.2)
    assert sender.answer_all(OK) == 1
    assert store.queues["b"] == {}


def test_backoff_schedule_grows_then_stays_at_two_hours() -> None:
    """Successive retries wait about 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, then 2 h each."""
    _ob, broker, store, sender, clock = make(max_attempts=20)
    broker.commit("o.a", 1)
    waits = []
    for _ in range(9):
        before = clock.seconds()
        sender.answer_all(FAIL)
        (row,) = store.queues["b"].values()
        waits.append(row.next_at - before)
        clock.advance(row.next_at - before)
    assert waits == [5, 30, 120, 600, 1800, 3600, 7200, 7200, 7200]


def test_continuous_failure_pauses_the_destination() -> None:
    """Failing for disable_after_seconds pauses it with a reason (RT-D05); resume delivers again."""
    ob, broker, store, sender, clock = make(disable_after_seconds=60)
    broker.commit("o.a", 1)
    sender.answer_all(FAIL)
    clock.advance(61)
    sender.answer_all(FAIL)  # the retry at +5 s... and beyond
    w = ob.workers["b"]
    for _ in range(5):
        clock.advance(200)
        sender.answer_all(FAIL)
    assert w.state.paused and "failing continuously" in w.state.reason
    assert store.states["b"].paused
    broker.commit("o.a", 2)
    clock.advance(10000)
    assert sender.open() == []
    _result(Deferred.fromCoroutine(ob.set_paused("b", False)))
    clock.advance(0.2)
    assert len(sender.open()) == 2
    sender.answer_all(OK)
    assert not w.state.paused and store.queues["b"] == {}


def test_api_pause_stops_new_sends() -> None:
    """A paused destination sends nothing new; its position stays until resumed."""
    ob, broker, _store, sender, _clock = make()
    _result(Deferred.fromCoroutine(ob.set_paused("b", True)))
    broker.commit("o.a", 1)
    assert sender.calls == []
    _result(Deferred.fromCoroutine(ob.set_paused("b", False)))
    assert len(sender.open()) == 1


def test_event_format_headers_and_signature() -> None:
    """format=event: JSON of the event, webhook-id = event id, timestamp, v1 signature, the extra headers."""
    from standardwebhooks.webhooks import Webhook

    _ob, broker, _store, sender, _clock = make(headers=(("X-Env", "prod"),))
    e = broker.commit("o.a", {"k": "v"})
    body, headers, _ = sender.calls[0]
    h = dict(headers)
    assert h["webhook-id"] == e.id and h["X-Env"] == "prod" and h["Content-Type"] == "application/json"
    assert body == e.json()
    # the fake clock is the signing time: verify at that time
    wh = Webhook("whsec_" + KEY)
    expected = wh.sign(e.id, __import__("datetime").datetime.fromtimestamp(int(h["webhook-timestamp"]),
                       tz=__import__("datetime").timezone.utc), body.decode())
    assert h["webhook-signature"] == expected


def test_raw_format_forwards_the_original_request_without_secret_headers() -> None:
    """format=raw: the body bytes and headers as received, minus secret ones and the source's redact_headers."""
    _ob, broker, _store, sender, _clock = make(format="raw")
    raw = b'{"zen":"hi"}'
    hdrs = {"X-GitHub-Event": "ping", "X-Hub-Signature-256": "sha256=ab", "Authorization": "x", "X-Api-Key": "k",
            "Content-Type": "application/json", "Content-Length": "12"}
    broker.commit("o.gh", {"zen": "hi"}, source="gh", raw=raw, headers=hdrs)
    broker.commit("o.api", {"n": 1})  # no raw body: sent as format=event
    (b1, h1, _), (_b2, h2, _) = sender.calls
    assert b1 == raw
    names = {k.lower() for k, _ in h1}
    assert names == {"x-github-event", "x-hub-signature-256", "content-type"}
    assert "webhook-id" not in names
    assert "webhook-signature" in dict(h2)


def test_enqueue_delivers_exact_bytes_with_retries() -> None:
    """enqueue: an ad-hoc payload is sent with exactly its headers (no signature), retried like events."""
    ob, _broker, store, sender, clock = make(channels=())
    d = ob.enqueue("b", b"payload", [("X-Pusher-Key", "k")], "adhoc-1")
    assert d.called
    clock.advance(0.1)
    body, headers, _ = sender.calls[0]
    assert body == b"payload" and headers == [("X-Pusher-Key", "k")]
    sender.answer_all(FAIL)
    assert store.queues["b"]["adhoc-1"].attempts == 1
    clock.advance(SCHEDULE[0] * 1.3)
    assert sender.answer_all(OK) == 1
    assert store.queues["b"] == {}
    f = ob.enqueue("nope", b"", [], "x")
    assert f.called and isinstance(_failure(f), UnknownDestination)


def test_store_failure_keeps_the_event_until_it_is_written() -> None:
    """While the state store fails, a failed event is not passed by the position; written once the store is back."""
    ob, broker, store, sender, clock = make()
    broker.commit("o.a", 1)
    store.broken = OSError("disk gone")
    sender.answer_all(FAIL)
    assert ob.workers["b"].state.position == 0
    store.broken = None
    clock.advance(1.5)
    assert ob.workers["b"].state.position == 1 and len(store.queues["b"]) == 1


def test_restart_resumes_from_the_saved_position() -> None:
    """A new engine on the same store sends only the events after the saved position (at-least-once)."""
    ob, broker, store, sender, clock = make()
    broker.commit("o.a", 1)
    sender.answer_all(OK)
    broker.commit("o.a", 2)  # in flight when "killed"
    sender2 = FakeSender()
    ob2 = Outbound(ob.config, clock, broker, store, Stats().destinations, sender_factory=lambda _: sender2)
    ob2.start()
    assert [b for b, _, _ in sender2.calls] == [broker.events[-1].json()]


def test_describe_lists_counters() -> None:
    """The API list shows state and counters of every destination."""
    ob, broker, _store, sender, _clock = make()
    broker.commit("o.a", 1)
    sender.answer_all(OK)
    (row,) = _result(Deferred.fromCoroutine(ob.describe()))
    assert row["name"] == "b" and row["state"] == "active" and row["delivered"] == 1 and row["pending"] == 0
    assert row["last_success"] is not None


def test_replay_queues_journaled_events_after_offsets() -> None:
    """replay re-sends the events after the given offsets of matching channels."""
    ob, broker, _store, sender, clock = make()
    for i in range(4):
        broker.commit("o.a", i)
    sender.answer_all(OK)
    queued, more = _result(Deferred.fromCoroutine(ob.replay("b", {"o.a": 2, "x.y": 0})))
    assert (queued, more) == (2, False)
    clock.advance(0.2)
    assert sender.answer_all(OK) == 2


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def _failure(d: Deferred[Any]) -> BaseException:
    out: list[Any] = []
    d.addErrback(out.append)
    return out[0].value  # type: ignore[no-any-return]


def test_dropped_headers_cover_the_secret_headers_of_ingest() -> None:
    """Raw forwarding drops at least every header ingest treats as a secret (routes.verify.SECRET_HEADERS)."""
    from twisted_rt.outbound._policy import DROPPED_HEADERS
    from twisted_rt.routes.verify import SECRET_HEADERS

    assert SECRET_HEADERS <= DROPPED_HEADERS


# -- live events taken as they come (a broker whose live events are in seq order) --------


def _offsets(calls: list[tuple[bytes, list[tuple[str, str]], Deferred[Outcome]]]) -> list[tuple[str, int]]:
    import json

    return [(json.loads(body)["channel"], json.loads(body)["offset"]) for body, _, _ in calls]


def test_caught_up_destination_takes_live_events_without_reading_the_journal() -> None:
    """Caught up, with a broker whose live events come in seq order: each new event is sent as it comes, no journal read."""
    _ob, broker, store, sender, _clock = make()
    broker.live_in_order = True
    reads = len(broker.replays)
    events = [broker.commit("o.a", i) for i in range(5)] + [broker.commit("x.other", 9), broker.commit("o.b", 5)]
    assert len(broker.replays) == reads
    assert _offsets(sender.calls) == [("o.a", 1), ("o.a", 2), ("o.a", 3), ("o.a", 4), ("o.a", 5), ("o.b", 1)]
    sender.answer_all(OK)
    assert store.states["b"].position == events[-1].seq and store.states["b"].delivered == 6


def test_live_events_during_a_read_are_read_back_in_order_once() -> None:
    """Events committed while a journal read is in flight are not taken live: the next read brings them, each sent once, in order."""
    _ob, broker, _store, sender, _clock = make(max_in_flight=100)
    broker.hold_reads = True
    broker.commit("o.a", 1)  # not in order (the default): a read, held
    assert len(broker.held) == 1
    broker.live_in_order = True
    broker.commit("o.a", 2)  # a read in flight: read again after it
    broker.commit("o.a", 3)
    assert sender.calls == []
    while broker.held:
        broker.release_one()
    assert _offsets(sender.calls) == [("o.a", 1), ("o.a", 2), ("o.a", 3)]
    broker.hold_reads = False
    reads = len(broker.replays)
    broker.commit("o.a", 4)  # caught up again: taken live
    assert _offsets(sender.calls)[-1] == ("o.a", 4) and len(sender.calls) == 4 and len(broker.replays) == reads


def test_live_event_matching_two_patterns_is_sent_once() -> None:
    """A destination whose two patterns both match an event hears it twice live and sends it once."""
    _ob, broker, _store, sender, _clock = make(channels=("o.>", "o.a"))
    broker.live_in_order = True
    broker.commit("o.a", 1)
    broker.commit("o.a", 2)
    assert _offsets(sender.calls) == [("o.a", 1), ("o.a", 2)]


def test_live_events_while_paused_are_read_after_resume() -> None:
    """Paused, live events are not taken; after resume the journal read brings every one of them in order."""
    ob, broker, _store, sender, _clock = make()
    broker.live_in_order = True
    w = ob.worker("b")
    w.pause("test")
    broker.commit("o.a", 1)
    broker.commit("o.a", 2)
    assert sender.calls == []
    w.resume()
    assert _offsets(sender.calls) == [("o.a", 1), ("o.a", 2)]

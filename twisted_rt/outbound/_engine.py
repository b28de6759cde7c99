# -*- test-case-name: tests.test_dest_engine -*-
"""
The delivery engine: one L{Worker} per destination, all under L{Outbound}.

The rule of a worker (at-least-once):

  - It reads the journal in seq order (C{broker.replay(patterns,
    after_seq=...)}) into a bounded buffer, woken by a live subscription to
    its patterns, and sends up to C{max_in_flight} requests at once
    (first attempts and retries together).
  - An event is I{done} once the receiver answered 2xx, or once it is
    durably in the queue of retries (after its first failed attempt: a copy
    of the request, so the journal's trimming cannot lose it).  The
    I{position} (a seq, saved in the delivery store) only moves past done
    events: after a crash every event above it is sent again.
  - Retries are read from the store when due (the earliest C{next_at}),
    with exponential backoff and jitter (L{twisted_rt.outbound._policy}),
    or the C{Retry-After} of the answer; after C{max_attempts} the row is a
    dead letter.  Rows of the queue are independent: one failing event
    never holds the others.
  - Failing continuously for C{disable_after_seconds} pauses the
    destination (C{RT-D05}, the reason kept in its state) until resumed.
  - With a shared store (Redis), a worker delivers only while its node
    holds the destination's lease (L{LEASE_SECONDS}, renewed every
    L{LEASE_RENEW_SECONDS}); another node takes it when it expires.

Clock and randomness are injected (a test drives a fake C{Clock}).
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict, deque
from dataclasses import replace
from typing import Any, Callable, Mapping, Protocol, Sequence

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rt.core.config import Config, DestinationConfig
from twisted_rt.core.event import Event, now_iso
from twisted_rt.core.matcher import matches
from twisted_rt.core.metrics import DestinationStats
from twisted_rt.interfaces import Broker, Reactor
from twisted_rt.outbound._http import Outcome, Sender
from twisted_rt.outbound._policy import backoff, forwarded_headers, retry_after, signer
from twisted_rt.store.deliveries import Delivery, DeliveryStore, DestState

__all__ = ["LEASE_RENEW_SECONDS", "LEASE_SECONDS", "Outbound", "UnknownDestination", "Worker"]

#: how long a node's lease on a destination lasts without renewal (shared stores)
LEASE_SECONDS = 10.0
#: how often the lease is renewed, or tried by a node that does not hold it
LEASE_RENEW_SECONDS = 3.0
#: events read ahead of the requests in flight (and bytes of them, about)
BUFFER_EVENTS = 512
BUFFER_BYTES = 4 * 1024 * 1024
#: the state row (the position) is written at most this often while deliveries go on (the first at once);
#: a crash in between only sends again what the receiver already got (at-least-once), never loses one
SAVE_EVERY_SECONDS = 0.1
#: a failing store write is tried again after this long
STORE_RETRY_SECONDS = 1.0
#: seconds a stopping daemon waits for requests in flight
STOP_GRACE_SECONDS = 2.0
#: at most one log line per destination and failure kind this often (the rest are counted)
LOG_EVERY_SECONDS = 10.0
#: events one replay request may queue
MAX_REPLAY = 10000

#: log categories of failures, by L{Outcome.kind}
CATEGORIES = {
    "refused": "RT-D01",
    "timeout": "RT-D02",
    "status": "RT-D03",
    "tls": "RT-D06",
    "error": "RT-D07",
}

ControlSender = Callable[[str, dict[str, Any]], "Deferred[None]"]


class UnknownDestination(KeyError):
    """No C{[[destinations]]} has that name."""


class SenderLike(Protocol):
    """What a worker sends with (L{Sender}, or a test's fake)."""

    def send(self, body: bytes, headers: Sequence[tuple[str, str]]) -> Deferred[Outcome]:
        """One attempt."""

    def close(self) -> Deferred[None]:
        """Close connections."""


class _Live:
    """The live subscription of a worker: any matching event wakes it."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def deliver(self, event: Event) -> None:
        self.worker.live(event)


class Worker:
    """
    Delivers one destination (see the module's docstring).

    @ivar active: this node delivers the destination now (it holds the
        lease, or the store is not shared).
    """

    log = Logger()

    def __init__(
        self,
        dest: DestinationConfig,
        config: Config,
        reactor: Reactor,
        broker: Broker,
        store: DeliveryStore,
        sender: SenderLike,
        stats: DestinationStats,
        rand: Callable[[], float],
        node_id: str,
    ) -> None:
        self.dest = dest
        self.name = dest.name
        self.config = config
        self.reactor = reactor
        self.broker = broker
        self.store = store
        self.sender = sender
        self.stats = stats
        self.rand = rand
        self.node_id = node_id
        self.key = dest.secret_key()
        self._sign = signer(self.key) if self.key else None
        self.patterns = list(dest.channels)
        self.extra_headers = list(dest.headers)
        self.state = DestState()
        self.active = False
        self.stopped = False
        self._live = _Live(self)
        self._subscribed = False
        self._buffer: deque[Event] = deque()
        self._read_upto = 0
        self._reading = False
        self._read_again = False
        self._window: OrderedDict[int, bool] = OrderedDict()  # seq -> done, first attempts in seq order
        self._fresh: dict[int, Delivery] = {}
        self._retrying: dict[str, Delivery] = {}
        self._retry_call: IDelayedCall | None = None
        self._retry_at: float | None = None
        self._fetching = False
        self._retry_waiting = False
        self._saving = False
        self._save_again = False
        self._save_call: IDelayedCall | None = None
        self._latency = stats.latency.labels(self.name)
        self._lease_call: IDelayedCall | None = None
        self._activating = False
        self._pumping = False
        self._caught_up = False
        self._logged: dict[str, tuple[float, int]] = {}

    # -- lifecycle ---------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Requests in flight (first attempts and retries)."""
        return len(self._fresh) + len(self._retrying)

    @property
    def pending(self) -> int:
        """Events not delivered yet that this node knows of: read ahead, in flight, waiting for a retry."""
        return len(self._buffer) + len(self._window) + self.state.retrying

    def start(self) -> Deferred[None]:
        """Begin: at once with a local store, else when this node gets the lease."""
        if self.store.shared:
            self._lease_tick()
            return succeed(None)
        return self._activate()

    def _activate(self) -> Deferred[None]:
        self._activating = True

        async def go() -> None:
            try:
                state = await self.store.load(self.name)
                if state.position is None:
                    state.position = await self.broker.position()
                    await self.store.save(self.name, state)
                if self.stopped:
                    return
                self.state = state
                self._read_upto = state.position
                self.active = True
                if not self._subscribed:
                    for p in self.patterns:
                        self.broker.subscribe(p, self._live)
                    self._subscribed = True
                self.log.info(
                    "destination {name}: delivering from seq {seq}{paused}",
                    name=self.name,
                    seq=state.position,
                    paused=f" (paused: {state.reason})" if state.paused else "",
                    log_category="RT-D10",
                )
                self._caught_up = False
                self._fill()
                self._schedule_retry(self.reactor.seconds())
            finally:
                self._activating = False

        d = Deferred.fromCoroutine(go())

        def failed(f: Failure) -> None:
            self._problem("store", f"cannot load the delivery state: {f.getErrorMessage()}", "RT-D08")
            if not self.stopped and not self.store.shared:
                self.reactor.callLater(STORE_RETRY_SECONDS, self._activate)

        return d.addErrback(failed)

    def _deactivate(self) -> None:
        """Another node holds the lease: stop sending (what is in flight is left to finish, unrecorded)."""
        self.active = False
        self._buffer.clear()
        self._window.clear()
        self._fresh.clear()
        self._retrying.clear()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()  # the new holder's position is not overwritten with an older one
        self._save_call = None
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        if self._subscribed:
            for p in self.patterns:
                self.broker.unsubscribe(p, self._live)
            self._subscribed = False

    def _lease_tick(self) -> None:
        self._lease_call = None
        if self.stopped:
            return
        d = self.store.acquire(self.name, self.node_id, LEASE_SECONDS)

        def held(mine: bool) -> None:
            if self.stopped:
                return
            if mine and not self.active and not self._activating:
                self.log.info("destination {name}: this node took the lease", name=self.name, log_category="RT-D11")
                self._activate()
            elif not mine and self.active:
                self.log.warn("destination {name}: lease lost to another node", name=self.name, log_category="RT-D11")
                self._deactivate()
            elif mine and self.active:
                self._schedule_retry(self.reactor.seconds())  # rows another node queued (enqueue, replay)

        def failed(f: Failure) -> None:
            if self.active:  # cannot renew: assume it will expire
                self._deactivate()
            self._problem("store", f"lease: {f.getErrorMessage()}", "RT-D08")

        d.addCallback(held).addErrback(failed)
        d.addBoth(lambda _: self._next_lease())

    def _next_lease(self) -> None:
        if not self.stopped and self._lease_call is None:
            self._lease_call = self.reactor.callLater(LEASE_RENEW_SECONDS, self._lease_tick)

    def stop(self) -> Deferred[None]:
        """Send nothing more; wait a little for requests in flight; save the state; give up the lease."""
        self.stopped = True
        for call in (self._retry_call, self._lease_call, self._save_call):
            if call is not None and call.active():
                call.cancel()
        self._unsubscribe()

        async def go() -> None:
            waited = 0.0
            while self.inflight and waited < STOP_GRACE_SECONDS:
                d: Deferred[None] = Deferred()
                self.reactor.callLater(0.05, d.callback, None)
                await d
                waited += 0.05
            if self.active:
                self._advance()
                try:
                    await self.store.save(self.name, self.state)
                except Exception as e:  # noqa: BLE001 - logged; the position saved before stands
                    self._problem("store", f"cannot save the delivery state: {e}", "RT-D08")
                if self.store.shared:
                    await self.store.release(self.name, self.node_id)
            self.active = False

        return Deferred.fromCoroutine(go()).addErrback(lambda f: None)

    # -- reading the journal ---------------------------------------------------

    def live(self, event: Event) -> None:
        """
        A matching event was journaled: when this worker has read everything
        before it (caught up, no read in flight) and the broker hands events
        over in seq order, it is taken as it is; otherwise the journal is
        read on (L{wake}).  Saves a read of the journal per event when a
        destination keeps up.
        """
        if (
            self._caught_up
            and not self._reading
            and self.broker.live_in_order
            and event.seq > self._read_upto
            and self.active
            and not self.state.paused
            and not self.stopped
            and len(self._buffer) < BUFFER_EVENTS // 2
        ):
            self._buffer.append(event)
            self._read_upto = event.seq
            self._pump()
            return
        self.wake(event.seq)

    def wake(self, seq: int = 0) -> None:
        """A matching event was journaled (or something changed): read on."""
        if seq and seq <= self._read_upto:
            return
        self._caught_up = False
        self._fill()

    def _fill(self) -> None:
        if not self.active or self.state.paused or self.stopped:
            return
        if self._reading:
            self._read_again = True
            return
        if len(self._buffer) >= BUFFER_EVENTS // 2:
            self._pump()
            return
        self._reading = True
        self._read_again = False
        after = self._read_upto
        d = self.broker.replay(
            self.patterns, {}, BUFFER_EVENTS - len(self._buffer), after_seq=after, max_bytes=BUFFER_BYTES
        )

        def got(events: list[Event]) -> None:
            self._reading = False
            if not self.active or after != self._read_upto:
                return
            if events:
                self._buffer.extend(events)
                self._read_upto = events[-1].seq
                self._read_again = True
            else:
                self._caught_up = True  # read again when woken by a new event
            self._pump()
            if self._read_again:
                self._fill()

        def failed(f: Failure) -> None:
            self._reading = False
            self._problem("journal", f"cannot read the journal: {f.getErrorMessage()}", "RT-D08")
            self.reactor.callLater(STORE_RETRY_SECONDS, self._fill)

        d.addCallback(got).addErrback(failed)

    def _pump(self) -> None:
        """Start first attempts from the buffer while there is room."""
        if self._pumping or self.state.paused or not self.active:
            return
        self._pumping = True
        try:
            now = self.reactor.seconds()
            limit = self.dest.max_in_flight
            while self._buffer and self.inflight < limit and self.active and not self.state.paused:
                event = self._buffer.popleft()
                delivery = self.delivery_of(event, now)
                self._window[event.seq] = False
                self._fresh[event.seq] = delivery
                self._attempt(delivery, fresh=True)
        finally:
            self._pumping = False
        if len(self._buffer) < BUFFER_EVENTS // 2 and not self._caught_up:
            self._fill()

    def delivery_of(self, event: Event, now: float) -> Delivery:
        """What is sent for C{event}: its raw request (C{format = "raw"}, webhooks only) or its JSON."""
        if self.dest.format == "raw" and event.raw is not None:
            source = self.config.source(event.source)
            headers = forwarded_headers(event.headers, source.redact_headers if source else ())
            return Delivery(
                id=event.id, body=event.raw, headers=tuple(headers + self.extra_headers), sign=False,
                seq=event.seq, channel=event.channel, offset=event.offset, created=now,
            )
        return Delivery(
            id=event.id, body=event.json(), headers=tuple([("Content-Type", "application/json"), *self.extra_headers]),
            sign=True, seq=event.seq, channel=event.channel, offset=event.offset, created=now,
        )

    # -- attempts ---------------------------------------------------------------

    def _attempt(self, delivery: Delivery, fresh: bool) -> None:
        headers = list(delivery.headers)
        if delivery.sign:
            ts = int(self.reactor.seconds())
            headers += [("webhook-id", delivery.id), ("webhook-timestamp", str(ts))]
            if self._sign is not None:
                headers.append(("webhook-signature", self._sign(delivery.id, ts, delivery.body)))
        self.stats.attempts[self.name] += 1
        d = self.sender.send(delivery.body, headers)
        d.addCallback(self._answered, delivery, fresh)
        d.addErrback(lambda f: self.log.failure("destination {name}: delivery bookkeeping", f, name=self.name))

    def _answered(self, outcome: Outcome, delivery: Delivery, fresh: bool) -> None:
        if not self.active:
            return
        if fresh and delivery.seq not in self._fresh:
            return  # dropped by a lease loss
        if not fresh and delivery.id not in self._retrying:
            return
        self._latency.observe(outcome.seconds)
        now = self.reactor.seconds()
        delivery.attempts += 1
        if outcome.ok:
            self._succeeded(delivery, fresh, now)
        else:
            self._failed(delivery, fresh, outcome, now)

    def _succeeded(self, delivery: Delivery, fresh: bool, now: float) -> None:
        self.stats.successes[self.name] += 1
        st = self.state
        st.delivered += 1
        st.last_success = self.reactor.seconds()
        st.failing_since = 0.0
        if fresh:
            self._done(delivery.seq)
        else:
            self.store.delete(self.name, [delivery.id]).addCallbacks(
                lambda _: self._retry_finished(delivery, -1),
                lambda f: self._store_failed(f, lambda: self._succeeded(delivery, False, now)),
            )

    def _failed(self, delivery: Delivery, fresh: bool, outcome: Outcome, now: float) -> None:
        self.stats.failures[self.name] += 1
        st = self.state
        st.failed += 1
        st.last_error = f"{now_iso(self.reactor.seconds())} {outcome.message}"
        delivery.last_error = outcome.message
        if not st.failing_since:
            st.failing_since = self.reactor.seconds()
        self._log_failure(outcome, delivery)
        if delivery.attempts >= self.dest.max_attempts:
            delivery.dead = True
            delivery.next_at = self.reactor.seconds()
            self.stats.dead[self.name] += 1
            self.log.warn(
                "destination {name}: {channel}#{offset} (id {id}) dead-lettered after {n} attempts: {error}",
                name=self.name, channel=delivery.channel, offset=delivery.offset, id=delivery.id,
                n=delivery.attempts, error=outcome.message, log_category="RT-D04",
            )
        else:
            wait = retry_after(outcome.retry_after, self.reactor.seconds())
            delivery.next_at = now + (wait if wait is not None else backoff(delivery.attempts, self.rand))
        self._queue(delivery, fresh)
        self._check_disable(now)

    def _queue(self, delivery: Delivery, fresh: bool) -> None:
        """Put a failed delivery in the queue (a retry or a dead letter); a first attempt is then done."""

        def stored(_: object) -> None:
            if fresh:
                self.state.dead += delivery.dead
                self.state.retrying += not delivery.dead
                self._done(delivery.seq)
            else:
                self._retry_finished(delivery, 0)
            if not delivery.dead:
                self._schedule_retry(delivery.next_at)

        self.store.put(self.name, [delivery]).addCallbacks(
            stored, lambda f: self._store_failed(f, lambda: self._queue(delivery, fresh))
        )

    def _store_failed(self, f: Failure, again: Callable[[], None]) -> None:
        self._problem("store", f"cannot write the delivery state: {f.getErrorMessage()}", "RT-D08")
        if not self.stopped:
            self.reactor.callLater(STORE_RETRY_SECONDS, again)

    def _done(self, seq: int) -> None:
        self._fresh.pop(seq, None)
        if seq in self._window:
            self._window[seq] = True
        self._advance()
        self._slot_free()

    def _advance(self) -> None:
        moved = False
        window = self._window
        while window:
            seq, done = next(iter(window.items()))
            if not done:
                break
            window.popitem(last=False)
            self.state.position = seq
            moved = True
        if moved:
            self._save()

    def _save(self) -> None:
        """Save the state row; one write at a time, the next one takes the latest state."""
        if self._saving or self._save_call is not None:
            self._save_again = True
            return
        self._saving = True
        self._save_again = False

        def saved(_: object) -> None:
            self._saving = False
            if self._save_again and not self.stopped:
                self._save_call = self.reactor.callLater(SAVE_EVERY_SECONDS, self._save_held)

        def failed(f: Failure) -> None:
            self._saving = False
            self._problem("store", f"cannot save the delivery state: {f.getErrorMessage()}", "RT-D08")
            self.reactor.callLater(STORE_RETRY_SECONDS, self._save)

        self.store.save(self.name, replace(self.state)).addCallbacks(saved, failed)

    def _save_held(self) -> None:
        self._save_call = None
        if not self.stopped:
            self._save()

    def _slot_free(self) -> None:
        if self._retry_waiting:
            self._retry_waiting = False
            self._fetch_retries()
        self._pump()

    # -- retries ----------------------------------------------------------------

    def _schedule_retry(self, at: float) -> None:
        if not self.active or self.stopped:
            return
        if self._retry_call is not None and self._retry_call.active():
            if self._retry_at is not None and self._retry_at <= at:
                return
            self._retry_call.cancel()
        self._retry_at = at
        self._retry_call = self.reactor.callLater(max(0.0, at - self.reactor.seconds()), self._retry_due)

    def _retry_due(self) -> None:
        self._retry_call = None
        self._retry_at = None
        self._fetch_retries()

    def _fetch_retries(self) -> None:
        if not self.active or self.state.paused or self.stopped:
            return
        if self._fetching:
            self._retry_waiting = True
            return
        room = self.dest.max_in_flight - self.inflight
        if room <= 0:
            self._retry_waiting = True
            return
        self._fetching = True
        now = self.reactor.seconds()

        async def go() -> None:
            rows = await self.store.due(self.name, now, room, skip=list(self._retrying))
            if not self.active or self.stopped:
                return
            for row in rows:
                if row.id in self._retrying:
                    continue
                self._retrying[row.id] = row
                self._attempt(row, fresh=False)
            if len(rows) >= room:
                self._retry_waiting = True
                return
            nxt = await self.store.next_due(self.name)
            if nxt is not None:
                if nxt > now:
                    self._schedule_retry(nxt)
                else:
                    self._retry_waiting = True  # those in flight: looked at again when one finishes

        def done(_: object) -> None:
            self._fetching = False
            if self._retry_waiting and self.inflight < self.dest.max_in_flight:
                self._retry_waiting = False
                self._schedule_retry(self.reactor.seconds() + STORE_RETRY_SECONDS / 10)

        def failed(f: Failure) -> None:
            self._problem("store", f"cannot read the retry queue: {f.getErrorMessage()}", "RT-D08")
            self._schedule_retry(self.reactor.seconds() + STORE_RETRY_SECONDS)

        Deferred.fromCoroutine(go()).addErrback(failed).addBoth(done)

    def _retry_finished(self, delivery: Delivery, change: int) -> None:
        """A retry ended: delivered (C{change} -1 of retrying), or put back / dead-lettered."""
        self._retrying.pop(delivery.id, None)
        if change:
            self.state.retrying = max(0, self.state.retrying - 1)
        elif delivery.dead:
            self.state.retrying = max(0, self.state.retrying - 1)
            self.state.dead += 1
        self._save()
        self._slot_free()

    # -- pausing ----------------------------------------------------------------

    def _check_disable(self, now: float) -> None:
        st = self.state
        if st.paused or not st.failing_since:
            return
        if self.reactor.seconds() - st.failing_since >= self.dest.disable_after_seconds:
            self.pause(
                f"failing continuously since {now_iso(st.failing_since)}"
                f" (disable_after_seconds = {self.dest.disable_after_seconds:g}); last error: {st.last_error}"
            )

    def pause(self, reason: str) -> None:
        """Stop sending (requests in flight finish) and say why."""
        if self.state.paused:
            return
        self.state.paused = True
        self.state.reason = reason
        self.log.warn("destination {name} paused: {reason}", name=self.name, reason=reason, log_category="RT-D05")
        if self.active:
            self._save()

    def resume(self) -> None:
        """Deliver again (from where it stopped)."""
        st = self.state
        if not st.paused:
            return
        st.paused = False
        st.reason = ""
        st.failing_since = 0.0
        self.log.info("destination {name} resumed", name=self.name, log_category="RT-D12")
        if self.active:
            self._save()
            self._caught_up = False
            self._fill()
            self._pump()
            self._schedule_retry(self.reactor.seconds())

    def refresh(self) -> None:
        """The queue changed elsewhere (revived dead letters, a replay, an ad-hoc payload): recount, look for due rows."""
        if not self.active:
            return

        def counted(fresh: DestState) -> None:
            self.state.retrying = fresh.retrying
            self.state.dead = fresh.dead
            self._schedule_retry(self.reactor.seconds())

        self.store.load(self.name).addCallback(counted).addErrback(
            lambda f: self._problem("store", f"cannot count the queue: {f.getErrorMessage()}", "RT-D08")
        )

    # -- logs -------------------------------------------------------------------

    def _log_failure(self, outcome: Outcome, delivery: Delivery) -> None:
        category = CATEGORIES.get(outcome.kind, "RT-D07")
        now = time.monotonic()
        last, suppressed = self._logged.get(category, (-LOG_EVERY_SECONDS, 0))
        if now - last < LOG_EVERY_SECONDS:
            self._logged[category] = (last, suppressed + 1)
            return
        self._logged[category] = (now, 0)
        self.log.warn(
            "destination {name}: {channel}#{offset} attempt {n} failed: {error}{more}",
            name=self.name, channel=delivery.channel, offset=delivery.offset, n=delivery.attempts,
            error=outcome.message, more=f" ({suppressed} more such failures not logged)" if suppressed else "",
            kind=outcome.kind, log_category=category,
        )

    def _problem(self, kind: str, message: str, category: str) -> None:
        now = time.monotonic()
        last, n = self._logged.get(category, (-LOG_EVERY_SECONDS, 0))
        if now - last < LOG_EVERY_SECONDS:
            self._logged[category] = (last, n + 1)
            return
        self._logged[category] = (now, 0)
        self.log.warn("destination {name}: {message}", name=self.name, message=message, log_category=category)


class Outbound:
    """
    Every configured destination's L{Worker}, and what the API and the
    Pusher webhooks ask of them.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Reactor,
        broker: Broker,
        store: DeliveryStore,
        stats: DestinationStats,
        *,
        sender_factory: Callable[[DestinationConfig], SenderLike] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.broker = broker
        self.store = store
        self.stats = stats
        make = sender_factory or (lambda d: Sender(reactor, d))
        self.workers: dict[str, Worker] = {
            d.name: Worker(d, config, reactor, broker, store, make(d), stats, rand, broker.node_id)
            for d in config.destinations
        }
        self._stopped = False
        stats.pending = lambda: {n: w.pending for n, w in self.workers.items()}
        broker.on_broadcast("dest", self._on_control)

    def worker(self, name: str) -> Worker:
        """The worker of destination C{name}.  @raise UnknownDestination: no such destination."""
        w = self.workers.get(name)
        if w is None:
            raise UnknownDestination(name)
        return w

    def start(self) -> Deferred[None]:
        """Create the store's tables, then start every destination."""

        async def go() -> None:
            try:
                await self.store.start()
            except Exception as e:  # noqa: BLE001 - the journal may come up later: tried again
                if self._stopped:
                    return
                self.log.warn("destinations: cannot open the delivery state ({e}); trying again", e=e,
                              log_category="RT-D08")
                self.reactor.callLater(STORE_RETRY_SECONDS, self.start)
                return
            for w in self.workers.values():
                if not self._stopped:
                    await w.start()

        return Deferred.fromCoroutine(go())

    def stop(self) -> Deferred[None]:
        """Stop every destination (state saved), then close the connections."""
        self._stopped = True
        d = DeferredList([w.stop() for w in self.workers.values()], consumeErrors=True)
        d.addCallback(lambda _: DeferredList([w.sender.close() for w in self.workers.values()], consumeErrors=True))
        return d.addCallback(lambda _: None)

    # -- ad-hoc payloads (Pusher webhooks) ------------------------------------------

    def enqueue(self, destination: str, body: bytes, headers: Sequence[tuple[str, str]], id: str) -> Deferred[None]:
        """
        Deliver C{body} with exactly C{headers} to C{destination} (no
        signature added), with the same retries and dead letters; fires once
        it is durably queued.  @raise UnknownDestination: (as a failure).
        """
        try:
            w = self.worker(destination)
        except UnknownDestination as e:
            d: Deferred[None] = Deferred()
            d.errback(e)
            return d
        now = self.reactor.seconds()
        row = Delivery(id=id, body=body, headers=tuple(headers), sign=False, next_at=now, created=now)
        return self.store.put(w.name, [row]).addCallback(lambda _: self._changed(w.name))

    def _changed(self, name: str) -> None:
        self.broker.broadcast("dest", {"op": "refresh", "name": name}).addErrback(lambda f: None)

    # -- the API --------------------------------------------------------------------

    async def describe(self) -> list[dict[str, Any]]:
        """The C{GET /api/destinations} list."""
        out = []
        for name, w in self.workers.items():
            st = w.state if w.active else await self.store.load(name)
            out.append({
                "name": name,
                "url": w.dest.url,
                "state": "paused" if st.paused else "active",
                "reason": st.reason,
                "pending": w.pending if w.active else st.retrying,
                "retrying": st.retrying,
                "dead": st.dead,
                "delivered": st.delivered,
                "failed": st.failed,
                "last_success": now_iso(st.last_success) if st.last_success else None,
                "last_error": st.last_error or None,
                "position": st.position,
                "delivering_node": w.active,
            })
        return out

    async def dead(self, name: str, limit: int) -> list[dict[str, Any]]:
        """Dead letters of C{name}, the most recent first."""
        w = self.worker(name)
        return [d.summary() for d in await self.store.dead_letters(w.name, limit)]

    async def retry(self, name: str, ids: Sequence[str] | None) -> int:
        """Dead letters (all, or C{ids}) waiting again for an attempt now; how many."""
        w = self.worker(name)
        n = await self.store.revive(w.name, ids, self.reactor.seconds())
        self._changed(w.name)
        return n

    async def replay(self, name: str, since: Mapping[str, int]) -> tuple[int, bool]:
        """
        Queue for sending the journaled events after C{since}'s offsets (of
        channels the destination matches); how many, and whether there were
        more than L{MAX_REPLAY}.
        """
        w = self.worker(name)
        channels = [c for c in since if any(matches(p, c) for p in w.patterns)]
        if not channels:
            return 0, False
        queued = 0
        after = 0
        now = self.reactor.seconds()
        more = False
        while True:
            page = await self.broker.replay(channels, since, min(500, MAX_REPLAY - queued + 1), after_seq=after)
            if not page:
                break
            rows = [w.delivery_of(e, now) for e in page]
            for r in rows:
                r.next_at = now
                r.id = r.id  # the receiver dedupes on webhook-id: a replay is the same event
            if queued + len(rows) > MAX_REPLAY:
                rows = rows[: MAX_REPLAY - queued]
                more = True
            await self.store.put(w.name, rows)
            queued += len(rows)
            after = page[-1].seq
            if more:
                break
        self._changed(w.name)
        return queued, more

    async def set_paused(self, name: str, paused: bool) -> None:
        """Pause or resume C{name} on every node."""
        w = self.worker(name)
        await self.broker.broadcast("dest", {"op": "pause" if paused else "resume", "name": w.name})

    def _on_control(self, message: dict[str, Any], sender: str) -> None:
        w = self.workers.get(str(message.get("name")))
        if w is None:
            return
        op = message.get("op")
        if op == "pause":
            w.pause("paused by the API")
        elif op == "resume":
            w.resume()
        elif op == "refresh":
            w.refresh()

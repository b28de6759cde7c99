# -*- test-case-name: tests.test_broker -*-
"""
The broker: accepts events (durably), and hands each one to the matching
subscribers.

L{Broker} is the one interface the transports talk to.  L{LocalBroker} is a
single node: the SQLite journal plus an in-memory L{PatternIndex}.  The Redis
broker (L{twisted_rt.store.redis}) implements the same interface for several nodes.

Ordering: the journal fires commits in order and the broker fans out each
commit's events right after that commit's callbacks (L{Journal.after_callbacks}:
every publisher's ack goes first), so live events reach subscribers in
increasing C{seq} (so each channel's in offset order), and only after they are
durable.  The only event of a commit on an idle daemon is written at once
(L{twisted_rt.routes.ws}); the events of a bigger commit are queued for the
next round of writes, at most about L{FANOUT_TURN} deliveries per reactor
turn (the rest in the next turns, still before any later commit's events).
The fan-out does not depend on the publishes' Deferreds: one cancelled
because its publisher went away is still sent live.

Every L{Event} a broker returns or fans out carries its C{seq}, the
journal-wide order.  Reads are pages bounded by count I{and} bytes
(L{PAGE_BYTES}): a page may be short because of its byte bound, so a caller
pages a replay with C{after_seq=page[-1].seq} until a page comes back empty.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Mapping, Sequence, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_rt.core.event import Accepted, Draft, Event
from twisted_rt.core.matcher import PatternIndex
from twisted_rt.interfaces import PAGE_BYTES, Broker, ChannelInfo, Control, ControlHandler, Listener
from twisted_rt.store.journal import Journal

__all__ = ["FANOUT_TURN", "IndexedBroker", "LocalBroker"]

#: about this many deliveries per reactor turn: a commit of many events to many subscribers is
#: fanned out over several turns, so that it does not hold back the next commit's acks
FANOUT_TURN = 8000


class IndexedBroker(Broker):
    """
    The part every broker shares: this node's live subscriptions in a
    L{PatternIndex}, and the fan-out of an event to the listeners that match.
    """

    log = Logger()

    def __init__(self) -> None:
        self.index: PatternIndex[Listener] = PatternIndex()
        self.control_handlers: dict[str, list[ControlHandler]] = {}

    def on_broadcast(self, kind: str, handler: ControlHandler) -> None:
        self.control_handlers.setdefault(kind, []).append(handler)

    def broadcast(self, kind: str, message: Control) -> Deferred[None]:
        """One node: the handlers of this node, at once."""
        self.dispatch_control(kind, message, self.node_id)
        return succeed(None)

    def dispatch_control(self, kind: str, message: Control, sender: str) -> None:
        """Hand a control message to this node's C{kind} handlers."""
        for handler in self.control_handlers.get(kind, ()):
            try:
                handler(message, sender)
            except Exception:  # noqa: BLE001 - one bad handler must not stop the others
                self.log.failure("control message {kind} to {handler}", kind=kind, handler=handler)

    def subscribe(self, pattern: str, listener: Listener) -> None:
        self.index.add(pattern, listener)

    def unsubscribe(self, pattern: str, listener: Listener) -> None:
        self.index.remove(pattern, listener)

    def fanout(self, event: Event) -> None:
        """Hand C{event} to every local listener whose pattern matches."""
        for listener in self.index.match(event.channel):
            try:
                listener.deliver(event)
            except Exception:  # noqa: BLE001 - one bad listener must not stop the fan-out
                self.log.failure("delivering {event} to {listener}", event=event, listener=listener)

    def fanout_many(self, events: Sequence[Event]) -> None:
        """
        Hand C{events} (consecutive, of one channel, in order) to every local
        listener whose pattern matches: all of them in one call to a
        listener that has C{deliver_many} (L{Listener}), one by one to the
        others.  The per-listener work is then paid once per commit, not
        once per event.
        """
        for listener in self.index.match(events[0].channel):
            try:
                many = getattr(listener, "deliver_many", None)
                if many is not None:
                    many(events)
                else:
                    for event in events:
                        listener.deliver(event)
            except Exception:  # noqa: BLE001 - one bad listener must not stop the fan-out
                self.log.failure("delivering {events} to {listener}", events=events, listener=listener)

    def local_subscribers(self, channel: str) -> int:
        return len(set(self.index.match(channel)))


class LocalBroker(IndexedBroker):
    """One node: SQLite journal plus in-memory fan-out."""

    #: commits complete in seq order and each is fanned out before the next one's callbacks
    live_in_order = True

    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal
        journal.after_callbacks = self._fanout_commit
        # committed events not fanned out yet (FANOUT_TURN), and the call that goes on with them
        self._backlog: deque[Event] = deque()
        self._drain_call: IDelayedCall | None = None

    def start(self) -> Deferred[None]:
        return self.journal.open()

    def stop(self) -> Deferred[None]:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        self._backlog.clear()
        return self.journal.close()

    @property
    def ready(self) -> bool:
        return self.journal.healthy

    @property
    def not_ready_reason(self) -> str:
        return "" if self.journal.healthy else f"journal: {self.journal.error}"

    def publish(self, drafts: Sequence[Draft]) -> Deferred[list[Accepted]]:
        return self.journal.append(drafts)

    def _fanout_commit(self, accepted: list[list[Accepted]]) -> None:
        """
        Every publisher of a commit has been answered: fan out its new
        events, in order (L{Journal.after_callbacks}).  Acks first: the
        fan-out of a commit of N publishes is N x subscribers deliveries,
        and the last publisher used to wait for all of them (ack p50 of
        55-76 ms at 200 events/s to 1,000 subscribers).  The events go out
        in commit order, each commit's before the next one's (L{_drain},
        which may spread a big commit over several turns).  The hook does
        not go through the publishes' Deferreds: one cancelled because its
        publisher went away is still sent live (no gap).
        """
        backlog = self._backlog
        if not len(self.index) and not backlog:  # nobody subscribed on this node (e.g. a pure webhook intake)
            return
        for acc in accepted:
            for a in acc:
                if not a.duplicate:
                    backlog.append(a.event)
        if self._drain_call is None:
            self._drain()

    def _drain(self) -> None:
        """
        Fan out the committed events in order, about L{FANOUT_TURN}
        deliveries in this reactor turn; the rest goes on in the next turn
        (after the requests and commits that came meanwhile: the next
        commit's publishers are answered before this one's last events
        go out).  Events committed meanwhile queue behind them.  Consecutive
        events of one channel go out as one run (L{fanout_many}).
        """
        self._drain_call = None
        backlog = self._backlog
        budget = FANOUT_TURN
        fanout = self.fanout
        count = self.index.count  # once per event (or run): the per-delivery loop stays as it was
        while backlog:
            event = backlog.popleft()
            channel = event.channel
            n = count(channel)
            if backlog and backlog[0].channel == channel and n:
                # the next events are of the same channel: one run, within the budget
                run = [event]
                room = max(1, budget // n)
                while backlog and len(run) < room and backlog[0].channel == channel:
                    run.append(backlog.popleft())
                budget -= n * len(run)
                self.fanout_many(run)
            else:
                budget -= n
                fanout(event)
            if budget <= 0 and backlog:
                self._drain_call = cast(IReactorTime, self.journal.reactor).callLater(0, self._drain)
                return

    def history(
        self, channel: str, after: int = 0, limit: int = 1000, *, max_bytes: int = PAGE_BYTES
    ) -> Deferred[list[Event]]:
        return self.journal.history(channel, after, limit, max_bytes=max_bytes)

    def replay(
        self,
        pattern: str | Sequence[str],
        since: Mapping[str, int],
        limit: int = 1000,
        *,
        after_seq: int = 0,
        max_bytes: int = PAGE_BYTES,
    ) -> Deferred[list[Event]]:
        return self.journal.replay(pattern, since, limit, after_seq=after_seq, max_bytes=max_bytes)

    def position(self) -> Deferred[int]:
        return succeed(self.journal.seq)

    def last_offset(self, channel: str) -> Deferred[int]:
        return succeed(self.journal.last_offsets.get(channel, 0))

    def channels(self) -> Deferred[list[ChannelInfo]]:
        return succeed(_channel_list(self.journal.last_offsets.items(), self.local_subscribers))


def _channel_list(items: Iterable[tuple[str, int]], count: Any) -> list[ChannelInfo]:
    return [
        {"name": name, "subscribers": count(name), "last_offset": last}
        for name, last in sorted(items)
    ]

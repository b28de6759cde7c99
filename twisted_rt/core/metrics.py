# -*- test-case-name: tests.test_metrics -*-
"""
Counters of what the daemon does, for C{/api/stats} and C{/metrics}.

The per-delivery path only bumps plain integers on L{Stats} (no locks, no
label lookups); a custom Prometheus collector reads them at scrape time.
Rare things (commits, rejections) use C{prometheus_client} types directly.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ACCEPTED_OUTCOMES", "DestinationStats", "Stats"]

#: webhook outcomes that are not rejections
ACCEPTED_OUTCOMES = frozenset({"accepted", "duplicate"})


class Stats:
    """
    The daemon's counters.  One instance per daemon (and per test).

    @ivar connections: open streaming connections by transport.
    @ivar subscriptions: active subscriptions by transport.
    @ivar events_in: events accepted by source (duplicates excluded).
    @ivar events_out: events delivered by transport.
    @ivar dropped: connections closed or events dropped, by reason.
    @ivar webhooks: webhook outcomes by (source, outcome) where outcome is
        C{accepted}, C{duplicate} or a rejection reason.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started = clock()
        #: set by the API: whether the broker accepts events now
        self.ready: Callable[[], bool] | None = None
        self.connections: Counter[str] = Counter()
        self.subscriptions: Counter[str] = Counter()
        self.events_in: Counter[str] = Counter()
        self.events_out: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.webhooks: Counter[tuple[str, str]] = Counter()
        #: set by the service: presence members per channel, cluster-wide (as last counted)
        self.presence_gauge: Callable[[], Mapping[str, int]] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.commit_seconds = Histogram(
            "rt_journal_commit_seconds",
            "Time from a batch leaving the queue to its durable commit.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "rt_journal_batch_events",
            "Events per journal commit.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.destinations = DestinationStats(self.registry)
        self.registry.register(_StatsCollector(self))
        ProcessCollector(registry=self.registry)

    def on_commit(self, count: int, seconds: float) -> None:
        """Record one journal commit (the journal's C{on_commit} hook)."""
        self.commit_seconds.observe(seconds)
        self.batch_size.observe(count)

    def webhook(self, source: str, outcome: str) -> None:
        """Count one webhook outcome."""
        self.webhooks[(source, outcome)] += 1

    def rejected(self) -> dict[tuple[str, str], int]:
        """Rejected webhooks by (source, reason)."""
        return {k: v for k, v in self.webhooks.items() if k[1] not in ACCEPTED_OUTCOMES}

    def snapshot(self) -> dict[str, Any]:
        """The C{/api/stats} body."""
        by_source: dict[str, dict[str, int]] = {}
        for (source, outcome), n in sorted(self.webhooks.items()):
            by_source.setdefault(source, {})[outcome] = n
        return {
            "uptime_seconds": round(max(0.0, self._clock() - self.started), 3),
            "connections": sum(self.connections.values()),
            "connections_by_transport": dict(self.connections),
            "subscriptions": sum(self.subscriptions.values()),
            "events_in": sum(self.events_in.values()),
            "events_in_by_source": dict(self.events_in),
            "events_out": sum(self.events_out.values()),
            "events_out_by_transport": dict(self.events_out),
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "webhooks": by_source,
            "webhooks_rejected": sum(self.rejected().values()),
        }


class _StatsCollector(Collector):
    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats
        g = GaugeMetricFamily("rt_connections", "Open streaming connections.", labels=["transport"])
        for k, v in sorted(s.connections.items()):
            g.add_metric([k], v)
        yield g
        g = GaugeMetricFamily("rt_subscriptions", "Active subscriptions.", labels=["transport"])
        for k, v in sorted(s.subscriptions.items()):
            g.add_metric([k], v)
        yield g
        c = CounterMetricFamily("rt_events_in", "Events accepted.", labels=["source"])
        for k, v in sorted(s.events_in.items()):
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("rt_events_out", "Events delivered to subscribers.", labels=["transport"])
        for k, v in sorted(s.events_out.items()):
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("rt_dropped", "Slow consumers closed and events dropped.", labels=["reason"])
        for k, v in sorted(s.dropped.items()):
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily(
            "rt_slow_consumers_closed", "Subscribers closed because they could not keep up."
        )
        c.add_metric([], s.dropped.get("slow_consumer", 0))
        yield c
        c = CounterMetricFamily("rt_webhooks", "Webhook deliveries by outcome.", labels=["source", "outcome"])
        for (src, outcome), v in sorted(s.webhooks.items()):
            c.add_metric([src, outcome], v)
        yield c
        c = CounterMetricFamily(
            "rt_webhooks_rejected", "Webhooks refused, by source and reason.", labels=["source", "reason"]
        )
        for (src, reason), v in sorted(s.rejected().items()):
            c.add_metric([src, reason], v)
        yield c
        members = s.presence_gauge
        if members is not None:
            g = GaugeMetricFamily("rt_presence_members", "Members of each presence channel.", labels=["channel"])
            for k, v in sorted(members().items()):
                g.add_metric([k], v)
            yield g
        ready = s.ready
        if ready is not None:
            yield GaugeMetricFamily("rt_ready", "1 when the journal/broker accepts events.", value=1 if ready() else 0)
        yield GaugeMetricFamily("rt_uptime_seconds", "Seconds since the daemon started.", value=s._clock() - s.started)


# -- outgoing webhooks (issue 17) ---------------------------------------------------


class DestinationStats:
    """
    Counters of the outgoing webhooks, per destination: attempts, successes,
    failures, dead letters (plain integers), the delivery latency (a
    histogram, observed per attempt), and the pending events (a gauge read
    at scrape time from L{pending}).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.dead: Counter[str] = Counter()
        #: set by the engine: pending events per destination
        self.pending: Callable[[], dict[str, int]] | None = None
        self.latency = Histogram(
            "rt_destination_latency_seconds",
            "Time of one delivery attempt to a destination (request sent to answer read).",
            labelnames=["destination"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        registry.register(_DestinationCollector(self))


class _DestinationCollector(Collector):
    def __init__(self, stats: DestinationStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats
        for name, helptext, counts in (
            ("rt_destination_attempts", "Delivery attempts per destination.", s.attempts),
            ("rt_destination_successes", "Deliveries answered 2xx per destination.", s.successes),
            ("rt_destination_failures", "Failed delivery attempts per destination.", s.failures),
            ("rt_destination_dead_letters", "Events dead-lettered per destination.", s.dead),
        ):
            c = CounterMetricFamily(name, helptext, labels=["destination"])
            for k, v in sorted(counts.items()):
                c.add_metric([k], v)
            yield c
        g = GaugeMetricFamily("rt_destination_pending", "Events not yet delivered per destination.",
                              labels=["destination"])
        pending = s.pending() if s.pending is not None else {}
        for k, v in sorted(pending.items()):
            g.add_metric([k], v)
        yield g

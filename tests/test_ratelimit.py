"""Token buckets of L{twisted_rt.routes.ratelimit} on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from twisted_rt.routes.ratelimit import RateLimiter


def test_burst_then_refused_with_whole_seconds() -> None:
    """A bucket allows one second's worth of requests at once, then asks to wait a whole second."""
    clock = Clock()
    rl = RateLimiter(5, clock)
    assert [rl.take("a") for _ in range(5)] == [0] * 5
    assert rl.take("a") == 1


def test_refills_over_time() -> None:
    """Tokens come back at the configured rate on the injected clock."""
    clock = Clock()
    rl = RateLimiter(2, clock)
    assert rl.take("a") == 0 and rl.take("a") == 0
    assert rl.take("a") == 1
    clock.advance(0.5)
    assert rl.take("a") == 0
    assert rl.take("a") == 1


def test_slow_rate_retry_after_rounds_up() -> None:
    """Below one token per second Retry-After is the whole seconds until the next token, rounded up."""
    clock = Clock()
    rl = RateLimiter(0.1, clock)
    assert rl.take("a") == 0
    assert rl.take("a") == 10
    clock.advance(2.5)
    assert rl.take("a") == 8
    clock.advance(10)
    assert rl.take("a") == 0


def test_keys_are_independent() -> None:
    """Each key has its own bucket: one client's flood does not limit another."""
    clock = Clock()
    rl = RateLimiter(1, clock)
    assert rl.take("10.0.0.1") == 0
    assert rl.take("10.0.0.1") == 1
    assert rl.take("10.0.0.2") == 0


def test_memory_bounded_under_many_keys() -> None:
    """A flood of distinct keys never keeps more than max_keys buckets."""
    clock = Clock()
    rl = RateLimiter(1, clock, max_keys=100)
    for i in range(1000):
        rl.take(f"k{i}")
        assert len(rl) <= 100
    clock.advance(5)
    rl.take("new")
    assert len(rl) <= 100


def test_prune_keeps_busy_buckets_when_possible() -> None:
    """When the table is full, refilled buckets are forgotten first and busy ones kept."""
    clock = Clock()
    rl = RateLimiter(1, clock, max_keys=3)
    rl.take("busy")
    clock.advance(2)
    rl.take("idle1")
    rl.take("idle2")
    rl.take("busy")
    clock.advance(1.5)
    rl.take("new")  # idle1/idle2 have refilled; busy took its token 1.5 s ago and refilled too
    assert len(rl) <= 3


def test_rate_must_be_positive() -> None:
    """A limiter with no rate is a programming error (0 means no limiter at all)."""
    with pytest.raises(ValueError):
        RateLimiter(0, Clock())


def test_peek_does_not_take() -> None:
    """peek answers what take would, without using a token, and forgets a bucket that has refilled."""
    clock = Clock()
    rl = RateLimiter(1 / 60, clock, burst=3)
    assert rl.peek("a") == 0 and len(rl) == 0
    assert [rl.take("a") for _ in range(3)] == [0, 0, 0]
    assert rl.peek("a") == 60 and rl.peek("a") == 60
    clock.advance(60)
    assert rl.peek("a") == 0 and len(rl) == 1  # one token back, not yet full
    clock.advance(120)
    assert rl.peek("a") == 0 and len(rl) == 0  # full again: forgotten


class CountingLimiter(RateLimiter):
    """Counts the passes over the whole table."""

    prunes = 0

    def _prune(self, now: float) -> None:
        self.prunes += 1
        super()._prune(now)


def test_flood_of_busy_keys_costs_no_scan_per_request() -> None:
    """Distinct keys that all stay busy are pruned down to half the table, so a scan happens once per max_keys/2 keys."""
    clock = Clock()
    rl = CountingLimiter(1 / 60, clock, burst=1, max_keys=1000)
    for i in range(20000):
        rl.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")  # every bucket empty: nothing refills in time
        assert len(rl) <= 1000
    assert rl.prunes <= 20000 // 500 + 1


def test_trickle_of_refilled_keys_costs_no_scan_per_request() -> None:
    """When each pass would free only a key or two (keys refill just as fast as new ones come), it still frees half."""
    clock = Clock()
    rl = CountingLimiter(1, clock, burst=1, max_keys=1000)
    for i in range(20000):
        clock.advance(1 / 999)  # about one bucket refills per new key
        rl.take(f"k{i}")
        assert len(rl) <= 1000
    assert rl.prunes <= 20000 // 500 + 1


def test_busy_key_survives_prune_of_full_ones() -> None:
    """When refilled buckets free enough room, a busy bucket keeps its state through a prune."""
    clock = Clock()
    rl = RateLimiter(1, clock, burst=1, max_keys=4)
    for k in ("a", "b", "c"):
        rl.take(k)
    clock.advance(5)  # a, b, c are full again
    assert rl.take("busy") == 0
    assert rl.take("busy") == 1
    rl.take("new")  # the table is full: a, b, c go, busy stays
    assert rl.take("busy") == 1


def test_recent_empties_the_table_after_a_quiet_spell() -> None:
    """recent() is False for an empty table, True while a bucket may be short, and empties it once all are full."""
    clock = Clock()
    rl = RateLimiter(1, clock, burst=4)
    assert rl.recent() is False
    rl.take("a")
    clock.advance(3.9)
    rl.take("b")
    clock.advance(3.9)
    assert rl.recent() is True and len(rl) == 2  # b took 3.9 s ago: not full yet
    clock.advance(0.2)
    assert rl.recent() is False and len(rl) == 0

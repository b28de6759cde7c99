"""Token buckets of L{twisted_rt.ratelimit} on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from twisted_rt.ratelimit import RateLimiter


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

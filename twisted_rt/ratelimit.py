# -*- test-case-name: tests.test_ratelimit -*-
"""
Token-bucket rate limits keyed by a string (a source name, a client IP).

Each key has a bucket holding up to C{burst} tokens (default: one second's
worth, at least 1) that refills at C{rate} tokens per second on the injected
reactor clock.  A request takes one token; with none left it is refused and
told when to come back, in whole seconds (rounded up, at least 1) as
C{Retry-After} needs.  Buckets that have refilled completely carry no
information, so they are dropped when the table grows, which keeps memory
bounded under a flood of distinct client addresses.
"""

from __future__ import annotations

import math

from twisted.internet.interfaces import IReactorTime

__all__ = ["RateLimiter"]


class RateLimiter:
    """
    Buckets per key.

    @ivar rate: tokens added per second.
    @ivar burst: the bucket size.
    """

    def __init__(
        self,
        rate: float,
        clock: IReactorTime,
        burst: float | None = None,
        max_keys: int = 10000,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, time of last update)
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> int:
        """
        Take one token for C{key}: 0 if allowed, else the whole seconds to
        wait before a token is available (the C{Retry-After} value).
        """
        now = self._clock.seconds()
        state = self._buckets.get(key)
        if state is None:
            tokens = self.burst
            if len(self._buckets) >= self._max_keys:
                self._prune(now)
        else:
            tokens, last = state
            tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0
        self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def _prune(self, now: float) -> None:
        """Forget full buckets; if all are busy, forget the oldest half."""
        full = self.burst
        rate = self.rate
        buckets = self._buckets
        for k, (tokens, last) in list(buckets.items()):
            if tokens + (now - last) * rate >= full:
                del buckets[k]
        if len(buckets) >= self._max_keys:
            for k in list(buckets)[: len(buckets) // 2]:
                del buckets[k]

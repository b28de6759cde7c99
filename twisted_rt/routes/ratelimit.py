# -*- test-case-name: tests.test_ratelimit -*-
"""
Token-bucket rate limits keyed by a string (a source name, a client IP).

Each key has a bucket holding up to C{burst} tokens (default: one second's
worth, at least 1) that refills at C{rate} tokens per second on the injected
reactor clock.  A request takes one token; with none left it is refused and
told when to come back, in whole seconds (rounded up, at least 1) as
C{Retry-After} needs.  L{RateLimiter.peek} asks the same question without
taking a token (the webhook ingest looks at its signature-failure buckets
before checking a signature, and takes a token only when the check fails).

Memory is bounded whatever the keys: at most C{max_keys} buckets.  A bucket
that has refilled completely carries no information, so it is dropped
first when the table is full; if the table is still more than half full
after that (many busy keys, e.g. an attacker with many addresses), the
oldest buckets are dropped down to half.  Each such pass is paid for by the
at least C{max_keys / 2} new keys that must arrive before the next one, so
a flood of distinct keys costs O(1) per request, never a scan per request.
A busy bucket dropped that way starts again full: a client with many
addresses can reset its own buckets, which a per-address limit cannot
prevent anyway.
"""

from __future__ import annotations

import math

from twisted_rt.interfaces import Reactor

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
        clock: Reactor,
        burst: float | None = None,
        max_keys: int = 10000,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if max_keys < 2:
            raise ValueError("max_keys must be at least 2")
        self.rate = rate
        self.burst = float(burst) if burst is not None else max(1.0, rate)
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, time of last update)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._last_take = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def _wait(self, tokens: float) -> int:
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def take(self, key: str) -> int:
        """
        Take one token for C{key}: 0 if allowed, else the whole seconds to
        wait before a token is available (the C{Retry-After} value).
        """
        now = self._last_take = self._clock.seconds()
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
        return self._wait(tokens)

    def recent(self) -> bool:
        """
        Whether some bucket may still be short of tokens.  Once C{burst /
        rate} seconds have passed since the last L{take}, every bucket is
        full again and the table is emptied, so a caller that asks this
        first pays nothing per request after a quiet spell.
        """
        if not self._buckets:
            return False
        if self._clock.seconds() - self._last_take >= self.burst / self.rate:
            self._buckets.clear()
            return False
        return True

    def peek(self, key: str) -> int:
        """
        What L{take} would answer, without taking a token: 0 if C{key} has
        a token, else the whole seconds to wait.  A bucket found full again
        is forgotten (it carries no information).
        """
        state = self._buckets.get(key)
        if state is None:
            return 0
        tokens, last = state
        tokens += (self._clock.seconds() - last) * self.rate
        if tokens >= 1.0:
            if tokens >= self.burst:
                del self._buckets[key]
            return 0
        return self._wait(tokens)

    def _prune(self, now: float) -> None:
        """Forget full buckets; if more than half the table is still busy, forget the oldest down to half."""
        full = self.burst
        rate = self.rate
        buckets = self._buckets
        for k, (tokens, last) in list(buckets.items()):
            if tokens + (now - last) * rate >= full:
                del buckets[k]
        keep = self._max_keys // 2
        if len(buckets) > keep:
            for k in list(buckets)[: len(buckets) - keep]:
                del buckets[k]

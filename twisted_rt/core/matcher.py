# -*- test-case-name: tests.test_matcher -*-
"""
Channel names, subscription patterns, and an index that finds the
subscriptions matching a channel without scanning them all.

A channel is 1-200 characters of C{A-Z a-z 0-9 _ - . : @}, its segments
separated by C{.}.  A pattern may use C{*} for exactly one segment and C{>}
as its last segment for one or more segments.  Names and segments are
checked as whole strings (C{fullmatch}): C{re}'s C{$} would also accept a
trailing newline, which breaks the line framing of Server-Sent Events.

L{PatternIndex} keeps exact patterns in a dict and wildcard patterns in a
trie keyed by segment, so a lookup costs O(segments) dict probes (times the
wildcard branches actually present), not O(subscriptions).
"""

from __future__ import annotations

import re
from typing import Generic, Iterator, TypeVar

__all__ = [
    "ChannelError",
    "PatternError",
    "PatternIndex",
    "covers",
    "is_wildcard",
    "matches",
    "validate_channel",
    "validate_pattern",
]

# used with fullmatch only (never match/search with "$", which allows a final "\n")
_CHANNEL = re.compile(r"[A-Za-z0-9_\-.:@]{1,200}")
_SEGMENT = re.compile(r"[A-Za-z0-9_\-:@]+")

K = TypeVar("K")


class ChannelError(ValueError):
    """An invalid channel name."""


class PatternError(ValueError):
    """An invalid subscription pattern."""


def validate_channel(name: object) -> str:
    """Return C{name} if it is a valid channel name.  @raise ChannelError: if not."""
    if not isinstance(name, str) or not _CHANNEL.fullmatch(name):
        raise ChannelError(
            "a channel is 1-200 characters of A-Z a-z 0-9 _ - . : @"
        )
    if name[0] == "." or name[-1] == "." or ".." in name:
        raise ChannelError("a channel may not have an empty segment")
    return name


def validate_pattern(pattern: object) -> str:
    """Return C{pattern} if it is a valid pattern.  @raise PatternError: if not."""
    if not isinstance(pattern, str) or not (1 <= len(pattern) <= 200):
        raise PatternError("a pattern is 1-200 characters")
    segs = pattern.split(".")
    for i, seg in enumerate(segs):
        if seg == "*":
            continue
        if seg == ">":
            if i != len(segs) - 1:
                raise PatternError("'>' may only be the last segment")
            continue
        if not _SEGMENT.fullmatch(seg):
            raise PatternError(
                f"bad segment {seg!r}: use A-Z a-z 0-9 _ - : @, or * and a final >"
            )
    return pattern


def is_wildcard(pattern: str) -> bool:
    """Whether C{pattern} has C{*} or C{>} segments."""
    return "*" in pattern or ">" in pattern


def matches(pattern: str, channel: str) -> bool:
    """Whether C{channel} matches C{pattern} (both assumed valid)."""
    if not is_wildcard(pattern):
        return pattern == channel
    ps = pattern.split(".")
    cs = channel.split(".")
    for i, p in enumerate(ps):
        if p == ">":
            return len(cs) > i
        if i >= len(cs):
            return False
        if p != "*" and p != cs[i]:
            return False
    return len(ps) == len(cs)


class _Node(Generic[K]):
    __slots__ = ("children", "here", "tail")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        # keys whose pattern ends at this node
        self.here: dict[K, None] = {}
        # keys whose pattern has '>' as the next segment
        self.tail: dict[K, None] = {}

    def empty(self) -> bool:
        return not (self.children or self.here or self.tail)


class PatternIndex(Generic[K]):
    """
    A multimap from patterns to keys, queried by channel.

    Keys are kept in insertion-ordered dicts, so C{match} yields them in a
    stable order.  A key added under several matching patterns is yielded
    once per pattern; callers that need a set deduplicate.  C{match} works
    on snapshots, so a listener may unsubscribe (itself or others) while a
    fan-out is iterating.
    """

    def __init__(self) -> None:
        self._exact: dict[str, dict[K, None]] = {}
        self._root: _Node[K] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, pattern: str, key: K) -> None:
        """Index C{key} under C{pattern}."""
        if not is_wildcard(pattern):
            bucket = self._exact.setdefault(pattern, {})
            if key not in bucket:
                bucket[key] = None
                self._count += 1
            return
        node = self._root
        segs = pattern.split(".")
        for seg in segs[:-1]:
            node = node.children.setdefault(seg, _Node())
        last = segs[-1]
        if last == ">":
            target = node.tail
        else:
            node = node.children.setdefault(last, _Node())
            target = node.here
        if key not in target:
            target[key] = None
            self._count += 1

    def remove(self, pattern: str, key: K) -> None:
        """Forget C{key} under C{pattern}; no error if it was not there."""
        if not is_wildcard(pattern):
            bucket = self._exact.get(pattern)
            if bucket is not None and key in bucket:
                del bucket[key]
                self._count -= 1
                if not bucket:
                    del self._exact[pattern]
            return
        segs = pattern.split(".")
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        for seg in segs[:-1]:
            child = node.children.get(seg)
            if child is None:
                return
            path.append((node, seg))
            node = child
        last = segs[-1]
        if last == ">":
            target = node.tail
        else:
            child = node.children.get(last)
            if child is None:
                return
            path.append((node, last))
            node = child
            target = node.here
        if key not in target:
            return
        del target[key]
        self._count -= 1
        # prune empty branches
        while path and node.empty():
            parent, seg = path.pop()
            del parent.children[seg]
            node = parent

    def match(self, channel: str) -> Iterator[K]:
        """Yield the keys of every pattern that C{channel} matches."""
        for bucket in self._buckets(channel):
            yield from tuple(bucket)

    def count(self, channel: str) -> int:
        """How many keys L{match} yields for C{channel}, without yielding them."""
        return sum(len(bucket) for bucket in self._buckets(channel))

    def _buckets(self, channel: str) -> Iterator[dict[K, None]]:
        """The non-empty key sets whose pattern matches C{channel}: exact first, then the trie's, lazily."""
        bucket = self._exact.get(channel)
        if bucket:
            yield bucket
        root = self._root
        if not (root.children or root.tail):
            return
        segs = channel.split(".")
        n = len(segs)
        stack: list[tuple[_Node[K], int]] = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if i == n:
                if node.here:
                    yield node.here
                continue
            if node.tail:
                yield node.tail
            children = node.children
            if not children:
                continue
            child = children.get(segs[i])
            if child is not None:
                stack.append((child, i + 1))
            star = children.get("*")
            if star is not None:
                stack.append((star, i + 1))

    def patterns_exact(self) -> list[str]:
        """The exact (non-wildcard) patterns indexed."""
        return list(self._exact)


def covers(right: str, pattern: str) -> bool:
    """
    Whether every channel that C{pattern} matches also matches C{right}.

    Used for rights: a token allowed C{github.>} may subscribe to
    C{github.*} and C{github.push}, but one allowed C{github.*} may not
    subscribe to C{github.>}.
    """
    rs = right.split(".")
    ps = pattern.split(".")
    for i, r in enumerate(rs):
        if r == ">":
            return len(ps) > i
        if i >= len(ps):
            return False
        p = ps[i]
        if p == ">":
            return False
        if r == "*":
            continue
        if p == "*" or p != r:
            return False
    return len(rs) == len(ps)

"""Channel and pattern rules, the PatternIndex against the naive matcher, and covers()."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted_rt.matcher import (
    ChannelError,
    PatternError,
    PatternIndex,
    covers,
    is_wildcard,
    matches,
    validate_channel,
    validate_pattern,
)

# a tiny alphabet so random channels and patterns actually collide
SEG = st.sampled_from(["a", "b", "c", "d1"])
channels = st.lists(SEG, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    segs = draw(st.lists(st.one_of(SEG, st.just("*")), min_size=1, max_size=5))
    if draw(st.booleans()):
        segs.append(">")
    return ".".join(segs)


def test_valid_channels_and_patterns() -> None:
    """Valid names pass; wildcards are recognised."""
    assert validate_channel("github.push") == "github.push"
    assert validate_channel("a:b@c_d-e") == "a:b@c_d-e"
    assert validate_pattern("github.*") == "github.*"
    assert validate_pattern("billing.>") == "billing.>"
    assert validate_pattern(">") == ">"
    assert is_wildcard("a.*") and is_wildcard("a.>") and not is_wildcard("a.b")


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a b", "a/b", "x" * 201, "a.*", 5, None])
def test_invalid_channels(bad: object) -> None:
    """Empty segments, foreign characters, wildcards, over 200 chars and non-strings are refused."""
    with pytest.raises(ChannelError):
        validate_channel(bad)


@pytest.mark.parametrize("bad", ["", "a.>.b", "a..b", "a*", "a.b>", "x" * 201, 3])
def test_invalid_patterns(bad: object) -> None:
    """'>' only last, '*' only as a whole segment, no empty segment."""
    with pytest.raises(PatternError):
        validate_pattern(bad)


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("*.b", "a.b", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
    ],
)
def test_matches_examples(pattern: str, channel: str, expected: bool) -> None:
    """'*' is exactly one segment, '>' one or more trailing segments."""
    assert matches(pattern, channel) is expected


@settings(max_examples=150, deadline=None)
@given(st.lists(patterns(), max_size=12), st.lists(channels, min_size=1, max_size=8))
def test_index_agrees_with_naive_matches(pats: list[str], chans: list[str]) -> None:
    """PatternIndex.match returns exactly the keys whose pattern matches, once per pattern."""
    index: PatternIndex[int] = PatternIndex()
    for i, p in enumerate(pats):
        index.add(p, i)
    for ch in chans:
        got = sorted(index.match(ch))
        assert got == sorted(i for i, p in enumerate(pats) if matches(p, ch))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(patterns(), st.integers(0, 3)), max_size=12),
    st.lists(st.integers(0, 11), max_size=12),
    st.lists(channels, min_size=1, max_size=6),
)
def test_index_after_removals(entries: list[tuple[str, int]], drop: list[int], chans: list[str]) -> None:
    """After removing some (pattern, key) pairs the index still agrees with the naive matcher and its size."""
    index: PatternIndex[int] = PatternIndex()
    live: set[tuple[str, int]] = set()
    for p, k in entries:
        index.add(p, k)
        live.add((p, k))
    for j in drop:
        if j < len(entries):
            index.remove(*entries[j])
            live.discard(entries[j])
    index.remove("never.added", 99)
    assert len(index) == len(live)
    for ch in chans:
        assert sorted(index.match(ch)) == sorted(k for p, k in live if matches(p, ch))
    for p, k in list(live):
        index.remove(p, k)
    assert len(index) == 0
    assert all(list(index.match(ch)) == [] for ch in chans)


@settings(max_examples=200, deadline=None)
@given(patterns(), patterns(), st.lists(channels, min_size=1, max_size=20))
def test_covers_is_sound(right: str, pattern: str, chans: list[str]) -> None:
    """If covers(right, pattern), every channel pattern matches is matched by right."""
    if covers(right, pattern):
        for ch in chans:
            if matches(pattern, ch):
                assert matches(right, ch)


@settings(max_examples=150, deadline=None)
@given(st.one_of(patterns(), channels))
def test_covers_is_reflexive(p: str) -> None:
    """Every pattern covers itself."""
    assert covers(p, p)


@given(channels)
def test_covers_exact_channel_is_matches(ch: str) -> None:
    """For an exact channel, covers() agrees with matches() on a few typical rights."""
    for right in ["a.>", "a.*", "*", ">", "*.b", ch]:
        assert covers(right, ch) == matches(right, ch)


@pytest.mark.parametrize(
    ("right", "pattern", "expected"),
    [
        ("github.>", "github.*", True),
        ("github.>", "github.push", True),
        ("github.*", "github.>", False),
        ("github.*", "github.push", True),
        (">", "a.>", True),
        ("a.>", ">", False),
        ("*.push", "github.*", False),
    ],
)
def test_covers_examples(right: str, pattern: str, expected: bool) -> None:
    """The rights examples of the contract."""
    assert covers(right, pattern) is expected


def test_listeners_may_unsubscribe_during_match() -> None:
    """Removing keys while iterating match() neither raises nor skips the other keys."""
    index: PatternIndex[int] = PatternIndex()
    for k in range(5):
        index.add("a.b", k)
        index.add("a.*", k + 10)
    seen = []
    for k in index.match("a.b"):
        seen.append(k)
        index.remove("a.b", k)
        index.remove("a.*", 10 + (k + 1) % 5)
    # every exact key is seen; the '*' keys were all removed before the trie was reached
    assert seen == [0, 1, 2, 3, 4]
    assert len(index) == 0

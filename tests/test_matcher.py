"""
Channel and pattern rules, the PatternIndex against the naive matcher, and
covers(); the grammar against a reference implementation (hypothesis), and
the daemon refusing names the grammar refuses on every route.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest
import websocket
from conftest import API_KEY, Daemon, http, http_json
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted_rt.core.matcher import (
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
        assert index.count(ch) == len(got)


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
        assert index.count(ch) == len(list(index.match(ch)))
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


# ---------------------------------------------------------------------------
# The grammar against a reference written from the contract's sentence:
# "1-200 characters of A-Z a-z 0-9 _ - . : @, segments separated by '.',
# '*' for exactly one segment, '>' as the last segment for one or more".

_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:@")
# characters a regex or str method might let through: line ends, other
# digits and letters (², ٣, é, K = Kelvin sign), controls, wildcards, spaces
_TRICKY = "\n\r\t\x00\x0b\x0c \u00b2\u0663\u00e9\u212a\u2028*>/,;=%#"
_CHARS = st.sampled_from(sorted(_ALLOWED) + list(_TRICKY))
_SEGS = st.one_of(
    st.text(_CHARS, min_size=0, max_size=6),
    st.sampled_from(["a", "b", "*", ">", "", "a\n", "\n", "x" * 199, "x" * 200, "x" * 201]),
)
texts = st.lists(_SEGS, min_size=1, max_size=6).map(".".join)


def ref_channel(name: object) -> bool:
    """The contract's channel rule, written out by hand."""
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        return False
    if any(c not in _ALLOWED for c in name):
        return False
    return all(seg != "" for seg in name.split("."))


def ref_pattern(pattern: object) -> bool:
    """The contract's pattern rule, written out by hand."""
    if not isinstance(pattern, str) or not 1 <= len(pattern) <= 200:
        return False
    segs = pattern.split(".")
    for i, seg in enumerate(segs):
        if seg == "*":
            continue
        if seg == ">":
            if i != len(segs) - 1:
                return False
            continue
        if seg == "" or any(c not in _ALLOWED or c == "." for c in seg):
            return False
    return True


def ref_matches(pattern: str, channel: str) -> bool:
    """Segment by segment, recursively: '*' takes one segment, a final '>' one or more."""

    def go(ps: list[str], cs: list[str]) -> bool:
        if not ps:
            return not cs
        if ps[0] == ">":
            return len(cs) >= 1
        if not cs:
            return False
        return (ps[0] == "*" or ps[0] == cs[0]) and go(ps[1:], cs[1:])

    return go(pattern.split("."), channel.split("."))


def ref_covers(right: str, pattern: str) -> bool:
    """
    By brute force: no channel matched by C{pattern} escapes C{right}.  A
    counterexample, if one exists, is found among channels built from the
    two patterns' literal segments plus one fresh segment, at most one
    segment longer than the longer pattern.
    """
    from itertools import product

    literals = {s for s in right.split(".") + pattern.split(".") if s not in ("*", ">")}
    alphabet = sorted(literals | {"zz"})
    longest = max(len(right.split(".")), len(pattern.split("."))) + 1
    for n in range(1, longest + 1):
        for segs in product(alphabet, repeat=n):
            ch = ".".join(segs)
            if ref_matches(pattern, ch) and not ref_matches(right, ch):
                return False
    return True


@settings(max_examples=600, deadline=None)
@given(st.one_of(texts, st.text(_CHARS, max_size=8), st.sampled_from(["a\n", "a.b\n", "\na", "a\r\n", "a.*\n"])))
def test_channel_grammar_matches_reference(name: str) -> None:
    """validate_channel accepts exactly the names the contract's rule accepts (a trailing newline included)."""
    try:
        validate_channel(name)
        ok = True
    except ChannelError:
        ok = False
    assert ok == ref_channel(name), repr(name)


@settings(max_examples=600, deadline=None)
@given(st.one_of(texts, st.text(_CHARS, max_size=8), st.sampled_from(["a\n", "a.*\n", "*\n", ">\n", "a.>\n"])))
def test_pattern_grammar_matches_reference(pattern: str) -> None:
    """validate_pattern accepts exactly the patterns the contract's rule accepts."""
    try:
        validate_pattern(pattern)
        ok = True
    except PatternError:
        ok = False
    assert ok == ref_pattern(pattern), repr(pattern)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_every_valid_channel_is_a_valid_pattern(name: str) -> None:
    """A channel name is also a pattern (the exact one), and matches itself only."""
    if ref_channel(name):
        assert validate_pattern(name) == name
        assert not is_wildcard(name)
        assert matches(name, name)


@pytest.mark.parametrize("bad", ["a\n", "a.b\n", "\n", "a\r", "a\x00", "a.\u00b2", "\u0663", "a b", "caf\u00e9"])
def test_line_ends_and_unicode_refused(bad: str) -> None:
    """A trailing newline, a control character or a non-ASCII letter or digit is refused in channels and patterns."""
    with pytest.raises(ChannelError):
        validate_channel(bad)
    with pytest.raises(PatternError):
        validate_pattern(bad)
    with pytest.raises(PatternError):
        validate_pattern(bad + ".>")


# small valid patterns and channels over two letters, for the semantic checks
_LIT = st.sampled_from(["a", "b"])


@st.composite
def small_patterns(draw: st.DrawFn) -> str:
    segs = draw(st.lists(st.one_of(_LIT, st.just("*")), min_size=0, max_size=3))
    if not segs or draw(st.booleans()):
        segs.append(">")
    return ".".join(segs)


small_channels = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5).map(".".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(small_patterns(), small_channels), small_channels)
def test_matches_agrees_with_reference(pattern: str, channel: str) -> None:
    """matches() is the reference segment matcher on every valid pattern and channel."""
    assert matches(pattern, channel) == ref_matches(pattern, channel)


@settings(max_examples=400, deadline=None)
@given(st.one_of(small_patterns(), small_channels), st.one_of(small_patterns(), small_channels))
def test_covers_agrees_with_brute_force(right: str, pattern: str) -> None:
    """covers(right, pattern) is exactly 'every channel pattern matches, right matches' (sound and complete)."""
    assert covers(right, pattern) == ref_covers(right, pattern), (right, pattern)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(small_patterns(), small_channels), max_size=10), st.lists(small_channels, min_size=1,
                                                                                       max_size=10))
def test_index_agrees_with_reference(pats: list[str], chans: list[str]) -> None:
    """PatternIndex.match yields each key once per matching pattern, as the reference matcher says."""
    index: PatternIndex[int] = PatternIndex()
    for i, p in enumerate(pats):
        index.add(p, i)
    for ch in chans:
        assert sorted(index.match(ch)) == [i for i, p in enumerate(pats) if ref_matches(p, ch)]


def test_daemon_refuses_a_trailing_newline_everywhere(daemon: Daemon) -> None:
    """A channel or pattern ending in a newline is 400/invalid_channel over HTTP, SSE, poll and WebSocket."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for name in ("nl.a\n", "nl.a\r\n", "nl\n.a", "nl.\u00b2"):
        status, body = http_json("POST", daemon.url + "/api/publish", {"channel": name, "data": 1}, auth)
        assert (status, body["error"]) == (400, "invalid_channel"), name
        status, body = http_json("POST", daemon.url + "/api/publish", {"events": [{"channel": name, "data": 1}]},
                                 auth)
        assert (status, body["error"]) == (400, "invalid_channel"), name
        q = urllib.parse.quote(name)
        for path in (f"/sse?channel={q}", f"/poll?channel={q}&timeout=0",
                     f"/api/channels/{q}/history"):
            status, _, raw = http("GET", daemon.url + path, headers=auth)
            assert (status, json.loads(raw)["error"]) == (400, "invalid_channel"), (path, raw)
    ws = websocket.create_connection(daemon.ws_url + f"?token={API_KEY}", timeout=10)
    try:
        for op, name in (("publish", "nl.a\n"), ("subscribe", "nl.*\n"), ("subscribe", "nl.>\n"),
                         ("subscribe", "nl\n.*")):
            ws.send(json.dumps({"op": op, "channel": name, "data": 1, "ref": 1}))
            reply = json.loads(ws.recv())
            assert (reply["op"], reply["code"]) == ("error", "invalid_channel"), (op, name)
    finally:
        ws.close()
    _, body = http_json("GET", daemon.url + "/api/channels", headers=auth)
    assert body["channels"] == []  # nothing was journaled under any of those names

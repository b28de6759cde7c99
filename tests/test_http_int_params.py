"""
Every integer query parameter of /poll (since, limit, timeout) and /sse
(since), fuzzed with hypothesis against the real daemon: any text is 200 or
400 invalid_parameter, never 5xx; exactly the ASCII integers of at most 19
digits (and at most 2**63-1) are accepted.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from urllib.parse import quote

import pytest
from conftest import DEFAULT_CONFIG, Daemon
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

# valid timeouts answer at once: they are capped at 0 s here
CONFIG = DEFAULT_CONFIG + "\n[sse]\nmax_poll_timeout_seconds = 0\n"

_texts = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
    st.text(alphabet="0123456789", min_size=18, max_size=21),
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=5),
)


def _accepted(text: str) -> bool:
    return 0 < len(text) <= 19 and text.isascii() and text.isdigit() and int(text) <= 2**63 - 1


def _status(d: Daemon, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = b"" if resp.getheader("content-type", "").startswith("text/event-stream") else resp.read()
        return resp.status, body
    finally:
        conn.close()


@pytest.fixture
def fuzz_daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    """One daemon for all the examples of a test."""
    return make_daemon(CONFIG)


PATHS = [
    "/poll?channel=public.a&timeout=0&since={}",
    "/poll?channel=public.a&timeout=0&limit={}",
    "/poll?channel=public.a&timeout={}",
    "/sse?channel=public.a&since={}",
]


# one test drawing the path too (pytest-twisted's hook does not take several
# hypothesis-parametrized items in one session)
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), text=_texts)
@example(path=PATHS[0], text="\u00b2")
@example(path=PATHS[3], text="\u00b2")
@example(path=PATHS[0], text="9" * 5000)
@example(path=PATHS[1], text="9223372036854775807")
@example(path=PATHS[2], text="9223372036854775808")
def test_any_text_is_200_or_400(fuzz_daemon: Daemon, path: str, text: str) -> None:
    """Any text in an integer query parameter is answered 200 (an ASCII integer in range) or 400, never 5xx."""
    status, body = _status(fuzz_daemon, path.format(quote(text, safe="")))
    if _accepted(text):
        assert status == 200, (path, text, body)
    else:
        assert status == 400, (path, text, body)
        assert json.loads(body)["error"] == "invalid_parameter"

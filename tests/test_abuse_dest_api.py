"""
Attacks on the destinations API against the real daemon: every oversized or odd input is a
clear 4xx JSON error, never a 500 or unbounded work, and no secret of a destination is served.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any, Iterator

import jwt
import pytest

from tests.conftest import API_KEY, DEFAULT_CONFIG, JWT_SECRET, Daemon, http, http_json

AUTH = {"Authorization": f"Bearer {API_KEY}"}

CONFIG = DEFAULT_CONFIG + """
[[destinations]]
name = "svc"
url = "http://127.0.0.1:9/hook?token=t0ps3cret&x=1"
channels = ["a.>"]
secret = "whsec_c2VjcmV0LXNpZ25pbmcta2V5LWJ5dGVz"
headers = { "Authorization" = "Bearer dest-header-secret" }
max_attempts = 1
"""


@pytest.fixture(scope="module")
def dd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with a destination whose URL and headers carry secrets (shared: the tests only read or fail)."""
    d = Daemon(tmp_path_factory.mktemp("dd"), textwrap.dedent(CONFIG))
    d.start()
    yield d
    d.stop()


def _err(status: int, body: Any, expected: int) -> None:
    assert status == expected, (status, body)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body.get("message"), body


def test_destination_secrets_are_never_served(dd: Daemon) -> None:
    """GET /api/destinations shows the URL without its password or secret-looking query values; no header or key."""
    status, body = dd.get("/api/destinations", headers=AUTH)
    assert status == 200
    text = str(body)
    for secret in ("s3cr3t-pw", "t0ps3cret", "dest-header-secret", "c2VjcmV0LXNpZ25pbmcta2V5LWJ5dGVz"):
        assert secret not in text, text
    assert body["destinations"][0]["url"] == "http://127.0.0.1:9/hook?token=REDACTED&x=1"


@pytest.mark.parametrize("limit", ["abc", "-1", "0", "1" * 20, "1e3", "%205", "99999"])
def test_dead_limit_must_be_a_small_integer(dd: Daemon, limit: str) -> None:
    """?limit= that is not 1..1000 in ASCII digits is 400 JSON."""
    status, body = dd.get(f"/api/destinations/svc/dead?limit={limit}", headers=AUTH)
    _err(status, body, 400)


@pytest.mark.parametrize("body", [
    {"ids": ["x"] * 1001},
    {"ids": [1, 2]},
    {"ids": "abc"},
    {"ids": [], "extra": 1},
])
def test_retry_ids_are_bounded_and_typed(dd: Daemon, body: Any) -> None:
    """retry ids: more than 1000, not strings, not a list, or an unknown field: 400."""
    status, got = dd.post("/api/destinations/svc/retry", body, AUTH)
    _err(status, got, 400)


@pytest.mark.parametrize("body", [
    {"since": {f"c{i}": 0 for i in range(1001)}},
    {"since": {"a.x\n": 0}},
    {"since": {"a.x": -1}},
    {"since": {"a.x": 1.5}},
    {"since": {"a.x": True}},
    {"since": {"a.x": 2**64}},
    {"since": {}},
    {"since": [1]},
    {},
])
def test_replay_since_is_bounded_and_typed(dd: Daemon, body: Any) -> None:
    """replay since: more than 1000 channels, a bad name, a bad offset, or none: 400."""
    status, got = dd.post("/api/destinations/svc/replay", body, AUTH)
    _err(status, got, 400)


def test_bodies_that_are_not_an_object_are_400(dd: Daemon) -> None:
    """Non-JSON, a lone surrogate, an array, deep nesting: 400 JSON; a body over the limit: 413."""
    for raw in (b"{", b'{"ids": ["\\ud800"]}', b"[1]", b"[" * 100000):
        status, _, got = http("POST", dd.url + "/api/destinations/svc/retry", raw,
                              {**AUTH, "Content-Type": "application/json"})
        assert status == 400, (raw[:20], status, got)
    import socket

    with socket.create_connection(("127.0.0.1", dd.port), timeout=10) as s:  # announce 2 MiB, send none of it
        s.sendall(b"POST /api/destinations/svc/retry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + API_KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 413")


def test_only_api_keys_reach_the_destinations_api(dd: Daemon) -> None:
    """A JWT (even with every right) is 403, no token 401, an unknown destination 404, a deep path 404."""
    token = jwt.encode({"sub": "eve", "rights": [">"], "exp": int(time.time()) + 600}, JWT_SECRET,
                       algorithm="HS256")
    for method, path in (("GET", "/api/destinations"), ("POST", "/api/destinations/svc/pause"),
                         ("GET", "/api/destinations/svc/dead")):
        status, got = http_json(method, dd.url + path, None, {"Authorization": f"Bearer {token}"})
        _err(status, got, 403)
        status, got = http_json(method, dd.url + path, None, {})
        _err(status, got, 401)
    status, got = dd.post("/api/destinations/" + "n" * 5000 + "/retry", {}, AUTH)
    _err(status, got, 404)
    assert "n" * 300 not in str(got)  # the echo of a name is bounded
    status, got = dd.get("/api/destinations/svc/dead/x/y", headers=AUTH)
    _err(status, got, 404)
    assert dd.get("/healthz")[0] == 200


def test_redact_url_hides_passwords_and_secret_query_values() -> None:
    """redact_url: user:password and token/key/sig-like query values become REDACTED; the rest is kept."""
    from twisted_rt.routes.destinations import redact_url

    assert redact_url("https://u:pw@h.example:8443/p?api_key=1&x=2&flag#frag") == (
        "https://u:REDACTED@h.example:8443/p?api_key=REDACTED&x=2&flag")
    assert redact_url("http://u@h/p") == "http://u@h/p"
    assert redact_url("http://h/p") == "http://h/p"

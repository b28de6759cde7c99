"""
The destinations API on a real daemon: API key only, the list with
counters, dead letters, retry, replay, pause and resume, and the errors of
bad requests; /metrics per destination; the config lines of bad destinations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jwt
import pytest
from conftest import API_KEY, BIN, DEFAULT_CONFIG, JWT_SECRET, Daemon, http
from test_dest_support import Answer, Receiver, running_receiver

receiver = pytest.fixture(running_receiver, name="receiver")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def cfg(url: str) -> str:
    return DEFAULT_CONFIG + f"""
[[destinations]]
name = "svc"
url = "{url}"
channels = ["a.>"]
max_attempts = 1
"""


def test_api_dead_letters_retry_replay_pause(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    """A 500 dead-letters at once (max_attempts 1); retry re-sends it; replay re-sends by offset; pause holds events."""
    receiver.script = lambda n, r: Answer(500, body=b"boom") if n == 0 else Answer(204)
    d = make_daemon(cfg(receiver.url))
    status, first = d.publish("a.x", {"n": 1})
    receiver.wait_for(lambda r: len(r.requests) >= 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, body = d.get("/api/destinations/svc/dead", headers=AUTH)
        if body["dead"]:
            break
        time.sleep(0.05)
    (dead,) = body["dead"]
    assert dead["id"] == first["id"] and "HTTP 500" in dead["last_error"]
    _, lst = d.get("/api/destinations", headers=AUTH)
    row = lst["destinations"][0]
    assert row["dead"] == 1 and row["failed"] == 1 and "HTTP 500" in row["last_error"]
    assert d.post("/api/destinations/svc/retry", {"ids": [first["id"]]}, AUTH) == (
        200, {"destination": "svc", "retried": 1})
    receiver.wait_for(lambda r: len(r.delivered()) == 1)
    assert json.loads(receiver.delivered()[0].body)["id"] == first["id"]
    status, body = d.post("/api/destinations/svc/replay", {"since": {"a.x": 0}}, AUTH)
    assert (status, body["queued"], body["more"]) == (200, 1, False)
    receiver.wait_for(lambda r: len(r.delivered()) == 2)
    assert d.post("/api/destinations/svc/pause", None, AUTH) == (200, {"destination": "svc", "state": "paused"})
    d.publish("a.x", {"n": 2})
    time.sleep(0.5)
    assert len(receiver.requests) == 3
    _, lst = d.get("/api/destinations", headers=AUTH)
    assert lst["destinations"][0]["state"] == "paused"
    assert d.post("/api/destinations/svc/resume", {}, AUTH)[0] == 200
    receiver.wait_for(lambda r: len(r.delivered()) == 3)
    status, _, metrics = http("GET", d.url + "/metrics")
    text = metrics.decode()
    assert 'rt_destination_attempts_total{destination="svc"} 4.0' in text
    assert 'rt_destination_dead_letters_total{destination="svc"} 1.0' in text
    assert 'rt_destination_pending{destination="svc"}' in text
    assert "rt_destination_latency_seconds_bucket" in text


def test_api_errors(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    """401 without a token, 403 with a JWT, 404 for an unknown name or action, 400 for bad bodies."""
    d = make_daemon(cfg(receiver.url))
    assert d.get("/api/destinations")[0] == 401
    tok = jwt.encode({"sub": "x", "exp": time.time() + 60, "subscribe": [">"]}, JWT_SECRET, algorithm="HS256")
    status, body = d.get("/api/destinations", headers={"Authorization": f"Bearer {tok}"})
    assert (status, body["error"]) == (403, "forbidden")
    status, body = d.post("/api/destinations/nope/pause", {}, AUTH)
    assert (status, body["error"]) == (404, "unknown_destination")
    assert d.post("/api/destinations/svc/explode", {}, AUTH)[0] == 404
    assert d.get("/api/destinations/svc/dead?limit=abc", headers=AUTH)[0] == 400
    for path, payload, code in [
        ("retry", {"ids": "x"}, "invalid_body"),
        ("retry", {"what": 1}, "invalid_body"),
        ("replay", {}, "invalid_body"),
        ("replay", {"since": {"bad channel!": 1}}, "invalid_channel"),
        ("replay", {"since": {"a.x": -1}}, "invalid_body"),
        ("replay", [1], "invalid_body"),
    ]:
        status, body = d.post(f"/api/destinations/svc/{path}", payload, AUTH)
        assert (status, body["error"]) == (400, code), (path, payload, body)
    status, _, raw = http("POST", d.url + "/api/destinations/svc/retry", b"{", {**AUTH, "Content-Type": "application/json"})
    assert status == 400 and json.loads(raw)["error"] == "invalid_json"


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ('url = "ftp://x/y"\nchannels = ["a"]', "destinations[0].url"),
        ('url = "http://no-such-host.invalid/x"\nchannels = ["a"]', "destinations[0].url"),
        ('url = "http://127.0.0.1/x"\nchannels = ["a..b"]', "destinations[0].channels[0]"),
        ('url = "http://127.0.0.1/x"\nchannels = ["a"]\nsecret = "whsec_%%%"', "destinations[0].secret"),
    ],
)
def test_bad_destination_is_one_config_line(tmp_path: Path, snippet: str, key: str) -> None:
    """check-config names the key of an invalid URL, an unresolvable host, a bad pattern, an undecodable secret."""
    import subprocess

    p = tmp_path / "c.toml"
    p.write_text(f'[[destinations]]\nname = "d"\n{snippet}\n')
    out = subprocess.run([str(BIN / "twisted-rt"), "check-config", str(p)], capture_output=True, text=True)
    assert out.returncode != 0
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], lines

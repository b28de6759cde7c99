"""
Destinations end to end: the real daemon (``twistd -n rt``) delivering to a
scripted receiver on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, Callable

import pytest
from conftest import API_KEY, DEFAULT_CONFIG, SHARED_DATA, Daemon, http
from standardwebhooks.webhooks import Webhook
from test_dest_support import Answer, Receiver, running_receiver

receiver = pytest.fixture(running_receiver, name="receiver")

SECRET = "whsec_" + base64.b64encode(b"destination-test-secret-0123456789").decode()
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def dest_config(url: str, extra: str = "", channels: str = '["orders.>"]', name: str = "backend") -> str:
    return DEFAULT_CONFIG + f"""
[[destinations]]
name = "{name}"
url = "{url}"
channels = {channels}
secret = "{SECRET}"
headers = {{ "X-Env" = "test" }}
max_in_flight = 4
timeout_seconds = 2
{extra}
"""


def test_event_format_is_signed_per_standard_webhooks(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    """Published events matching a destination arrive once each, JSON, verified by the standardwebhooks package."""
    d = make_daemon(dest_config(receiver.url))
    for i in range(5):
        status, _ = d.publish(f"orders.eu{i % 2}", {"n": i})
        assert status == 202
    d.publish("other.channel", {"x": 1})
    receiver.wait_for(lambda r: len(r.delivered()) >= 5)
    got = receiver.delivered()
    wh = Webhook(SECRET)
    seen: list[Any] = []
    for r in got:
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-env"] == "test"
        payload = wh.verify(r.body, r.headers)
        assert r.headers["webhook-id"] == payload["id"]
        seen.append(payload["data"]["n"])
    assert sorted(seen) == [0, 1, 2, 3, 4]
    status, body = d.get("/api/destinations", headers=AUTH)
    assert status == 200
    (row,) = body["destinations"]
    assert row["name"] == "backend" and row["state"] == "active" and row["delivered"] == 5
    assert json.loads(got[0].body).keys() >= {"id", "channel", "offset", "time", "source", "type", "data"}


GH_SECRET = "gh-source-secret"
EXAMPLES = SHARED_DATA / "octokit-webhook-examples"


def octokit_verify(secret: str, payload: bytes, signature: str) -> bool:
    """@octokit/webhooks-methods verify(): "sha256=" + hex HMAC-SHA256 of the payload, compared in constant time."""
    if not signature.startswith("sha256="):
        return False
    expected = "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    return len(expected) == len(signature) and hmac.compare_digest(expected, signature)


def test_raw_format_passes_github_signature_through(make_daemon: Callable[..., Daemon], receiver: Receiver) -> None:
    """format=raw re-sends GitHub's body bytes and headers: octokit-style verification with the source secret passes."""
    cfg = DEFAULT_CONFIG + f"""
[[sources]]
name = "github"
verify = "github"
secrets = ["{GH_SECRET}"]
channel = "github.{{header:X-GitHub-Event}}"

[[destinations]]
name = "mirror"
url = "{receiver.url}"
channels = ["github.>"]
format = "raw"
headers = {{ "X-Forwarded-By" = "twisted-rt" }}
"""
    d = make_daemon(cfg)
    sent = {}
    for i, name in enumerate(["push_payload.json", "issues_opened.payload.json"]):
        body = (EXAMPLES / name).read_bytes()
        event = "push" if name.startswith("push") else "issues"
        sig = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
        status, _, _ = http("POST", d.url + "/hooks/github", body, {
            "Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": f"dlv-{i}",
            "X-Hub-Signature-256": sig, "Authorization": "Bearer must-not-leak", "Cookie": "c=1",
        })
        assert status == 202
        sent[f"dlv-{i}"] = body
    receiver.wait_for(lambda r: len(r.delivered()) >= 2)
    for r in receiver.delivered():
        delivery = r.headers["x-github-delivery"]
        assert r.body == sent[delivery]
        assert octokit_verify(GH_SECRET, r.body, r.headers["x-hub-signature-256"])
        assert "authorization" not in r.headers and "cookie" not in r.headers
        assert r.headers["x-forwarded-by"] == "twisted-rt"
        assert "webhook-signature" not in r.headers


def test_kill_9_during_delivery_then_every_event_is_delivered_or_dead(
    make_daemon: Callable[..., Daemon], receiver: Receiver
) -> None:
    """kill -9 while delivering: after restart every acknowledged event was delivered or dead-lettered."""
    def script(n: int, r: Any) -> Answer:
        body = json.loads(r.body)
        if body["data"]["n"] % 7 == 3:
            return Answer(500)
        return Answer(204, delay=0.02)

    receiver.script = script
    d = make_daemon(dest_config(receiver.url, "max_attempts = 1"))
    acked = set()
    for i in range(60):
        status, body = d.publish("orders.x", {"n": i})
        assert status == 202
        acked.add(body["id"])
    receiver.wait_for(lambda r: len(r.requests) >= 10)
    d.kill()
    d.start()
    failing = {i for i in range(60) if i % 7 == 3}

    def complete(r: Receiver) -> bool:
        ok = {json.loads(x.body)["id"] for x in r.delivered()}
        return len(ok) >= len(acked) - len(failing)

    receiver.wait_for(complete, timeout=30)
    deadline = time.monotonic() + 20
    while True:  # the last dead letters may still be being written
        delivered = {json.loads(x.body)["id"] for x in receiver.delivered()}
        status, body = d.get("/api/destinations/backend/dead?limit=1000", headers=AUTH)
        assert status == 200
        dead = {x["id"] for x in body["dead"]}
        if delivered | dead == acked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert delivered | dead == acked
    assert len(dead) <= len(failing)

"""
Destinations end to end: the real daemon (``twistd -n rt``) delivering to a
scripted receiver on loopback.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

import pytest
from conftest import API_KEY, DEFAULT_CONFIG, Daemon
from standardwebhooks.webhooks import Webhook
from test_dest_support import Receiver, running_receiver

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

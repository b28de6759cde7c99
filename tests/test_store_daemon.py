"""
The journal behind the real daemon when it was unusable at start (issue 13,
defect 6): once it recovers, the channels written before the outage are all
there, with their history, their last offsets and their replay, and offsets
continue without reuse.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import websocket
from conftest import API_KEY, Daemon, http_json

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _channels(d: Daemon) -> dict[str, int]:
    status, body = d.get("/api/channels", headers=AUTH)
    assert status == 200, body
    return {c["name"]: c["last_offset"] for c in body["channels"]}


def _replay(d: Daemon, pattern: str, since: dict[str, int], count: int) -> list[tuple[str, int]]:
    """Subscribe over WebSocket with since: the first C{count} events, then whatever came before a pong."""
    ws = websocket.create_connection(d.ws_url + f"?token={API_KEY}", timeout=10)
    try:
        ws.send(json.dumps({"op": "subscribe", "channel": pattern, "since": since, "ref": 1}))
        got: list[tuple[str, int]] = []
        pinged = False
        while True:
            m: dict[str, Any] = json.loads(ws.recv())
            if m["op"] == "event":
                got.append((m["channel"], m["offset"]))
            elif m["op"] == "pong":
                return got
            else:
                assert m["op"] == "subscribed", m
            if len(got) >= count and not pinged:
                ws.send(json.dumps({"op": "ping", "ref": 2}))
                pinged = True
    finally:
        ws.close()


def test_channels_written_before_a_journal_outage_at_start_are_all_back(make_daemon: Callable[..., Daemon]) -> None:
    """Journal unusable at start (its directory replaced by a file), fixed later: old channels, offsets and replay are all there."""
    d = make_daemon()
    for i in range(3):
        assert d.publish("old.a", i)[0] == 202
    for i in range(2):
        assert d.publish("old.b", i)[0] == 202
    d.stop()

    var = d.workdir / "var"
    away = d.workdir / "var.away"
    var.rename(away)
    var.write_text("the journal's directory is not there")
    d.start()
    try:
        status, body = d.publish("new.c", "during")
        assert status == 503 and body["error"] == "journal_unavailable", body
        assert http_json("GET", d.url + "/readyz")[0] == 503

        var.unlink()
        away.rename(var)
        status, body = d.publish("new.c", "after")
        assert status == 202 and body["offset"] == 1, body
        assert http_json("GET", d.url + "/readyz")[0] == 200

        assert _channels(d) == {"old.a": 3, "old.b": 2, "new.c": 1}
        status, body = d.get("/api/channels/old.a/history?since=3", headers=AUTH)
        assert status == 200 and body["events"] == [] and body["last_offset"] == 3, body
        status, body = d.get("/api/channels/old.b/history", headers=AUTH)
        assert [e["data"] for e in body["events"]] == [0, 1]

        status, body = d.publish("old.a", 3)
        assert status == 202 and body["offset"] == 4, body  # continues, no reuse
        assert _replay(d, "old.*", {"old.a": 1}, 5) == [("old.a", 2), ("old.a", 3), ("old.b", 1), ("old.b", 2),
                                                      ("old.a", 4)]
    finally:
        if var.is_file():
            var.unlink()
        if away.exists():
            away.rename(var)

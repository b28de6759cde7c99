"""
/ws against the real daemon: the per-connection bounds and rights of issue 13.

A since object is bounded and only what its pattern matches counts (#3), a
repeated subscribe starts no second replay (#13), an unsubscribe or a
narrowing auth stops a replay at once (#14), the live buffer of a replaying
connection is bounded in bytes (#3), and an idempotency key is one event
over HTTP and WebSocket for one publisher, and another for another (#17).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import psutil
import websocket
from conftest import API_KEY, Daemon, http_json
from test_ws import conn, read_until_close, recv, request, send, token, with_config

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def publish_batch(d: Daemon, channel: str, n: int, data: Any = 0, batch: int = 100) -> None:
    """n events on channel through POST /api/publish, 100 per request."""
    left = n
    while left:
        k = min(batch, left)
        status, body = http_json("POST", d.url + "/api/publish",
                                 {"events": [{"channel": channel, "data": data} for _ in range(k)]}, AUTH)
        assert status == 202, body
        left -= k


def slow_conn(d: Daemon, tok: str | None = API_KEY) -> websocket.WebSocket:
    """A connection with a tiny receive buffer: a replay to it is paced by the server."""
    return conn(d, tok, timeout=30, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))


def read_through_pong(ws: websocket.WebSocket, ref: str = "end") -> list[dict[str, Any]]:
    """Send a ping and return every message up to its pong (everything the server queued before it)."""
    send(ws, op="ping", ref=ref)
    out: list[dict[str, Any]] = []
    while True:
        m = recv(ws)
        if m.get("op") == "pong" and m.get("ref") == ref:
            return out
        out.append(m)


def test_since_naming_more_channels_than_max_since_channels_is_refused(make_daemon: Callable[..., Daemon]) -> None:
    """Since objects naming more than max_since_channels channels over a connection are refused (too_many_channels)."""
    d = make_daemon(with_config("[websocket]\nmax_since_channels = 5\n"))
    ws = conn(d, None)  # anonymous: public.> only
    big = {f"public.c{i}": 1 for i in range(6)}
    r = request(ws, op="subscribe", channel="public.>", since=big, ref=1)
    assert (r["op"], r["code"], r["ref"]) == ("error", "too_many_channels", 1)
    assert "5" in r["message"]
    assert request(ws, op="unsubscribe", channel="public.>")["code"] == "not_subscribed"
    r = request(ws, op="subscribe", channel="public.>", since=dict(list(big.items())[:3]), ref=2)
    assert r == {"op": "subscribed", "channel": "public.>", "recovered": True, "ref": 2}
    # the three names are kept for public.>: a second pattern may name only two more
    r = request(ws, op="subscribe", channel="public.*", since={f"public.d{i}": 1 for i in range(3)}, ref=3)
    assert (r["op"], r["code"]) == ("error", "too_many_channels")
    r = request(ws, op="subscribe", channel="public.*", since={"public.c1": 1, "public.c2": 1}, ref=4)
    assert r == {"op": "subscribed", "channel": "public.*", "recovered": True, "ref": 4}
    ws.close()


def test_since_names_outside_the_pattern_do_not_count(daemon: Daemon) -> None:
    """Offsets a since object gives for channels its pattern does not match change nothing for other subscriptions."""
    publish_batch(daemon, "nm.h", 3)
    ws = conn(daemon)
    assert request(ws, op="subscribe", channel="nm.g.*", since={"nm.h": 50, "nm.g.a": 0})["op"] == "subscribed"
    assert request(ws, op="subscribe", channel="nm.h", since=0)["op"] == "subscribed"
    assert [recv(ws)["offset"] for _ in range(3)] == [1, 2, 3]  # not swallowed by the unrelated claim
    ws.close()


def test_repeated_subscribe_changes_nothing(daemon: Daemon) -> None:
    """Subscribing again to a pattern already held answers 'subscribed' and keeps its position: its since is not used."""
    ws = conn(daemon)
    assert request(ws, op="subscribe", channel="rs.*", since={})["op"] == "subscribed"
    publish_batch(daemon, "rs.a", 3)
    assert [recv(ws)["offset"] for _ in range(3)] == [1, 2, 3]
    for since in ({"rs.a": 10}, {"rs.a": 0}, 0, 2, None):
        r = request(ws, op="subscribe", channel="rs.*", since=since, ref="again")
        assert r == {"op": "subscribed", "channel": "rs.*", "ref": "again"}
    assert read_through_pong(ws) == []  # no replayed duplicates
    publish_batch(daemon, "rs.a", 2)
    assert [recv(ws)["offset"] for _ in range(2)] == [4, 5]  # the claim of 10 was not taken
    _, st = daemon.get("/api/stats", headers=AUTH)
    assert st["subscriptions"] == 1
    ws.close()


def _stalled_replay(d: Daemon, channel: str, n: int, tok: str = API_KEY, size: int = 200,
                    first: int = 100) -> tuple[websocket.WebSocket, list[dict[str, Any]]]:
    """
    n events on channel, then a slow client subscribing with since=0 that
    reads the first events of the replay (so it is surely running) and then
    stops reading: the replay waits on it.  Returns the messages read.
    """
    publish_batch(d, channel, n, "x" * size, batch=max(1, min(100, 2**20 // (size + 100))))
    ws = slow_conn(d, tok)
    send(ws, op="subscribe", channel=channel, since=0, ref="s")
    got: list[dict[str, Any]] = []
    while sum(1 for m in got if m.get("op") == "event") < first:
        got.append(recv(ws))
    return ws, got


def read_until_quiet(ws: websocket.WebSocket, quiet: float = 1.5) -> list[dict[str, Any]]:
    """Every message until none came for `quiet` seconds (a replay still running keeps sending)."""
    out: list[dict[str, Any]] = []
    ws.settimeout(quiet)
    try:
        while True:
            out.append(recv(ws))
    except websocket.WebSocketTimeoutException:
        pass
    finally:
        ws.settimeout(30)
    return out


def test_unsubscribe_stops_a_running_replay(make_daemon: Callable[..., Daemon]) -> None:
    """After 'unsubscribed' not one more event of the pattern arrives, although its replay had thousands to go."""
    d = make_daemon(with_config("[websocket]\nmax_send_buffer_bytes = 65536\n"))
    n = 20000
    ws, before = _stalled_replay(d, "stop.x", n)
    publish_batch(d, "stop.x", 50, "live")  # live events buffered behind the replay
    send(ws, op="unsubscribe", channel="stop.x", ref="u")
    while True:
        m = recv(ws)
        if m.get("ref") == "u":
            assert m == {"op": "unsubscribed", "channel": "stop.x", "ref": "u"}
            break
        before.append(m)
    after = read_until_quiet(ws) + read_through_pong(ws)
    assert [m for m in after if m.get("op") == "event"] == []
    events = [m["offset"] for m in before if m.get("op") == "event"]
    assert events == list(range(1, len(events) + 1))
    assert len(events) < n // 2  # the replay was cut, not finished before the reply
    ws.close()


def test_narrowing_auth_stops_a_running_replay(make_daemon: Callable[..., Daemon]) -> None:
    """A new token without the right ends the replay: after its 'unsubscribed' no event of the channel arrives."""
    d = make_daemon(with_config("[websocket]\nmax_send_buffer_bytes = 65536\n"))
    wide = token(sub="u1", subscribe=["na.>", "other"])
    ws, _ = _stalled_replay(d, "na.x", 20000, wide)
    publish_batch(d, "na.x", 50, "live")
    send(ws, op="auth", token=token(sub="u1", subscribe=["other"]), ref="a")
    replies: list[dict[str, Any]] = []
    while True:
        m = recv(ws)
        if m.get("op") != "event":
            replies.append(m)
        if m.get("op") == "unsubscribed":
            break
    assert replies == [{"op": "authenticated", "sub": "u1", "ref": "a"},
                       {"op": "unsubscribed", "channel": "na.x", "reason": "forbidden"}]
    assert [m for m in read_until_quiet(ws) + read_through_pong(ws) if m.get("op") == "event"] == []
    publish_batch(d, "na.x", 5)
    assert [m for m in read_through_pong(ws, "end2") if m.get("op") == "event"] == []
    ws.close()


def test_live_buffer_during_a_replay_is_bounded_in_bytes(make_daemon: Callable[..., Daemon]) -> None:
    """
    While a replay waits on a client that does not read, 32 MiB of live
    events are published past it: the daemon holds at most about
    max_send_buffer_bytes of them, closes it with 1013 and its RSS grows by
    less than 16 MiB (the old buffer held up to 20,000 whole events).
    """
    d = make_daemon(with_config("[websocket]\nmax_send_buffer_bytes = 262144\n"))
    proc = psutil.Process(d.proc.pid)  # type: ignore[union-attr]
    ws, got = _stalled_replay(d, "buf.x", 5000, size=4096, first=10)  # 20 MiB to replay
    publish_batch(d, "buf.warmup", 64, "y" * 65536, batch=8)
    before = proc.memory_info().rss
    publish_batch(d, "buf.x", 512, "z" * 65536, batch=8)  # 32 MiB, live
    after = proc.memory_info().rss
    assert after - before < 16 * 2**20, (before, after)
    code, msgs = read_until_close(ws)
    assert code == 1013
    offsets = [m["offset"] for m in got + msgs if m.get("op") == "event"]
    assert offsets == list(range(1, len(offsets) + 1))
    again = conn(d)
    assert request(again, op="subscribe", channel="buf.x", since=offsets[-1])["op"] == "subscribed"
    assert recv(again)["offset"] == offsets[-1] + 1
    again.close()


def test_idempotency_key_is_one_event_over_http_and_ws(daemon: Daemon) -> None:
    """The same key from the same publisher over HTTP then WebSocket is one event; another JWT sub gets its own."""
    status, first = http_json("POST", daemon.url + "/api/publish", {"channel": "idem.a", "data": 1, "id": "K1"}, AUTH)
    assert status == 202
    ws = conn(daemon)
    again = request(ws, op="publish", channel="idem.a", data=1, id="K1", ref=1)
    assert again == {"op": "published", "id": "K1", "channel": "idem.a", "offset": first["offset"],
                     "duplicate": True, "ref": 1}
    ws.close()
    alice = token(sub="alice", publish=["idem.>"], subscribe=["idem.>"])
    bob = token(sub="bob", publish=["idem.>"], subscribe=["idem.>"])
    status, a_http = http_json("POST", daemon.url + "/api/publish", {"channel": "idem.b", "data": "a", "id": "K2"},
                               {"Authorization": f"Bearer {alice}"})
    assert status == 202 and not a_http.get("duplicate")
    wa = conn(daemon, alice)
    a_ws = request(wa, op="publish", channel="idem.b", data="a", id="K2")
    assert (a_ws["offset"], a_ws.get("duplicate")) == (a_http["offset"], True)
    wb = conn(daemon, bob)
    b_ws = request(wb, op="publish", channel="idem.c", data="b", id="K2")
    assert b_ws["op"] == "published" and not b_ws.get("duplicate")
    assert (b_ws["channel"], b_ws["offset"]) == ("idem.c", 1)  # nothing of alice's event is revealed
    b_again = request(wb, op="publish", channel="idem.c", data="b", id="K2")
    assert (b_again["offset"], b_again.get("duplicate")) == (1, True)
    # an API key's K2 is yet another event
    wk = conn(daemon)
    k = request(wk, op="publish", channel="idem.b", data="k", id="K2")
    assert not k.get("duplicate") and k["offset"] == a_http["offset"] + 1
    _, hist = http_json("GET", daemon.url + "/api/channels/idem.b/history", headers=AUTH)
    assert [e["data"] for e in hist["events"]] == ["a", "k"]
    for w in (wa, wb, wk):
        w.close()

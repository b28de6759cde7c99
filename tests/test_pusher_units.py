"""In-memory units of the Pusher protocol: the activity sweep, webhooks, the fallback presence, the frame cache."""

from __future__ import annotations

import json
import time
from typing import Any

import pusher
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from twisted_rt.app import App
from twisted_rt.core.auth import Authenticator
from twisted_rt.core.config import AuthConfig, Config, PusherConfig
from twisted_rt.core.event import Event
from twisted_rt.core.metrics import Stats
from twisted_rt.routes.pusher import PONG_TIMEOUT, PusherFactory, _LocalPresence, pusher_data
from twisted_rt.routes.pusher_api import PusherWebhooks
from twisted_rt.testing import MemoryBroker

KEY, SECRET = "rt-key", "rt-secret"


def _app(clock: Clock, **pusher_kw: Any) -> App:
    config = Config(auth=AuthConfig(api_keys=("k" * 20,)),
                    pusher=PusherConfig(app_id="1", key=KEY, secret=SECRET, activity_timeout_seconds=10, **pusher_kw))
    return App(config=config, reactor=clock, broker=MemoryBroker(), auth=Authenticator(config.auth), stats=Stats())


class _FakeConn:
    def __init__(self, last_seen: float) -> None:
        self.last_seen = last_seen
        self.pinged = False
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def _push(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    def close_with(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_sweep_pings_silent_connections_then_closes_4201() -> None:
    """Silent past activity_timeout: pusher:ping; still silent PONG_TIMEOUT later: closed with 4201."""
    clock = Clock()
    f = PusherFactory(_app(clock))
    quiet, busy = _FakeConn(0.0), _FakeConn(0.0)
    f.sockets.update({"1.1": quiet, "1.2": busy})  # type: ignore[dict-item]
    f.start_sweeping()
    clock.advance(11)
    assert quiet.sent == [{"event": "pusher:ping", "data": {}}] and quiet.pinged
    busy.last_seen, busy.pinged = clock.seconds(), False  # it answered
    clock.advance(PONG_TIMEOUT)
    assert quiet.closed == (4201, "Pong reply not received")
    assert busy.closed is None
    f.stop_sweeping()
    f.stop_sweeping()  # twice is fine


class _Outbound:
    def __init__(self, result: Any = None, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str], str]] = []
        self.result = result
        self.fail = fail

    def enqueue(self, destination: str, body: bytes, headers: list[tuple[str, str]], id: str) -> Any:
        if self.fail:
            raise RuntimeError("boom")
        self.sent.append((destination, body, dict(headers), id))
        return self.result


def test_webhooks_are_signed_the_pusher_way() -> None:
    """Each webhook is {time_ms, events} with X-Pusher-Key/Signature that pusher.validate_webhook accepts."""
    clock = Clock()
    app = _app(clock)
    out = _Outbound(result=succeed(None))
    app.outbound = out  # type: ignore[assignment]
    now = time.time()
    hooks = PusherWebhooks(app, "hooks", clock=lambda: now)
    hooks.local_occupied("a")
    hooks.local_vacated("a")
    hooks.member("member_added", "presence-r", "u1")
    hooks.client_event({"channel": "private-a", "event": "client-x", "data": {"k": 1}, "socket_id": "1.2",
                        "user_id": "u1"})
    client = pusher.Pusher(app_id="1", key=KEY, secret=SECRET)
    names = []
    for dest, body, headers, _ in out.sent:
        assert dest == "hooks" and headers["X-Pusher-Key"] == KEY
        payload = client.validate_webhook(headers["X-Pusher-Key"], headers["X-Pusher-Signature"], body.decode())
        assert payload["time_ms"] == int(now * 1000)
        names.append(payload["events"][0]["name"])
    assert names == ["channel_occupied", "channel_vacated", "member_added", "client_event"]
    ce = json.loads(out.sent[3][1])["events"][0]
    assert ce == {"name": "client_event", "channel": "private-a", "event": "client-x", "data": '{"k":1}',
                  "socket_id": "1.2", "user_id": "u1"}


def test_webhooks_without_engine_or_failing_engine_do_not_raise() -> None:
    """No outbound engine, or one that raises or fails later: logged, the connection is unaffected."""
    clock = Clock()
    app = _app(clock)
    PusherWebhooks(app, "hooks").member("member_removed", "presence-r", "u")
    app.outbound = _Outbound(fail=True)  # type: ignore[assignment]
    PusherWebhooks(app, "hooks").member("member_removed", "presence-r", "u")
    d: Deferred[None] = Deferred()
    app.outbound = _Outbound(result=d)  # type: ignore[assignment]
    PusherWebhooks(app, "hooks").member("member_removed", "presence-r", "u")
    d.errback(RuntimeError("later"))


class _RedisLike(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def key(self, kind: str, name: str = "") -> str:
        return f"rt:{kind}:{name}"

    def command(self, *args: Any) -> Deferred[Any]:
        assert args[0] == "EVAL" and args[2] == 1  # INCRBY KEYS[1] ARGV[1], deleted back at 0
        n = self.counts[args[3]] = self.counts.get(args[3], 0) + int(args[4])
        if n <= 0:
            del self.counts[args[3]]
        return succeed(n)


def test_occupancy_is_counted_cluster_wide_with_a_shared_counter() -> None:
    """With a Redis-like broker, occupied/vacated are sent only on the cluster's first and last subscriber."""
    clock = Clock()
    app = _app(clock)
    app.broker = _RedisLike()
    out = _Outbound()
    app.outbound = out  # type: ignore[assignment]
    hooks = PusherWebhooks(app, "hooks")
    hooks.local_occupied("a")  # node 1
    hooks.local_occupied("a")  # node 2
    hooks.local_vacated("a")
    hooks.local_vacated("a")
    assert [json.loads(b)["events"][0]["name"] for _, b, _, _ in out.sent] == ["channel_occupied", "channel_vacated"]
    assert app.broker.counts == {}


class _Watcher:
    def __init__(self) -> None:
        self.heard: list[tuple[str, str, str]] = []

    def presence_changed(self, op: str, channel: str, user: str, info: Any) -> None:
        self.heard.append((op, channel, user))


def test_local_presence_one_member_per_user() -> None:
    """The fallback presence: the first connection joins, the last leaves; members and counts follow."""
    p = _LocalPresence()
    w = _Watcher()
    p.watch("presence-r", w)
    c1, c2 = object(), object()
    p.add("presence-r", "u", {"n": 1}, c1)
    p.add("presence-r", "u", {"n": 1}, c2)
    p.add("presence-r", "v", None, c1)
    assert w.heard == [("join", "presence-r", "u"), ("join", "presence-r", "v")]
    members: list[Any] = []
    p.members("presence-r").addCallback(members.extend)
    assert members == [{"user": "u", "info": {"n": 1}}, {"user": "v"}]
    counts: list[Any] = []
    p.counts().addCallback(counts.append)
    assert counts == [{"presence-r": 2}]
    p.remove("presence-r", "u", c1)
    p.remove("presence-r", "u", object())
    assert len(w.heard) == 2
    p.remove("presence-r", "u", c2)
    p.remove("presence-r", "v", c1)
    assert w.heard[2:] == [("leave", "presence-r", "u"), ("leave", "presence-r", "v")]
    p.unwatch("presence-r", w)
    p.unwatch("presence-r", w)


def test_frame_is_encoded_once_per_event_and_data_rules() -> None:
    """The Pusher frame is cached on the event; Pusher text data is sent verbatim, other data as JSON text."""
    f = PusherFactory(_app(Clock()))
    e = Event("i", "c", 1, "t", "api", "", {"a": 1})
    frame = f.frame(e)
    assert f.frame(e) is frame and e.cached("pusher") is frame
    assert b'"event":"message"' in frame and b'"data":"{\\"a\\":1}"' in frame
    assert pusher_data(Event("i", "c", 1, "t", "pusher", "e", "plain")) == "plain"
    assert pusher_data(Event("i", "c", 1, "t", "api", "e", "plain")) == '"plain"'


def test_fallback_presence_and_local_terminate() -> None:
    """Without App.presence/App.connections the factory uses its own presence and a broadcast terminate."""
    clock = Clock()
    f = PusherFactory(_app(clock))
    assert isinstance(f.presence, _LocalPresence) and f.presence is f.presence

    class Conn:
        closed = False

        def disconnect(self) -> None:
            self.closed = True

    conn = Conn()
    f.register("u", conn)  # type: ignore[arg-type]
    f.terminate("u")
    assert conn.closed
    f.unregister("u", conn)  # type: ignore[arg-type]
    assert f.by_user == {}

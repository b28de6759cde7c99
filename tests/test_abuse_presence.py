"""
Attacks on presence: a presence channel far larger than any reply should carry (in memory: a
daemon channel of 1000+ members needs 1000+ connections, each getting every other's join, which
takes a minute), a JWT `info` claim past its limit and a disconnect of a huge user name (daemon).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jwt
import pytest
import websocket
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from tests.conftest import API_KEY, JWT_SECRET, Daemon, http_json
from tests.test_api import _call
from twisted_rt.app import App
from twisted_rt.core.auth import Authenticator
from twisted_rt.core.config import AuthConfig, ChannelRule, Config
from twisted_rt.core.metrics import Stats
from twisted_rt.routes import api
from twisted_rt.routes.pusher import _LocalPresence
from twisted_rt.store.presence import MAX_MEMBERS_LISTED, make_presence
from twisted_rt.testing import MemoryBroker
from twisted_rt.web.resource import Root

BIG = MAX_MEMBERS_LISTED + 20


def _filled(p: Any) -> Any:
    if hasattr(p, "start"):
        p.start()  # the node's alive mark: its members count
    for i in range(BIG):
        p.add("hall", f"user{i:05d}", {"n": i}, object())
    return p


def test_members_list_is_capped_in_a_huge_channel() -> None:
    """presence.members of a channel over MAX_MEMBERS_LISTED members lists the first MAX_MEMBERS_LISTED by name."""
    p = _filled(make_presence(MemoryBroker(), Clock(), 5, 20))
    got: list[Any] = []
    p.members("hall").addCallback(got.append)
    assert len(got[0]) == MAX_MEMBERS_LISTED and got[0][0] == {"user": "user00000", "info": {"n": 0}}
    local = _filled(_LocalPresence())
    local.members("hall").addCallback(got.append)
    assert len(got[1]) == MAX_MEMBERS_LISTED


def test_presence_api_counts_every_member_and_says_more() -> None:
    """GET /api/channels/<name>/presence of a huge channel: members capped, count = all of them, more: true."""
    from treq.testing import StubTreq

    broker = MemoryBroker()
    app = App(config=Config(channels=(ChannelRule(pattern="hall", presence=True),)), reactor=MemoryReactorClock(),
              broker=broker, auth=Authenticator(AuthConfig(api_keys=("k",))), stats=Stats())
    app.presence = _filled(make_presence(broker, Clock(), 5, 20))
    root = Root()
    api.mount(root, app)
    status, body = _call(StubTreq(root), "GET", "/api/channels/hall/presence")
    assert status == 200
    assert (len(body["members"]), body["count"], body["more"]) == (MAX_MEMBERS_LISTED, BIG, True)


def _token(sub: str, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "subscribe": ["chat.>"], "exp": int(time.time()) + 600, **claims}, JWT_SECRET, algorithm="HS256")


PRESENCE_CONFIG = f"""
[journal]
path = "var/journal.sqlite3"

[auth]
api_keys = ["{API_KEY}"]
jwt_secret = "{JWT_SECRET}"

[[channels]]
pattern = "chat.>"
presence = true
"""


@pytest.fixture
def chat(make_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon with presence on chat.>."""
    return make_daemon(PRESENCE_CONFIG)


def test_info_claim_over_1_kib_is_refused(chat: Daemon) -> None:
    """A JWT whose info claim is over 1 KiB of JSON does not connect (it would ride on every join and members list)."""
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(chat.ws_url + "?token=" + _token("alice", info={"bio": "x" * 1100}), timeout=10)
    assert e.value.status_code == 401 and b"'info' claim is" in (e.value.resp_body or b"")
    assert chat.get("/healthz")[0] == 200


def test_disconnect_of_a_huge_or_odd_user_name_is_a_clear_error(chat: Daemon) -> None:
    """POST /api/users/<user>/disconnect with a 10 KB name or bad UTF-8 is 400 JSON, not a broadcast or a 500."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, body = http_json("POST", chat.url + "/api/users/" + "u" * 10000 + "/disconnect", headers=auth)
    assert status in (400, 414) and "error" in body, body
    status, body = http_json("POST", chat.url + "/api/users/%ff%fe/disconnect", headers=auth)
    assert status == 400 and "error" in body, body
    status, body = http_json("POST", chat.url + "/api/users/alice/disconnect",
                             headers={"Authorization": "Bearer " + _token("alice")})
    assert status == 403 and body["error"] == "forbidden"
    assert chat.get("/healthz")[0] == 200


def _members(d: Daemon) -> list[str]:
    status, body = d.get("/api/channels/chat.room/presence", headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200
    return [m["user"] for m in body["members"]]


def _eventually(d: Daemon, expected: list[str]) -> None:
    deadline = time.monotonic() + 5
    while _members(d) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _members(d) == expected


def test_only_a_jwt_sub_is_a_member_and_a_new_token_moves_it(chat: Daemon) -> None:
    """API-key and anonymous subscribers are not members; a re-auth as bob makes the connection bob, not alice."""
    admin = websocket.create_connection(chat.ws_url + f"?token={API_KEY}", timeout=10)
    admin.send(json.dumps({"op": "subscribe", "channel": "chat.room", "ref": 1}))
    assert json.loads(admin.recv())["op"] == "subscribed"
    _eventually(chat, [])
    ws = websocket.create_connection(chat.ws_url + "?token=" + _token("alice"), timeout=10)
    ws.send(json.dumps({"op": "subscribe", "channel": "chat.room", "user": "mallory", "info": {"x": 1}, "ref": 1}))
    _eventually(chat, ["alice"])
    ws.send(json.dumps({"op": "auth", "token": _token("bob"), "ref": 2}))
    _eventually(chat, ["bob"])
    status, body = http_json("POST", chat.url + "/api/users/alice/disconnect", {},
                             {"Authorization": f"Bearer {API_KEY}"})
    assert (status, body["disconnected"]) == (200, 0)
    ws.close()
    admin.close()
    _eventually(chat, [])


def test_members_need_the_subscribe_right(chat: Daemon) -> None:
    """A JWT without the subscribe right on the channel gets 403 on the API and 'forbidden' on /ws, no members."""
    eve = jwt.encode({"sub": "eve", "subscribe": ["other.>"], "exp": int(time.time()) + 600}, JWT_SECRET,
                     algorithm="HS256")
    status, body = chat.get("/api/channels/chat.room/presence", headers={"Authorization": f"Bearer {eve}"})
    assert status == 403 and body["error"] == "forbidden" and "members" not in body
    ws = websocket.create_connection(chat.ws_url + "?token=" + eve, timeout=10)
    ws.send(json.dumps({"op": "presence", "channel": "chat.room", "ref": 3}))
    got = json.loads(ws.recv())
    assert got["op"] == "error" and got["code"] == "forbidden" and got["ref"] == 3
    ws.send(json.dumps({"op": "presence", "channel": "chat.room\n", "ref": 4}))
    assert json.loads(ws.recv())["code"] == "invalid_channel"
    ws.close()


def test_presence_requests_of_one_connection_are_rate_limited(chat: Daemon) -> None:
    """A second op:presence within PRESENCE_INTERVAL is rate_limited (ref kept); a loop of them is closed 1008."""
    from twisted_rt.routes.ws import MAX_BAD_MESSAGES, PRESENCE_INTERVAL

    ws = websocket.create_connection(chat.ws_url + "?token=" + _token("alice"), timeout=10)
    ws.send(json.dumps({"op": "subscribe", "channel": "chat.room", "ref": 1}))
    while json.loads(ws.recv())["op"] != "subscribed":
        pass
    replies: list[dict[str, Any]] = []
    ws.send(json.dumps({"op": "presence", "channel": "chat.room", "ref": 2}))
    ws.send(json.dumps({"op": "presence", "channel": "chat.room", "ref": 3}))
    while len(replies) < 2:
        got = json.loads(ws.recv())
        if got.get("ref") in (2, 3):
            replies.append(got)
    by_ref = {r["ref"]: r for r in replies}
    assert by_ref[2]["op"] == "presence" and [m["user"] for m in by_ref[2]["members"]] == ["alice"]
    assert by_ref[3]["op"] == "error" and by_ref[3]["code"] == "rate_limited"
    time.sleep(PRESENCE_INTERVAL + 0.1)
    ws.send(json.dumps({"op": "presence", "channel": "chat.room", "ref": 4}))
    while (got := json.loads(ws.recv())).get("ref") != 4:
        pass
    assert got["op"] == "presence"
    for i in range(MAX_BAD_MESSAGES):  # a loop: the tenth refusal closes it as a bad client
        ws.send(json.dumps({"op": "presence", "channel": "chat.room", "ref": 10 + i}))
    status, limited = None, 0
    try:
        while status is None:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                status = int.from_bytes(data[:2], "big")
            elif b"rate_limited" in data:
                limited += 1
    except (websocket.WebSocketConnectionClosedException, ConnectionResetError):
        pass
    assert status == 1008 and limited >= MAX_BAD_MESSAGES - 1
    assert chat.get("/healthz")[0] == 200

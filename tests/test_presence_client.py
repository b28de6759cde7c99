"""The Python client and ``twisted-rt tail`` with presence: join/leave lines, 4003 ends tail."""

from __future__ import annotations

from collections.abc import Callable

from conftest import Daemon
from test_cli_client import Tail, wait_for
from test_cli_client import tails as tails  # the fixture
from test_presence_e2e import ADMIN, CONFIG, Client, token


def test_tail_prints_join_and_leave_and_stops_on_4003(make_daemon: Callable[..., Daemon],
                                                       tails: Callable[..., Tail]) -> None:
    """tail prints a JSON line per join and leave of a presence channel; a disconnect (4003) makes it exit 1."""
    d = make_daemon(CONFIG)
    t = tails("room.9", "--url", d.ws_url, "--token", token("watcher"))
    wait_for(lambda: any(line.get("op") == "join" and line["user"] == "watcher" for line in t.lines()), what="own join")
    bob = Client(d, token("bob", info={"n": "Bob"}))
    bob.subscribe("room.9")
    wait_for(lambda: {"op": "join", "channel": "room.9", "user": "bob", "info": {"n": "Bob"}} in t.lines(), what="join")
    bob.close()
    wait_for(lambda: {"op": "leave", "channel": "room.9", "user": "bob"} in t.lines(), what="leave")
    assert d.post("/api/users/watcher/disconnect", {}, ADMIN)[1]["disconnected"] == 1
    assert t.wait() == 1
    assert "4003" in t.stderr()


def test_client_understands_presence_messages() -> None:
    """The Python client hands join/leave to on_presence, keeps recovered per pattern, answers presence() calls."""
    from twisted.internet.testing import MemoryReactorClock

    from twisted_rt.client import Subscription

    heard: list[dict[str, object]] = []
    sub = Subscription(["room.1"], lambda e: None, reactor=MemoryReactorClock(), on_presence=heard.append)
    sub._message({"op": "join", "channel": "room.1", "user": "a", "info": {"x": 1}})
    sub._message({"op": "leave", "channel": "room.1", "user": "a"})
    assert [m["op"] for m in heard] == ["join", "leave"]
    sub._message({"op": "subscribed", "channel": "room.1", "recovered": False})
    assert sub.recovered == {"room.1": False}
    failed: list[object] = []
    sub.presence("room.1").addErrback(failed.append)
    assert failed  # not connected

    class Proto:
        STATE_OPEN = 3
        state = 3
        sent: list[bytes] = []

        def sendMessage(self, data: bytes) -> None:
            self.sent.append(data)

    sub._proto = Proto()  # type: ignore[assignment]
    got: list[object] = []
    sub.presence("room.1").addCallback(got.append)
    sub._message({"op": "presence", "channel": "room.1", "members": [{"user": "a"}], "ref": "p1"})
    assert got == [[{"user": "a"}]]
    bad: list[object] = []
    sub.presence("plain").addErrback(bad.append)
    sub._message({"op": "error", "code": "presence_off", "message": "no", "ref": "p2"})
    assert len(bad) == 1

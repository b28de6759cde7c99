"""pusher-js (npm) and Laravel Echo, unchanged, driving the daemon from Node; the server side signs with PyPI pusher."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pusher
import pytest

from tests.conftest import Daemon
from tests.test_pusher_daemon import APP, CONFIG, KEY, SECRET

NODE_DIR = Path(__file__).parent / "node"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "pusher-js").is_dir(),
    reason="node and tests/node/node_modules (npm ci) are needed",
)


class NodeClient:
    """tests/node/pusher_client.js as a child process, its JSON lines read one by one."""

    def __init__(self, mode: str, port: int, user: str) -> None:
        self.proc = subprocess.Popen(
            ["node", "pusher_client.js", mode, str(port), KEY, SECRET, user],
            cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[dict[str, Any]] = []

    def next(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"node exited {self.proc.wait()} after {self.lines}")
        try:
            msg: dict[str, Any] = json.loads(line)
        except ValueError:
            msg = {"log": line.rstrip()}
        self.lines.append(msg)
        return msg

    def until(self, key: str) -> dict[str, Any]:
        while True:
            msg = self.next()
            assert "error" not in msg and "connection_error" not in msg, msg
            if key in msg:
                return msg

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def nodes() -> Iterator[Callable[[str, int, str], NodeClient]]:
    """Start Node clients; every one is killed at the end."""
    started: list[NodeClient] = []

    def start(mode: str, port: int, user: str) -> NodeClient:
        c = NodeClient(mode, port, user)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def _client(d: Daemon) -> pusher.Pusher:
    return pusher.Pusher(app_id=APP, key=KEY, secret=SECRET, host="127.0.0.1", port=d.port, ssl=False)


def test_pusher_js_public_private_presence_and_client_events(
    make_daemon: Callable[..., Daemon], nodes: Callable[[str, int, str], NodeClient]
) -> None:
    """pusher-js subscribes public, private and presence channels; gets triggers, members and whispers."""
    d = make_daemon(CONFIG)
    a = nodes("pusher", d.port, "alice")
    ready = a.until("ready")
    assert ready["ready"]
    assert a.lines[-2] == {"members": 1, "me": "alice"}
    b = nodes("pusher", d.port, "bob")
    b.until("ready")
    added = a.until("member_added")
    assert added == {"member_added": "bob", "info": {"name": "BOB"}}
    c = _client(d)
    c.trigger("orders.1", "order-shipped", {"id": 1})
    c.trigger("private-orders", "secret", {"code": 42})
    assert a.until("got") == {"got": "order-shipped", "channel": "orders.1", "data": {"id": 1}}
    assert a.until("got") == {"got": "secret", "channel": "private-orders", "data": {"code": 42}}
    d.publish("orders.1", {"id": 2}, type="order-shipped")  # the JSON API reaches pusher-js too
    assert a.until("got")["data"] == {"id": 2}
    b.send({"whisper": True})
    assert a.until("got") == {"got": "client-typing", "data": {"from": "bob"}}
    b.stop()
    assert a.until("member_removed") == {"member_removed": "bob"}
    c.trigger("orders.1", "bye", {})
    a.until("bye")


def test_laravel_echo_listens_joins_and_leaves(
    make_daemon: Callable[..., Daemon], nodes: Callable[[str, int, str], NodeClient]
) -> None:
    """Laravel Echo (broadcaster pusher) gets Laravel-named events, here/joining/leaving."""
    d = make_daemon(CONFIG)
    e = nodes("echo", d.port, "erin")
    e.until("ready")
    assert {"here": ["ERIN"]} in e.lines
    f = nodes("echo", d.port, "frank")
    f.until("ready")
    assert e.until("joining") == {"joining": "FRANK"}
    c = _client(d)
    # what Laravel's pusher broadcaster sends: the event class name, data as a JSON object text
    c.trigger(["orders.1"], "App\\Events\\OrderPaid", {"order": {"id": 9}, "socket": None})
    assert e.until("got") == {"got": "OrderPaid", "data": {"order": {"id": 9}, "socket": None}}
    c.trigger("orders.1", "order-shipped", {"id": 3})
    assert e.until("got") == {"got": "order-shipped", "data": {"id": 3}}
    c.trigger("private-orders", "secret", {"s": 1})
    assert e.until("got") == {"got": "secret", "data": {"s": 1}}
    f.stop()
    assert e.until("leaving") == {"leaving": "FRANK"}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and c.users_info("presence-room")["users"] != [{"id": "erin"}]:
        time.sleep(0.05)
    assert c.users_info("presence-room") == {"users": [{"id": "erin"}]}
    c.trigger("orders.1", "bye", {})
    e.until("bye")

"""
``twisted-rt publish`` and ``twisted-rt tail`` (with ``--forward``) against a
real daemon, as subprocesses exactly as users run them.
"""

from __future__ import annotations

import http.server as httpserver
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import API_KEY, BIN, DEFAULT_CONFIG, Daemon, free_port, http

CLI = str(BIN / "twisted-rt")

HOOK_CONFIG = DEFAULT_CONFIG + """
[[sources]]
name = "plain"
verify = "none"
channel = "hooks.{source}"
"""


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``twisted-rt`` to completion."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


def wait_for(predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll C{predicate} until it is truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Tail:
    """A ``twisted-rt tail`` subprocess writing to files we can poll."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.out_path = tmp / "tail.out"
        self.err_path = tmp / "tail.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([CLI, "tail", *args], stdout=out, stderr=err)

    def lines(self) -> list[dict[str, Any]]:
        text = self.out_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"tail did not finish; stderr:\n{self.stderr()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def tails(tmp_path: Path) -> Iterator[Callable[..., Tail]]:
    """Start ``tail`` subprocesses, killed at the end."""
    started: list[Tail] = []

    def start(*args: str) -> Tail:
        d = tmp_path / f"tail{len(started)}"
        d.mkdir()
        t = Tail(d, *args)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def wait_subscribed(daemon: Daemon, channel: str, n: int = 1) -> None:
    """Wait until C{channel} has C{n} subscribers (per GET /api/channels)."""

    def check() -> bool:
        status, body = daemon.get("/api/channels", headers={"Authorization": f"Bearer {API_KEY}"})
        if status != 200:
            return False
        return any(c["name"] == channel and c["subscribers"] >= n for c in body["channels"])

    wait_for(check, what=f"a subscriber on {channel}")


# -- publish -----------------------------------------------------------------


def test_publish_prints_receipt(daemon: Daemon) -> None:
    """``publish`` exits 0 and prints the daemon's JSON receipt; the event is in the history."""
    r = run_cli("publish", "cli.test", '{"n": 1}', "--url", daemon.url, "--token", API_KEY, "--id", "k-1")
    assert r.returncode == 0, r.stderr
    receipt = json.loads(r.stdout)
    assert receipt == {"id": "k-1", "channel": "cli.test", "offset": 1}
    status, body = daemon.get("/api/channels/cli.test/history?since=0",
                              headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200
    assert [e["data"] for e in body["events"]] == [{"n": 1}]


def test_publish_errors_are_one_line(daemon: Daemon) -> None:
    """A refused token, bad JSON data or an unreachable daemon: non-zero exit and one stderr line."""
    bad_token = run_cli("publish", "cli.test", "{}", "--url", daemon.url, "--token", "nope")
    assert bad_token.returncode != 0
    assert len(bad_token.stderr.strip().splitlines()) == 1
    assert "401" in bad_token.stderr

    bad_json = run_cli("publish", "cli.test", "{not json", "--url", daemon.url, "--token", API_KEY)
    assert bad_json.returncode != 0
    assert len(bad_json.stderr.strip().splitlines()) == 1

    down = run_cli("publish", "cli.test", "{}", "--url", f"http://127.0.0.1:{free_port()}", "--token", API_KEY)
    assert down.returncode != 0
    assert len(down.stderr.strip().splitlines()) == 1
    assert bad_token.stdout == bad_json.stdout == down.stdout == ""


# -- tail --------------------------------------------------------------------


def test_tail_prints_json_lines(daemon: Daemon, tails: Callable[..., Tail]) -> None:
    """``tail --since 0`` (given the http:// base URL) prints backlog then live events as JSON lines; stops at --count."""
    daemon.publish("tail.a", {"n": 1})
    t = tails("tail.*", "--url", daemon.url, "--token", API_KEY, "--since", "0", "--count", "3")
    wait_for(lambda: len(t.lines()) >= 1, what="the backlog event")
    daemon.publish("tail.a", {"n": 2})
    daemon.publish("tail.b", {"n": 3})
    assert t.wait() == 0, t.stderr()
    lines = t.lines()
    assert [(e["channel"], e["offset"], e["data"]["n"]) for e in lines] == [
        ("tail.a", 1, 1), ("tail.a", 2, 2), ("tail.b", 1, 3)]
    assert set(lines[0]) >= {"id", "channel", "offset", "time", "source", "type", "data"}
    assert "op" not in lines[0]
    # not a terminal: compact lines
    assert t.out_path.read_text().count("\n") == 3


def test_tail_resumes_across_restart(daemon: Daemon, tails: Callable[..., Tail]) -> None:
    """``tail`` reconnects after a daemon restart and prints what was sent meanwhile, no gap, no duplicate."""
    daemon.publish("resume.x", {"n": 0})  # before the tail: not printed
    t = tails("resume.x", "--url", daemon.ws_url, "--token", API_KEY, "--count", "5")
    wait_subscribed(daemon, "resume.x")
    daemon.publish("resume.x", {"n": 1})
    daemon.publish("resume.x", {"n": 2})
    wait_for(lambda: len(t.lines()) >= 2, what="two events")
    daemon.stop()
    daemon.start()
    # published as soon as the daemon is back: the tail may still be reconnecting
    daemon.publish("resume.x", {"n": 3})
    daemon.publish("resume.x", {"n": 4})
    wait_for(lambda: "reconnected" in t.stderr() or len(t.lines()) >= 4, what="the reconnect")
    daemon.publish("resume.x", {"n": 5})
    assert t.wait() == 0, t.stderr()
    assert [e["offset"] for e in t.lines()] == [2, 3, 4, 5, 6]
    assert [e["data"]["n"] for e in t.lines()] == [1, 2, 3, 4, 5]


def test_tail_forbidden_pattern_exits(make_daemon: Callable[..., Daemon], tails: Callable[..., Tail]) -> None:
    """``tail`` without a token on a non-anonymous channel reports the refusal and exits non-zero."""
    d = make_daemon()
    t = tails("private.x", "--url", d.ws_url, "--count", "1")
    assert t.wait() != 0
    assert "forbidden" in t.stderr() or "unauthorized" in t.stderr()


def test_tail_stops_when_its_token_expires(daemon: Daemon, tails: Callable[..., Tail]) -> None:
    """``tail`` whose JWT expires while connected (close 4001) says so and exits 1 instead of retrying forever."""
    import jwt

    from tests.conftest import JWT_SECRET

    token = jwt.encode({"sub": "t", "exp": int(time.time()) + 2, "subscribe": ["chat.>"]}, JWT_SECRET, "HS256")
    t = tails("chat.x", "--url", daemon.ws_url, "--token", token)
    assert t.wait() == 1
    assert "expired" in t.stderr()


def test_tail_with_an_already_expired_token_exits(daemon: Daemon, tails: Callable[..., Tail]) -> None:
    """``tail`` whose JWT is refused at the upgrade (401, already expired) says so and exits 1, no endless retries."""
    import jwt

    from tests.conftest import JWT_SECRET

    token = jwt.encode({"sub": "t", "exp": int(time.time()) - 5, "subscribe": ["chat.>"]}, JWT_SECRET, "HS256")
    t = tails("chat.x", "--url", daemon.ws_url, "--token", token)
    assert t.wait() == 1
    assert "401" in t.stderr() and "expired" in t.stderr()


# -- forward -----------------------------------------------------------------


class Receiver:
    """A local HTTP server (thread) recording each POST's body and headers."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        self.fail_first = fail_first
        self.calls = 0
        receiver = self

        class Handler(httpserver.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                receiver.calls += 1
                if receiver.calls <= receiver.fail_first:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                receiver.requests.append((body, {k.lower(): v for k, v in self.headers.items()}))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = httpserver.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A local receiving server that answers 503 twice, then 200."""
    r = Receiver(fail_first=2)
    yield r
    r.close()


def test_tail_forward_replays_original_bytes(
    make_daemon: Callable[..., Daemon], tails: Callable[..., Tail], receiver: Receiver
) -> None:
    """``tail --forward`` re-POSTs each webhook's original bytes and headers, retrying a failing target."""
    d = make_daemon(HOOK_CONFIG)
    t = tails("hooks.>", "--url", d.ws_url, "--token", API_KEY, "--since", "0",
              "--forward", receiver.url, "--count", "2")
    raw = b'{ "action":  "opened",\n  "n": 1 }'
    status, _, _ = http("POST", d.url + "/hooks/plain", raw,
                        {"Content-Type": "application/json", "X-Delivery-Note": "first", "X-Custom-Sig": "abc=="})
    assert status == 202
    status, _ = d.publish("hooks.plain", {"from": "api"})
    assert status == 202
    assert t.wait() == 0, t.stderr()
    assert len(receiver.requests) == 2
    body, headers = receiver.requests[0]
    assert body == raw
    assert headers["x-delivery-note"] == "first"
    assert headers["x-custom-sig"] == "abc=="
    assert headers["content-type"] == "application/json"
    # an event published through the API has no original body: its data is sent as JSON
    body2, headers2 = receiver.requests[1]
    assert json.loads(body2) == {"from": "api"}
    assert headers2["content-type"] == "application/json"
    assert receiver.calls == 4
    assert "retrying" in t.stderr()
    # and the events were printed too
    assert [e["offset"] for e in t.lines()] == [1, 2]


def test_tail_pretty_on_a_terminal(daemon: Daemon) -> None:
    """When stdout is a terminal, ``tail`` pretty-prints each event (indented JSON)."""
    import os
    import pty

    daemon.publish("tty.a", {"deep": {"n": 1}})
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([CLI, "tail", "tty.a", "--url", daemon.ws_url, "--token", API_KEY,
                                 "--since", "0", "--count", "1"], stdout=follower, stderr=subprocess.PIPE)
        os.close(follower)
        assert proc.wait(30) == 0
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    text = out.decode().replace("\r\n", "\n")
    assert '\n  "data": {\n    "deep": {\n      "n": 1' in text
    assert json.loads(text)["offset"] == 1


GITLAB_CONFIG = DEFAULT_CONFIG + """
[[sources]]
name = "gitlab"
verify = "gitlab"
secrets = ["gl-token-1"]
channel = "gitlab.{header:X-Gitlab-Event}"
redact_headers = ["X-Api-Key"]
"""


def test_tail_forward_never_sends_secret_headers(
    make_daemon: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    """``tail --forward`` re-sends a GitLab delivery without X-Gitlab-Token, credentials or redact_headers."""
    r = Receiver()
    try:
        d = make_daemon(GITLAB_CONFIG)
        t = tails("gitlab.>", "--url", d.ws_url, "--token", API_KEY, "--since", "0", "--forward", r.url,
                  "--count", "1")
        raw = b'{"object_kind": "push"}'
        status, _, _ = http("POST", d.url + "/hooks/gitlab", raw, {
            "Content-Type": "application/json", "X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "gl-token-1",
            "Authorization": "Bearer user-credential", "Cookie": "session=1", "X-Api-Key": "k-1",
            "X-Gitlab-Event-UUID": "u-1"})
        assert status == 202
        assert t.wait() == 0, t.stderr()
        ((body, headers),) = r.requests
        assert body == raw
        assert headers["x-gitlab-event"] == "Push Hook" and headers["x-gitlab-event-uuid"] == "u-1"
        assert not {"x-gitlab-token", "authorization", "cookie", "x-api-key"} & set(headers)
    finally:
        r.close()

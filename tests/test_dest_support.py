"""
A scripted webhook receiver for the destination tests: a real HTTP server on
127.0.0.1 (the standard library's threading server, in the test process),
answering each request as its script says: a status, a delay, headers
(C{Retry-After}); and a port with nothing listening (a refused connection).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import pytest
from conftest import free_port


@dataclass
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Answer:
    """How to answer one request."""

    status: int = 204
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class Receiver:
    """
    A loopback HTTP server; C{script(request_number, Received) -> Answer}
    decides each answer (default: 204 at once).
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: Callable[[int, Received], Answer] = lambda n, r: Answer()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                got = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, 0)
                with receiver.lock:
                    n = len(receiver.requests)
                    answer = receiver.script(n, got)
                if answer.delay:
                    time.sleep(answer.delay)
                got.answered = answer.status
                with receiver.lock:
                    receiver.requests.append(got)
                self.send_response(answer.status)
                for k, v in answer.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[Received]:
        """The requests answered 2xx."""
        with self.lock:
            return [r for r in self.requests if 200 <= r.answered < 300]

    def wait_for(self, check: Callable[[Receiver], bool], timeout: float = 20.0) -> None:
        """Wait until C{check(self)} holds (polling), or fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check(self):
                return
            time.sleep(0.05)
        raise AssertionError(f"receiver: condition not met in {timeout} s; got {len(self.requests)} requests")


def running_receiver() -> Iterator[Receiver]:
    """A scripted receiver on loopback, stopped when the generator closes (each module's fixture)."""
    r = Receiver().start()
    try:
        yield r
    finally:
        r.stop()


receiver = pytest.fixture(running_receiver, name="receiver")


def refused_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/hook"


def test_receiver_answers_as_scripted(receiver: Receiver) -> None:
    """The receiver answers each request with the status and headers its script gives."""
    import urllib.error
    import urllib.request

    receiver.script = lambda n, r: Answer(503, headers={"Retry-After": "7"}) if n == 0 else Answer(200)
    req = urllib.request.Request(receiver.url, data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 503 and e.value.headers["Retry-After"] == "7"
    with urllib.request.urlopen(urllib.request.Request(receiver.url, data=b"{}", method="POST"), timeout=5) as r:
        assert r.status == 200
    assert [x.answered for x in receiver.requests] == [503, 200]

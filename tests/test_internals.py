"""
L{twisted_rt._twisted_internals}: the one module that reads Twisted's private
names.  Its fast paths are on only inside the tested version range and when
every private name they read exists; otherwise the site serves with plain
twisted.web, logged once, and answers the same.  CI runs this file on both
ends of the range (C{tests/run}).
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource

from twisted_rt import _twisted_internals as internals
from twisted_rt.web.site import RTChannel, RTSite

ROOT = Path(__file__).resolve().parent.parent
PEER = IPv4Address("TCP", "127.0.0.1", 40000)


@pytest.fixture(autouse=True)
def _fresh_gate() -> Iterator[None]:
    """Every test starts and ends with the gate decided for the running Twisted."""
    internals.recheck()
    yield
    internals.recheck()


def _warnings() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


logged = pytest.fixture(_warnings)


def _fallbacks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_category") == "RT-W10"]


# -- the range ---------------------------------------------------------------


def test_tested_range_is_setup_cfg_requirement() -> None:
    """setup.cfg allows exactly the Twisted versions of TESTED: >=low, <high's next minor."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [s.strip() for s in cfg["options"]["install_requires"].splitlines()]
    twisted = [s for s in lines if s.startswith("twisted[")]
    (low, high) = internals.TESTED
    assert twisted == [f"twisted[tls,http2]>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}"]


def test_ci_runs_the_differential_test_on_the_oldest_allowed() -> None:
    """tests/run installs the low end of TESTED in its second venv and runs test_web.py there."""
    script = (ROOT / "tests" / "run").read_text()
    low = internals.TESTED[0]
    assert f"twisted[tls,http2]=={low[0]}.{low[1]}.0" in script
    assert "OLDEST=.venv-twisted-oldest\n" in script
    assert re.search(r'\n"\$OLDEST/bin/python" -m pytest [^\n]*tests/test_web\.py tests/test_internals\.py\n', script)


def test_running_twisted_is_in_range_with_fast_paths_on() -> None:
    """The Twisted the tests run on is inside TESTED, every private name is there, and sites use RTChannel."""
    low, high = internals.TESTED
    assert low <= internals.running_version() <= high
    assert internals.fast_paths_problem() is None
    assert internals.fast_paths_enabled()
    proto: Any = RTSite(Resource()).buildProtocol(PEER)
    assert isinstance(proto, internals.ChannelSwitch) and isinstance(proto.rt_channel, RTChannel)


@pytest.mark.parametrize("version", [(25, 5), (25, 12), (26, 0), (26, 10)])
def test_versions_inside_the_range_are_allowed(version: tuple[int, int]) -> None:
    """Both ends of TESTED and what lies between allow the fast paths."""
    assert internals.fast_paths_problem(version) is None


@pytest.mark.parametrize("version", [(25, 4), (24, 11), (26, 11), (27, 0), (0, 0)])
def test_versions_outside_the_range_are_refused(version: tuple[int, int]) -> None:
    """A version below or above TESTED turns the fast paths off, and says why."""
    problem = internals.fast_paths_problem(version)
    assert problem is not None and "outside the tested range 25.5 to 26.10" in problem


def test_running_version_reads_major_and_minor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The version is read from twisted.__version__, release candidates and dev builds too."""
    for text, expected in [("26.10.0", (26, 10)), ("25.5.0rc1", (25, 5)), ("26.4.0.post1", (26, 4)), ("x", (0, 0))]:
        monkeypatch.setattr(internals, "_twisted_version", text)
        assert internals.running_version() == expected


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        ("twisted.protocols.basic.LineReceiver", "_busyReceiving"),
        ("twisted.protocols.basic.LineReceiver", "_buffer"),
        ("twisted.web.http.HTTPChannel", "_HTTPChannel__first_line"),
        ("twisted.web.http", "_GenericHTTPChannelProtocol"),
        ("twisted.web._newclient", "HTTP11ClientProtocol"),
        ("twisted.web._newclient", "Request"),
    ],
)
def test_a_missing_private_name_is_refused(monkeypatch: pytest.MonkeyPatch, owner: str, name: str) -> None:
    """A Twisted in the range that lacks one private name the fast paths read turns them off, naming it."""
    import importlib
    import types

    if owner == "twisted.web.http":  # a deprecation proxy: stand in for the whole module
        monkeypatch.setattr(internals, "http", types.SimpleNamespace())
    else:
        module, _, attr = owner.rpartition(".")
        monkeypatch.delattr(getattr(importlib.import_module(module), attr), name)
    problem = internals.fast_paths_problem()
    assert problem is not None and f"lacks {owner}.{name}" in problem


def test_a_missing_instance_attribute_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Private attributes set in __init__ (Headers._rawHeaders) are looked for on a fresh instance."""
    from twisted.web.http_headers import Headers

    original = Headers.__init__

    def without_raw(self: Headers, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        del self._rawHeaders

    monkeypatch.setattr(Headers, "__init__", without_raw)
    problem = internals.fast_paths_problem()
    assert problem is not None and "twisted.web.http_headers.Headers()._rawHeaders" in problem


# -- the fallback --------------------------------------------------------------


def test_fallback_is_logged_once_and_sites_use_plain_twisted(logged: list[dict[str, Any]]) -> None:
    """Outside the range: one RT-W10 warning for any number of sites, each serving with twisted.web's HTTPChannel."""
    assert not internals.recheck((24, 1))
    sites = [RTSite(Resource(), log_requests=False) for _ in range(3)]
    assert not internals.fast_paths_enabled()
    assert [s.fast_paths for s in sites] == [False, False, False]
    proto: Any = sites[0].buildProtocol(PEER)
    assert type(proto.wrappedProtocol._channel) is HTTPChannel
    warnings = _fallbacks(logged)
    assert len(warnings) == 1
    assert warnings[0]["log_level"].name == "warn"
    assert "Twisted 24.1 is outside the tested range" in warnings[0]["problem"]


def test_nothing_is_logged_when_the_fast_paths_are_on(logged: list[dict[str, Any]]) -> None:
    """Inside the range no RT-W10 line is written."""
    RTSite(Resource(), log_requests=False)
    assert internals.fast_paths_enabled()
    assert _fallbacks(logged) == []


class _Socket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


def _idle_tcp_server() -> Any:
    """A TCP server transport with nothing queued (not connected to anything real)."""
    from twisted.internet.tcp import Server

    server: Any = Server.__new__(Server)
    server._tempDataLen = 0
    server.offset = 0
    server.dataBuffer = b""
    server.connected = 1
    server.disconnecting = False
    server.socket = _Socket()
    written: list[bytes] = []
    server.write = written.append
    server.written = written
    return server


def test_write_now_sends_at_once_only_with_the_fast_paths() -> None:
    """write_now sends on an idle TCP transport's socket when the gate is on, and uses plain write() when it is off."""
    on = _idle_tcp_server()
    internals.write_now(on, b"abc")
    assert on.socket.sent == [b"abc"] and on.written == []
    internals.recheck((27, 0))
    off = _idle_tcp_server()
    internals.write_now(off, b"abc")
    assert off.socket.sent == [] and off.written == [b"abc"]


def test_plain_connection_frees_its_slot_when_it_closes() -> None:
    """With the fallback, a connection counts against the caps until it closes, and the per-IP cap still refuses."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    site = RTSite(Resource(), log_requests=False, fast_paths=False, max_connections_per_ip=1)
    proto: Any = site.buildProtocol(PEER)
    proto.makeConnection(StringTransport(peerAddress=PEER))
    assert site.connections == 1
    refused: Any = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    refused.makeConnection(transport)
    refused.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 503 ")
    proto.connectionLost(Failure(ConnectionDone()))
    assert site.connections == 0 and site.per_ip == {}


# -- the daemon's routes with the fallback ----------------------------------------

API_KEY = "internals-test-key-0123456789"
_DATE = re.compile(rb"\r\nDate: [^\r]*")


def _app_site(fast: bool) -> RTSite:
    from twisted.internet.task import Clock

    from twisted_rt.app import App
    from twisted_rt.core.auth import Authenticator
    from twisted_rt.core.config import AuthConfig, Config
    from twisted_rt.core.metrics import Stats
    from twisted_rt.routes import build_root
    from twisted_rt.testing import MemoryBroker

    clock = Clock()
    clock.advance(1700000000)
    config = Config(auth=AuthConfig(api_keys=(API_KEY,)))
    app = App(
        config=config,
        reactor=clock,
        broker=MemoryBroker(clock),
        auth=Authenticator(config.auth, clock=clock.seconds),
        stats=Stats(),
    )
    return RTSite(build_root(app), log_requests=False, reactor=clock, fast_paths=fast, max_body_bytes=4096)


def _exchange(site: RTSite, raw: bytes) -> bytes:
    transport = StringTransport(peerAddress=PEER)
    proto: Any = site.buildProtocol(PEER)
    proto.makeConnection(transport)
    proto.dataReceived(raw)
    return _DATE.sub(b"", transport.value())


_AUTH = f"Authorization: Bearer {API_KEY}\r\n".encode()
_PUBLISH = b'{"channel": "orders.eu", "data": {"n": 1}, "id": "e1"}'
_CONVERSATION = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + _AUTH + b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_PUBLISH), _PUBLISH),
    b"GET /api/channels/orders.eu/history?since=0 HTTP/1.1\r\nHost: x\r\n" + _AUTH + b"\r\n",
    b"GET /api/channels HTTP/1.1\r\nHost: x\r\n\r\n",
    b"DELETE /api/publish HTTP/1.1\r\nHost: x\r\n" + _AUTH + b"\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/publish HTTP/1.1\r\nHost: x\r\n" + _AUTH + b"Content-Length: 5000\r\n\r\n" + b"x" * 5000,
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /bad path HTTP/1.1\r\n\r\n",
]


def test_routes_answer_the_same_with_the_fallback() -> None:
    """The daemon's routes (health, publish, history, 401, 404, 405, 413, pipelining, 400) answer byte for byte alike on both channels."""
    fast, plain = _app_site(True), _app_site(False)
    assert fast.fast_paths and not plain.fast_paths
    for raw in _CONVERSATION:
        ours = _exchange(fast, raw)
        assert ours.startswith(b"HTTP/1.1 "), raw
        assert _exchange(plain, raw) == ours, raw
    published = _exchange(plain, _CONVERSATION[1].replace(b'"e1"', b'"e2"'))
    assert published.startswith(b"HTTP/1.1 202 ") and b'"offset": 2' in published.replace(b'"offset":2', b'"offset": 2')


def test_sse_stream_starts_alike_with_the_fallback() -> None:
    """An SSE stream opened on the plain channel starts with the same head and first frames as on the fast one."""
    heads = []
    for fast in (True, False):
        site = _app_site(fast)
        heads.append(_exchange(site, b"GET /sse?channel=orders.eu HTTP/1.1\r\nHost: x\r\n" + _AUTH + b"\r\n"))
    assert heads[0].startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in heads[0]
    assert heads[1] == heads[0]


def test_websocket_upgrade_with_the_fallback_keeps_its_slot() -> None:
    """On the plain channel /ws upgrades (101, the same Accept) and the connection counts until it closes."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    raw = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n"
    )
    site = _app_site(False)
    transport = StringTransport(peerAddress=PEER)
    proto: Any = site.buildProtocol(PEER)
    proto.makeConnection(transport)
    proto.dataReceived(raw)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer
    assert site.connections == 1
    proto.connectionLost(Failure(ConnectionDone()))
    assert site.connections == 0


# -- the other private reaches ---------------------------------------------------------


def test_clear_exit_signal_forgets_the_signal() -> None:
    """clear_exit_signal sets a reactor's _exitSignal back to None, and leaves a reactor without one alone."""

    class Stopped:
        _exitSignal: int | None = 15

    reactor = Stopped()
    internals.clear_exit_signal(reactor)
    assert reactor._exitSignal is None
    internals.clear_exit_signal(object())  # a fake reactor: nothing to clear, no error


def test_log_observers_lists_a_publishers_observers() -> None:
    """log_observers lists what a LogPublisher holds, and an empty list where it cannot tell."""
    from twisted.logger import LogPublisher

    def a(event: dict[str, Any]) -> None:
        """An observer."""

    publisher = LogPublisher(a)
    assert internals.log_observers(publisher) == [a]
    assert internals.log_observers(object()) == []


def test_request_gone_reads_the_disconnected_flag_or_the_channel() -> None:
    """request_gone is twisted.web's _disconnected flag; without it, a request with no channel is gone."""
    from twisted.web.http import Request

    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    request = Request(channel)
    assert not internals.request_gone(request)
    request.connectionLost(Exception("gone"))
    assert internals.request_gone(request)

    class NoFlag:
        channel: object | None = object()

    still = NoFlag()
    assert not internals.request_gone(still)
    still.channel = None
    assert internals.request_gone(still)
    assert internals.request_gone(object())


def test_set_curves_says_when_pyopenssl_cannot() -> None:
    """set_curves answers None for a context it cannot reach (no binding or no _context)."""
    assert internals.set_curves(object(), ["X25519"]) is None


def _private_reach(line: str) -> bool:
    """A line that imports a private name of Twisted or pyOpenSSL, or reads one of the private attributes moved here."""
    imported = re.match(r"\s*(from (twisted|OpenSSL)(\.[\w.]*)? import (.*)|import ((twisted|OpenSSL)[\w.]*))", line)
    if imported:
        names = re.sub(r" as \w+", "", imported[4] or imported[5] or "")
        if "._" in (imported[3] or "") or re.search(r"(^|[\s,(.])_[A-Za-z]", names):
            return True
    return bool(
        re.search(
            r"_exitSignal|\._observers\b|\._context\b|_rawHeaders|_busyReceiving|_tempDataLen|_HTTPChannel__"
            r"|_GenericHTTPChannelProtocol|\._options\b|_disconnected|_tokenize|_handlingRequest",
            line,
        )
    )


def test_only_the_internals_module_reads_private_twisted_names() -> None:
    """No other module of the package imports a private Twisted name or reads the private attributes moved here."""
    offenders = []
    for path in sorted((ROOT / "twisted_rt").rglob("*.py")):
        if path.name == "_twisted_internals.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _private_reach(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_the_private_reach_check_finds_what_it_looks_for() -> None:
    """The scan above flags a private import or attribute, not an alias or the package's own names."""
    assert _private_reach("from twisted.web.http import _GenericHTTPChannelProtocol")
    assert _private_reach("    from OpenSSL._util import lib")
    assert _private_reach("        self.reactor._exitSignal = None")
    assert _private_reach("    opts._options |= 1")
    assert not _private_reach("    from twisted.internet import reactor as _reactor")
    assert not _private_reach("from twisted_rt.core import config as _config")
    assert not _private_reach("from twisted.web.server import version as _server_version")

"""
The HTTP layer's hot path (L{twisted_rt.web.site.RTChannel}, L{RTRequest}) must
behave exactly as twisted.web's own channel: every request below, however it
is cut into reads, gets the same bytes back from both (but for C{Date}).

This is the differential test that L{twisted_rt._twisted_internals.TESTED}
names: CI runs this file on the oldest and on the newest Twisted that range
allows (C{tests/run}).  The differential checks also run against the site's
fallback (plain twisted.web's channel, used when the fast paths are off).

These are fast unit tests over C{StringTransport}; the end-to-end behaviour
of the routes is tested against the real daemon elsewhere.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from twisted_rt.web.site import RTChannel, RTRequest, RTSite, http_date

#: the two ways RTSite serves: with the fast paths, and plain twisted.web's channel
CHANNELS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 8080)


class Echo(Resource):
    """Answers every request with what it saw: method, URI, headers, body."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        seen = {
            "method": request.method.decode("latin-1"),
            "uri": request.uri.decode("latin-1"),
            "postpath": [p.decode("latin-1") for p in request.postpath or []],
            "args": {k.decode("latin-1"): [v.decode("latin-1") for v in vs] for k, vs in (request.args or {}).items()},
            "headers": [
                [k.decode("latin-1"), [v.decode("latin-1") for v in vs]]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            ],
            "body": request.content.read().decode("latin-1"),
            "proto": request.clientproto.decode("latin-1"),
            "host": str(request.getHost()),
            "client": str(request.getClientAddress()),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(seen).encode()


class CountingTransport(StringTransport):
    """A StringTransport that counts its writes and C{getHost} calls."""

    def __init__(self) -> None:
        super().__init__(hostAddress=HOST, peerAddress=PEER)
        self.writes = 0
        self.host_calls = 0
        self.peer_calls = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.writes += 1
        super().writeSequence(data)

    def getHost(self) -> IPv4Address:
        self.host_calls += 1
        return HOST

    def getPeer(self) -> IPv4Address:
        self.peer_calls += 1
        return PEER


def _serve(site: Site, chunks: list[bytes]) -> tuple[bytes, CountingTransport]:
    transport = CountingTransport()
    proto = site.buildProtocol(PEER)
    assert proto is not None
    proto.makeConnection(transport)
    for chunk in chunks:
        if transport.disconnecting:
            break
        proto.dataReceived(chunk)
    return transport.value(), transport


def _ours(resource: Resource, fast: bool = True) -> RTSite:
    site = RTSite(resource, log_requests=False, fast_paths=fast)
    assert site.fast_paths is fast, "the fast paths are off for this Twisted"
    return site


def _theirs(resource: Resource) -> Site:
    site = Site(resource)
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


_DATE = re.compile(rb"\r\nDate: [^\r]*")


def _same_answer(chunks: list[bytes], fast: bool = True) -> bytes:
    ours, _ = _serve(_ours(Echo(), fast), chunks)
    theirs, _ = _serve(_theirs(Echo()), chunks)
    assert _DATE.sub(b"", ours) == _DATE.sub(b"", theirs)
    return ours


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        if p > last:
            out.append(data[last:p])
            last = p
    return out


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@st.composite
def _request(draw: Any) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]))
    path = b"/" + b"/".join(s.encode() for s in draw(st.lists(_token, max_size=3)))
    if draw(st.booleans()):
        path += b"?" + draw(_token).encode() + b"=" + draw(_token).encode()
    names = draw(
        st.lists(
            st.one_of(
                _token,
                st.sampled_from(["Content-Type", "content-type", "X-GitHub-Event", "x-hub-signature-256", "Host"]),
            ),
            max_size=8,
        )
    )
    head = [b"%s %s HTTP/1.1" % (method, path)]
    for name in names:
        if name.lower() in ("content-length", "transfer-encoding", "connection", "expect"):
            continue
        value = draw(_value)
        space = draw(st.sampled_from(["", " ", "  ", "\t"]))
        head.append(f"{name}:{space}{value}".encode())
    body = draw(st.binary(max_size=64)) if method != b"GET" else b""
    if body and draw(st.booleans()):
        head.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        if body:
            head.append(b"Content-Length: %d" % len(body))
        payload = body
    return b"\r\n".join(head) + b"\r\n\r\n" + payload


def _any_requests_any_reads(requests: list[bytes], cuts: list[int], fast: bool) -> None:
    stream = b"".join(requests)
    answer = _same_answer(_cut(stream, cuts), fast)
    assert answer.count(b"HTTP/1.1 200 OK") == len(requests)


# (two tests, not one parametrized: pytest-twisted wraps a hypothesis test's
# inner function once per parametrized case, and the second wrap fails)
_REQUESTS = st.lists(_request(), min_size=1, max_size=3)
_CUTS = st.lists(st.integers(min_value=0), max_size=4)


@settings(max_examples=150, deadline=None)
@given(_REQUESTS, _CUTS)
def test_any_requests_any_reads_same_as_twisted(requests: list[bytes], cuts: list[int]) -> None:
    """Pipelined, valid requests cut into arbitrary reads are answered byte for byte as twisted.web does."""
    _any_requests_any_reads(requests, cuts, fast=True)


@settings(max_examples=150, deadline=None)
@given(_REQUESTS, _CUTS)
def test_any_requests_any_reads_same_as_twisted_plain(requests: list[bytes], cuts: list[int]) -> None:
    """The same, with the fast paths off: the fallback answers byte for byte as twisted.web does."""
    _any_requests_any_reads(requests, cuts, fast=False)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX : y\r\n\r\n",
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nX-Folded: a\r\n  b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Folded: a\r\n\tb\r\nHost: h\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"G@T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\nGET /again HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /again HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(501)) + b"\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 17000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 16370 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nset-cookie: a=1\r\nCookie: b=2\r\ncookie: c=3\r\n\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /y HTTP/1.1\r\n\r\n",
        b"GET /%41%2f?x=%20 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: \t v \t \r\nX-B:\r\nX-C: \x01\xff\x7f\r\nx-a: again\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A:    \r\n:novalue\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\nY-B: b\r\nZ: c\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\rY-B: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-\xe9: v\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length:  2 \r\n\r\nok",
        b"POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
)
@pytest.mark.parametrize("split", [False, True])
@CHANNELS
def test_odd_and_bad_heads_same_as_twisted(raw: bytes, split: bool, fast: bool) -> None:
    """Malformed, folded, oversized and pipelined heads get twisted.web's own answer (400, close, 200)."""
    chunks = [raw[i : i + 7] for i in range(0, len(raw), 7)] if split else [raw]
    _same_answer(chunks, fast)


@CHANNELS
def test_too_many_headers_fall_back_to_twisted_limit(fast: bool) -> None:
    """A head with more header lines than maxHeaders is refused 400 as twisted.web refuses it."""
    raw = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(501)) + b"\r\n"
    assert _same_answer([raw], fast).startswith(b"HTTP/1.1 400 Bad Request")


def test_response_head_and_body_are_one_write() -> None:
    """A response with Content-Length goes to the transport in a single write (head and body together)."""
    raw = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    answer, transport = _serve(_ours(Echo()), [raw])
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert transport.writes == 2
    _, theirs = _serve(_theirs(Echo()), [raw])
    assert theirs.writes == 4  # twisted.web: head and body separately


def test_addresses_are_asked_once_per_connection() -> None:
    """Three requests on one connection ask the transport for its local and peer addresses once each."""
    raw = b"GET / HTTP/1.1\r\n\r\n" * 3
    answer, transport = _serve(_ours(Echo()), [raw])
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert b"127.0.0.1" in answer and b"8080" in answer
    assert transport.host_calls == 1
    assert transport.peer_calls == 1


class Later(Resource):
    """Sets its headers at once and writes the body only when told."""

    isLeaf = True

    def __init__(self, length: bool) -> None:
        super().__init__()
        self.length = length
        self.pending: list[Request] = []

    def render(self, request: Request) -> int:
        if self.length:
            request.setHeader(b"content-length", b"2")
        request.write(b"")
        self.pending.append(request)
        return NOT_DONE_YET


def test_streaming_response_head_is_sent_at_once() -> None:
    """A response without Content-Length (SSE) sends its head at the first write, before any body."""
    res = Later(length=False)
    answer, _ = _serve(_ours(res), [b"GET / HTTP/1.1\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in answer


def test_sized_response_head_waits_for_body_then_finish() -> None:
    """A sized response holds its head until the body comes, and a bodiless finish still sends it."""
    res = Later(length=True)
    transport = CountingTransport()
    proto = _ours(res).buildProtocol(PEER)
    assert proto is not None
    proto.makeConnection(transport)
    proto.dataReceived(b"GET / HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n")
    assert transport.value() == b""
    first = res.pending.pop()
    first.write(b"ok")
    first.finish()
    value = transport.value()
    assert value.startswith(b"HTTP/1.1 200 OK") and value.endswith(b"\r\n\r\nok")
    head = res.pending.pop()  # the pipelined HEAD: no body is ever written
    transport.clear()
    head.finish()
    assert transport.value().startswith(b"HTTP/1.1 200 OK") and transport.value().endswith(b"\r\n\r\n")


@CHANNELS
def test_lost_connection_untracks_and_cancels(fast: bool) -> None:
    """A request whose client goes away leaves the in-flight set and runs its on_gone hook once."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    res = Later(length=True)
    site = _ours(res, fast)
    transport = CountingTransport()
    proto = site.buildProtocol(PEER)
    assert proto is not None
    proto.makeConnection(transport)
    proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    request = res.pending.pop()
    assert isinstance(request, RTRequest) and request in site.inflight
    gone: list[int] = []
    request.on_gone = lambda: gone.append(1)
    proto.connectionLost(Failure(ConnectionLost()))
    assert request not in site.inflight
    assert gone == [1]


@CHANNELS
def test_finished_request_leaves_inflight(fast: bool) -> None:
    """A finished request is no longer counted in flight."""
    site = _ours(Echo(), fast)
    _serve(site, [b"GET / HTTP/1.1\r\n\r\n"])
    assert not site.inflight


def test_channel_is_rtchannel_behind_alpn_switch() -> None:
    """The site's protocol is an RTChannel wrapped in twisted.web's HTTP/2 (ALPN) switch."""
    proto: Any = _ours(Echo()).buildProtocol(PEER)
    assert isinstance(proto._channel, RTChannel)


def test_fallback_is_plain_twisted_channel_behind_its_switch() -> None:
    """Without the fast paths, a connection is twisted.web's own protocol (its HTTPChannel), counted by the site."""
    from twisted.protocols.policies import ProtocolWrapper
    from twisted.web.http import HTTPChannel

    site = _ours(Echo(), fast=False)
    proto: Any = site.buildProtocol(PEER)
    assert isinstance(proto, ProtocolWrapper)
    channel = proto.wrappedProtocol._channel
    assert type(channel) is HTTPChannel
    assert site.connections == 1 and site.per_ip == {"127.0.0.1": 1}


def test_http_date_is_formatted_once_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Date value is twisted.web's IMF-fixdate, formatted once per second and reused within it."""
    from twisted.web.http import datetimeToString

    from twisted_rt.web import site as web

    now = [1700000000.2]
    monkeypatch.setattr(web.time, "time", lambda: now[0])
    a = http_date()
    assert a == datetimeToString(1700000000)
    now[0] = 1700000000.9
    assert http_date() is a
    now[0] = 1700000001.0
    assert http_date() == datetimeToString(1700000001)


def test_whole_head_skips_line_by_line_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head that arrives whole is parsed in one pass: lineReceived runs for the request line and the end only."""
    calls: list[bytes] = []
    original = RTChannel.lineReceived

    def spy(self: RTChannel, line: bytes) -> None:
        calls.append(line)
        original(self, line)

    monkeypatch.setattr(RTChannel, "lineReceived", spy)
    raw = b"POST /x HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-B: 2\r\nContent-Length: 2\r\n\r\nok"
    answer, _ = _serve(_ours(Echo()), [raw])
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert calls == [b"POST /x HTTP/1.1", b""]


def _bad_body_root() -> Resource:
    """Routes whose answers cannot be encoded (sync and async), and one that fails after its client left."""
    from twisted.internet import reactor
    from twisted.internet.defer import CancelledError, Deferred
    from twisted.internet.task import deferLater

    from twisted_rt.web.resource import JsonResource, Reply, Root

    class BadStatus(JsonResource):
        async def handle_GET(self, request: Request) -> Reply:
            return Reply("200", {"ok": 1}, {"X-Snow": "\u2603"})  # type: ignore[arg-type]

    class BadStatusSync(JsonResource):
        def handle_GET(self, request: Request) -> Reply:
            return Reply("200", {"ok": 1})  # type: ignore[arg-type]

    class Sync(JsonResource):
        def handle_GET(self, request: Request) -> dict[str, Any]:
            return {"x": object()}

    class Async(JsonResource):
        async def handle_GET(self, request: Request) -> dict[str, Any]:
            await deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]
            return {"x": {1, 2}}

    class Late(JsonResource):
        async def handle_GET(self, request: Request) -> dict[str, Any]:
            try:
                await Deferred()
            except CancelledError:
                raise RuntimeError("cleanup failed after the client left") from None
            return {}  # pragma: no cover

    root = Root()
    root.putChild(b"sync", Sync())
    root.putChild(b"async", Async())
    root.putChild(b"late", Late())
    root.putChild(b"badstatus", BadStatus())
    root.putChild(b"badstatus-sync", BadStatusSync())
    return root


@pytest_twisted.ensureDeferred
async def test_reply_path_failures_are_json_500_over_a_real_socket() -> None:
    """An answer that cannot be encoded is a JSON 500 (sync and async handlers), logged; nothing stays in flight."""
    from conftest import http
    from twisted.internet import reactor, threads
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    site = RTSite(_bad_body_root(), log_requests=False, reactor=reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        for path in ("/sync", "/async", "/badstatus", "/badstatus-sync"):
            status, headers, raw = await threads.deferToThread(http, "GET", url + path, None, None, 5)
            assert status == 500 and headers["content-type"] == "application/json", (path, raw)
            assert json.loads(raw)["error"] == "internal_error"
        assert not site.inflight
        logged = [e.get("uri") for e in events if e.get("log_category") == "RT-W500"]
        assert logged == ["/sync", "/async", "/badstatus", "/badstatus-sync"]
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_failure_after_the_client_left_is_logged() -> None:
    """A handler that fails after its client went away is logged (not dropped) and leaves nothing in flight."""
    import socket

    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    site = RTSite(_bad_body_root(), log_requests=False, reactor=reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        s = socket.create_connection(("127.0.0.1", port.getHost().port))
        s.sendall(b"GET /late?token=s3cret HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(200):
            await deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
            if site.inflight:
                break
        s.close()
        for _ in range(200):
            await deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
            if any(e.get("log_category") == "RT-W501" for e in events):
                break
        late = [e for e in events if e.get("log_category") == "RT-W501"]
        assert late and late[0]["uri"] == "/late?token=REDACTED"
        assert not site.inflight
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()


@pytest.mark.parametrize("finish", [False, True], ids=["cancelled", "finished"])
def test_a_handler_whose_client_went_away_is_cancelled_unless_it_must_finish(finish: bool) -> None:
    """Client gone mid-handler: a JsonResource's handler is cancelled, one with finish_when_gone runs to its end; nothing is written."""
    from twisted.internet.defer import CancelledError, Deferred
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    from twisted_rt.web.resource import JsonResource

    step: Deferred[None] = Deferred()
    seen: list[str] = []

    class TwoSteps(JsonResource):
        finish_when_gone = finish

        async def handle_GET(self, request: Request) -> dict[str, Any]:
            try:
                await step
            except CancelledError:
                seen.append("cancelled")
                raise
            seen.append("second step")
            return {"ok": True}

    transport = CountingTransport()
    proto = _ours(TwoSteps()).buildProtocol(PEER)
    assert proto is not None
    proto.makeConnection(transport)
    proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    proto.connectionLost(Failure(ConnectionLost()))
    if not finish:
        assert seen == ["cancelled"]
    step.callback(None)
    assert seen == (["second step"] if finish else ["cancelled"])
    assert transport.value() == b""

# -*- test-case-name: tests.test_web -*-
"""
The HTTP layer every route shares: JSON replies and errors, a resource base
that runs C{async} handlers, the body-size limit enforced while reading, and
a lean L{Site} whose L{RTChannel} trims twisted.web's per-request cost (a
whole request head parsed in one pass, a sized response sent in one
C{send()}, no per-request Deferreds), byte for byte the same on the wire as
twisted.web's own channel (C{tests/test_web.py}).

Handlers are methods C{handle_<METHOD>(request)} that return (or are
coroutines returning) a L{Reply}, a JSON-able dict, or raise L{JsonError}.
Modelled on Klein's resource bridge: the coroutine runs as a Deferred, is
cancelled if the client goes away, nothing is written after that, and every
failure goes through one mapper, so no traceback ever reaches a client.
"""

from __future__ import annotations

import re
import time
from io import BytesIO
from typing import Any, Callable, Sequence
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.tcp import Server as _TCPServer
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.protocols.policies import ProtocolWrapper, TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from twisted.web.server import version as _server_version

from twisted_rt.core.logs import redact_uri
from twisted_rt.web.resource import (
    _method,
    _uri,
    error_body,
    log,
    method_not_allowed,
    write_json,
)


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data}, sending it at once when the transport has nothing queued.

    C{transport.write} on a Twisted TCP transport only buffers, then asks
    epoll for writability (an C{epoll_ctl}), sends on the next turn and stops
    asking (another C{epoll_ctl}): three system calls per connection per
    flush.  When nothing is queued in the transport, one C{send()} usually
    takes it all; anything not sent goes through C{write} as usual, so
    ordering and the producer (back-pressure) signals are unchanged.  TLS and
    other transports always use C{write}.

    This reads the TCP transport's buffer fields (C{_tempDataLen},
    C{offset}, C{dataBuffer}); C{tests/test_ws.py} pins the behaviour.
    """
    if (
        type(transport) is not _TCPServer
        or transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
        or not transport.connected
        or transport.disconnecting
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(data)  # let the transport see and report the error
        return
    if sent < len(data):
        transport.write(data[sent:] if sent else data)


_date_cache: list[Any] = [0, b""]


def http_date() -> bytes:
    """The C{Date} header value for now, formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = datetimeToString(now)
    return _date_cache[1]  # type: ignore[no-any-return]


class RTRequest(Request):
    """
    A request that enforces the body limit while the body arrives: a body
    over the limit is answered 413 at once (HTTP/1.1: the connection is then
    closed) and never buffered.

    It also keeps the per-request work of C{twisted.web} small: the C{Date}
    header is formatted once per second, and the site's count of requests
    in flight and L{run}'s cancellation need no Deferred per request.

    @ivar on_gone: called once if the client goes away before the response
        is finished.
    """

    max_body_bytes = 1048576
    _received = 0
    too_large = False
    started: float = 0.0
    on_gone: Callable[[], None] | None = None
    _tracked: set[Request] | None = None

    def gotLength(self, length: int | None) -> None:
        self.started = time.monotonic()
        self.content: BytesIO = BytesIO()
        if length is not None and length > self.max_body_bytes:
            self._reject_too_large()

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self._reject_too_large()
            return
        self.content.write(data)

    def _reject_too_large(self) -> None:
        self.too_large = True
        self.content.seek(0)
        self.content.truncate()
        channel = self.channel
        if isinstance(channel, HTTPChannel) and channel.transport is not None:
            body = error_body(
                "body_too_large", f"the request body is over {self.max_body_bytes} bytes"
            )
            channel.transport.write(
                b"HTTP/1.1 413 Request Entity Too Large\r\n"
                b"Content-Type: application/json\r\n"
                b"Connection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            channel.loseConnection()
            site = getattr(channel, "site", None)
            if isinstance(site, RTSite):
                site.on_too_large(self)

    def render(self, resrc: IResource) -> None:
        """Render C{resrc}; a method it does not support is a JSON 405 with C{Allow}."""
        super().render(_MethodGuard(resrc))

    def process(self) -> None:
        """
        Find the resource and render it: L{twisted.web.server.Request.process}
        with a cached C{Date}, without content encoders (no route uses
        them), and with the request counted in flight until it ends.
        """
        if self.too_large:
            # HTTP/2, or a body that grew past the limit after headers
            write_json(
                self,
                413,
                error_body("body_too_large", f"the request body is over {self.max_body_bytes} bytes"),
            )
            return
        site = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        if self.path == b"*":
            super().process()
            return
        if isinstance(site, RTSite):
            self._tracked = site.inflight
            site.inflight.add(self)
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", [_server_version])
        headers.setRawHeaders(b"Date", [http_date()])
        self.prepath = []
        self.postpath = [unquote_to_bytes(p) for p in self.path[1:].split(b"/")]
        channel = self.channel
        transport = channel.transport
        try:
            self.render(site.getResourceFor(self))
        except BaseException:  # noqa: BLE001 - as twisted.web: any failure becomes a 500
            self.processingFailed(Failure())
        if channel.transport is None and transport is not None and isinstance(channel, RTChannel):
            channel.handed_over(transport)  # an upgrade (WebSocket) took the connection

    def processingFailed(self, reason: Failure) -> Failure:
        """
        A failure while rendering: logged (URI without tokens) and answered
        as a JSON 500 when nothing was sent yet (twisted.web answers HTML).
        """
        log.failure(
            "unexpected error rendering {method} {uri}",
            reason,
            method=_method(self),
            uri=_uri(self),
            log_category="RT-W500",
        )
        if self.finished or self._disconnected:
            return reason
        if self.startedWriting:
            self.finish()  # a partial answer: end it (the client sees it cut)
            return reason
        body = error_body("internal_error", "the server failed to handle this request; it was logged")
        self.responseHeaders = Headers()
        write_json(self, 500, body)
        return reason

    def __repr__(self) -> str:
        """As twisted.web's, with the URI's tokens redacted (it reaches log lines)."""
        method = self.method.decode("ascii", "replace") if isinstance(self.method, bytes) else "-"
        return f"<{type(self).__name__} at 0x{id(self):x} method={method} uri={_uri(self)}>"

    def finish(self) -> None:
        super().finish()
        self._untrack()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._untrack()
        gone, self.on_gone = self.on_gone, None
        if gone is not None:
            gone()

    def _untrack(self) -> None:
        tracked, self._tracked = self._tracked, None
        if tracked is not None:
            tracked.discard(self)


_CANONICAL: dict[bytes, bytes] = {}
_LENGTH_HEADERS = (b"Content-Length", b"Transfer-Encoding")
# One header line as twisted.web accepts it, found only at a line start: a
# token (RFC 9110 5.6.2), a colon, and a value without NUL/CR/LF (its spaces
# and tabs are stripped).  When every line of a head is one such match, the
# head is read in one C call; otherwise it goes line by line.
_HEADER_LINE = re.compile(rb"(?<=\r\n)([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00\r\n]*)\r\n")


def _canonical_name(name: bytes) -> bytes:
    """
    A request header name in C{twisted.web}'s canonical case
    (C{x-github-event} -> C{X-Github-Event}), cached.

    @raise InvalidHeaderName: C{name} is not an HTTP token.
    """
    canon = _CANONICAL.get(name)
    if canon is None:
        probe = Headers()
        probe.addRawHeader(name, b"")
        canon = next(iter(probe.getAllRawHeaders()))[0]
        if len(_CANONICAL) < 4096:
            _CANONICAL[name] = canon
    return canon


# HTTPChannel's own state, read by the fast path below (checked at import:
# without it, every request takes twisted.web's line-by-line path).
_FIRST_LINE = "_HTTPChannel__first_line"
_FAST_HEAD = hasattr(HTTPChannel, _FIRST_LINE) and hasattr(basic.LineReceiver, "_busyReceiving")


class RTChannel(HTTPChannel):
    """
    C{twisted.web}'s HTTP/1.1 channel with two shortcuts on the hot path.

      - A request head that arrives whole (the usual case) is found with one
        C{find}, and its header lines are read with one regex scan straight
        into the request's headers, instead of one C{lineReceived} call per
        line, each re-splitting the buffer.  Request line, length headers,
        end of headers, bodies, pipelining and every error still go through
        L{HTTPChannel}'s own methods; a head split across reads, or with any
        line the regex does not take whole, goes line by line.
      - A response with a C{Content-Length} sends its head and first body
        bytes in one C{send()} (L{write_now}) instead of two buffered writes
        and a turn of the reactor.
    """

    _held_head: list[bytes] | None = None
    _host: Any = None
    _peer: Any = None
    #: the per-address key this connection is counted under by L{RTSite}
    _slot: str | None = None
    #: body bytes since the body deadline was last extended
    _body_read = 0

    # -- deadlines -------------------------------------------------------
    #
    # twisted.web's idle timeout is reset by every read, so a client sending
    # one byte every few seconds holds a connection for ever.  Here the
    # channel's one TimeoutMixin timer is a deadline instead: a request (its
    # head, then its body) must arrive within the site's head_timeout (from
    # the connection's start, or from the end of the previous response on a
    # keep-alive connection), whatever trickles in; each BODY_PROGRESS_BYTES
    # of body read in later reads moves the deadline to head_timeout from
    # then.  While a request is handled (streams, long-polls) twisted.web
    # turns the timer off, as before.  Per read this costs two attribute
    # tests; per request nothing more than twisted.web's own timer.

    def connectionMade(self) -> None:
        timeout = getattr(getattr(self, "site", None), "head_timeout", None)
        if timeout:
            self.timeOut = timeout
        super().connectionMade()

    def resetTimeout(self) -> None:
        """Reads do not extend the deadline (only body progress does: L{dataReceived})."""

    def _body_progress(self, size: int) -> None:
        n = self._body_read + size
        if n >= BODY_PROGRESS_BYTES:
            n = 0
            TimeoutMixin.resetTimeout(self)
        self._body_read = n

    def timeoutConnection(self) -> None:
        """
        The deadline passed: a partly received request is answered 408
        (JSON, C{Connection: close}); an idle connection is just closed.
        """
        transport = self.transport
        if transport is not None and not self._handlingRequest and (self._buffer or self.requests):
            seconds = self.timeOut
            body = error_body(
                "request_timeout", f"the request did not arrive whole within {seconds:g} s"
            )
            self._flush_head()
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\n"
                b"Content-Type: application/json\r\n"
                b"Connection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            site = getattr(self, "site", None)
            if isinstance(site, RTSite):
                site.refused("request_timeout")
        # twisted.web's: close, and abort if the client does not let go
        super().timeoutConnection()

    # -- connection accounting ---------------------------------------------

    def release(self) -> None:
        """This connection no longer counts against the site's caps (idempotent)."""
        slot, self._slot = self._slot, None
        if slot is not None:
            site = getattr(self, "site", None)
            if isinstance(site, RTSite):
                site.release(slot)

    def handed_over(self, transport: Any) -> None:
        """
        An upgrade (C{/ws}) took the transport over: the connection keeps its
        slot until the new protocol's C{is_closed} (Autobahn's public
        Deferred that fires when the connection is gone) fires.
        """
        slot, self._slot = self._slot, None
        if slot is None:
            return
        proto = transport.wrappedProtocol if isinstance(transport, ProtocolWrapper) else getattr(transport, "protocol", None)
        if isinstance(proto, ProtocolWrapper):
            proto = proto.wrappedProtocol
        closed = getattr(proto, "is_closed", None)
        site = getattr(self, "site", None)
        if not isinstance(site, RTSite):
            return
        if not isinstance(closed, Deferred):
            site.release(slot)  # cannot follow it: do not leak the slot
            return

        def release(result: Any) -> Any:
            site.release(slot)
            return result

        closed.addBoth(release)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.release()

    def getHost(self) -> Any:
        """The local address (asked of the transport once, not once per request)."""
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> Any:
        """The peer's address (built once per connection, not once per request)."""
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    # -- reading ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self.line_mode and not self._handlingRequest:
            self._body_progress(len(data))  # more of a request body
        if not _FAST_HEAD or self._busyReceiving:
            super().dataReceived(data)
            return
        buf = self._buffer + data if self._buffer else data
        self._buffer = b""
        while buf:
            if self.line_mode and not self.paused and self.persistent and getattr(self, _FIRST_LINE):
                end = buf.find(b"\r\n\r\n")
                if 0 < end <= self.totalHeadersSize and not buf.startswith(b"\r\n"):
                    head, buf = buf[:end], buf[end + 4 :]
                    if b"\r\n " not in head and b"\r\n\t" not in head:
                        self._busyReceiving = True
                        try:
                            self._head_received(head)
                        finally:
                            self._busyReceiving = False
                        if self._closing():
                            return
                        if self._buffer:  # arrived while we were busy (a request finished at once)
                            buf, self._buffer = buf + self._buffer, b""
                        continue
                    buf = head + b"\r\n\r\n" + buf
            basic.LineReceiver.dataReceived(self, buf)
            return

    def _closing(self) -> bool:
        transport = self.transport
        return transport is None or bool(getattr(transport, "disconnecting", False))

    def _head_received(self, head: bytes) -> None:
        end = head.find(b"\r\n")
        self.lineReceived(head if end < 0 else head[:end])
        if getattr(self, _FIRST_LINE) or self._closing():
            return  # a bad request line was answered 400
        if end >= 0:
            block = head + b"\r\n"
            raw: dict[bytes, list[bytes]] | None = getattr(self.requests[-1].requestHeaders, "_rawHeaders", None)
            pairs = _HEADER_LINE.findall(block, end) if raw is not None else None
            if pairs is None or len(pairs) != block.count(b"\r\n") - 1 or len(pairs) > self.maxHeaders:
                # anything unusual (a bad name or value, obsolete folding, too
                # many headers): line by line, as twisted.web does it
                for line in head[end + 2 :].split(b"\r\n"):
                    if not self.headerReceived(line):
                        return
            else:
                assert raw is not None
                canonical = _CANONICAL
                added = 0
                for name, value in pairs:
                    canon = canonical.get(name) or _canonical_name(name)  # a token: the regex checked it
                    if canon in _LENGTH_HEADERS:  # they choose the body's decoder: twisted.web's own code
                        if not self.headerReceived(name + b":" + value):
                            return
                        continue
                    value = value.rstrip(b" \t")
                    values = raw.get(canon)
                    if values is None:
                        raw[canon] = [value]
                    else:
                        values.append(value)
                    added += 1
                self._receivedHeaderCount += added
        self.lineReceived(b"")

    # -- writing ---------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers) or not headers.hasHeader(b"Content-Length"):
            self._flush_head()
            super().writeHeaders(version, code, reason, headers)
            return
        seq = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                seq += (name, b": ", value, b"\r\n")
        seq.append(b"\r\n")
        self._flush_head()
        self._held_head = seq

    def write(self, data: bytes) -> None:
        seq = self._held_head
        if seq is not None:
            self._held_head = None
            seq.append(data)
            data = b"".join(seq)
        write_now(self.transport, data)

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        self._flush_head()
        super().writeSequence(iovec)

    def _flush_head(self) -> None:
        seq = self._held_head
        if seq is not None:
            self._held_head = None
            write_now(self.transport, b"".join(seq))

    def requestDone(self, request: Request) -> None:
        self._flush_head()
        super().requestDone(request)

    def loseConnection(self) -> None:
        self._flush_head()
        super().loseConnection()


#: body bytes that extend a request body's deadline by another head timeout
BODY_PROGRESS_BYTES = 16384


class _RTChannelProtocol(_GenericHTTPChannelProtocol):
    """twisted.web's HTTP/1.1-or-HTTP/2 switch, which also frees the connection's slot."""

    def __init__(self, channel: RTChannel) -> None:
        super().__init__(channel)
        self._rt_channel = channel

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._rt_channel.release()  # also when HTTP/2 replaced the channel


def _rt_channel_protocol(site: Site) -> Any:
    """The protocol of L{RTSite}: an L{RTChannel} behind the HTTP/2 (ALPN) switch."""
    return _RTChannelProtocol(RTChannel())


class _Refused(Protocol):
    """
    A connection past a cap: its request head is read (at most
    L{RTChannel.totalHeadersSize} bytes, within the head timeout) and
    answered 503 JSON with C{Connection: close}; nothing else is done.
    """

    def __init__(self, site: RTSite, message: str) -> None:
        self.site = site
        self.message = message
        self._tail = b""
        self._seen = 0
        self._timer: Any = None

    def connectionMade(self) -> None:
        self._timer = self.site.reactor.callLater(self.site.head_timeout, self._give_up)

    def dataReceived(self, data: bytes) -> None:
        if self._seen < 0:
            return
        self._seen += len(data)
        probe = self._tail + data
        if b"\r\n\r\n" in probe or b"\n\n" in probe or self._seen > RTChannel.totalHeadersSize:
            self._answer()
            return
        self._tail = probe[-3:]

    def _answer(self) -> None:
        self._seen = -1
        body = error_body("too_many_connections", self.message)
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Content-Type: application/json\r\n"
            b"Retry-After: 1\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()

    def _give_up(self) -> None:
        self._timer = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.site.refusing -= 1


class _MethodGuard:
    """Turns twisted.web's HTML 405/501 for unsupported methods into JSON 405."""

    def __init__(self, resource: IResource) -> None:
        self.resource = resource

    def render(self, request: Request) -> Any:
        try:
            return self.resource.render(request)
        except UnsupportedMethod as e:
            methods: tuple[bytes, ...] = tuple(e.allowedMethods or ())
            allowed = [m.decode("ascii") for m in methods]
            if request.method == b"HEAD" and "GET" in allowed:
                raise
            return method_not_allowed(request, allowed)


#: most connections answered 503 at a time; past it, new ones are closed unanswered
_MAX_REFUSING = 1024


class RTSite(Site):
    """
    The daemon's site: JSON errors, no tracebacks to clients, one access-log
    line per request through C{twisted.logger} (or none), and a count of
    requests in flight for graceful shutdown.
    """

    displayTracebacks = False
    access_log = Logger(namespace="twisted_rt.access")
    protocol = _rt_channel_protocol

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int = 1048576,
        log_requests: bool = True,
        on_too_large: Callable[[Request], None] | None = None,
        reactor: Any = None,
        head_timeout: float = 10.0,
        max_connections: int = 20000,
        max_connections_per_ip: int = 256,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        # Routes read their bodies themselves; parsing every POST's Content-Type
        # and form fields (twisted.web's default) cost ~27% of the ingest path.
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.requestFactory: type[Request] = type("Request", (RTRequest,), {"max_body_bytes": max_body_bytes})
        self.log_requests = log_requests
        self.inflight: set[Request] = set()
        self._on_too_large = on_too_large
        self._on_refused = on_refused
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        #: open connections (HTTP, SSE, long-poll and WebSocket), in all and per address
        self.connections = 0
        self.per_ip: dict[str, int] = {}
        #: connections being answered 503 right now
        self.refusing = 0

    def buildProtocol(self, addr: Any) -> Any:
        """
        A channel for a new connection, counted against C{max_connections}
        and C{max_connections_per_ip} (0: no cap); past a cap, a
        L{_Refused} protocol that answers 503.  The per-address table holds
        only addresses with an open connection.
        """
        ip = getattr(addr, "host", None) or "-"  # UNIX sockets share one key
        per_ip = self.per_ip
        n = per_ip.get(ip, 0)
        cap, cap_ip = self.max_connections, self.max_connections_per_ip
        if (cap and self.connections >= cap) or (cap_ip and n >= cap_ip):
            return self._refuse(ip, bool(cap_ip and n >= cap_ip))
        proto = super().buildProtocol(addr)
        channel = getattr(proto, "_rt_channel", None)
        if channel is not None:
            channel._slot = ip
            per_ip[ip] = n + 1
            self.connections += 1
        return proto

    def _refuse(self, ip: str, per_ip: bool) -> Any:
        reason = "too_many_connections_per_ip" if per_ip else "too_many_connections"
        self.refused(reason)
        if self.refusing >= _MAX_REFUSING:
            return None  # the endpoint closes the connection at once
        self.refusing += 1
        if per_ip:
            message = f"more than {self.max_connections_per_ip} connections from {ip}; try again later"
        else:
            message = f"the server has {self.max_connections} connections open; try again later"
        return _Refused(self, message)

    def release(self, ip: str) -> None:
        """A counted connection from C{ip} has closed."""
        self.connections -= 1
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def refused(self, reason: str) -> None:
        """A connection was refused or timed out (counted in the stats)."""
        if self._on_refused is not None:
            self._on_refused(reason)

    def on_too_large(self, request: Request) -> None:
        """A body was refused while reading."""
        if self._on_too_large is not None:
            self._on_too_large(request)

    def log(self, request: Request) -> None:  # type: ignore[override]
        if not self.log_requests:
            return
        started = getattr(request, "started", 0.0)
        ms = (time.monotonic() - started) * 1000 if started else 0.0
        peer = request.getClientAddress()
        self.access_log.info(
            "{peer} {method} {uri} {code} {length}B {ms:.1f}ms",
            peer=getattr(peer, "host", "-"),
            method=request.method.decode("ascii", "replace"),
            uri=redact_uri(request.uri),
            code=request.code,
            length=request.sentLength,
            ms=ms,
            log_category="RT-ACCESS",
        )

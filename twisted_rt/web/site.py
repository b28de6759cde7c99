# -*- test-case-name: tests.test_web -*-
"""
The daemon's L{Site}: L{RTRequest} (the body limit enforced while reading,
JSON 405/413/500, a cached C{Date}, no per-request Deferreds), L{RTSite}
(caps on open connections, the access log, requests in flight) and
L{RTChannel}, its HTTP/1.1 channel with request deadlines.

L{RTChannel} is built on L{twisted_rt._twisted_internals.FastHTTPChannel},
which trims twisted.web's per-request cost (a whole request head parsed in
one pass, a sized response sent in one C{send()}) by reading Twisted's
private state, byte for byte the same on the wire as twisted.web's own
channel (C{tests/test_web.py}).  When this Twisted is outside the tested
range, L{RTSite} serves with plain twisted.web's channel instead (logged
once, C{RT-W10}).  This module itself uses public API only.
"""

from __future__ import annotations

import time
from io import BytesIO
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, TimeoutMixin, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from twisted.web.server import version as _server_version

from twisted_rt._twisted_internals import (
    ChannelSwitch,
    FastHTTPChannel,
    fast_paths_enabled,
    request_gone,
    write_now,
)
from twisted_rt.core.logs import redact_uri
from twisted_rt.web.resource import (
    _method,
    _uri,
    error_body,
    log,
    method_not_allowed,
    write_json,
)

__all__ = ["BODY_PROGRESS_BYTES", "RTChannel", "RTRequest", "RTSite", "http_date", "write_now"]

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
        if self.finished or request_gone(self):
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


class RTChannel(FastHTTPChannel):
    """
    The site's HTTP/1.1 channel: L{FastHTTPChannel}'s shortcuts (one pass
    per whole request head, one C{send()} per sized response), plus the
    request deadlines, the connection's slot under L{RTSite}'s caps, and
    its addresses asked of the transport once.

    Used only when the fast paths are on (L{fast_paths_enabled}); otherwise
    the site serves with plain twisted.web (L{RTSite}).
    """

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
        """Reads do not extend the deadline (only body progress does: L{body_received})."""

    def body_received(self, size: int) -> None:
        """More of a request body: each L{BODY_PROGRESS_BYTES} extend the deadline."""
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
        if transport is not None and self.partial_request():
            seconds = self.timeOut
            body = error_body(
                "request_timeout", f"the request did not arrive whole within {seconds:g} s"
            )
            self.flush_head()
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


#: body bytes that extend a request body's deadline by another head timeout
BODY_PROGRESS_BYTES = 16384

# plain twisted.web's protocol for a site: its own HTTPChannel behind its own
# HTTP/1.1-or-HTTP/2 (ALPN) switch (HTTPFactory's public C{protocol})
_plain_protocol: Callable[[Site], Any] = Site.protocol


def _rt_channel_protocol(site: Site) -> Any:
    """
    The protocol of L{RTSite}: an L{RTChannel} behind the HTTP/2 (ALPN)
    switch, or plain twisted.web's when the fast paths are off.
    """
    if getattr(site, "fast_paths", False):
        channel = RTChannel()
        return ChannelSwitch(channel, channel.release)
    return _plain_protocol(site)


class _Counted(ProtocolWrapper):
    """
    A connection of plain twisted.web's (the fast paths are off), counted
    against L{RTSite}'s caps until it closes.  A WebSocket upgrade replaces
    its wrapped protocol (as it does TLS's), so the slot is held until the
    WebSocket connection closes too.
    """

    def __init__(self, factory: WrappingFactory[Any], wrapped: Any, site: RTSite, slot: str) -> None:
        super().__init__(factory, wrapped)
        self._site = site
        self._slot: str | None = slot

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        slot, self._slot = self._slot, None
        if slot is not None:
            self._site.release(slot)


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
    line per request through C{twisted.logger} (or none), a count of
    requests in flight for graceful shutdown, and caps on open connections.

    Its connections get L{RTChannel} when the private-API fast paths are
    on (L{fast_paths_enabled}, asked once at the first site); otherwise
    they get plain twisted.web's channel, whose idle timeout
    (C{head_timeout}, reset by every read) stands in for the request
    deadlines and which answers a timed-out request by closing it, not 408.
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
        fast_paths: bool = True,
    ) -> None:
        #: whether connections get L{RTChannel} (the private-API fast paths,
        #: when this Twisted allows them) or plain twisted.web's channel
        self.fast_paths = fast_paths and fast_paths_enabled()
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
        self._counted: WrappingFactory[Any] = WrappingFactory(self)

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
        if proto is None:
            return None
        if isinstance(proto, ChannelSwitch):
            channel = proto.rt_channel
            if isinstance(channel, RTChannel):
                channel._slot = ip
        else:
            # plain twisted.web: its own idle timeout, and a wrapper that
            # frees the slot when the connection closes
            if self.head_timeout:
                proto.timeOut = self.head_timeout
            proto = _Counted(self._counted, proto, self, ip)
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

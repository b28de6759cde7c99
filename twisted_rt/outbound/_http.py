# -*- test-case-name: tests.test_dest_http -*-
"""
The HTTP side of delivery: one L{Sender} per destination, on Twisted's own
client (C{twisted.web.client.Agent}) with a connection pool of up to
C{max_in_flight} kept-alive connections, a timeout for the whole request
(connect, send, answer, body), no redirects (the Agent follows none), and
at most L{BODY_CAP} bytes of an answer read (a longer one is cut and its
connection closed).  C{https://} is verified against the system CA store
(C{platformTrust}), and also against the certificates of C{ca_file} when
one is given (they are added to the system store, not put in its place);
the host name is verified either way (C{optionsForClientTLS}).

Lean per request: the destination has one URL, so its endpoint (TCP, or TLS
over TCP) and the start of every request (request line, C{Host}) are made
once.  With the private-API fast paths on (L{fast_paths_enabled}: the
Twisted versions tested), requests go straight to Twisted's HTTP/1.1
client protocol, the one inside C{Agent}, each written in one C{write}
(L{PreparedRequest}), over a pool of this sender's own: less than half
the CPU of C{Agent.request} for the same bytes on the wire
(C{tests/test_dest_http.py} compares them).  Otherwise C{Agent} (with an
C{HTTPConnectionPool}) sends them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence, cast

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from twisted_rt._twisted_internals import (
    PreparedRequest,
    SystemAndFileTrust,
    canonical_header_name,
    client_protocol,
    fast_paths_enabled,
)
from twisted_rt.core.config import DestinationConfig
from twisted_rt.web.outgoing import BytesBody

__all__ = ["BODY_CAP", "Outcome", "Sender", "load_ca_file"]

#: the most bytes of an answer's body read (kept for the error message)
BODY_CAP = 4096
#: idle kept-alive connections are closed after this long
IDLE_SECONDS = 60.0
#: the most bytes of one answer (head and body) read on the fast path before its connection is
#: dropped: the body is read up to BODY_CAP anyway, this bounds a head of endless header lines
ANSWER_CAP = 64 * 1024


@dataclass
class Outcome:
    """
    What one attempt came to.

    @ivar kind: C{ok}, C{status} (not 2xx), C{refused} (could not connect),
        C{timeout}, C{tls} or C{error}.
    """

    kind: str
    status: int = 0
    message: str = ""
    retry_after: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """A 2xx in time."""
        return self.kind == "ok"


def load_ca_file(path: str) -> list[Certificate]:
    """
    The certificates of a PEM file.  @raise ValueError: none in it, or
    unreadable PEM.  @raise OSError: cannot read it.
    """
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    certs = []
    for part in data.split(marker)[1:]:
        pem = marker + part.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
        try:
            certs.append(Certificate.loadPEM(pem))
        except Exception as e:  # noqa: BLE001 - pyOpenSSL raises its own Error types
            raise ValueError(f"not a PEM certificate: {e}") from None
    if not certs:
        raise ValueError("no PEM certificate in it")
    return certs


class _Capped(Protocol):
    """Reads an answer's body up to L{BODY_CAP} bytes, then stops the connection."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.parts.append(data)
        self.size += len(data)
        if self.size > BODY_CAP:
            body = b"".join(self.parts)[:BODY_CAP]
            self.done.callback(body)
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = ierror.ConnectionDone()) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        # ResponseDone, or cut short (PotentialDataLoss, a dropped connection): what came is enough
        self.done.callback(b"".join(self.parts))


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """The endpoint of a destination's only URL, built once."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self.endpoint


@implementer(IStreamClientEndpoint)
class _NoDelay:
    """TCP connections with C{TCP_NODELAY}: a request is not held back by Nagle waiting for a delayed ACK."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner

    def connect(self, factory: Any) -> Deferred[Any]:
        def nodelay(proto: Any) -> Any:
            set_no_delay = getattr(getattr(proto, "transport", None), "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
            return proto

        return self.inner.connect(factory).addCallback(nodelay)


def endpoint_for(reactor: Any, url: bytes, timeout: float, ca_file: str = "") -> IStreamClientEndpoint:
    """
    The endpoint of C{url}: TCP, or for C{https://} TLS verified against the
    system CA store plus C{ca_file}'s certificates (when given), with the
    host name checked.
    """
    uri = URI.fromBytes(url)
    host = uri.host.decode("idna").strip("[]")
    endpoint: IStreamClientEndpoint = _NoDelay(HostnameEndpoint(reactor, host, uri.port, timeout=timeout))
    if uri.scheme == b"https":
        trust: Any = SystemAndFileTrust(ca_file) if ca_file else platformTrust()
        endpoint = wrapClientTLS(optionsForClientTLS(host, trust), endpoint)
    return endpoint


class _ClientFactory(Factory):
    """Builds the client protocols of one L{Sender}'s own pool."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    def buildProtocol(self, addr: Any) -> Any:
        sender = self.sender
        proto = client_protocol(sender._quiescent, sender._lost)
        proto.factory = self
        sender._open.add(proto)
        return proto


class Sender:
    """
    The HTTP client of one destination.

    @param fast: send through Twisted's HTTP/1.1 client protocol directly
        (by default: when L{fast_paths_enabled}), or through C{Agent}.
    """

    def __init__(self, reactor: Any, dest: DestinationConfig, fast: bool | None = None) -> None:
        self.reactor = reactor
        self.dest = dest
        self.url = dest.url.encode("ascii")
        self.timeout = dest.timeout_seconds
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = dest.max_in_flight
        self.pool.cachedConnectionTimeout = IDLE_SECONDS  # type: ignore[assignment]
        self.pool.retryAutomatically = False  # a retry is the engine's decision (at-least-once, counted)
        if dest.ca_file:
            load_ca_file(dest.ca_file)  # a clear error now rather than at the first connection
        uri = URI.fromBytes(self.url)
        default = (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443))
        self.host = uri.host if default else b"%b:%d" % (uri.host, uri.port)
        self.endpoint = endpoint_for(reactor, self.url, dest.timeout_seconds, dest.ca_file)
        self.agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(self.endpoint), pool=self.pool)
        self.fast = fast_paths_enabled() if fast is None else fast
        # the fast path's pool: quiescent connections (the last used last) with the time each became so
        self._idle: list[tuple[Any, float]] = []
        self._open: set[Any] = set()
        # close(): the idle connections it closed, and what fires once they are gone
        self._closing: set[Any] = set()
        self._closed_d: Deferred[None] | None = None
        self._sweep: Any = None
        self._closed = False
        self._factory = _ClientFactory(self)
        # what Agent writes first: the request line, then (Request._writeHeaders) Content-Length, then Host
        self._request_line = b"POST " + uri.originForm + b" HTTP/1.1\r\n"
        self._host_line = b"Host: " + self.host + b"\r\n"

    def send(self, body: bytes, headers: Sequence[tuple[str, str]]) -> Deferred[Outcome]:
        """POST C{body} with C{headers}; fires with an L{Outcome} (never fails)."""
        if self.fast:
            return self._send_fast(body, headers)
        started = time.perf_counter()
        hdrs = Headers()
        hdrs.addRawHeader(b"Host", self.host)
        for name, value in headers:
            hdrs.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        return self._outcome(self.agent.request(b"POST", self.url, hdrs, BytesBody(body)), started)

    def _outcome(self, d: Deferred[Any], started: float) -> Deferred[Outcome]:
        """The L{Outcome} of the response C{d} will give (its body read up to the cap), in time or not."""
        d.addCallback(self._answer)
        d.addTimeout(self.timeout, cast(IReactorTime, self.reactor))

        def done(outcome: Outcome) -> Outcome:
            outcome.seconds = time.perf_counter() - started
            return outcome

        def failed(f: Failure) -> Outcome:
            return done(_failure_outcome(f, self.timeout))

        return d.addCallbacks(done, failed)

    def _send_fast(self, body: bytes, headers: Sequence[tuple[str, str]]) -> Deferred[Outcome]:
        started = time.perf_counter()
        # as Agent writes them: names in canonical case, repeated names together, CR/LF in a value made a space
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            raw = value.encode("latin-1")
            if b"\n" in raw or b"\r" in raw:
                raw = b" ".join(raw.splitlines())
            grouped.setdefault(canonical_header_name(name.encode("latin-1")), []).append(raw)
        lines: list[bytes] = [self._request_line, b"Content-Length: %d\r\n" % len(body), self._host_line]
        for raw_name, values in grouped.items():
            lines.extend([raw_name + b": " + v + b"\r\n" for v in values])
        lines.append(b"\r\n")
        lines.append(body)
        request = PreparedRequest(b"".join(lines))
        idle = self._idle
        proto = None
        while idle:
            candidate = idle.pop()[0]
            if candidate.state == "QUIESCENT":
                proto = candidate
                break
        d: Deferred[Any]
        if proto is not None:
            proto.budget = ANSWER_CAP
            d = proto.request(request)
        else:
            d = self.endpoint.connect(self._factory).addCallback(_request_on, request)
        return self._outcome(d, started)

    def _quiescent(self, proto: Any) -> None:
        """A connection of the fast path can take the next request (closed instead after L{close})."""
        if self._closed:
            proto.transport.loseConnection()
            return
        self._idle.append((proto, self.reactor.seconds()))
        if self._sweep is None:
            self._sweep = self.reactor.callLater(IDLE_SECONDS, self._close_idle)

    def _lost(self, proto: Any) -> None:
        self._open.discard(proto)
        closing = self._closing
        if proto in closing:
            closing.discard(proto)
            if not closing and self._closed_d is not None:
                closed, self._closed_d = self._closed_d, None
                closed.callback(None)

    def _close_idle(self) -> None:
        """Close the connections idle for L{IDLE_SECONDS}; look again when the next one will be."""
        self._sweep = None
        cutoff = self.reactor.seconds() - IDLE_SECONDS
        keep = []
        for proto, since in self._idle:
            if since <= cutoff:
                proto.transport.loseConnection()
            else:
                keep.append((proto, since))
        self._idle = keep
        if keep:
            self._sweep = self.reactor.callLater(keep[0][1] + IDLE_SECONDS - self.reactor.seconds(), self._close_idle)

    def _answer(self, response: IResponse) -> Deferred[Outcome]:
        code = response.code
        reader: list[_Capped] = []

        def cancel(_: Deferred[bytes]) -> None:  # the timeout while the body is read: drop the connection
            transport = reader[0].transport if reader else None
            if transport is not None:
                transport.stopProducing()  # type: ignore[attr-defined]

        got: Deferred[bytes] = Deferred(cancel)
        reader.append(_Capped(got))
        response.deliverBody(reader[0])

        def outcome(body: bytes) -> Outcome:
            if 200 <= code < 300:
                return Outcome("ok", code)
            after = response.headers.getRawHeaders(b"retry-after")
            text = body[:200].decode("utf-8", "replace").strip()
            return Outcome(
                "status",
                code,
                f"HTTP {code}" + (f": {text}" if text else ""),
                after[0].decode("latin-1") if after else None,
            )

        return got.addCallback(outcome)

    def close(self) -> Deferred[None]:
        """Close the kept-alive connections; fires when they are closed."""
        if not self.fast:
            d: Deferred[None] = self.pool.closeCachedConnections()
            return d
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        self._closing.update(p for p, _ in idle if p in self._open)
        if not self._closing:
            return succeed(None)
        if self._closed_d is None:
            self._closed_d = Deferred()
        closed = self._closed_d
        for proto, _ in idle:
            proto.transport.loseConnection()
        return closed


def _request_on(proto: Any, request: PreparedRequest) -> Deferred[IResponse]:
    proto.budget = ANSWER_CAP
    answer: Deferred[IResponse] = proto.request(request)
    return answer


def _failure_outcome(f: Failure, timeout: float) -> Outcome:
    if f.check(TimeoutError, CancelledError):
        return Outcome("timeout", message=f"no answer within {timeout:g} s")
    reasons = getattr(f.value, "reasons", None)
    inner = reasons[0] if reasons else f
    if inner.check(TimeoutError, CancelledError):  # cancelled by the timeout inside the client (ResponseNeverReceived)
        return Outcome("timeout", message=f"no answer within {timeout:g} s")
    if inner.check(ierror.ConnectionRefusedError, ierror.DNSLookupError, ierror.NoRouteError, ierror.TCPTimedOutError,
                   ierror.ConnectError):
        return Outcome("refused", message=f"cannot connect: {inner.getErrorMessage()}")
    text = inner.getErrorMessage()
    module = type(inner.value).__module__.lower()
    if "SSL" in text or "certificate" in text.lower() or "tls" in module or "service_identity" in module:
        return Outcome("tls", message=f"TLS: {text}")
    return Outcome("error", message=f"{type(inner.value).__name__}: {text}")

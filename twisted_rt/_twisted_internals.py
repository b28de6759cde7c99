# -*- test-case-name: tests.test_internals,tests.test_web -*-
"""
The one module that touches private names of Twisted and pyOpenSSL.

Every other module of twisted_rt uses their public API only.  Each private
reach is here, with a comment saying which public API is missing:

  - the HTTP/1.1 fast paths (L{FastHTTPChannel}, L{write_now}, the
    HTTP/1.1-or-HTTP/2 switch L{ChannelSwitch}, and for outgoing webhooks
    L{client_protocol} with L{PreparedRequest}): on only for the Twisted
    versions in L{TESTED}, where C{tests/test_web.py} proves them byte for
    byte equal to twisted.web, and only when every private name they read
    exists (L{fast_paths_enabled}); otherwise the site serves with plain
    twisted.web, destinations deliver with C{Agent}, and one log line
    (C{RT-W10}) says why;
  - L{clear_exit_signal} (twistd's C{reactor._exitSignal});
  - L{log_observers} (C{LogPublisher._observers});
  - L{set_curves} (pyOpenSSL's C{Context._context} and binding).

It imports only Twisted, pyOpenSSL and the standard library: it is the
lowest layer of the package (README, "Development").
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.tcp import Client as TCPClient
from twisted.internet.tcp import Server as TCPServer
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.python.failure import Failure
from twisted.web import _newclient, http
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from twisted import __version__ as _twisted_version

__all__ = [
    "TESTED",
    "ChannelSwitch",
    "FastHTTPChannel",
    "PreparedRequest",
    "canonical_header_name",
    "client_protocol",
    "clear_exit_signal",
    "fast_paths_enabled",
    "fast_paths_problem",
    "log_observers",
    "recheck",
    "request_gone",
    "running_version",
    "set_curves",
    "write_now",
]

log = Logger(namespace="twisted_rt.internals")

#: the Twisted versions (major, minor), both ends included, on which the
#: differential test (C{tests/test_web.py}) has passed: CI runs it on both
#: ends (C{tests/run}); setup.cfg's C{twisted} requirement allows no other
TESTED: tuple[tuple[int, int], tuple[int, int]] = ((25, 5), (26, 10))


# -- the version gate ---------------------------------------------------------

_FIRST_LINE = "_HTTPChannel__first_line"


def _required() -> list[tuple[str, object, str]]:
    """
    Every private name the fast paths read, as (where, on what, name).
    Instance attributes are looked for on a fresh instance (a
    C{FileDescriptor} made without a reactor).
    """
    channel = HTTPChannel()
    descriptor = FileDescriptor(reactor=_NO_REACTOR)
    return [
        ("twisted.web.http.HTTPChannel", HTTPChannel, _FIRST_LINE),
        ("twisted.web.http.HTTPChannel()", channel, "_handlingRequest"),
        ("twisted.web.http.HTTPChannel()", channel, "_receivedHeaderCount"),
        ("twisted.protocols.basic.LineReceiver", basic.LineReceiver, "_buffer"),
        ("twisted.protocols.basic.LineReceiver", basic.LineReceiver, "_busyReceiving"),
        ("twisted.web.http_headers.Headers()", Headers(), "_rawHeaders"),
        ("twisted.web.http", http, "_GenericHTTPChannelProtocol"),
        ("twisted.internet.abstract.FileDescriptor()", descriptor, "_tempDataLen"),
        ("twisted.internet.abstract.FileDescriptor()", descriptor, "offset"),
        ("twisted.internet.abstract.FileDescriptor()", descriptor, "dataBuffer"),
        ("twisted.web._newclient", _newclient, "HTTP11ClientProtocol"),
        ("twisted.web._newclient", _newclient, "Request"),
    ]


class _NoReactor:
    """Stands for a reactor where an instance is made only to see its attributes."""


_NO_REACTOR: Any = _NoReactor()


def running_version() -> tuple[int, int]:
    """The running Twisted's C{(major, minor)} (C{(0, 0)} if it cannot be read)."""
    found = re.match(r"(\d+)\.(\d+)", _twisted_version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def fast_paths_problem(version: tuple[int, int] | None = None) -> str | None:
    """
    Why the fast paths cannot be used with this Twisted, or C{None} when
    they can: its C{(major, minor)} (by default the running one's) is
    outside L{TESTED}, or a private name they read is missing.
    """
    if version is None:
        version = running_version()
    low, high = TESTED
    if not low <= version <= high:
        return (
            f"Twisted {version[0]}.{version[1]} is outside the tested range "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]}"
        )
    missing = [f"{where}.{name}" for where, obj, name in _required() if not hasattr(obj, name)]
    if missing:
        return f"Twisted {version[0]}.{version[1]} lacks {', '.join(missing)}"
    return None


_state: dict[str, Any] = {}
#: read by L{write_now} on every call (a module global: one lookup)
_fast_write = False


def recheck(version: tuple[int, int] | None = None) -> bool:
    """
    Decide again whether the fast paths are on (for C{version}, by default
    the running Twisted) and log the fallback once more if they are off;
    L{fast_paths_enabled} returns this answer from now on.  Tests use it.
    """
    global _fast_write
    problem = fast_paths_problem(version)
    _state.clear()
    _state["problem"] = problem
    _fast_write = problem is None
    return problem is None


def fast_paths_enabled() -> bool:
    """
    Whether the private-API fast paths are on for the running Twisted.

    Decided once, at the first call (the daemon's start: every L{RTSite}
    asks); when they are off, that call logs one warning (C{RT-W10}) saying
    why, and the site serves with plain twisted.web (HTTPChannel, its own
    HTTP/2 switch, C{transport.write}).
    """
    if "problem" not in _state:
        recheck()
    problem: str | None = _state["problem"]
    if problem is not None and not _state.get("logged"):
        _state["logged"] = True
        log.warn(
            "{problem}: serving HTTP with plain twisted.web and delivering webhooks with Agent"
            " (the private-API fast paths are off)",
            problem=problem,
            log_category="RT-W10",
        )
    return problem is None


recheck()  # write_now's answer from import on; logging waits for the first site


# -- one send() for a response -----------------------------------------------


#: the transports L{write_now} sends on itself (TCP, accepted or connected)
_PLAIN_TCP = (TCPServer, TCPClient)


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data}, sending it at once when the transport has nothing queued.

    C{transport.write} on a Twisted TCP transport only buffers, then asks
    epoll for writability (an C{epoll_ctl}), sends on the next turn and stops
    asking (another C{epoll_ctl}): three system calls per connection per
    flush.  When nothing is queued in the transport, one C{send()} usually
    takes it all; anything not sent goes through C{write} as usual, so
    ordering and the producer (back-pressure) signals are unchanged.  TLS and
    other transports, and every transport when the fast paths are off, use
    C{write}.

    Missing public API: L{twisted.internet.tcp.Server} (and C{Client})
    offers no "is anything queued?" (this reads C{FileDescriptor}'s C{_tempDataLen},
    C{offset} and C{dataBuffer}) and no "write now if you can".
    C{tests/test_ws.py} pins the behaviour.
    """
    if (
        not _fast_write
        or type(transport) not in _PLAIN_TCP
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


# -- the HTTP/1.1 channel's fast paths ------------------------------------------

_CANONICAL: dict[bytes, bytes] = {}
_LENGTH_HEADERS = (b"Content-Length", b"Transfer-Encoding")
# One header line as twisted.web accepts it, found only at a line start: a
# token (RFC 9110 5.6.2), a colon, and a value without NUL/CR/LF (its spaces
# and tabs are stripped).  When every line of a head is one such match, the
# head is read in one C call; otherwise it goes line by line.
_HEADER_LINE = re.compile(rb"(?<=\r\n)([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00\r\n]*)\r\n")


def canonical_header_name(name: bytes) -> bytes:
    """
    A header name in C{twisted.web}'s canonical case (C{x-github-event} ->
    C{X-Github-Event}: what C{Headers} writes), cached.  Made with the
    public C{Headers} API; here because the fast paths read its cache.

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


class FastHTTPChannel(HTTPChannel):
    """
    C{twisted.web}'s HTTP/1.1 channel with two shortcuts on the hot path.
    Use it only when L{fast_paths_enabled}.

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

    Missing public API: L{HTTPChannel} parses a head only line by line and
    offers no hook for a whole head; this reads and sets its private state
    (C{_HTTPChannel__first_line}, C{_receivedHeaderCount},
    C{_handlingRequest}), L{basic.LineReceiver}'s (C{_buffer},
    C{_busyReceiving}) and L{Headers}' C{_rawHeaders}.  Its behaviour is
    pinned to twisted.web's by C{tests/test_web.py} on both ends of
    L{TESTED}.
    """

    _held_head: list[bytes] | None = None

    # -- what a subclass (the site's channel) may use --------------------------

    def body_received(self, size: int) -> None:
        """Called with the size of each read that is (more of) a request body."""

    def partial_request(self) -> bool:
        """Part of a request has arrived and no request is being handled."""
        return not self._handlingRequest and bool(self._buffer or self.requests)

    def flush_head(self) -> None:
        """Send a response head held back for its body, if there is one."""
        seq = self._held_head
        if seq is not None:
            self._held_head = None
            write_now(self.transport, b"".join(seq))

    # -- reading ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self.line_mode and not self._handlingRequest:
            self.body_received(len(data))
        if self._busyReceiving:
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
            raw: dict[bytes, list[bytes]] = self.requests[-1].requestHeaders._rawHeaders
            pairs = _HEADER_LINE.findall(block, end)
            if len(pairs) != block.count(b"\r\n") - 1 or len(pairs) > self.maxHeaders:
                # anything unusual (a bad name or value, obsolete folding, too
                # many headers): line by line, as twisted.web does it
                for line in head[end + 2 :].split(b"\r\n"):
                    if not self.headerReceived(line):
                        return
            else:
                canonical = _CANONICAL
                added = 0
                for name, value in pairs:
                    canon = canonical.get(name) or canonical_header_name(name)  # a token: the regex checked it
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
            self.flush_head()
            super().writeHeaders(version, code, reason, headers)
            return
        seq = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                seq += (name, b": ", value, b"\r\n")
        seq.append(b"\r\n")
        self.flush_head()
        self._held_head = seq

    def write(self, data: bytes) -> None:
        seq = self._held_head
        if seq is not None:
            self._held_head = None
            seq.append(data)
            data = b"".join(seq)
        write_now(self.transport, data)

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        self.flush_head()
        super().writeSequence(iovec)

    def requestDone(self, request: Request) -> None:
        self.flush_head()
        super().requestDone(request)

    def loseConnection(self) -> None:
        self.flush_head()
        super().loseConnection()


# twisted.web's HTTP/1.1-or-HTTP/2 (ALPN) switch.  Missing public API:
# twisted.web can put only its own HTTPChannel behind the switch
# (HTTPFactory.protocol builds C{_GenericHTTPChannelProtocol(HTTPChannel())});
# there is no public way to give it another channel.
_Switch: Any = getattr(http, "_GenericHTTPChannelProtocol", object)


class ChannelSwitch(_Switch):  # type: ignore[misc]
    """
    twisted.web's HTTP/1.1-or-HTTP/2 switch around a L{FastHTTPChannel};
    C{on_lost} runs when the connection ends (also when HTTP/2 replaced
    the channel).  Use it only when L{fast_paths_enabled}.
    """

    def __init__(self, channel: FastHTTPChannel, on_lost: Any) -> None:
        super().__init__(channel)
        #: the HTTP/1.1 channel this connection started with
        self.rt_channel = channel
        self._on_lost = on_lost

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._on_lost()


# -- twisted.web's Request ---------------------------------------------------------


def request_gone(request: Any) -> bool:
    """
    The client of C{request} went away before its response was finished
    (twisted.web's C{Request._disconnected}; where it is missing, the
    request has no C{channel} any more, which twisted.web also sets then;
    C{True} for an object that is no request).

    Missing public API: twisted.web tells of a lost client only through
    C{notifyFinish()}, a Deferred per request, which the hot path avoids;
    L{twisted.web.server.Request} has no public flag for it.
    """
    gone = getattr(request, "_disconnected", None)
    if gone is None:  # a Twisted without the flag: the public sign of it
        return getattr(request, "channel", None) is None
    return bool(gone)


# -- twistd ------------------------------------------------------------------------


def clear_exit_signal(reactor: Any) -> None:
    """
    Forget the signal (SIGTERM, SIGINT) that stopped C{reactor}, so that
    twistd exits 0 after a clean shutdown instead of re-raising the signal
    and dying "by signal".

    Missing public API: twistd reads the reactor's C{_exitSignal}
    (L{twisted.internet.interfaces._ISupportsExitSignalCapturing}, itself
    private) and there is no public way to say "the shutdown was clean".
    A reactor without the attribute (a test's fake) is left alone.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


# -- twisted.logger ----------------------------------------------------------------


def log_observers(publisher: Any) -> list[Any]:
    """
    The observers of a L{twisted.logger.LogPublisher} now (none when this
    Twisted does not say).

    Missing public API: a C{LogPublisher} can add and remove observers but
    not list them, and twistd keeps no public handle on the observers it
    installed; this reads C{LogPublisher._observers}.
    """
    return list(getattr(publisher, "_observers", ()))


# -- pyOpenSSL ---------------------------------------------------------------------


def set_curves(ctx: Any, curves: Sequence[str]) -> bool | None:
    """
    Limit an C{OpenSSL.SSL.Context}'s key-exchange groups to C{curves}
    (OpenSSL names: C{X25519}, C{P-256}, ...).  C{True}: done; C{False}:
    OpenSSL does not know one of them; C{None}: this pyOpenSSL offers no
    way to set them.

    Missing public API: pyOpenSSL's C{Context} sets one curve
    (C{set_tmp_ecdh}) but not a list of groups; this calls
    C{SSL_CTX_set1_curves_list} through its binding (C{OpenSSL._util.lib})
    on C{Context._context}, as Twisted's own C{_sslverify} does for
    C{SSL_CTX_set_ecdh_auto}.
    """
    try:
        from OpenSSL._util import lib

        set_list = lib.SSL_CTX_set1_curves_list
        pointer = ctx._context
    except (ImportError, AttributeError):
        return None
    return bool(set_list(pointer, ":".join(curves).encode("ascii")) == 1)


# -- TLS trust of outgoing webhooks (engineer dest-fast) -----------------------------


def _implementer_trust(cls: type) -> type:
    from twisted.internet._sslverify import IOpenSSLTrustRoot
    from zope.interface import implementer

    return implementer(IOpenSSLTrustRoot)(cls)  # type: ignore[no-any-return]


@_implementer_trust
class SystemAndFileTrust:
    """
    An C{IOpenSSLTrustRoot} trusting the system CA store AND the PEM
    certificates of one file (C{[[destinations]] ca_file}), for
    C{optionsForClientTLS}, which still verifies the host name.

    Missing public API: Twisted's public trust roots are the system store
    (C{platformTrust}) or a list of certificates in its place
    (C{trustRootFromCertificates}), never both; an C{IOpenSSLTrustRoot}
    says what it trusts through the private-named
    C{_addCACertsToContext(context)}, which this implements.
    """

    def __init__(self, ca_file: str) -> None:
        self.ca_file = ca_file

    def _addCACertsToContext(self, context: Any) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self.ca_file.encode())


# -- outgoing webhooks: Twisted's HTTP/1.1 client protocol without the Agent --------


class PreparedRequest(_newclient.Request):
    """
    A request whose bytes (request line, headers, body) the caller made:
    written in one C{write}, done at once.  For L{client_protocol} only.

    Missing public API: the only public way to Twisted's HTTP/1.1 client
    is C{Agent.request}, which per request parses the URL, builds a
    C{Headers}, looks the connection up in C{HTTPConnectionPool} (a
    C{callLater} for each connection put back, a cancel for each taken),
    and writes the body through a registered producer and a
    C{LengthEnforcingConsumer} with four Deferreds: about 200 of the
    350 µs of CPU a delivery costs on the bench machine.  C{Request} and
    C{HTTP11ClientProtocol} live in the private C{twisted.web._newclient};
    the protocol reads C{persistent} and calls C{writeTo} (and
    C{stopWriting} only while a C{writeTo} Deferred is pending, never
    here); its response parser reads C{method}.
    C{tests/test_dest_http_fast.py} proves the bytes on the wire equal
    C{Agent}'s.
    """

    #: read by nobody here (the caller wrote the headers): one shared, empty
    headers = Headers()

    def __init__(self, data: bytes) -> None:
        # not Request.__init__: the caller checked the method and the URI once, for every request
        self.method = b"POST"
        self.uri = b""
        self.bodyProducer = None
        self.persistent = True
        self._parsedURI = None
        self.data = data

    def writeTo(self, transport: Any) -> Deferred[None]:
        write_now(transport, self.data)
        return succeed(None)

    def stopWriting(self) -> None:
        """Nothing to stop: L{writeTo} wrote everything at once."""


_CONNECTION_DONE = Failure(ConnectionDone())


class _ClientProtocol(_newclient.HTTP11ClientProtocol):
    """
    C{HTTP11ClientProtocol} that also says when its connection is gone, and
    drops it when an answer goes past C{budget} bytes: Twisted's response
    parser takes any number of header lines (each up to 16 KiB), so a
    receiver streaming headers would grow them until the request's timeout.
    """

    def __init__(self, quiescent: Any, lost: Any) -> None:
        super().__init__(quiescent)
        self._rt_lost = lost
        #: bytes the current answer may still take (set before each request)
        self.budget = 0

    def dataReceived(self, data: bytes) -> None:
        budget = self.budget = self.budget - len(data)
        if budget < 0:
            transport: Any = self.transport
            transport.abortConnection()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        super().connectionLost(reason)
        self._rt_lost(self)


def client_protocol(quiescent: Any, lost: Any) -> Any:
    """
    Twisted's HTTP/1.1 client protocol (the one inside C{Agent}):
    C{quiescent(protocol)} is called when it can take the next request
    (C{protocol.request(PreparedRequest(...))}), C{lost(protocol)} when its
    connection is closed; set its C{budget} (bytes the answer may take, head
    and body) before each request.  Use it only when L{fast_paths_enabled}.
    """
    return _ClientProtocol(quiescent, lost)

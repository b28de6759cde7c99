# -*- test-case-name: tests.test_web -*-
"""
The HTTP layer every route shares: JSON replies and errors, a resource base
that runs C{async} handlers, the body-size limit enforced while reading, and
a lean L{Site}.

Handlers are methods C{handle_<METHOD>(request)} that return (or are
coroutines returning) a L{Reply}, a JSON-able dict, or raise L{JsonError}.
Modelled on Klein's resource bridge: the coroutine runs as a Deferred, is
cancelled if the client goes away, nothing is written after that, and every
failure goes through one mapper, so no traceback ever reaches a client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from twisted_rt.event import dumps

__all__ = [
    "JsonError",
    "JsonResource",
    "Reply",
    "RTRequest",
    "RTSite",
    "error_body",
    "json_page",
    "write_json",
]

log = Logger()


class JsonError(Exception):
    """An error answered as C{{"error": code, "message": message}}."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class Reply:
    """A handler's answer: status, JSON body (or raw bytes) and headers."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: bytes = b"application/json"


def error_body(code: str, message: str) -> bytes:
    """The JSON bytes of an error."""
    return dumps({"error": code, "message": message})


def write_json(request: Request, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    """Write a complete JSON response and finish C{request}."""
    payload = body if isinstance(body, bytes) else dumps(body)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    if headers:
        for k, v in headers.items():
            request.responseHeaders.setRawHeaders(k.encode("latin-1"), [v.encode("latin-1")])
    request.setHeader(b"content-length", b"%d" % len(payload))
    request.write(payload)
    request.finish()


def _map_failure(f: Failure) -> JsonError:
    from twisted_rt.auth import AuthError
    from twisted_rt.journal import JournalUnavailable, UnencodableEvent

    e = f.value
    if isinstance(e, JsonError):
        return e
    if isinstance(e, AuthError):
        hdrs = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if e.status == 401 else {}
        return JsonError(e.status, e.code, e.message, hdrs)
    if isinstance(e, UnencodableEvent):
        return JsonError(400, "invalid_body", str(e))
    if isinstance(e, JournalUnavailable):
        return JsonError(503, "journal_unavailable", f"nothing was accepted: {e}", {"Retry-After": "1"})
    log.failure("unexpected error", f, log_category="RT-W500")
    return JsonError(500, "internal_error", "the server failed to handle this request; it was logged")


Handler = Callable[[Request], Reply | dict[str, Any] | Awaitable[Reply | dict[str, Any]]]


class JsonResource(Resource):
    """
    A leaf resource dispatching to C{handle_<METHOD>}; unknown methods are a
    JSON 405 with C{Allow}.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"handle_{method}", None) if method.isalpha() else None
        if handler is None and method == "HEAD":
            handler = getattr(self, "handle_GET", None)
        if handler is None:
            return method_not_allowed(request, sorted(n[7:] for n in dir(self) if n.startswith("handle_")))
        return run(request, handler)


def method_not_allowed(request: Request, allowed: list[str]) -> int:
    """Answer a JSON 405 naming the C{allowed} methods (also in C{Allow})."""
    method = request.method.decode("ascii", "replace")
    write_json(
        request,
        405,
        error_body("method_not_allowed", f"{method} is not allowed here; use {', '.join(allowed)}"),
        {"Allow": ", ".join(allowed)},
    )
    return NOT_DONE_YET


def run(request: Request, handler: Handler) -> int:
    """Run C{handler} for C{request} and write what it returns."""
    finished = [False]
    try:
        result = handler(request)
    except Exception:  # noqa: BLE001 - any handler error becomes a JSON answer
        _answer_failure(Failure(), request, finished)
        return NOT_DONE_YET
    if not hasattr(result, "__await__") and not isinstance(result, Deferred):
        _answer(result, request, finished)
        return NOT_DONE_YET
    d: Deferred[Any] = result if isinstance(result, Deferred) else ensureDeferred(result)  # type: ignore[arg-type]

    def gone(f: Failure) -> None:
        finished[0] = True
        d.cancel()

    request.notifyFinish().addErrback(gone)
    d.addCallbacks(_answer, _answer_failure, callbackArgs=(request, finished), errbackArgs=(request, finished))
    return NOT_DONE_YET


def _answer(result: Any, request: Request, finished: list[bool]) -> None:
    if finished[0]:
        return
    finished[0] = True
    if isinstance(result, Reply):
        if result.content_type != b"application/json" or isinstance(result.body, bytes):
            request.setResponseCode(result.status)
            request.setHeader(b"content-type", result.content_type)
            for k, v in result.headers.items():
                request.setHeader(k.encode("latin-1"), v.encode("latin-1"))
            body = result.body if isinstance(result.body, bytes) else dumps(result.body)
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()
            return
        write_json(request, result.status, result.body, result.headers)
    else:
        write_json(request, 200, result)


def _answer_failure(f: Failure, request: Request, finished: list[bool]) -> None:
    if f.check(CancelledError) or finished[0]:
        return
    finished[0] = True
    e = _map_failure(f)
    write_json(request, e.status, error_body(e.code, e.message), e.headers)


class JsonPage(Resource):
    """A fixed JSON error for any path and method (404s of unknown routes)."""

    isLeaf = True

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__()
        self.status = status
        self.body = error_body(code, message)

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return self.body


def json_page(status: int, code: str, message: str) -> IResource:
    """A resource that answers every request with one JSON error."""
    return JsonPage(status, code, message)


class Root(Resource):
    """The root: named children, and a JSON 404 for everything else."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return json_page(404, "not_found", f"no route for {request.path.decode('utf-8', 'replace')}")


class RTRequest(Request):
    """
    A request that enforces the body limit while the body arrives: a body
    over the limit is answered 413 at once (HTTP/1.1: the connection is then
    closed) and never buffered.
    """

    max_body_bytes = 1048576
    _received = 0
    too_large = False
    started: float = 0.0

    def gotLength(self, length: int | None) -> None:
        from io import BytesIO

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
        if isinstance(channel, http.HTTPChannel) and channel.transport is not None:
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
        if self.too_large:
            # HTTP/2, or a body that grew past the limit after headers
            write_json(
                self,
                413,
                error_body("body_too_large", f"the request body is over {self.max_body_bytes} bytes"),
            )
            return
        site = getattr(self.channel, "site", None)
        if isinstance(site, RTSite):
            site.inflight.add(self)
            self.notifyFinish().addBoth(lambda _: site.inflight.discard(self))
        super().process()


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


class RTSite(Site):
    """
    The daemon's site: JSON errors, no tracebacks to clients, one access-log
    line per request through C{twisted.logger} (or none), and a count of
    requests in flight for graceful shutdown.
    """

    displayTracebacks = False
    access_log = Logger(namespace="twisted_rt.access")

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int = 1048576,
        log_requests: bool = True,
        on_too_large: Callable[[Request], None] | None = None,
        reactor: Any = None,
    ) -> None:
        # Routes read their bodies themselves; parsing every POST's Content-Type
        # and form fields (twisted.web's default) cost ~27% of the ingest path.
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.requestFactory: type[Request] = type("Request", (RTRequest,), {"max_body_bytes": max_body_bytes})
        self.log_requests = log_requests
        self.inflight: set[Request] = set()
        self._on_too_large = on_too_large

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
            uri=request.uri.decode("utf-8", "replace"),
            code=request.code,
            length=request.sentLength,
            ms=ms,
            log_category="RT-ACCESS",
        )

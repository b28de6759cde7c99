# -*- test-case-name: tests.test_web -*-
"""
JSON replies and errors, and the resource bridge every route uses.

Handlers are methods C{handle_<METHOD>(request)} that return (or are
coroutines returning) a L{Reply}, a JSON-able dict, or raise L{JsonError}.
Modelled on Klein's resource bridge: the coroutine runs as a Deferred, is
cancelled if the client goes away, nothing is written after that, and every
failure goes through one mapper (L{map_failure}), so no traceback ever
reaches a client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, cast

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from twisted_rt.core.event import dumps
from twisted_rt.core.logs import redact_uri

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


#: the largest integer a query parameter may carry (SQLite's signed 64-bit INTEGER)
MAX_INT = 2**63 - 1


def int_arg(request: Request, name: str, default: int, low: int = 0, high: int = MAX_INT) -> int:
    """
    The integer query parameter C{name} (C{default} when absent): only ASCII
    digits, at most 19 of them, from C{low} to C{high}.

    @raise JsonError: 400 C{invalid_parameter} for anything else (a sign, a
        Unicode digit such as C{²}, a fraction, 5,000 digits, ...).
    """
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return default
    raw = values[0]
    if not (0 < len(raw) <= 19 and raw.isdigit()):  # bytes.isdigit() is ASCII only
        raise JsonError(400, "invalid_parameter", f"{name} must be an integer from {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise JsonError(400, "invalid_parameter", f"{name} must be an integer from {low} to {high}")
    return value


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


def _map_failure(f: Failure, request: Request | None = None) -> JsonError:
    from twisted_rt.interfaces import AuthError, JournalUnavailable, UnencodableEvent

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
    log.failure(
        "unexpected error answering {method} {uri}",
        f,
        method=_method(request),
        uri=_uri(request),
        log_category="RT-W500",
    )
    return JsonError(500, "internal_error", "the server failed to handle this request; it was logged")


def _method(request: Request | None) -> str:
    method = getattr(request, "method", None)
    return method.decode("ascii", "replace") if isinstance(method, bytes) else "-"


def _uri(request: Request | None) -> str:
    """The request's URI as it may be logged (no tokens: L{redact_uri})."""
    uri = getattr(request, "uri", None)
    return redact_uri(uri) if isinstance(uri, bytes) else "-"


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
    """
    Run C{handler} for C{request} and write what it returns.

    Whatever fails, in the handler or while encoding or writing its answer
    (a body that is not JSON-able, ...), goes through L{_map_failure}: the
    client gets a JSON error, never twisted.web's HTML 500 and never
    silence.  A failure after the client went away is logged.
    """
    finished = [False]
    try:
        result = handler(request)
        if not hasattr(result, "__await__") and not isinstance(result, Deferred):
            _answer(result, request, finished)
            return NOT_DONE_YET
    except Exception:  # noqa: BLE001 - any handler error becomes a JSON answer
        _answer_failure(Failure(), request, finished)
        return NOT_DONE_YET
    d: Deferred[Any] = result if isinstance(result, Deferred) else ensureDeferred(result)  # type: ignore[arg-type]

    def gone(_: object = None) -> None:
        finished[0] = True
        d.cancel()

    if hasattr(type(request), "on_gone"):  # the site's RTRequest: no Deferred per request
        cast(Any, request).on_gone = gone
    else:
        request.notifyFinish().addErrback(gone)
    # addCallback then addErrback (not addCallbacks): a failure raised by
    # _answer itself must reach _answer_failure too
    d.addCallback(_answer, request, finished)
    d.addErrback(_answer_failure, request, finished)
    d.addErrback(_unanswerable, request)
    return NOT_DONE_YET


def _answer(result: Any, request: Request, finished: list[bool]) -> None:
    if finished[0]:
        return
    # encode first: a body that cannot be encoded fails before anything is written
    if isinstance(result, Reply):
        status, content_type, headers = result.status, result.content_type, result.headers
        body = result.body if isinstance(result.body, bytes) else dumps(result.body)
    else:
        status, content_type, headers = 200, b"application/json", None
        body = dumps(result)
    extra = [(k.encode("latin-1"), [v.encode("latin-1")]) for k, v in headers.items()] if headers else ()
    if type(status) is not int:
        raise TypeError(f"a reply's status must be an int, not {status!r}")
    finished[0] = True
    request.setResponseCode(status)
    set_header = request.responseHeaders.setRawHeaders
    set_header(b"content-type", [content_type])
    for name, value in extra:
        set_header(name, value)
    set_header(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def _answer_failure(f: Failure, request: Request, finished: list[bool]) -> None:
    if finished[0] and _unanswered(request):
        # _answer failed before writing anything (e.g. a header it may not
        # send): the client is still there and waiting
        request.responseHeaders = Headers()
        finished[0] = False
    if finished[0]:
        # the client went away (cancelled), or the answer broke while being
        # written: nobody can be told, so it is logged
        if not f.check(CancelledError):
            log.failure(
                "{method} {uri} failed after its answer was started or its client went away",
                f,
                method=_method(request),
                uri=_uri(request),
                log_category="RT-W501",
            )
        if not (request.finished or getattr(request, "_disconnected", True)):
            request.channel.loseConnection()  # a half-written answer: do not leave the client waiting
        return
    finished[0] = True
    e = _map_failure(f, request)
    write_json(request, e.status, error_body(e.code, e.message), e.headers)


def _unanswered(request: Request) -> bool:
    """Nothing of an answer was written yet, and the client has not gone."""
    return not (
        getattr(request, "startedWriting", True)
        or getattr(request, "finished", True)
        or getattr(request, "_disconnected", True)
    )


def _unanswerable(f: Failure, request: Request) -> None:
    """The last errback of L{run}: writing even the error answer failed."""
    log.failure(
        "could not answer {method} {uri}",
        f,
        method=_method(request),
        uri=_uri(request),
        log_category="RT-W502",
    )
    try:
        request.channel.loseConnection()
    except Exception:  # noqa: BLE001 - the connection may be gone already  # pragma: no cover
        pass


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



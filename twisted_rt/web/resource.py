# -*- test-case-name: tests.test_web -*-
"""
JSON replies and errors, and the resource bridge every route uses.

Handlers are methods C{handle_<METHOD>(request)} of a L{JsonResource} that
return (or are coroutines returning) a L{Reply}, a JSON-able dict, or raise
L{JsonError}.  Modelled on Klein's resource bridge: the coroutine runs as a
Deferred, is cancelled if the client goes away, nothing is written after
that, and every failure goes through one mapper (L{as_json_error}, which
knows the exceptions the lower layers raise), so no traceback ever reaches
a client.  A method with no handler is the one JSON 405 with C{Allow}
(L{method_not_allowed}).

Beside the bridge, the request rules every route shares, one of each: the
integer query parameter (L{int_arg}), the media type of a C{Content-Type}
(L{media_type}, L{is_json_media}) and the browser Origin check
(L{origin_allowed}, L{check_origin}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, ClassVar, cast, overload
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from twisted_rt._twisted_internals import request_gone
from twisted_rt.core.event import dumps
from twisted_rt.core.logs import redact_uri
from twisted_rt.interfaces import AuthError, JournalUnavailable, UnencodableEvent

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


def ascii_int(raw: bytes | str) -> int | None:
    """
    The value of 1 to 19 ASCII digits, at most L{MAX_INT}; C{None} for
    anything else (a sign, a Unicode digit such as C{²}, a fraction, 5,000
    digits, ...).  The one digit rule of query parameters and cursors.
    """
    if 0 < len(raw) <= 19 and raw.isascii() and raw.isdigit():
        value = int(raw)
        if value <= MAX_INT:
            return value
    return None


def int_arg(request: Request, name: str, default: int, low: int = 0, high: int = MAX_INT) -> int:
    """
    The integer query parameter C{name} (C{default} when absent): only ASCII
    digits (L{ascii_int}), from C{low} to C{high}.

    @raise JsonError: 400 C{invalid_parameter} for anything else.
    """
    values = (request.args or {}).get(name.encode("ascii"))
    if not values:
        return default
    value = ascii_int(values[0])
    if value is None or not low <= value <= high:
        raise JsonError(400, "invalid_parameter", f"{name} must be an integer from {low} to {high}")
    return value


def no_subpath(request: Request) -> None:
    """
    A leaf route answers its own path (and a trailing slash) only.

    @raise JsonError: 404 C{not_found} for a longer path.
    """
    if request.postpath and request.postpath != [b""]:
        raise JsonError(404, "not_found", f"no route for {request.path.decode('utf-8', 'replace')}")


def str_args(request: Request, name: str) -> list[str]:
    """Every value of the query parameter C{name}, as text (undecodable bytes replaced)."""
    return [v.decode("utf-8", "replace") for v in (request.args or {}).get(name.encode(), [])]


def media_type(content_type: str | bytes | None) -> str:
    """The lower-case media type of a C{Content-Type} value, without parameters (C{""} when absent)."""
    if not content_type:
        return ""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.partition(";")[0].strip().lower()


def is_json_media(mime: str) -> bool:
    """
    Whether a media type (from L{media_type}) says JSON: C{application/json}
    or a structured syntax suffix C{+json} (RFC 6839, e.g.
    C{application/vnd.github+json}).
    """
    return mime == "application/json" or mime.endswith("+json")


def origin_allowed(origin: str | None, allowed: tuple[str, ...], host: str | None = None) -> bool:
    """
    Whether a request with C{Origin: origin} may connect: any when
    C{allowed} is empty or there is no Origin (not a browser), else a listed
    origin or the daemon's own (the Origin's host is the request's C{Host},
    e.g. the inspector page served at C{/}).
    """
    if not allowed or not origin:
        return True
    if origin.rstrip("/") in {a.rstrip("/") for a in allowed} or "*" in allowed:
        return True
    if host:
        return urlsplit(origin).netloc.lower() == host.lower()
    return False


def check_origin(request: Request, allowed: tuple[str, ...]) -> str | None:
    """
    The request's C{Origin} (C{None} without one) once L{origin_allowed}
    lets it in.  @raise JsonError: 403 C{forbidden_origin}.
    """
    raw = request.getHeader(b"origin")
    origin = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    host = request.getHeader(b"host")
    if not origin_allowed(origin, allowed, host.decode("latin-1") if host else None):
        raise JsonError(403, "forbidden_origin", f"origin {origin!r} is not allowed")
    return origin


def allow_origin(request: Request, origin: str | None) -> None:
    """Let a browser at C{origin} (checked by L{check_origin}) read the answer (CORS)."""
    if origin:
        request.setHeader(b"access-control-allow-origin", origin.encode("latin-1"))
        request.setHeader(b"vary", b"Origin")


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


def write_error(request: Request, e: JsonError) -> int:
    """Answer C{request} with the JSON error C{e} (its status and headers); C{NOT_DONE_YET}."""
    write_json(request, e.status, error_body(e.code, e.message), e.headers)
    return NOT_DONE_YET


@overload
def as_json_error(e: JsonError | AuthError | UnencodableEvent | JournalUnavailable) -> JsonError: ...


@overload
def as_json_error(e: BaseException | None) -> JsonError | None: ...


def as_json_error(e: BaseException | None) -> JsonError | None:
    """
    The answer to an exception the layers below raise on purpose, or
    C{None} for an unexpected one (a 500, logged: L{run}).  The one table
    from exceptions to errors: HTTP routes answer it as JSON, C{/ws}
    sends its C{code} and C{message} in an C{error} message.
    """
    if isinstance(e, JsonError):
        return e
    if isinstance(e, AuthError):
        hdrs = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if e.status == 401 else {}
        return JsonError(e.status, e.code, e.message, hdrs)
    if isinstance(e, UnencodableEvent):
        return JsonError(400, "invalid_body", str(e))
    if isinstance(e, JournalUnavailable):
        return JsonError(503, "journal_unavailable", f"not acknowledged: {e}", {"Retry-After": "1"})
    return None


def _map_failure(f: Failure, request: Request | None = None) -> JsonError:
    """L{as_json_error}, and for an unexpected failure a logged 500."""
    e = as_json_error(f.value)
    if e is not None:
        return e
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


#: request method -> the name of its handler (C{""}: no handler can exist)
_HANDLER_NAMES: dict[bytes, str] = {}


def _handler_name(method: bytes) -> str:
    """C{handle_<METHOD>} for a method token, cached (a bounded table: clients choose methods)."""
    text = method.decode("ascii", "replace")
    name = f"handle_{text}" if text.isalpha() else ""
    if len(_HANDLER_NAMES) < 64:
        _HANDLER_NAMES[method] = name
    return name


class JsonResource(Resource):
    """
    A leaf resource dispatching to C{handle_<METHOD>}; HEAD is answered by
    C{handle_GET} (twisted.web drops the body) unless L{head_from_get} is
    false; other methods are the JSON 405 with C{Allow}
    (L{not_allowed}).
    """

    isLeaf = True
    #: whether C{HEAD} falls back to C{handle_GET}
    head_from_get = True
    #: C{False}: a handler still running when its client goes away is
    #: cancelled (a query, a wait).  C{True}: it runs to its end, for
    #: handlers that change state in several steps (a store's write, then
    #: telling the workers): a cancel between them would leave the first
    #: done and the second never.
    finish_when_gone = False
    #: L{allowed_methods}, computed once per class
    _allowed: ClassVar[list[str]]

    def render(self, request: Request) -> bytes | int:
        method = request.method
        name = _HANDLER_NAMES.get(method)
        if name is None:
            name = _handler_name(method)
        handler = getattr(self, name, None) if name else None
        if handler is None and method == b"HEAD" and self.head_from_get:
            handler = getattr(self, "handle_GET", None)
        if handler is None:
            return self.not_allowed(request)
        return run(request, handler, cancel=not self.finish_when_gone)

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The methods this resource has a handler for, sorted (the C{Allow} of its 405)."""
        allowed: list[str] | None = cls.__dict__.get("_allowed")
        if allowed is None:
            allowed = sorted(n[7:] for n in dir(cls) if n.startswith("handle_"))
            cls._allowed = allowed
        return allowed

    def not_allowed(self, request: Request) -> int:
        """Answer a method this resource has no handler for: L{method_not_allowed}."""
        return method_not_allowed(request, self.allowed_methods())


def method_not_allowed(request: Request, allowed: list[str], note: str = "") -> int:
    """
    Answer the JSON 405 naming the C{allowed} methods (also in C{Allow});
    C{note} is added to its message.
    """
    method = request.method.decode("ascii", "replace")
    write_json(
        request,
        405,
        error_body("method_not_allowed", f"{method} is not allowed here; use {', '.join(allowed)}{note}"),
        {"Allow": ", ".join(allowed)},
    )
    return NOT_DONE_YET


def run(request: Request, handler: Handler, cancel: bool = True) -> int:
    """
    Run C{handler} for C{request} and write what it returns.  When the
    client goes away first, nothing is written and, with C{cancel}, the
    handler's Deferred is cancelled.

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
        if cancel:
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
        if not (request.finished or request_gone(request)):
            request.channel.loseConnection()  # a half-written answer: do not leave the client waiting
        return
    finished[0] = True
    write_error(request, _map_failure(f, request))


def _unanswered(request: Request) -> bool:
    """Nothing of an answer was written yet, and the client has not gone."""
    return not (
        getattr(request, "startedWriting", True)
        or getattr(request, "finished", True)
        or request_gone(request)
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



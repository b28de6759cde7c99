# -*- test-case-name: tests.test_hooks -*-
"""
C{/hooks/<source>}: signed webhooks in.

C{POST /hooks/<source>} goes, cheapest check first: unknown source (404),
the per-IP rate limit (429), the per-IP throttle of signature failures
(429, see below), X's content-type rule (415), the source's signature over
the raw body (401, L{twisted_rt.routes.verify}), the source's rate limit (429,
counting verified deliveries only, so junk never locks the genuine sender
out), the body (415, 400), provider handshakes (answered, never journaled),
the channel template (400 C{unroutable}), then one C{broker.publish} whose
durable commit is the acknowledgement: C{202 {"id","channel","offset"}}, or
C{200 {..., "duplicate": true}} when the source already delivered that id
(the journal keeps delivery ids, so this holds across restarts).  A journal
failure is a 503 via L{twisted_rt.web}.

Every 401 (and every wrong Meta C{hub.verify_token}) takes a token from its
client address's bucket of C{[server] signature_failures_per_ip_per_minute};
an address with none left is answered 429 with C{Retry-After} before its
signature is even looked at, whatever it sends, so online guessing (of a
weak GitLab token, say) stops there while other addresses are untouched.
IPv6 clients are counted per /64.  Both per-IP tables are bounded
(L{twisted_rt.routes.ratelimit}).

The request headers kept with the event are the provider's minus
L{twisted_rt.routes.verify.SECRET_HEADERS} and the source's C{redact_headers}.

C{GET /hooks/<source>} answers only the handshakes of Meta
(C{hub.challenge}) and X (C{crc_token}, refused with 400 for a token that
could be a delivery body: L{twisted_rt.routes.verify.crc_token_problem}); anything
else is a 405.

This is the ingest hot path: no logging besides the access log, one copy of
the body, templates compiled once per source, and the failure throttle is
looked at only while some address has failed in the last minute.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any, Union, cast
from urllib.parse import parse_qsl

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from twisted_rt.core.config import SourceConfig
from twisted_rt.core.event import Accepted, Draft, loads
from twisted_rt.core.matcher import ChannelError, validate_channel
from twisted_rt.routes.ratelimit import RateLimiter
from twisted_rt.routes.verify import (
    SignatureError,
    identify,
    meta_challenge,
    secret_headers,
    twitter_crc,
    verify,
    zoom_validation,
)
from twisted_rt.web.resource import JsonError, Reply, error_body, run, write_json

if TYPE_CHECKING:
    from twisted_rt.app import App

__all__ = ["ChannelTemplate", "HooksResource", "parse_body", "resource"]

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-.:@]")
_TEXT_TYPES = frozenset(
    {
        "application/xml",
        "application/javascript",
        "application/yaml",
        "application/x-yaml",
        "application/graphql",
    }
)
_HANDSHAKE_GET = frozenset({"meta", "twitter"})



class ChannelTemplate:
    """
    A compiled C{channel} template: literal text, C{{source}},
    C{{header:Name}} and C{{json:a.b.c}} (list indices allowed as numbers).

    Filled-in values have every character not allowed in a channel name
    replaced by C{_} (GitLab's C{Push Hook} becomes C{Push_Hook}, Shopify's
    C{orders/create} becomes C{orders_create}); dots are kept as segment
    separators.
    """

    def __init__(self, template: str, source: str) -> None:
        self.template = template
        # (kind, argument): kind is "text", "header" or "json"
        self.parts: list[tuple[str, Any]] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(template):
            if m.start() > pos:
                self.parts.append(("text", template[pos : m.start()]))
            inner = m.group(1)
            if inner == "source":
                self.parts.append(("text", source))
            else:
                kind, _, arg = inner.partition(":")
                if kind == "header":
                    self.parts.append(("header", (arg.lower(), arg)))
                else:
                    self.parts.append(("json", (arg, arg.split("."))))
            pos = m.end()
        if pos < len(template):
            self.parts.append(("text", template[pos:]))
        self.static: str | None = None
        if all(kind == "text" for kind, _ in self.parts):
            self.static = "".join(arg for _, arg in self.parts)

    def render(self, headers: dict[str, str], data: Any) -> str:
        """
        The channel of one delivery.  @raise JsonError: 400 C{unroutable}
        naming the part that could not be filled, or the invalid result.
        """
        if self.static is not None:
            channel = self.static
        else:
            out: list[str] = []
            for kind, arg in self.parts:
                if kind == "text":
                    out.append(arg)
                elif kind == "header":
                    value = headers.get(arg[0])
                    if not value:
                        raise JsonError(
                            400, "unroutable", f"the channel template needs the {arg[1]} header, which is missing"
                        )
                    out.append(_UNSAFE.sub("_", value))
                else:
                    value = _lookup(data, arg[1])
                    if value is None:
                        raise JsonError(
                            400,
                            "unroutable",
                            f"the channel template needs the body field {arg[0]}, which is missing or not a"
                            " string or number",
                        )
                    out.append(_UNSAFE.sub("_", value))
            channel = "".join(out)
        try:
            return validate_channel(channel)
        except ChannelError as e:
            raise JsonError(
                400, "unroutable", f"the channel template {self.template!r} gave {channel!r}, which is invalid: {e}"
            ) from None


def _lookup(data: Any, path: list[str]) -> str | None:
    for key in path:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            return None
    if isinstance(data, str):
        return data or None
    if isinstance(data, int) and not isinstance(data, bool):
        return str(data)
    return None


_HEADER_NAMES: dict[bytes, tuple[str, str]] = {}


def _header_name(raw: bytes) -> tuple[str, str]:
    """A request header name as (name, lower-case name), cached."""
    name = raw.decode("latin-1")
    known = (name, name.lower())
    if len(_HEADER_NAMES) < 1024:
        _HEADER_NAMES[raw] = known
    return known


def _json_text(headers: dict[str, str], body: bytes) -> str | None:
    """
    The body itself as the event's stored JSON, when L{parse_body} read it as
    UTF-8 JSON (so the journal need not encode the parsed data again).
    """
    if not _is_json(_media_type(headers.get("content-type"))):
        return None
    if not body or body[:3] == b"\xef\xbb\xbf":
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _media_type(content_type: str | None) -> str:
    """The lower-case media type of a C{Content-Type} (C{""} when absent)."""
    return content_type.partition(";")[0].strip().lower() if content_type else ""


def _is_json(mime: str) -> bool:
    """Whether a webhook body of this media type is read as JSON (no type means JSON)."""
    return not mime or mime == "application/json" or mime.endswith("+json")


def parse_body(content_type: str | None, body: bytes) -> Any:
    """
    The C{data} of a webhook body per the contract: JSON; a form becomes an
    object of its fields (a C{payload} field holding JSON, as Slack and
    GitHub send it, is decoded); other text is kept as a string; no content
    type means JSON.  An empty body is C{None}.

    @raise JsonError: 415 for a binary or unknown type, 400 if unparsable.
    """
    mime = _media_type(content_type)
    charset = "utf-8"
    if content_type:
        for p in content_type.partition(";")[2].split(";"):
            k, _, v = p.partition("=")
            if k.strip().lower() == "charset" and v.strip():
                charset = v.strip().strip('"')
    if _is_json(mime):
        if not body:
            return None
        try:
            return loads(body)
        except ValueError as e:
            raise JsonError(400, "invalid_body", f"the body is not valid JSON: {e}") from None
    if mime == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, ValueError) as e:
            raise JsonError(400, "invalid_body", f"the form body cannot be decoded: {e}") from None
        fields: dict[str, Any] = {}
        for k, v in pairs:
            prior = fields.get(k)
            if prior is None:
                fields[k] = v
            elif isinstance(prior, list):
                prior.append(v)
            else:
                fields[k] = [prior, v]
        payload = fields.get("payload")
        if isinstance(payload, str) and payload[:1] in ("{", "["):
            try:
                fields["payload"] = loads(payload)
            except ValueError as e:
                raise JsonError(400, "invalid_body", f"the form's payload field is not valid JSON: {e}") from None
        return fields
    if mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith("+xml"):
        try:
            return body.decode(charset)
        except (LookupError, UnicodeDecodeError) as e:
            raise JsonError(400, "invalid_body", f"the text body cannot be decoded as {charset}: {e}") from None
    raise JsonError(
        415,
        "unsupported_media_type",
        f"{mime} bodies are not accepted; send JSON, a form, or text",
    )


def _peer(request: IRequest) -> str:
    """
    The client's address as a rate-limit key: an IPv4 address as it is, an
    IPv6 one as its /64 (one host commonly holds a whole /64, so counting
    single IPv6 addresses would let one client take the whole table).
    """
    address = cast(Any, request).getClientAddress()
    host = str(getattr(address, "host", ""))
    if ":" in host:
        return _ipv6_key(host)
    return host


def _ipv6_key(host: str) -> str:
    try:
        ip = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def _body(request: Request) -> bytes:
    content = request.content
    if content is None:
        return b""
    getvalue = getattr(content, "getvalue", None)
    if getvalue is not None:
        return bytes(getvalue())
    content.seek(0)
    return bytes(content.read())


class _Source:
    """One configured source, ready to serve."""

    __slots__ = ("allow", "config", "drop", "json_only", "kind", "limiter", "name", "route")

    def __init__(self, config: SourceConfig, reactor: Any) -> None:
        self.config = config
        self.name = config.name
        self.kind = config.verify
        self.route = ChannelTemplate(config.channel, config.name)
        self.limiter = (
            RateLimiter(config.rate_limit_per_second, reactor) if config.rate_limit_per_second > 0 else None
        )
        self.allow = "GET, POST" if self.kind in _HANDSHAKE_GET else "POST"
        #: lower-case names of the request headers never kept with an event
        self.drop = secret_headers(config)
        #: X: only application/json bodies (CONTRACT.md, "Safety rules")
        self.json_only = self.kind == "twitter"


Answer = Union[Reply, "Deferred[Reply]"]


@implementer(IResource)
class HooksResource:
    """The C{/hooks} subtree: a leaf that dispatches on the source name."""

    isLeaf = True

    def __init__(self, app: App) -> None:
        self.app = app
        self.reactor = app.reactor
        self.stats = app.stats
        self.sources = {s.name: _Source(s, app.reactor) for s in app.config.sources}
        rate = app.config.server.rate_limit_per_ip_per_second
        self.ip_limiter = RateLimiter(rate, app.reactor) if rate > 0 else None
        failures = app.config.server.signature_failures_per_ip_per_minute
        #: signature failures per client address: a bucket of C{failures}
        #: refilling over a minute
        self.failures = RateLimiter(failures / 60, app.reactor, burst=failures) if failures > 0 else None

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        """Never called: this resource is a leaf."""
        return self  # pragma: no cover

    def putChild(self, path: bytes, child: IResource) -> None:
        """A leaf has no children."""
        raise NotImplementedError("/hooks has no children")

    def render(self, request: Request) -> int:
        path = request.postpath or []
        if len(path) == 2 and path[1] == b"":
            path = path[:1]
        if len(path) != 1 or not path[0]:
            return self._error(request, 404, "unknown_source", "use /hooks/<source>")
        name = path[0].decode("utf-8", "replace")
        src = self.sources.get(name)
        if self.ip_limiter is not None:
            wait = self.ip_limiter.take(_peer(request))
            if wait:
                if src is not None:
                    self.stats.webhook(name, "rate_limited")
                return self._error(
                    request, 429, "rate_limited", "too many requests from this address", {"Retry-After": str(wait)}
                )
        if src is None:
            return self._error(request, 404, "unknown_source", f"no webhook source is called {name!r}")
        method = request.method
        if method == b"POST":
            return run(request, lambda r: self._post(r, src))
        if method == b"GET" and src.kind in _HANDSHAKE_GET:
            return run(request, lambda r: self._get(r, src))
        self.stats.webhook(name, "method_not_allowed")
        return self._error(
            request,
            405,
            "method_not_allowed",
            f"{method.decode('ascii', 'replace')} is not allowed here; use {src.allow}"
            + (" (GET only for provider handshakes)" if src.kind in _HANDSHAKE_GET else ""),
            {"Allow": src.allow},
        )

    def _error(
        self, request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> int:
        write_json(request, status, error_body(code, message), headers)
        return NOT_DONE_YET

    def _reject(self, src: _Source, e: JsonError) -> JsonError:
        self.stats.webhook(src.name, e.code)
        return e

    def _throttle(self, request: Request, src: _Source, failures: RateLimiter) -> None:
        """
        @raise JsonError: 429 when the client's address has used up its
            signature failures (called only while some address has failed
            in the last minute: otherwise L{RateLimiter.recent} is the cost).
        """
        wait = failures.peek(_peer(request))
        if wait:
            self.stats.webhook(src.name, "signature_throttled")
            raise JsonError(
                429,
                "rate_limited",
                "too many requests with a bad signature or token from this address",
                {"Retry-After": str(wait)},
            )

    def _failed_check(self, request: Request) -> None:
        """Count one signature (or verify token) failure against the client's address."""
        if self.failures is not None:
            self.failures.take(_peer(request))

    # -- POST ---------------------------------------------------------------

    def _post(self, request: Request, src: _Source) -> Answer:
        failures = self.failures
        if failures is not None and failures.recent():
            self._throttle(request, src, failures)
        body = _body(request)
        lower: dict[str, str] = {}
        kept: dict[str, str] = {}
        drop = src.drop
        names = _HEADER_NAMES
        for raw_name, values in request.requestHeaders.getAllRawHeaders():
            known = names.get(raw_name)
            if known is None:
                known = _header_name(raw_name)
            hname, lname = known
            value = (values[0] if len(values) == 1 else b", ".join(values)).decode("latin-1")
            lower[lname] = value
            if lname not in drop:
                kept[hname] = value
        if src.json_only and _media_type(lower.get("content-type")) != "application/json":
            raise self._reject(
                src,
                JsonError(415, "unsupported_media_type", f"source {src.name!r} accepts application/json bodies only"),
            )
        try:
            verify(src.config, body, lower, self.reactor.seconds())
        except SignatureError as e:
            self._failed_check(request)
            raise self._reject(
                src, JsonError(401, e.code, e.message, {"WWW-Authenticate": f'Signature realm="{src.name}"'})
            ) from None
        if src.limiter is not None:
            wait = src.limiter.take("")
            if wait:
                raise self._reject(
                    src,
                    JsonError(
                        429, "rate_limited", f"source {src.name!r} is over its rate limit", {"Retry-After": str(wait)}
                    ),
                )
        try:
            data = parse_body(lower.get("content-type"), body)
        except JsonError as e:
            raise self._reject(src, e) from None
        kind = src.kind
        if kind == "slack" and isinstance(data, dict) and data.get("type") == "url_verification":
            return Reply(200, {"challenge": data.get("challenge", "")})
        if kind == "zoom" and isinstance(data, dict) and data.get("event") == "endpoint.url_validation":
            payload = data.get("payload")
            token = payload.get("plainToken") if isinstance(payload, dict) else None
            if not isinstance(token, str):
                raise self._reject(src, JsonError(400, "invalid_body", "endpoint.url_validation without payload.plainToken"))
            return Reply(200, zoom_validation(src.config, token))
        etype, eid = identify(kind, lower, data)
        try:
            channel = src.route.render(lower, data)
        except JsonError as e:
            raise self._reject(src, e) from None
        draft = Draft(
            channel, data, source=src.name, type=etype, id=eid, raw=body, headers=kept, text=_json_text(lower, body)
        )
        d = self.app.broker.publish([draft])
        return d.addCallback(self._accepted, src.name).addErrback(self._failed, src.name)

    def _accepted(self, accepted: list[Accepted], name: str) -> Reply:
        a = accepted[0]
        if a.duplicate:
            self.stats.webhook(name, "duplicate")
            return Reply(200, a.receipt())
        self.stats.webhook(name, "accepted")
        self.stats.events_in[name] += 1
        return Reply(202, a.receipt())

    def _failed(self, f: Failure, name: str) -> Failure:
        from twisted.internet.defer import CancelledError

        from twisted_rt.interfaces import JournalUnavailable

        if isinstance(f.value, JournalUnavailable):
            self.stats.webhook(name, "journal_unavailable")
        elif not isinstance(f.value, CancelledError):
            self.stats.webhook(name, "internal_error")
        return f

    # -- GET handshakes -----------------------------------------------------

    def _get(self, request: Request, src: _Source) -> Reply:
        if self.failures is not None and self.failures.recent():
            self._throttle(request, src, self.failures)
        args = {
            k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
            for k, v in (request.args or {}).items()
            if v
        }
        if src.kind == "meta":
            try:
                challenge = meta_challenge(src.config, args)
            except SignatureError as e:
                self._failed_check(request)
                raise self._reject(src, JsonError(403, e.code, e.message)) from None
            if challenge is not None:
                return Reply(
                    200,
                    challenge.encode("utf-8"),
                    {"X-Content-Type-Options": "nosniff"},
                    content_type=b"text/plain; charset=utf-8",
                )
        elif "crc_token" in args:
            try:
                return Reply(200, twitter_crc(src.config, args["crc_token"]))
            except ValueError as e:
                raise self._reject(src, JsonError(400, "invalid_parameter", str(e))) from None
        raise self._reject(
            src,
            JsonError(
                405,
                "method_not_allowed",
                "GET is only for the provider's handshake"
                + (" (hub.mode=subscribe&hub.challenge=…&hub.verify_token=…)" if src.kind == "meta" else " (crc_token=…)")
                + "; deliveries use POST",
                {"Allow": src.allow},
            ),
        )


def resource(app: App) -> HooksResource:
    """The C{/hooks} subtree."""
    return HooksResource(app)

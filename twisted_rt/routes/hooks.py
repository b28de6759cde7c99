# -*- test-case-name: tests.test_hooks -*-
"""
C{/hooks/<source>}: signed webhooks in.

C{/hooks} is a L{HooksResource}; its children are one L{SourceResource}
per configured source, a L{twisted_rt.web.resource.JsonResource} whose
C{handle_POST} takes deliveries.  Providers with a handshake have their
own subclass (L{SOURCE_TYPES}): L{MetaSource} and L{XSource} add a
C{handle_GET}, L{SlackSource} and L{ZoomSource} answer a signed POST.  Every
answer goes through the resource bridge and its one error mapper
(L{twisted_rt.web.resource.run}); a method without a handler is the shared
JSON 405 with C{Allow}, counted per source.

A request goes, cheapest check first: a path that is not
C{/hooks/<name>} (404), the per-IP rate limit (429, before anything else,
even for an unknown source or a method not allowed), an unknown source
(404), the method (405), the per-IP throttle of signature failures (429,
see below), X's content-type rule (415), the source's signature over the
raw body (401, L{twisted_rt.routes.verify}), the source's rate limit (429,
counting verified deliveries only, so junk never locks the genuine sender
out), the body (415, 400), provider handshakes (answered, never journaled),
the channel template (400 C{unroutable}), then one C{broker.publish} whose
durable commit is the acknowledgement: C{202 {"id","channel","offset"}}, or
C{200 {..., "duplicate": true}} when the source already delivered that id
(the journal keeps delivery ids, so this holds across restarts).  A journal
failure is a 503 (L{twisted_rt.web.resource.as_json_error}).

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
the body, the media type read once, templates parsed once per source
(L{twisted_rt.core.template}), and the failure throttle is looked at only
while some address has failed in the last minute.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Union
from urllib.parse import parse_qsl

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from twisted_rt.app import App
from twisted_rt.core.config import SourceConfig
from twisted_rt.core.event import Accepted, Draft, loads
from twisted_rt.core.metrics import Stats
from twisted_rt.core.template import ChannelTemplate, Unroutable
from twisted_rt.interfaces import Broker, Reactor
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
from twisted_rt.web.resource import (
    JsonError,
    JsonResource,
    Reply,
    as_json_error,
    error_body,
    is_json_media,
    media_type,
    method_not_allowed,
    write_error,
    write_json,
)

__all__ = ["HooksResource", "MetaSource", "SlackSource", "SourceResource", "XSource", "ZoomSource", "parse_body",
           "resource"]

_TEXT_TYPES = frozenset(
    {
        "application/xml",
        "application/javascript",
        "application/yaml",
        "application/x-yaml",
        "application/graphql",
    }
)

#: C{/hooks}, C{/hooks/} and C{/hooks/<source>/<more>}: no source named
_NO_SOURCE = JsonError(404, "unknown_source", "use /hooks/<source>")


_HEADER_NAMES: dict[bytes, tuple[str, str]] = {}


def _header_name(raw: bytes) -> tuple[str, str]:
    """A request header name as (name, lower-case name), cached."""
    name = raw.decode("latin-1")
    known = (name, name.lower())
    if len(_HEADER_NAMES) < 1024:
        _HEADER_NAMES[raw] = known
    return known


def _json_text(as_json: bool, body: bytes) -> str | None:
    """
    The body itself as the event's stored JSON, when L{parse_body} read it as
    UTF-8 JSON (so the journal need not encode the parsed data again).
    """
    if not as_json:
        return None
    if not body or body[:3] == b"\xef\xbb\xbf":
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_body(content_type: str | None, body: bytes) -> Any:
    """
    The C{data} of a webhook body per the contract: JSON; a form becomes an
    object of its fields (a C{payload} field holding JSON, as Slack and
    GitHub send it, is decoded); other text is kept as a string; no content
    type means JSON.  An empty body is C{None}.

    @raise JsonError: 415 for a binary or unknown type, 400 if unparsable.
    """
    mime = media_type(content_type)
    return _parse_body(mime, _as_json(mime), content_type, body)


def _as_json(mime: str) -> bool:
    """Whether a webhook body of this media type is read as JSON (no type means JSON)."""
    return not mime or is_json_media(mime)


def _parse_body(mime: str, as_json: bool, content_type: str | None, body: bytes) -> Any:
    """L{parse_body} with the media type of C{content_type} already read (and L{_as_json} of it)."""
    if as_json:
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
        charset = "utf-8"
        for p in (content_type or "").partition(";")[2].split(";"):
            k, _, v = p.partition("=")
            if k.strip().lower() == "charset" and v.strip():
                charset = v.strip().strip('"')
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
    address = request.getClientAddress()
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


def _query(request: Request) -> dict[str, str]:
    """The first value of each query parameter, as text."""
    return {
        k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in (request.args or {}).items() if v
    }


class _Shared:
    """What every path under C{/hooks} shares: the clock, the broker, the per-IP limits and the counters."""

    __slots__ = ("broker", "failures", "ip_limiter", "reactor", "stats")

    def __init__(self, app: App) -> None:
        reactor: Reactor = app.reactor
        self.reactor = reactor
        self.broker: Broker = app.broker
        self.stats: Stats = app.stats
        rate = app.config.server.rate_limit_per_ip_per_second
        self.ip_limiter = RateLimiter(rate, reactor) if rate > 0 else None
        failures = app.config.server.signature_failures_per_ip_per_minute
        #: signature failures per client address: a bucket of C{failures}
        #: refilling over a minute
        self.failures = RateLimiter(failures / 60, reactor, burst=failures) if failures > 0 else None


class _UnknownSource(Resource):
    """C{/hooks/<name>} for a name no source has: a JSON 404."""

    isLeaf = True

    def render(self, request: Request) -> int:
        name = request.prepath[-1].decode("utf-8", "replace") if request.prepath else ""
        write_json(request, 404, error_body("unknown_source", f"no webhook source is called {name!r}"))
        return NOT_DONE_YET


class _ErrorPage(Resource):
    """A leaf that answers one JSON error (C{/hooks/}, a path below a source, the per-IP 429)."""

    isLeaf = True

    def __init__(self, error: JsonError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: Request) -> int:
        return write_error(request, self.error)


Answer = Union[Reply, "Deferred[Reply]"]


class SourceResource(JsonResource):
    """
    C{/hooks/<source>} of one configured source: C{POST} takes deliveries;
    the subclasses of providers with a handshake add it (C{handle_GET}, or
    a step of C{POST}).  Other methods (C{HEAD} too) are the JSON 405,
    counted per source.
    """

    #: a delivery is journaled and fanned out whether or not its client waits
    #: for the answer: the handler runs on to count it (rt_events_in_total)
    finish_when_gone = True

    head_from_get = False

    #: X: only application/json bodies (CONTRACT.md, "Safety rules")
    json_only = False
    #: whether L{post_handshake} may answer a parsed body
    has_post_handshake = False
    #: added to the message of a 405
    not_allowed_note = ""

    def __init__(self, config: SourceConfig, shared: _Shared) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        self.kind = config.verify
        self.route = ChannelTemplate(config.channel, config.name)
        self.reactor = shared.reactor
        self.stats = shared.stats
        self.failures = shared.failures
        self.limiter = (
            RateLimiter(config.rate_limit_per_second, shared.reactor) if config.rate_limit_per_second > 0 else None
        )
        #: lower-case names of the request headers never kept with an event
        self.drop = secret_headers(config)
        self.broker = shared.broker
        self.allowed = self.allowed_methods()

    def not_allowed(self, request: Request) -> int:
        self.stats.webhook(self.name, "method_not_allowed")
        return method_not_allowed(request, self.allowed, self.not_allowed_note)

    def _reject(self, e: JsonError) -> JsonError:
        self.stats.webhook(self.name, e.code)
        return e

    def _throttle(self, request: Request, failures: RateLimiter) -> None:
        """
        @raise JsonError: 429 when the client's address has used up its
            signature failures (called only while some address has failed
            in the last minute: otherwise L{RateLimiter.recent} is the cost).
        """
        wait = failures.peek(_peer(request))
        if wait:
            self.stats.webhook(self.name, "signature_throttled")
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

    def handle_POST(self, request: Request) -> Answer:
        """One delivery: checked, parsed, routed, then journaled (202) or found a duplicate (200)."""
        failures = self.failures
        if failures is not None and failures.recent():
            self._throttle(request, failures)
        body = _body(request)
        lower: dict[str, str] = {}
        kept: dict[str, str] = {}
        drop = self.drop
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
        content_type = lower.get("content-type")
        mime = media_type(content_type)
        if self.json_only and mime != "application/json":
            raise self._reject(
                JsonError(415, "unsupported_media_type", f"source {self.name!r} accepts application/json bodies only"),
            )
        try:
            verify(self.config, body, lower, self.reactor.seconds())
        except SignatureError as e:
            self._failed_check(request)
            raise self._reject(
                JsonError(401, e.code, e.message, {"WWW-Authenticate": f'Signature realm="{self.name}"'})
            ) from None
        if self.limiter is not None:
            wait = self.limiter.take("")
            if wait:
                raise self._reject(
                    JsonError(
                        429, "rate_limited", f"source {self.name!r} is over its rate limit", {"Retry-After": str(wait)}
                    ),
                )
        as_json = not mime or is_json_media(mime)
        try:
            data = _parse_body(mime, as_json, content_type, body)
        except JsonError as e:
            raise self._reject(e) from None
        if self.has_post_handshake:
            reply = self.post_handshake(data)
            if reply is not None:
                return reply
        etype, eid = identify(self.kind, lower, data)
        try:
            channel = self.route.render(lower, data)
        except Unroutable as e:
            raise self._reject(JsonError(400, "unroutable", str(e))) from None
        draft = Draft(
            channel, data, source=self.name, type=etype, id=eid, raw=body, headers=kept, text=_json_text(as_json, body)
        )
        d = self.broker.publish([draft])
        return d.addCallback(self._accepted).addErrback(self._failed)

    def post_handshake(self, data: Any) -> Reply | None:
        """The answer to a provider's handshake sent as a signed POST, or C{None} for a delivery."""
        return None  # pragma: no cover - only called where has_post_handshake

    def _accepted(self, accepted: list[Accepted]) -> Reply:
        a = accepted[0]
        if a.duplicate:
            self.stats.webhook(self.name, "duplicate")
            return Reply(200, a.receipt())
        self.stats.webhook(self.name, "accepted")
        self.stats.events_in[self.name] += 1
        return Reply(202, a.receipt())

    def _failed(self, f: Failure) -> Failure:
        """Count a failed publish under the code it is answered with (L{as_json_error}); pass it on."""
        if not f.check(CancelledError):
            e = as_json_error(f.value)
            self.stats.webhook(self.name, e.code if e is not None else "internal_error")
        return f

    def _handshake_only(self, hint: str) -> JsonError:
        """The 405 of a GET that is not the provider's handshake."""
        return self._reject(
            JsonError(
                405,
                "method_not_allowed",
                f"GET is only for the provider's handshake ({hint}); deliveries use POST",
                {"Allow": ", ".join(self.allowed)},
            )
        )


class _GetHandshake(SourceResource):
    """A provider whose handshake is a GET (Meta, X): GET answers only it."""

    not_allowed_note = " (GET only for provider handshakes)"

    def _throttled(self, request: Request) -> None:
        if self.failures is not None and self.failures.recent():
            self._throttle(request, self.failures)


class MetaSource(_GetHandshake):
    """Meta: C{GET} echoes C{hub.challenge} when C{hub.verify_token} is the source's."""

    def handle_GET(self, request: Request) -> Reply:
        """The subscription handshake: the challenge as text, or 403 for a wrong verify token."""
        self._throttled(request)
        try:
            challenge = meta_challenge(self.config, _query(request))
        except SignatureError as e:
            self._failed_check(request)
            raise self._reject(JsonError(403, e.code, e.message)) from None
        if challenge is None:
            raise self._handshake_only("hub.mode=subscribe&hub.challenge=…&hub.verify_token=…")
        return Reply(
            200,
            challenge.encode("utf-8"),
            {"X-Content-Type-Options": "nosniff"},
            content_type=b"text/plain; charset=utf-8",
        )


class XSource(_GetHandshake):
    """X: JSON bodies only; C{GET ?crc_token=} is answered with its HMAC."""

    json_only = True

    def handle_GET(self, request: Request) -> Reply:
        """The CRC check (L{twisted_rt.routes.verify.twitter_crc})."""
        self._throttled(request)
        args = _query(request)
        if "crc_token" not in args:
            raise self._handshake_only("crc_token=…")
        try:
            return Reply(200, twitter_crc(self.config, args["crc_token"]))
        except ValueError as e:
            raise self._reject(JsonError(400, "invalid_parameter", str(e))) from None


class SlackSource(SourceResource):
    """Slack: a signed C{url_verification} POST is answered with its challenge."""

    has_post_handshake = True

    def post_handshake(self, data: Any) -> Reply | None:
        if isinstance(data, dict) and data.get("type") == "url_verification":
            return Reply(200, {"challenge": data.get("challenge", "")})
        return None


class ZoomSource(SourceResource):
    """Zoom: a signed C{endpoint.url_validation} POST is answered with the HMAC of its token."""

    has_post_handshake = True

    def post_handshake(self, data: Any) -> Reply | None:
        if not (isinstance(data, dict) and data.get("event") == "endpoint.url_validation"):
            return None
        payload = data.get("payload")
        token = payload.get("plainToken") if isinstance(payload, dict) else None
        if not isinstance(token, str):
            raise self._reject(JsonError(400, "invalid_body", "endpoint.url_validation without payload.plainToken"))
        return Reply(200, zoom_validation(self.config, token))


#: the resource class of each C{verify} kind with a handshake (others: L{SourceResource})
SOURCE_TYPES: dict[str, type[SourceResource]] = {
    "meta": MetaSource,
    "twitter": XSource,
    "slack": SlackSource,
    "zoom": ZoomSource,
}


class HooksResource(Resource):
    """
    C{/hooks}: one child resource per configured source.  Finding the child
    is where the subtree's first checks happen, in this order: a path that
    is not C{/hooks/<name>} is a JSON 404, then the per-IP rate limit (429,
    even for an unknown source or a method not allowed), then an unknown
    name is a JSON 404.
    """

    def __init__(self, app: App) -> None:
        super().__init__()
        shared = _Shared(app)
        self.ip_limiter = shared.ip_limiter
        self.stats = shared.stats
        self.sources: dict[bytes, SourceResource] = {}
        self._unknown = _UnknownSource()
        self._no_source = _ErrorPage(_NO_SOURCE)
        for config in app.config.sources:
            child = SOURCE_TYPES.get(config.verify, SourceResource)(config, shared)
            self.sources[config.name.encode("utf-8")] = child
            self.putChild(config.name.encode("utf-8"), child)

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        post = request.postpath
        if not path or (post and post != [b""]):
            return self._no_source
        child = self.sources.get(path)
        limiter = self.ip_limiter
        if limiter is not None:
            wait = limiter.take(_peer(request))
            if wait:
                if child is not None:
                    self.stats.webhook(child.name, "rate_limited")
                return _ErrorPage(
                    JsonError(429, "rate_limited", "too many requests from this address", {"Retry-After": str(wait)})
                )
        return child if child is not None else self._unknown

    def render(self, request: Request) -> int:
        """C{/hooks} itself."""
        return write_error(request, _NO_SOURCE)


def resource(app: App) -> HooksResource:
    """The C{/hooks} subtree."""
    return HooksResource(app)

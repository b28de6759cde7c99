# -*- test-case-name: tests.test_api -*-
"""
The JSON API a backend drives the daemon with, plus C{/metrics}.

  - C{POST /api/publish}: one event C{{"channel","data","id"?,"type"?}} or a
    batch C{{"events": [...]}} of at most L{MAX_BATCH}, journaled in one
    commit; idempotent by C{id} within the caller's scope
    (L{twisted_rt.core.auth.Principal.scope}: one for API keys, one per JWT
    C{sub}; the same over WebSocket), so another publisher's ids are
    neither met nor revealed.
  - C{GET /api/channels}: channels the caller may read.
  - C{GET /api/channels/<name>/history?since=N&limit=M}: at most C{limit}
    events and about L{twisted_rt.store.local.PAGE_BYTES} of them;
    C{"more": true} when more events follow (page on with C{since} = the
    last offset of the page), C{"more": false} otherwise.
    C{"truncated": true} when events after C{since} were already trimmed.
  - C{GET /api/channels/<name>/presence}: the members of a presence channel.
  - C{POST /api/users/<user>/disconnect} (API keys only): close every
    connection of that user on every node.
  - C{GET /api/stats}: the counters of L{twisted_rt.core.metrics.Stats}.
  - C{GET /metrics}: Prometheus text exposition.
  - (C{GET /openapi.json} describes them all: L{twisted_rt.routes.openapi}.)

Every route but C{/metrics} needs a token (an API key,
or a JWT with the rights); C{history} also answers an anonymous caller for
the C{anonymous_subscribe} channels.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.exposition import choose_encoder
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request

from twisted_rt.app import App
from twisted_rt.core.auth import Principal, require
from twisted_rt.core.event import Accepted, Draft, dumps, loads
from twisted_rt.core.matcher import ChannelError, validate_channel
from twisted_rt.interfaces import AuthError
from twisted_rt.store.presence import MAX_MEMBERS_LISTED
from twisted_rt.web.resource import (
    JsonError,
    JsonResource,
    Reply,
    Root,
    error_body,
    int_arg,
    is_json_media,
    media_type,
    no_subpath,
)

__all__ = [
    "DEFAULT_HISTORY_LIMIT",
    "MAX_BATCH",
    "MAX_HISTORY_LIMIT",
    "MAX_ID_LENGTH",
    "MAX_OFFSET",
    "MAX_TYPE_LENGTH",
    "mount",
    "parse_publish",
]

#: most events in one C{POST /api/publish}
MAX_BATCH = 100
#: longest idempotency key
MAX_ID_LENGTH = 200
#: longest event type
MAX_TYPE_LENGTH = 100
#: C{limit} of a history request: default and maximum
DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 1000
#: the largest offset (SQLite's signed 64-bit integer)
MAX_OFFSET = 2**63 - 1
#: longest user name of C{/api/users/<user>/disconnect}
MAX_USER_LENGTH = 1024

_EVENT_KEYS = frozenset({"channel", "data", "id", "type"})


def _bad(code: str, message: str) -> JsonError:
    return JsonError(400, code, message)


def _event_draft(obj: Any, where: str) -> Draft:
    """One event object of a publish body as a L{Draft}.  @raise JsonError: 400."""
    if not isinstance(obj, dict):
        raise _bad("invalid_body", f"{where} must be a JSON object")
    unknown = sorted(set(obj) - _EVENT_KEYS)
    if unknown:
        raise _bad("invalid_body", f"{where} has unknown field {unknown[0]!r} (known: channel, data, id, type)")
    if "channel" not in obj:
        raise _bad("missing_field", f"{where} needs a 'channel'")
    if "data" not in obj:
        raise _bad("missing_field", f"{where} needs 'data' (any JSON value)")
    try:
        channel = validate_channel(obj["channel"])
    except ChannelError as e:
        raise _bad("invalid_channel", f"{where}.channel: {e}") from None
    event_id = obj.get("id")
    if "id" in obj and (not isinstance(event_id, str) or not 1 <= len(event_id) <= MAX_ID_LENGTH):
        raise _bad("invalid_field", f"{where}.id must be a string of 1-{MAX_ID_LENGTH} characters")
    event_type = obj.get("type", "")
    if not isinstance(event_type, str) or len(event_type) > MAX_TYPE_LENGTH:
        raise _bad("invalid_field", f"{where}.type must be a string of at most {MAX_TYPE_LENGTH} characters")
    return Draft(channel=channel, data=obj["data"], source="api", type=event_type, id=event_id)


def parse_publish(body: bytes) -> tuple[list[Draft], bool]:
    """
    The drafts of a publish body, and whether it was a batch.

    @raise JsonError: 400 for anything malformed.
    """
    try:
        obj = loads(body)
    except ValueError:
        raise _bad("invalid_json", "the body is not valid JSON (or has a number out of range)") from None
    if not isinstance(obj, dict):
        raise _bad("invalid_body", "the body must be a JSON object: {channel, data} or {events: [...]}")
    # loads refused escaped lone surrogates; one written raw (UTF-8 bytes ED A0 80..)
    # needs a non-ASCII byte, so an ASCII body is not encoded a second time here
    if not body.isascii():
        try:
            dumps(obj)
        except UnicodeEncodeError:
            raise _bad("invalid_json", "the body has a lone surrogate (\\ud800-\\udfff) in a string") from None
    if "events" in obj:
        extra = sorted(set(obj) - {"events"})
        if extra:
            raise _bad("invalid_body", f"a batch has only 'events', not {extra[0]!r}")
        events = obj["events"]
        if not isinstance(events, list) or not events:
            raise _bad("invalid_body", "'events' must be a non-empty list of event objects")
        if len(events) > MAX_BATCH:
            raise _bad("too_many_events", f"at most {MAX_BATCH} events per request, got {len(events)}")
        return [_event_draft(e, f"events[{i}]") for i, e in enumerate(events)], True
    return [_event_draft(obj, "the event")], False


def _caller(app: App, request: Request) -> Principal:
    """The authenticated caller; anonymous callers are refused with 401."""
    return require(app.principal(request))


class Publish(JsonResource):
    """C{POST /api/publish}."""

    #: a publish is journaled and fanned out whether or not its client waits
    #: for the answer: the handler runs on to count it (rt_events_in_total)
    finish_when_gone = True

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    def handle_POST(self, request: Request) -> Deferred[Reply]:
        """
        One publish: answered once durable.  A Deferred chain, not a
        coroutine: this is the ingest hot path, and the coroutine's own
        Deferred and resumption were ~7 % of the reactor's samples.
        """
        no_subpath(request)
        principal = _caller(self.app, request)
        if not is_json_media(media_type(request.getHeader(b"content-type"))):
            raise JsonError(415, "unsupported_media_type", "send the body as Content-Type: application/json")
        assert request.content is not None
        drafts, batch = parse_publish(request.content.read())
        scope = principal.scope
        for d in drafts:
            if not principal.can_publish(d.channel):
                raise AuthError("forbidden", f"this token may not publish to {d.channel!r}", 403)
            d.scope = scope
        return self.app.broker.publish(drafts).addCallback(self._accepted, batch)

    def _accepted(self, accepted: list[Accepted], batch: bool) -> Reply:
        fresh = sum(1 for a in accepted if not a.duplicate)
        if fresh:
            self.app.stats.events_in["api"] += fresh
        if batch:
            return Reply(202, {"events": [a.receipt() for a in accepted]})
        return Reply(202, accepted[0].receipt())


class Channels(JsonResource):
    """C{GET /api/channels} and C{GET /api/channels/<name>/history}."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    async def handle_GET(self, request: Request) -> dict[str, Any]:
        post = request.postpath or []
        if not post or post == [b""]:
            return await self._list(request)
        if len(post) == 2 and post[1] == b"history":
            return await self._history(request, post[0])
        if len(post) == 2 and post[1] == b"presence":
            return await self._presence(request, post[0])
        raise JsonError(404, "not_found", f"no route for {request.path.decode('utf-8', 'replace')}")

    async def _list(self, request: Request) -> dict[str, Any]:
        principal = _caller(self.app, request)
        channels = await self.app.broker.channels()
        presence = self.app.presence
        config = self.app.config
        if presence is not None and any(r.presence for r in config.channels):
            counts = await presence.counts()
            known = {c["name"] for c in channels}
            broker = self.app.broker
            # presence channels with members but no event yet are listed too
            channels += [{"name": name, "subscribers": broker.local_subscribers(name), "last_offset": 0}
                         for name in counts if name not in known]
            channels.sort(key=lambda c: str(c["name"]))
            for c in channels:
                rule = config.rule(c["name"])
                if rule is not None and rule.presence:
                    c["members"] = counts.get(c["name"], 0)
        if not principal.admin:
            channels = [c for c in channels if principal.can_read(c["name"])]
        return {"channels": channels}

    async def _presence(self, request: Request, raw_name: bytes) -> dict[str, Any]:
        principal = _caller(self.app, request)
        try:
            channel = validate_channel(raw_name.decode("utf-8"))
        except (UnicodeDecodeError, ChannelError) as e:
            raise _bad("invalid_channel", f"{e}") from None
        if not principal.can_subscribe(channel):
            raise AuthError("forbidden", f"this token may not subscribe to {channel!r}", 403)
        rule = self.app.config.rule(channel)
        presence = self.app.presence
        if presence is None or rule is None or not rule.presence:
            raise JsonError(404, "presence_off", f"{channel!r} has no presence (a [[channels]] rule with presence = true)")
        members = await presence.members(channel)
        if len(members) < MAX_MEMBERS_LISTED:
            return {"channel": channel, "members": members, "count": len(members)}
        # the list is capped: the count is the channel's, "more" says members were left out
        count = (await presence.counts()).get(channel, len(members))
        return {"channel": channel, "members": members, "count": count, "more": count > len(members)}

    async def _history(self, request: Request, raw_name: bytes) -> dict[str, Any]:
        principal = self.app.principal(request)
        try:
            channel = validate_channel(raw_name.decode("utf-8"))
        except (UnicodeDecodeError, ChannelError) as e:
            raise _bad("invalid_channel", f"{e}") from None
        since = int_arg(request, "since", 0, 0, MAX_OFFSET)
        limit = int_arg(request, "limit", DEFAULT_HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT)
        if not principal.can_read(channel):
            if principal.anonymous:
                require(principal)
            raise AuthError("forbidden", f"this token may not read {channel!r}", 403)
        events = await self.app.broker.history(channel, since, limit)
        last = await self.app.broker.last_offset(channel)
        if events:
            last = max(last, events[-1].offset)
        body: dict[str, Any] = {
            "events": [e.public() for e in events],
            "last_offset": last,
            "more": bool(events) and events[-1].offset < last,
        }
        # events after since already trimmed: the page starts at the oldest kept one
        if (events[0].offset > since + 1) if events else last > since:
            body["truncated"] = True
        return body


class Users(JsonResource):
    """C{POST /api/users/<user>/disconnect} (API keys only)."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    async def handle_POST(self, request: Request) -> dict[str, Any]:
        post = request.postpath or []
        if len(post) != 2 or post[1] != b"disconnect" or not post[0]:
            raise JsonError(404, "not_found", f"no route for {request.path.decode('utf-8', 'replace')}")
        principal = _caller(self.app, request)
        if not principal.admin:
            raise AuthError("forbidden", "only an API key may disconnect users", 403)
        try:
            user = post[0].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("invalid_user", "the user name is not UTF-8") from None
        if len(user) > MAX_USER_LENGTH:
            raise _bad("invalid_user", f"a user name has at most {MAX_USER_LENGTH} characters")
        registry = self.app.connections
        n = await registry.disconnect(user) if registry is not None else 0
        return {"user": user, "disconnected": n}


class StatsPage(JsonResource):
    """C{GET /api/stats}."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    async def handle_GET(self, request: Request) -> dict[str, Any]:
        no_subpath(request)
        _caller(self.app, request)
        return self.app.stats.snapshot()


class Metrics(JsonResource):
    """
    C{GET /metrics}: the Prometheus text format 0.0.4, or OpenMetrics when
    the scraper's C{Accept} asks for it.
    """

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    async def handle_GET(self, request: Request) -> Reply:
        no_subpath(request)
        accept = request.getHeader(b"accept") or b""
        encode, content_type = choose_encoder(accept.decode("latin-1"))
        return Reply(200, encode(self.app.stats.registry), content_type=content_type.encode("ascii"))


class ApiRoot(Root):
    """C{/api} itself: a JSON 404 (its children are the routes)."""

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return error_body("not_found", "see /openapi.json for the API's routes")


def mount(root: Resource, app: App) -> None:
    """Put C{/api/*} and C{/metrics} under C{root}."""
    api = ApiRoot()
    api.putChild(b"publish", Publish(app))
    api.putChild(b"channels", Channels(app))
    api.putChild(b"stats", StatsPage(app))
    api.putChild(b"users", Users(app))
    root.putChild(b"api", api)
    root.putChild(b"metrics", Metrics(app))
    broker = app.broker
    app.stats.ready = lambda: bool(broker.ready)


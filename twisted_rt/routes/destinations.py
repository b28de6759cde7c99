# -*- test-case-name: tests.test_dest_api -*-
"""
The API of outgoing webhooks (C{[[destinations]]}), for API keys only:

  - C{GET /api/destinations}: every destination with its state and counters;
  - C{GET /api/destinations/<name>/dead?limit=N}: its dead letters, the most recent first;
  - C{POST /api/destinations/<name>/retry} C{{}} (every dead letter) or C{{"ids": [...]}};
  - C{POST /api/destinations/<name>/replay} C{{"since": {"<channel>": <offset>}}}:
    the journaled events after those offsets are sent again (at most
    L{twisted_rt.outbound._engine.MAX_REPLAY} per request; C{"more": true} says there were more);
  - C{POST /api/destinations/<name>/pause} and C{/resume}.

An unknown name is 404 C{unknown_destination}; a JWT is 403 (these routes
change what backends receive: the operator's API key only).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from twisted_rt.app import App
from twisted_rt.core.auth import require
from twisted_rt.core.event import loads
from twisted_rt.core.matcher import ChannelError, validate_channel
from twisted_rt.interfaces import AuthError
from twisted_rt.outbound import Outbound
from twisted_rt.web.resource import (
    MAX_INT,
    JsonError,
    JsonResource,
    int_arg,
    is_json_media,
    json_page,
    media_type,
    no_subpath,
)

__all__ = ["MAX_DEAD_LIMIT", "MAX_IDS", "Action", "Dead", "Destinations", "mount"]

#: C{limit} of the dead-letter list: default and maximum
DEFAULT_DEAD_LIMIT = 100
MAX_DEAD_LIMIT = 1000
#: ids in one retry request, channels in one replay request
MAX_IDS = 1000


#: query parameters of a destination URL whose values are served as REDACTED
_SECRET_PARAM = re.compile(r"token|key|secret|sig|pass|auth|code|credential|session", re.IGNORECASE)


def redact_url(url: str) -> str:
    """C{url} as C{GET /api/destinations} shows it: a password and secret-looking query values REDACTED."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = (userinfo.split(":", 1)[0] + ":REDACTED@" if ":" in userinfo else userinfo + "@") + host
    query = "&".join(
        f"{k}=REDACTED" if sep and _SECRET_PARAM.search(k) else f"{k}{sep}{v}"
        for k, sep, v in (item.partition("=") for item in parts.query.split("&"))
    ) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _bad(message: str, code: str = "invalid_body") -> JsonError:
    return JsonError(400, code, message)


class _Base(JsonResource):
    def __init__(self, app: App, name: str = "", action: str = "") -> None:
        super().__init__()
        self.app = app
        self.name = name
        self.action = action

    def _admin(self, request: Request) -> Outbound | None:
        principal = require(self.app.principal(request))
        if not principal.admin:
            raise AuthError("forbidden", "the destinations API needs an API key", 403)
        return self.app.outbound

    def _target(self, request: Request) -> Outbound:
        no_subpath(request)
        outbound = self._admin(request)
        if outbound is None or self.name not in outbound.workers:
            raise JsonError(404, "unknown_destination", f"no destination is called {self.name[:80]!r}")
        return outbound


class Destinations(_Base):
    """C{GET /api/destinations}; its children are C{<name>/<action>}."""

    isLeaf = False

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"" and not request.postpath:
            return self
        name = path.decode("utf-8", "replace")
        post = request.postpath or []
        action = post[0] if len(post) == 1 else b""
        if action == b"dead":
            request.postpath = []
            return Dead(self.app, name)
        if action in (b"retry", b"replay", b"pause", b"resume"):
            request.postpath = []
            return Action(self.app, name, action.decode("ascii"))
        return json_page(404, "not_found", f"no route for {request.path.decode('utf-8', 'replace')}")

    async def handle_GET(self, request: Request) -> dict[str, Any]:
        no_subpath(request)
        outbound = self._admin(request)
        rows = await outbound.describe() if outbound is not None else []
        for row in rows:
            if isinstance(row.get("url"), str):
                row["url"] = redact_url(row["url"])
        return {"destinations": rows}


class Dead(_Base):
    """C{GET /api/destinations/<name>/dead?limit=N}."""

    async def handle_GET(self, request: Request) -> dict[str, Any]:
        outbound = self._target(request)
        limit = int_arg(request, "limit", DEFAULT_DEAD_LIMIT, 1, MAX_DEAD_LIMIT)
        return {"destination": self.name, "dead": await outbound.dead(self.name, limit)}


class Action(_Base):
    """C{POST /api/destinations/<name>/(retry|replay|pause|resume)}."""

    #: a retry or replay writes the queue, then tells the workers (on every
    #: node) to look at it: an admin who hangs up in between must not leave
    #: revived or replayed rows unseen until something else wakes the worker
    finish_when_gone = True

    async def handle_POST(self, request: Request) -> dict[str, Any]:
        outbound = self._target(request)
        name = self.name
        body = self._body(request)
        if self.action == "retry":
            ids = body.get("ids")
            if ids is not None and (
                not isinstance(ids, list) or len(ids) > MAX_IDS or not all(isinstance(i, str) for i in ids)
            ):
                raise _bad(f"'ids' must be a list of at most {MAX_IDS} event ids")
            _only(body, {"ids"})
            return {"destination": name, "retried": await outbound.retry(name, ids)}
        if self.action == "replay":
            _only(body, {"since"})
            since = _since(body.get("since"))
            queued, more = await outbound.replay(name, since)
            return {"destination": name, "queued": queued, "more": more}
        _only(body, set())
        await outbound.set_paused(name, self.action == "pause")
        return {"destination": name, "state": "paused" if self.action == "pause" else "active"}

    def _body(self, request: Request) -> dict[str, Any]:
        assert request.content is not None
        raw = request.content.read()
        if not raw.strip():
            return {}
        if not is_json_media(media_type(request.getHeader(b"content-type"))):
            raise JsonError(415, "unsupported_media_type", "send the body as Content-Type: application/json")
        try:
            body = loads(raw)
        except ValueError:
            raise _bad("the body is not valid JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body


def _only(body: dict[str, Any], keys: set[str]) -> None:
    extra = sorted(set(body) - keys)
    if extra:
        raise _bad(f"unknown field {extra[0]!r}")


def _since(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise _bad("'since' must be an object of channel names to offsets, e.g. {\"github.push\": 41}")
    if len(value) > MAX_IDS:
        raise _bad(f"'since' names at most {MAX_IDS} channels")
    out: dict[str, int] = {}
    for channel, offset in value.items():
        try:
            validate_channel(channel)
        except ChannelError as e:
            raise _bad(f"since: {e}", "invalid_channel") from None
        if type(offset) is not int or not 0 <= offset <= MAX_INT:
            raise _bad(f"since[{channel!r}] must be an offset (an integer from 0)")
        out[channel] = offset
    return out


def mount(root: Resource, app: App) -> None:
    """Put C{/api/destinations} under the C{/api} child of C{root}."""
    root.children[b"api"].putChild(b"destinations", Destinations(app))

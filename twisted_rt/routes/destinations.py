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

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from twisted_rt.app import App
from twisted_rt.core.auth import require
from twisted_rt.core.event import loads
from twisted_rt.core.matcher import ChannelError, validate_channel
from twisted_rt.interfaces import AuthError
from twisted_rt.outbound import Outbound, UnknownDestination
from twisted_rt.web.resource import MAX_INT, JsonError, JsonResource, int_arg, is_json_media, media_type

__all__ = ["MAX_DEAD_LIMIT", "MAX_IDS", "Destinations", "mount"]

#: C{limit} of the dead-letter list: default and maximum
DEFAULT_DEAD_LIMIT = 100
MAX_DEAD_LIMIT = 1000
#: ids in one retry request, channels in one replay request
MAX_IDS = 1000


def _bad(message: str, code: str = "invalid_body") -> JsonError:
    return JsonError(400, code, message)


class Destinations(JsonResource):
    """C{/api/destinations} and its children."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    def _admin(self, request: Request) -> Outbound | None:
        principal = require(self.app.principal(request))
        if not principal.admin:
            raise AuthError("forbidden", "the destinations API needs an API key", 403)
        return self.app.outbound

    def _target(self, request: Request, action: bytes) -> tuple[Outbound, str]:
        outbound = self._admin(request)
        post = request.postpath or []
        if len(post) != 2 or post[1] != action:
            raise JsonError(404, "not_found", f"no route for {request.path.decode('utf-8', 'replace')}")
        name = post[0].decode("utf-8", "replace")
        if outbound is None or name not in outbound.workers:
            raise JsonError(404, "unknown_destination", f"no destination is called {name!r}")
        return outbound, name

    async def handle_GET(self, request: Request) -> dict[str, Any]:
        post = request.postpath or []
        if not post or post == [b""]:
            outbound = self._admin(request)
            return {"destinations": await outbound.describe() if outbound is not None else []}
        outbound, name = self._target(request, b"dead")
        limit = int_arg(request, "limit", DEFAULT_DEAD_LIMIT, 1, MAX_DEAD_LIMIT)
        return {"destination": name, "dead": await outbound.dead(name, limit)}

    async def handle_POST(self, request: Request) -> dict[str, Any]:
        post = request.postpath or []
        action = post[1] if len(post) == 2 else b""
        if action not in (b"retry", b"replay", b"pause", b"resume"):
            self._admin(request)
            raise JsonError(404, "not_found", f"no route for {request.path.decode('utf-8', 'replace')}")
        outbound, name = self._target(request, action)
        body = self._body(request)
        try:
            if action == b"retry":
                ids = body.get("ids")
                if ids is not None and (
                    not isinstance(ids, list) or len(ids) > MAX_IDS or not all(isinstance(i, str) for i in ids)
                ):
                    raise _bad(f"'ids' must be a list of at most {MAX_IDS} event ids")
                _only(body, {"ids"})
                return {"destination": name, "retried": await outbound.retry(name, ids)}
            if action == b"replay":
                _only(body, {"since"})
                since = _since(body.get("since"))
                queued, more = await outbound.replay(name, since)
                return {"destination": name, "queued": queued, "more": more}
            _only(body, set())
            await outbound.set_paused(name, action == b"pause")
            return {"destination": name, "state": "paused" if action == b"pause" else "active"}
        except UnknownDestination:  # pragma: no cover - checked above
            raise JsonError(404, "unknown_destination", f"no destination is called {name!r}") from None

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

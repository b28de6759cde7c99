# -*- test-case-name: tests.test_inspector -*-
"""
The people-facing routes: the live inspector page and the browser client.

- C{GET /}: the inspector (C{static/index.html}), a single static page that
  uses only the public API and C{/ws} through C{client.js};
- C{GET /client.js}: the browser client (WebSocket, reconnect with backoff,
  resume by per-channel offset), includable by users;
- C{GET /static/<file>}: the page's stylesheet and script;
- C{GET /api/raw/<channel>/<offset>}: one journaled event's original request
  body and headers, as C{{"id","channel","offset","source","type","headers",
  "body_base64"}} (C{headers} and C{body_base64} are C{null} for events that
  did not arrive as a webhook).  It needs the right to read the channel (an
  API key, or a JWT whose C{subscribe} covers it).  C{twisted-rt tail
  --forward} uses it to re-deliver the original bytes.  Headers that carry
  a secret (L{twisted_rt.routes.verify.SECRET_HEADERS} and the source's
  C{redact_headers}) are never served, even from rows journaled before
  ingest stopped storing them.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from twisted_rt.app import App
from twisted_rt.core.config import Config
from twisted_rt.core.matcher import ChannelError, validate_channel
from twisted_rt.routes.verify import secret_headers
from twisted_rt.web.resource import JsonError, JsonResource, Root, ascii_int, error_body, json_page

__all__ = ["RAW_PATH", "RawEvent", "StaticFile", "mount"]

STATIC = Path(__file__).resolve().parent.parent / "static"

#: Where L{RawEvent} is mounted (below the root).
RAW_PATH = (b"api", b"raw")

_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}

_NO_SUCH_FILE = error_body("not_found", "no such file")

# The page loads nothing from elsewhere; say so to the browser.
_CSP = (
    b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    b"style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class StaticFile(Resource):
    """One file of C{static/}, read once and served from memory."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        path = STATIC / name
        self.body = path.read_bytes()
        self.content_type = _TYPES.get(path.suffix, b"application/octet-stream")

    def render_GET(self, request: Request) -> bytes:
        """The file, with no-cache (it changes with the daemon) and a strict CSP."""
        if request.postpath and request.postpath != [b""]:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return _NO_SUCH_FILE
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if self.content_type.startswith(b"text/html"):
            request.setHeader(b"content-security-policy", _CSP)
            request.setHeader(b"referrer-policy", b"no-referrer")
        return self.body

    def render_HEAD(self, request: Request) -> bytes:
        """Like GET (Twisted drops the body)."""
        return self.render_GET(request)


class StaticDir(Resource):
    """C{/static/}: the page's assets, and a JSON 404 for anything else."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        for n in names:
            self.putChild(n.encode("ascii"), StaticFile(n))

    def getChild(self, path: bytes, request: Request) -> IResource:
        return json_page(404, "not_found", "no such file")


def served_headers(headers: dict[str, str] | None, source: str, config: Config) -> dict[str, str] | None:
    """
    The stored request headers of an event of C{source} as they may be
    served: without the secret-bearing ones (case-insensitively), whatever
    the journal holds.
    """
    if headers is None:
        return None
    drop = secret_headers(config.source(source))
    return {k: v for k, v in headers.items() if k.lower() not in drop}


class RawEvent(JsonResource):
    """C{GET /api/raw/<channel>/<offset>}: an event's original body and headers."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    async def handle_GET(self, request: Request) -> dict[str, Any]:
        """The raw body (base64) and headers of one journaled event."""
        # Twisted has already percent-decoded each segment
        parts = [p.decode("utf-8", "replace") for p in request.postpath or [] if p]
        if len(parts) != 2:
            raise JsonError(404, "not_found", "use /api/raw/<channel>/<offset>")
        channel, offset_text = parts
        try:
            validate_channel(channel)
        except ChannelError as e:
            raise JsonError(400, "invalid_channel", str(e)) from None
        offset = ascii_int(offset_text)
        if offset is None or offset < 1:
            raise JsonError(400, "invalid_offset", "the offset must be a positive integer")
        principal = self.app.principal(request)
        if not principal.can_read(channel):
            if principal.anonymous:
                raise JsonError(
                    401, "unauthorized", "an API key or a token that may subscribe to this channel is needed",
                    {"WWW-Authenticate": "Bearer"},
                )
            raise JsonError(403, "forbidden", f"this token may not read {channel!r}")
        events = await self.app.broker.history(channel, offset - 1, 1)
        if not events or events[0].offset != offset:
            raise JsonError(404, "not_found", f"{channel!r} has no event at offset {offset} (any more)")
        ev = events[0]
        return {
            "id": ev.id,
            "channel": ev.channel,
            "offset": ev.offset,
            "source": ev.source,
            "type": ev.type,
            "headers": served_headers(ev.headers, ev.source, self.app.config),
            "body_base64": base64.b64encode(ev.raw).decode("ascii") if ev.raw is not None else None,
        }


def _api_parent(root: Resource) -> Resource | None:
    """The C{/api} resource children can be added to, creating it if there is none."""
    api = root.children.get(RAW_PATH[0])
    if api is None:
        api = Root()
        root.putChild(RAW_PATH[0], api)
    if isinstance(api, Resource) and not api.isLeaf:
        return api
    return None


def mount(root: Resource, app: App) -> None:
    """Put the inspector page, the browser client and the raw-event route under C{root}."""
    page = StaticFile("index.html")
    root.putChild(b"", page)
    root.putChild(b"index.html", page)
    root.putChild(b"client.js", StaticFile("client.js"))
    root.putChild(b"static", StaticDir(["inspector.css", "inspector.js", "destinations.js"]))
    api = _api_parent(root)
    if api is not None:
        api.putChild(RAW_PATH[1], RawEvent(app))

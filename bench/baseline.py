# mypy: disallow-untyped-calls=False
"""
THE BASELINE -- not twisted_rt.

What a Python team would otherwise write in an afternoon: a plain Autobahn
broadcast server on Twisted.  A factory keeps a set of clients per channel and
C{sendMessage}s every published event to each of them in a loop, and plain
C{twisted.web} resources take the publishes and the webhooks.  It speaks just
enough of twisted_rt's protocol for the same load generator to drive both:

  - C{GET /ws}: WebSocket; C{{"op":"subscribe","channel":C,"since":N}} is
    answered with C{{"op":"subscribed"}}, then the kept events after C{N} (an
    in-memory list: no durability), then live ones;
  - C{POST /api/publish}: C{{"channel","data"}} or C{{"events":[...]}}; each
    event is JSON-encoded once and C{sendMessage}d to every subscriber;
  - C{POST /hooks/<anything>}: the bare POST resource -- reads the body and
    answers C{202 {}} (no signature check, nothing stored);
  - C{GET /healthz}: C{200}.

No auth, no journal, no access log (as in the bench config of the daemon).

Run: C{python -m bench.baseline --port 8081}.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = ["BroadcastFactory", "make_site", "main"]

_KEEP = 200000  # events kept per channel for "since"


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class BroadcastProtocol(WebSocketServerProtocol):
    """One subscriber: joins channels on C{subscribe}, leaves on close."""

    factory: BroadcastFactory

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        msg = json.loads(payload)
        op = msg.get("op")
        ref = msg.get("ref")
        if op == "subscribe":
            channel = msg["channel"]
            self.sendMessage(json.dumps({"op": "subscribed", "channel": channel, "ref": ref}).encode())
            since = msg.get("since")
            if isinstance(since, int):
                for m in self.factory.after(channel, since):
                    self.sendMessage(m)
            self.factory.clients.setdefault(channel, set()).add(self)
        elif op == "ping":
            self.sendMessage(json.dumps({"op": "pong", "ref": ref}).encode())

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        for clients in self.factory.clients.values():
            clients.discard(self)


class BroadcastFactory(WebSocketServerFactory):
    """The set of clients per channel, and the events kept for C{since}."""

    protocol = BroadcastProtocol  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.clients: dict[str, set[BroadcastProtocol]] = {}
        self.kept: dict[str, list[bytes]] = {}
        self.first: dict[str, int] = {}
        self.offsets: dict[str, int] = {}

    def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """Encode once, keep, and C{sendMessage} to every subscriber."""
        offset = self.offsets.get(channel, 0) + 1
        self.offsets[channel] = offset
        eid = uuid.uuid4().hex
        payload = json.dumps(
            {"op": "event", "channel": channel, "offset": offset, "id": eid, "time": _now_iso(),
             "source": "api", "type": "", "data": data},
            separators=(",", ":"),
        ).encode()
        kept = self.kept.setdefault(channel, [])
        self.first.setdefault(channel, offset)
        kept.append(payload)
        if len(kept) > 2 * _KEEP:
            del kept[:_KEEP]
            self.first[channel] += _KEEP
        for client in self.clients.get(channel, ()):
            client.sendMessage(payload)
        return {"id": eid, "channel": channel, "offset": offset}

    def after(self, channel: str, since: int) -> list[bytes]:
        """The kept events of C{channel} after offset C{since}."""
        kept = self.kept.get(channel, [])
        start = max(0, since + 1 - self.first.get(channel, 1))
        return kept[start:]


class Publish(Resource):
    """C{POST /api/publish}."""

    isLeaf = True

    def __init__(self, factory: BroadcastFactory) -> None:
        super().__init__()
        self.factory = factory

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        body = json.loads(request.content.read())
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        if "events" in body:
            out: Any = [self.factory.publish(e["channel"], e.get("data")) for e in body["events"]]
        else:
            out = self.factory.publish(body["channel"], body.get("data"))
        return json.dumps(out).encode()


class Hook(Resource):
    """C{POST /hooks/<source>}: the bare POST resource."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        request.content.read()
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        return b"{}"


class Health(Resource):
    """C{GET /healthz}."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"{}"


class QuietSite(Site):
    """A C{Site} with the access log off (the bench config of the daemon does the same)."""

    def log(self, request: Request) -> None:  # type: ignore[override]
        pass


def make_site() -> Site:
    """The baseline's whole resource tree."""
    factory = BroadcastFactory()
    root = Resource()
    api = Resource()
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"api", api)
    api.putChild(b"publish", Publish(factory))
    root.putChild(b"hooks", Hook())
    root.putChild(b"healthz", Health())
    return QuietSite(root)


def main(argv: list[str] | None = None) -> None:
    """Listen on 127.0.0.1 and run the reactor."""
    parser = argparse.ArgumentParser(description="the plain Autobahn broadcast baseline")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    reactor.listenTCP(args.port, make_site(), interface="127.0.0.1")  # type: ignore[arg-type]
    print(f"baseline listening on 127.0.0.1:{args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()

# -*- test-case-name: tests.test_client,tests.test_cli_client -*-
"""
Clients of a twisted_rt daemon: a Twisted WebSocket subscriber that survives
restarts, and the C{twisted-rt publish} / C{twisted-rt tail} commands.

The Twisted client::

    from twisted.internet import reactor
    from twisted_rt.client import subscribe

    def on_event(event):            # the contract's event object, a dict
        print(event["channel"], event["offset"], event["data"])

    sub = subscribe(["github.*"], on_event, url="ws://127.0.0.1:8080/ws", token="…")
    ...
    sub.stop()                      # a Deferred that fires once closed

It remembers the last offset seen on every channel.  When the connection
drops (daemon restart, network, a C{1013} slow-consumer close) it reconnects
with exponential backoff (and jitter) and subscribes again with C{since} set
to those offsets, so the daemon replays exactly what was missed; an event at
or below an offset already delivered is never passed on twice.  C{since}
(an int for a channel, C{{channel: offset}} for a pattern) starts from an
older point.  With C{since=None} and C{start_at_end=True} (the default) the
client first asks C{GET /api/channels} for the current last offsets, so even
channels it has not seen an event of yet resume without a gap.

Without Twisted, the same resume rule with the plain C{websocket-client}
package (C{pip install websocket-client})::

    import json, time, websocket

    def follow(pattern, handle, url="ws://127.0.0.1:8080/ws", token=None):
        last = {}                                   # channel -> last offset seen
        while True:
            try:
                ws = websocket.create_connection(
                    url, header=[f"Authorization: Bearer {token}"] if token else [])
                sub = {"op": "subscribe", "channel": pattern}
                if last:
                    sub["since"] = dict(last)       # replay what was missed
                ws.send(json.dumps(sub))
                while True:
                    msg = json.loads(ws.recv())
                    if msg["op"] == "event" and msg["offset"] > last.get(msg["channel"], 0):
                        last[msg["channel"]] = msg["offset"]
                        handle(msg)
                    elif msg["op"] == "error":
                        raise SystemExit(msg["message"])
            except (websocket.WebSocketException, OSError):
                time.sleep(1)                       # the daemon restarts: retry

C{twisted-rt tail --forward URL} re-delivers each event's original request
body and headers (from C{GET /api/raw/<channel>/<offset>}) to a local URL,
the smee-client use case, retrying while the local server is down.  Headers
that carry a secret (C{Authorization}, C{Cookie}, C{Proxy-Authorization},
C{X-Gitlab-Token}: L{twisted_rt.web.outgoing.SECRET_HEADERS}) are never forwarded,
even if an older daemon serves them; signatures (C{X-Hub-Signature-256},
C{webhook-signature}, ...) are, so the provider's own check still passes.
"""

from __future__ import annotations

import base64
import json
import random
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterable, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_rt.core.matcher import is_wildcard, matches
from twisted_rt.interfaces import Reactor
from twisted_rt.web.outgoing import FORWARD_DROPPED_HEADERS, BytesBody

__all__ = [
    "Forwarder",
    "Subscription",
    "http_base",
    "publish_main",
    "subscribe",
    "tail_main",
    "ws_url",
]

log = Logger()

EventCallback = Callable[[dict[str, Any]], Any]

# Request headers never copied when forwarding: hop-by-hop or recomputed,
# and those that carry a secret.
_SKIP_HEADERS = FORWARD_DROPPED_HEADERS


def http_base(ws_url: str) -> str:
    """The daemon's HTTP base URL for its C{/ws} URL (C{ws://h:p/ws} -> C{http://h:p})."""
    u = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme, u.scheme)
    path = u.path
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    return urllib.parse.urlunsplit((scheme, u.netloc, path.rstrip("/"), "", ""))


def ws_url(url: str) -> str:
    """
    The C{/ws} URL for what a user typed: C{ws://} and C{wss://} URLs as
    they are, C{http://h:p} (the daemon's base URL) as C{ws://h:p/ws}.
    """
    u = urllib.parse.urlsplit(url)
    if u.scheme in ("http", "https"):
        path = u.path.rstrip("/")
        if not path.endswith("/ws"):
            path += "/ws"
        return urllib.parse.urlunsplit(({"http": "ws", "https": "wss"}[u.scheme], u.netloc, path, u.query, ""))
    return url


def _endpoint_description(ws_url: str) -> str:
    u = urllib.parse.urlsplit(ws_url)
    if u.scheme not in ("ws", "wss") or not u.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {ws_url!r}")
    host = u.hostname.replace(":", r"\:")
    if u.scheme == "wss":
        return f"tls:{host}:{u.port or 443}"
    return f"tcp:host={host}:port={u.port or 80}"


class _Protocol(WebSocketClientProtocol):
    """One connection of a L{Subscription}."""

    factory: _Factory

    def onOpen(self) -> None:
        self.factory.subscription._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            return
        try:
            msg = json.loads(payload)
        except ValueError:
            log.warn("the server sent a frame that is not JSON", log_category="RT-C-JSON")
            return
        if isinstance(msg, dict):
            self.factory.subscription._message(msg)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        sub = self.factory.subscription
        sub.last_close = (code, reason)
        status = getattr(self, "http_status_line", None) or ""
        parts = status.split() if isinstance(status, str) else []
        # an upgrade refused with an HTTP status (401: the token is bad or expired)
        sub.last_refusal = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() and parts[1] != "101" else None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.subscription._lost(self)


class _Factory(WebSocketClientFactory):
    protocol = _Protocol  # type: ignore[assignment]

    def __init__(self, subscription: Subscription, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.subscription = subscription


class Subscription:
    """
    A reconnecting, resuming WebSocket subscription (see the module docstring).

    @ivar offsets: the last offset delivered per channel.
    @ivar state: C{"connecting"}, C{"open"}, C{"waiting"} (for a reconnect)
        or C{"stopped"}.
    @ivar connections: how many times a WebSocket was opened.
    """

    log = Logger()

    def __init__(
        self,
        patterns: Iterable[str],
        callback: EventCallback,
        since: int | dict[str, int] | None = None,
        url: str = "ws://127.0.0.1:8080/ws",
        token: str | None = None,
        reactor: Reactor | None = None,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        ping_interval: float = 20.0,
        ping_timeout: float = 10.0,
        on_error: Callable[[dict[str, Any]], Any] | None = None,
        on_state: Callable[[str], Any] | None = None,
        start_at_end: bool = True,
        on_presence: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.patterns = list(dict.fromkeys(patterns))
        if not self.patterns:
            raise ValueError("subscribe to at least one channel or pattern")
        self.callback = callback
        self.since = since
        self.url = url
        self.token = token
        self.reactor = reactor
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.on_error = on_error
        self.on_state = on_state
        #: called with each C{join} and C{leave} message of a presence channel subscribed to
        self.on_presence = on_presence
        #: per pattern resubscribed with C{since}: whether the server still had every event after it
        self.recovered: dict[str, bool] = {}
        self._presence_calls: dict[str, Deferred[list[dict[str, Any]]]] = {}
        self.start_at_end = start_at_end and since is None
        self.offsets: dict[str, int] = {}
        self.state = "waiting"
        self.connections = 0
        self.last_close: tuple[int | None, str | None] | None = None
        #: the HTTP status of the last refused upgrade (401: a bad or expired token), else C{None}
        self.last_refusal: int | None = None
        self._attempt = 0
        self._proto: _Protocol | None = None
        self._call: IDelayedCall | None = None
        self._connecting: Deferred[Any] | None = None
        self._stopped: Deferred[None] | None = None
        self._ref = 0
        if isinstance(since, dict):
            self.offsets.update(since)
        elif isinstance(since, int):
            for p in self.patterns:
                if not is_wildcard(p):
                    self.offsets[p] = since
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._factory = _Factory(self, url=url, headers=headers, reactor=reactor)
        self._factory.setProtocolOptions(
            autoPingInterval=ping_interval or None,
            autoPingTimeout=ping_timeout or None,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=2,
        )
        self._endpoint = clientFromString(reactor, _endpoint_description(url))

    # public

    def start(self) -> Subscription:
        """Connect (called by L{subscribe})."""
        if self.start_at_end:
            d = self._fetch_offsets()
            d.addBoth(lambda _: self._connect())
        else:
            self._connect()
        return self

    def stop(self) -> Deferred[None]:
        """Close for good; fires once the connection is closed."""
        if self._stopped is not None:
            return self._stopped
        self._set_state("stopped")
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._connecting is not None:
            self._connecting.cancel()
        proto = self._proto
        if proto is None:
            self._stopped = succeed(None)
            return self._stopped
        self._stopped = Deferred()
        if proto.state == proto.STATE_OPEN:
            proto.sendClose(1000)  # the close handshake times out after 2 s
        elif proto.transport is not None:
            proto.transport.loseConnection()  # still in the opening handshake
        return self._stopped

    def presence(self, channel: str) -> Deferred[list[dict[str, Any]]]:
        """
        The members of a presence channel (C{op: presence}); fails with
        L{ValueError} when the server answers an error (C{presence_off},
        C{forbidden}) and with L{ConnectionError} while not connected.
        """
        proto = self._proto
        if proto is None or proto.state != proto.STATE_OPEN:
            d: Deferred[list[dict[str, Any]]] = Deferred()
            d.errback(ConnectionError("not connected"))
            return d
        self._ref += 1
        ref = f"p{self._ref}"
        d = self._presence_calls[ref] = Deferred()
        proto.sendMessage(json.dumps({"op": "presence", "channel": channel, "ref": ref}).encode())
        return d

    def since_for(self, pattern: str) -> int | dict[str, int] | None:
        """The C{since} to send for C{pattern} now (offsets seen, else the initial one)."""
        if not is_wildcard(pattern):
            if pattern in self.offsets:
                return self.offsets[pattern]
            return self.since if isinstance(self.since, int) else None
        seen = {ch: off for ch, off in self.offsets.items() if matches(pattern, ch)}
        if seen:
            return seen
        return self.since if isinstance(self.since, int) else None

    # internals

    def _set_state(self, state: str) -> None:
        self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # noqa: BLE001 - a user callback must not break the client
                self.log.failure("on_state callback failed")

    @inlineCallbacks
    def _fetch_offsets(self) -> Any:
        """Best effort: C{since} = the current last offset of every matching channel."""
        from twisted.web.client import Agent

        agent = Agent(self.reactor, connectTimeout=5)
        headers = _headers({"Authorization": f"Bearer {self.token}"} if self.token else {})
        try:
            resp = yield agent.request(b"GET", (http_base(self.url) + "/api/channels").encode(), headers)
            body = yield _read_body(resp)
            if resp.code != 200:
                return
            channels = json.loads(body)["channels"]
        except Exception as e:  # noqa: BLE001 - a best effort; without it we start live
            self.log.debug("could not read the channels' last offsets: {e}", e=e)
            return
        for c in channels:
            name, last = c.get("name"), c.get("last_offset")
            if isinstance(name, str) and isinstance(last, int) and any(matches(p, name) for p in self.patterns):
                self.offsets.setdefault(name, last)
        for p in self.patterns:
            if not is_wildcard(p):
                self.offsets.setdefault(p, 0)

    def _connect(self) -> None:
        self._call = None
        if self._stopped is not None:
            return
        self._set_state("connecting")
        d = self._connecting = self._endpoint.connect(self._factory)

        def failed(f: Failure) -> None:
            self._connecting = None
            if self._stopped is None:
                self.log.info("connecting to {url} failed: {error}", url=self.url, error=f.getErrorMessage())
                self._retry()

        def connected(proto: _Protocol) -> None:
            self._connecting = None
            self._proto = proto

        d.addCallbacks(connected, failed)

    def _retry(self) -> None:
        if self._stopped is not None:
            return
        base = min(self.max_delay, self.min_delay * (2**self._attempt))
        delay = base / 2 + random.random() * base / 2
        self._attempt += 1
        self._set_state("waiting")
        self._call = self.reactor.callLater(delay, self._connect)

    def _opened(self, proto: _Protocol) -> None:
        if self._stopped is not None:
            return
        self._proto = proto
        self._attempt = 0
        self.connections += 1
        self._set_state("open")
        for p in self.patterns:
            self._ref += 1
            msg: dict[str, Any] = {"op": "subscribe", "channel": p, "ref": self._ref}
            since = self.since_for(p)
            if since is not None:
                msg["since"] = since
            proto.sendMessage(json.dumps(msg).encode())

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None
        calls, self._presence_calls = self._presence_calls, {}
        for d in calls.values():
            d.errback(ConnectionError("the connection was lost"))
        if self.last_close is not None and self.last_close[0] == 4003 and self._stopped is None:
            # disconnected by the operator: do not come back with the same token
            self.log.warn("disconnected by the server's operator (close 4003); not reconnecting")
            self._stopped = succeed(None)
            self._set_state("stopped")
            return
        if self._stopped is not None:
            if not self._stopped.called:
                self._stopped.callback(None)
            return
        self.log.info("connection to {url} lost ({close}); reconnecting", url=self.url, close=self.last_close)
        self._retry()

    def _message(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "event":
            channel, offset = msg.get("channel"), msg.get("offset")
            if not isinstance(channel, str) or not isinstance(offset, int):
                return
            seen = self.offsets.get(channel)
            if seen is None and isinstance(self.since, int):
                seen = self.since  # a wildcard's floor, for channels not seen yet
            if seen is not None and offset <= seen:
                return
            self.offsets[channel] = offset
            event = {k: v for k, v in msg.items() if k != "op"}
            try:
                self.callback(event)
            except Exception:  # noqa: BLE001 - a user callback must not break the client
                self.log.failure("the event callback failed on {channel}#{offset}", channel=channel, offset=offset)
        elif op in ("join", "leave"):
            if self.on_presence is not None:
                try:
                    self.on_presence(msg)
                except Exception:  # noqa: BLE001 - a user callback must not break the client
                    self.log.failure("the presence callback failed")
        elif op == "subscribed":
            if isinstance(msg.get("recovered"), bool) and isinstance(msg.get("channel"), str):
                self.recovered[msg["channel"]] = msg["recovered"]
                if not msg["recovered"]:
                    self.log.warn("events of {channel} after the last one seen were already trimmed"
                                  " (recovered: false)", channel=msg["channel"])
        elif op == "presence" and msg.get("ref") in self._presence_calls:
            self._presence_calls.pop(msg["ref"]).callback(list(msg.get("members") or []))
        elif op == "error" and msg.get("ref") in self._presence_calls:
            self._presence_calls.pop(msg["ref"]).errback(ValueError(f"{msg.get('code')}: {msg.get('message')}"))
        elif op == "error":
            if self.on_error is not None:
                self.on_error(msg)
            else:
                self.log.warn("the server said {code}: {message}", code=msg.get("code"), message=msg.get("message"))


def subscribe(
    patterns: Iterable[str] | str,
    callback: EventCallback,
    since: int | dict[str, int] | None = None,
    url: str = "ws://127.0.0.1:8080/ws",
    token: str | None = None,
    reactor: Reactor | None = None,
    **options: Any,
) -> Subscription:
    """
    Subscribe to channels or patterns and call C{callback(event)} once per
    event, in order, across reconnects.

    @param patterns: channel names or patterns (C{github.*}, C{billing.>}).
    @param callback: called with each event (the contract's event object).
    @param since: the last offset already seen (an int, or C{{channel:
        offset}}); C{None} for events from now on.
    @param url: the daemon's C{ws://}/C{wss://} URL of C{/ws}.
    @param token: an API key or JWT (sent as C{Authorization: Bearer}).
    @param reactor: the reactor (the global one by default).
    @param options: L{Subscription} options (C{min_delay}, C{max_delay},
        C{on_error}, C{on_state}, C{start_at_end}, ping settings).
    @return: the running L{Subscription}; C{.stop()} ends it.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    return Subscription(patterns, callback, since, url, token, reactor, **options).start()


# -- HTTP helpers ---------------------------------------------------------------


def _headers(h: dict[str, str | list[str]]) -> Any:
    from twisted.web.http_headers import Headers

    out = Headers()
    for k, v in h.items():
        out.setRawHeaders(k.encode("latin-1"), [x.encode("latin-1") for x in ([v] if isinstance(v, str) else v)])
    return out


class _Collect(Protocol):
    """Collects a response body (like C{readBody}, without its transport warning)."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _read_body(response: Any) -> Deferred[bytes]:
    d: Deferred[bytes] = Deferred()
    response.deliverBody(_Collect(d))
    return d


@dataclass
class _Delivery:
    body: bytes
    headers: dict[str, str | list[str]]


class Forwarder:
    """
    Re-POSTs events to a local URL in order: a webhook's original body and
    headers (from C{GET /api/raw/...}), else the event's C{data} as JSON.
    Retries with backoff while the target is down or answers 5xx.
    """

    log = Logger()

    def __init__(
        self,
        target: str,
        daemon_url: str,
        token: str | None,
        reactor: Reactor,
        attempts: int = 6,
        min_delay: float = 0.25,
        report: Callable[[str], None] | None = None,
    ) -> None:
        from twisted.web.client import Agent

        self.target = target
        self.base = http_base(daemon_url)
        self.token = token
        self.reactor = reactor
        self.attempts = attempts
        self.min_delay = min_delay
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.agent = Agent(reactor, connectTimeout=10)
        self.forwarded = 0
        self.failed = 0

    @inlineCallbacks
    def original(self, event: dict[str, Any]) -> Any:
        """The request to re-deliver for C{event} (a L{_Delivery})."""
        channel = urllib.parse.quote(str(event["channel"]), safe="")
        url = f"{self.base}/api/raw/{channel}/{int(event['offset'])}"
        auth: dict[str, str | list[str]] = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            resp = yield self.agent.request(b"GET", url.encode(), _headers(auth))
            body = yield _read_body(resp)
            raw = json.loads(body) if resp.code == 200 else None
        except Exception as e:  # noqa: BLE001 - fall back to the JSON data
            self.log.warn("could not fetch the raw body of {url}: {e}", url=url, e=e)
            raw = None
        if raw is None:
            self.report(f"forward: no original body for {event['channel']}#{event['offset']}; sending its data as JSON")
        if isinstance(raw, dict) and raw.get("body_base64") is not None:
            headers: dict[str, str | list[str]] = {}
            for k, v in (raw.get("headers") or {}).items():
                if k.lower() not in _SKIP_HEADERS:
                    headers[k] = v if isinstance(v, (str, list)) else str(v)
            return _Delivery(base64.b64decode(raw["body_base64"]), headers)
        return _Delivery(
            json.dumps(event.get("data"), separators=(",", ":")).encode(),
            {"Content-Type": "application/json"},
        )

    @inlineCallbacks
    def forward(self, event: dict[str, Any]) -> Any:
        """Deliver one event; fires with the final HTTP status (or C{None} if it never got through)."""
        from twisted.internet.task import deferLater

        delivery = yield self.original(event)
        where = f"{event['channel']}#{event['offset']}"
        for attempt in range(self.attempts):
            try:
                resp = yield self.agent.request(
                    b"POST",
                    self.target.encode(),
                    _headers(delivery.headers),
                    BytesBody(delivery.body),
                )
                yield _read_body(resp)
                problem = f"HTTP {resp.code}" if resp.code >= 500 else None
            except Exception as e:  # noqa: BLE001 - retried, then reported
                problem = str(e) or e.__class__.__name__
                resp = None
            if problem is None and resp is not None:
                self.forwarded += 1
                self.report(f"forward: {where} -> {self.target} {resp.code}")
                return resp.code
            if attempt + 1 < self.attempts:
                delay = self.min_delay * (2**attempt)
                self.report(f"forward: {where} -> {self.target} failed ({problem}); retrying in {delay:.2g} s")
                yield deferLater(cast(IReactorTime, self.reactor), delay, lambda: None)
        self.failed += 1
        self.report(f"forward: {where} -> {self.target} failed {self.attempts} times; giving up")
        return None


# -- the console commands ---------------------------------------------------


def _publish_url(url: str) -> str:
    u = url.rstrip("/")
    return u if u.endswith("/api/publish") else u + "/api/publish"


def publish_main(args: Any) -> int:
    """C{twisted-rt publish CHANNEL JSON}: print the receipt; 1 (and one line) on error."""
    try:
        data = json.loads(args.data)
    except ValueError as e:
        print(f"twisted-rt publish: the data is not JSON: {e}", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"channel": args.channel, "data": data}
    if getattr(args, "id", None):
        body["id"] = args.id
    headers = {"Content-Type": "application/json", "User-Agent": "twisted-rt"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    url = _publish_url(args.url)
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            print(r.read().decode("utf-8", "replace").strip())
            return 0
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            err = json.loads(raw)
            text = f"{err['error']}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            text = raw.decode("utf-8", "replace").strip()[:200] or e.reason
        print(f"twisted-rt publish: {e.code} {text}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"twisted-rt publish: cannot reach {url}: {reason}", file=sys.stderr)
        return 1


def tail_main(args: Any) -> int:
    """C{twisted-rt tail PATTERN...}: print events as JSON lines until interrupted (or C{--count})."""
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredLock

    from twisted_rt.core.matcher import PatternError, validate_pattern

    args.url = ws_url(args.url)
    try:
        for p in args.patterns:
            validate_pattern(p)
        _endpoint_description(args.url)
    except (PatternError, ValueError) as e:
        print(f"twisted-rt tail: {e}", file=sys.stderr)
        return 2

    pretty = sys.stdout.isatty()
    count: int | None = args.count
    status = [0]
    done = [0]
    lock = DeferredLock()
    forwarder = (
        Forwarder(args.forward, args.url, args.token, reactor) if getattr(args, "forward", None) else None
    )
    sub: Subscription | None = None

    def finish(code: int) -> None:
        status[0] = code
        d = sub.stop() if sub is not None else succeed(None)
        d.addBoth(lambda _: reactor.stop() if reactor.running else None)

    def counted() -> None:
        done[0] += 1
        if count is not None and done[0] >= count and sub is not None and sub.state != "stopped":
            finish(0)

    def on_event(event: dict[str, Any]) -> None:
        if pretty:
            sys.stdout.write(json.dumps(event, indent=2, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")
        sys.stdout.flush()
        if forwarder is None:
            counted()
            return
        fwd = forwarder
        d = lock.run(fwd.forward, event)
        d.addErrback(lambda f: log.failure("forwarding failed", f))
        d.addBoth(lambda _: counted())

    def on_presence(msg: dict[str, Any]) -> None:
        # one line per join or leave, beside the events (JSON when not on a terminal)
        if pretty:
            who = msg.get("user")
            extra = f" {json.dumps(msg['info'], ensure_ascii=False)}" if msg.get("info") is not None else ""
            sys.stdout.write(f"{msg.get('op')} {msg.get('channel')} {who}{extra}\n")
        else:
            sys.stdout.write(json.dumps(msg, separators=(",", ":"), ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def on_error(msg: dict[str, Any]) -> None:
        print(f"twisted-rt tail: {msg.get('code')}: {msg.get('message')}", file=sys.stderr)
        if msg.get("code") in ("forbidden", "invalid_channel", "bad_request", "too_many_subscriptions"):
            finish(1)

    previous = [""]

    def on_state(state: str) -> None:
        if state == "waiting" and sub is not None and sub.last_close and sub.last_close[0] == 4001:
            print("twisted-rt tail: the token has expired (close 4001); get a new one", file=sys.stderr, flush=True)
            finish(1)
            return
        if state == "stopped" and sub is not None and sub.last_close and sub.last_close[0] == 4003:
            print("twisted-rt tail: disconnected by the server's operator (close 4003)", file=sys.stderr, flush=True)
            finish(1)
            return
        if state == "waiting" and sub is not None and sub.last_refusal == 401:
            print("twisted-rt tail: the server refused the token (401: invalid or expired); get a new one",
                  file=sys.stderr, flush=True)
            finish(1)
            return
        if state == "open" and sub is not None and sub.connections > 1:
            print(f"twisted-rt tail: reconnected to {args.url}", file=sys.stderr, flush=True)
        elif state == "waiting" and previous[0] == "open":
            print(f"twisted-rt tail: disconnected from {args.url}; reconnecting", file=sys.stderr, flush=True)
        previous[0] = state

    def begin() -> None:
        nonlocal sub
        sub = subscribe(
            args.patterns,
            on_event,
            since=args.since,
            url=args.url,
            token=args.token,
            reactor=reactor,
            on_error=on_error,
            on_state=on_state,
            on_presence=on_presence,
            max_delay=10.0,
        )

    if count is not None and count <= 0:
        return 0
    reactor.callWhenRunning(begin)
    reactor.run()
    return status[0]

# -*- test-case-name: tests.test_pusher_ws -*-
"""
C{/app/<key>?protocol=7}: version 7 of the Pusher Channels WebSocket
protocol (pusher-js, Laravel Echo, Pusher's mobile libraries), on the same
Autobahn machinery as C{/ws}.

L{PusherProtocol} is an L{RTWebSocketProtocol}: the same subscriber (one
fan-out path from the broker), the same per-connection queue, back-pressure,
batched flush and slow-consumer close.  Only the wire format differs: an
event is framed once per protocol (L{PusherFactory.frame} caches the Pusher
frame on the event under C{"pusher"}, beside the C{"ws"} one), as
C{{"event": <type or "message">, "channel": ..., "data": <JSON text>}}.

Channels (one set with C{/ws} and C{/sse}: a Pusher channel is the channel
of the same name; names outside the channel character rule are refused with
C{pusher:error} 4009):

  - public: anyone with the app key (as in Pusher; C{[auth]} is not asked);
  - C{private-}: C{auth} = C{key:HMAC-SHA256(secret, "socket_id:channel")};
  - C{presence-}: the same over C{"socket_id:channel:channel_data"}; the
    member is C{channel_data}'s C{user_id} with C{user_info}, kept by
    L{twisted_rt.interfaces.Presence} (C{App.presence}: one member per user,
    the same on every node);
  - C{cache-} (also C{private-cache-}, C{presence-cache-}): the channel's
    last journaled event is sent after C{subscription_succeeded}, or
    C{pusher:cache_miss};
  - C{client-} events (when C{[pusher] client_events}): on C{private-} and
    C{presence-} channels the connection is subscribed to, relayed to the
    channel's other subscribers on every node through the broker's control
    plane (L{twisted_rt.interfaces.Broker.broadcast}), I{not journaled}, as
    Pusher does not keep them; at most L{CLIENT_EVENTS_PER_SECOND} per
    connection (more: C{pusher:error} 4301).

C{pusher:signin} (user authentication) is accepted; the connection's
C{user_id} (and every presence C{user_id}) is what
C{terminate_connections} closes (C{pusher:error} 4009, then close 4009).
Activity: the server sends C{pusher:ping} to a connection silent for
C{activity_timeout}, and closes it with 4201 when no message follows within
L{PONG_TIMEOUT}.  A message over C{[pusher] max_message_bytes} closes the
connection with 4100 (before it is buffered).
"""

from __future__ import annotations

import secrets
from typing import Any, Mapping

from autobahn.websocket.types import ConnectionRequest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from twisted_rt.app import App
from twisted_rt.core.auth import MAX_INFO_BYTES
from twisted_rt.core.event import Event, dumps, loads
from twisted_rt.core.matcher import ChannelError, matches, validate_channel
from twisted_rt.core.pusher_auth import PusherAuthError, check_channel_auth, check_user_auth
from twisted_rt.interfaces import Control, JournalUnavailable, Member, Presence, PresenceWatcher
from twisted_rt.routes.ws import (
    CLOSE_POLICY,
    MAX_BAD_MESSAGES,
    RTWebSocketFactory,
    RTWebSocketProtocol,
    WebSocketEndpoint,
)
from twisted_rt.store.presence import MAX_MEMBERS_LISTED

__all__ = [
    "CLIENT_EVENTS_PER_SECOND",
    "PONG_TIMEOUT",
    "PusherFactory",
    "PusherProtocol",
    "pusher_data",
    "resource",
]

#: seconds a pinged connection has to send anything before it is closed with 4201
PONG_TIMEOUT = 30.0
#: client events one connection may send per second (Pusher's limit)
CLIENT_EVENTS_PER_SECOND = 10
#: the protocol versions accepted in C{?protocol=}
PROTOCOLS = frozenset({"5", "6", "7"})
#: the control-plane kinds this module broadcasts
KIND_CLIENT = "pusher.client"
KIND_TERMINATE = "pusher.terminate"

_log = Logger()


def pusher_data(event: Event) -> str:
    """
    The C{data} string of C{event} for a Pusher client: a Pusher publish's
    own text when it was not a JSON object or array, else the JSON text of
    the event's C{data}.
    """
    data = event.data
    if event.source == "pusher" and isinstance(data, str):
        return data
    return dumps(data).decode("utf-8")


def _text(value: Any) -> str:
    return dumps(value).decode("utf-8")


class PusherProtocol(RTWebSocketProtocol):
    """One Pusher client (pusher-js, Laravel Echo, ...)."""

    factory: PusherFactory
    stat_name = "pusher"

    def __init__(self) -> None:
        super().__init__()
        self.socket_id = ""
        #: channels this connection is subscribed to -> its presence user_id there (None elsewhere)
        self.channels: dict[str, str | None] = {}
        #: the signed-in user (C{pusher:signin}), or None
        self.user_id: str | None = None
        self._users: set[str] | None = None
        self._refused: tuple[int, str] | None = None
        self.last_seen = 0.0
        self.pinged = False
        self._client_window = 0.0
        self._client_count = 0
        self._failure_logged = False

    # handshake

    def onConnect(self, request: ConnectionRequest) -> None:
        super().onConnect(request)  # shutdown, Origin, per-address cap (and a token, if one was given)
        conf = self.factory.app.config.pusher
        key = request.path.rstrip("/").rsplit("/", 1)[-1]
        protocol = (request.params.get("protocol") or [""])[0]
        if key != conf.key:
            self._refused = (4001, f"App key {key} does not exist")
        elif protocol not in PROTOCOLS:
            self._refused = (4007, f"Unsupported protocol version {protocol!r}: use ?protocol=7")
        return None

    def onOpen(self) -> None:
        super().onOpen()
        f = self.factory
        self.last_seen = f.reactor.seconds()
        if self._refused is not None:
            code, message = self._refused
            self._push({"event": "pusher:error", "data": {"code": code, "message": message}})
            self.close_with(code, message)
            return
        self.socket_id = f"{secrets.randbelow(10**9)}.{secrets.randbelow(10**9)}"
        f.sockets[self.socket_id] = self
        self._push({
            "event": "pusher:connection_established",
            "data": _text({"socket_id": self.socket_id,
                           "activity_timeout": f.app.config.pusher.activity_timeout_seconds}),
        })

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, reason)
        f = self.factory
        if self.socket_id:
            f.sockets.pop(self.socket_id, None)
        presence = f.presence
        for channel, user in self.channels.items():
            f.leave_index(channel, self)
            if user is not None:
                f.left(presence, channel, user, self)
        self.channels = {}
        for user in self._users or ():
            f.unregister(user, self)
        self._users = None

    def onMessageFrameBegin(self, length: int) -> None:
        # refuse an oversized message before any of it is buffered
        if not self.failedByMe and self.message_data_total_length + length > self.factory.max_pusher_message:
            limit = self.factory.max_pusher_message
            self._push({"event": "pusher:error",
                        "data": {"code": 4100, "message": f"message over {limit} bytes"}})
            self.close_with(4100, f"message over {limit} bytes")
            self.failedByMe = True  # Autobahn then drops the rest of this message unread
        super().onMessageFrameBegin(length)

    # output

    def _push(self, msg: dict[str, Any]) -> None:
        """Queue one Pusher message (a reply or a notice: not an event of the journal)."""
        self._reply(msg)

    def _pusher_error(self, code: int | None, message: str, bad: bool = True) -> None:
        self._push({"event": "pusher:error", "data": {"code": code, "message": message}})
        if bad:
            self._bad += 1
            if self._bad >= MAX_BAD_MESSAGES:
                self.close_with(CLOSE_POLICY, f"{self._bad} bad messages")

    def _sub_error(self, channel: str, status: int, error: str) -> None:
        self._push({"event": "pusher:subscription_error", "channel": channel,
                    "data": {"type": "AuthError" if status in (401, 403) else "SubscriptionError",
                             "error": error, "status": status}})

    def _send_event(self, event: Event) -> None:
        headers = event.headers
        if headers is not None and event.source == "pusher" and headers.get("socket_id") == self.socket_id:
            return  # the publisher asked to leave this connection out (socket_id: Laravel's toOthers)
        RTWebSocketProtocol._send_event(self, event)

    def disconnect(self) -> None:
        """Closed by C{terminate_connections}: C{pusher:error} 4009, then close 4009 (pusher-js does not retry)."""
        self._push({"event": "pusher:error",
                    "data": {"code": 4009, "message": "connection terminated by the server"}})
        self.close_with(4009, "connection terminated by the server")

    # presence (PresenceWatcher)

    def presence_changed(self, op: str, channel: str, user: str, info: Mapping[str, Any] | None) -> None:
        """A member joined or left a presence channel this connection is in."""
        own = self.channels.get(channel, "")
        if own == user and op == "join" and self.factory.webhooks is not None:
            self.factory.webhooks.member("member_added", channel, user)  # its one connection is here
        if self._closing or own in (user, ""):
            return  # not subscribed (any more), or this connection's own user
        if op == "join":
            data = {"user_id": user, "user_info": dict(info) if info is not None else None}
            if data["user_info"] is None:
                del data["user_info"]
            self._push({"event": "pusher_internal:member_added", "channel": channel, "data": _text(data)})
        elif op == "leave":
            self._push({"event": "pusher_internal:member_removed", "channel": channel,
                        "data": _text({"user_id": user})})

    # input

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._closing:
            return
        self.last_seen = self.factory.reactor.seconds()
        self.pinged = False
        if isBinary:
            self.close_with(CLOSE_POLICY, "binary messages are not accepted; send JSON text")
            return
        try:
            msg = loads(payload)
        except ValueError:
            self._pusher_error(None, "the message is not valid JSON")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            self._pusher_error(None, "a message is a JSON object with an 'event'")
            return
        name: str = msg["event"]
        data = msg.get("data")
        try:
            if name == "pusher:ping":
                self._push({"event": "pusher:pong", "data": {}})
            elif name == "pusher:pong":
                pass
            elif name == "pusher:subscribe":
                result = self._subscribe(data)
                if result is not None:
                    channel = str(data["channel"]) if isinstance(data, dict) else ""

                    def failed(f: Failure) -> None:
                        self._subscribe_failed(f, channel)

                    result.addErrback(failed)
            elif name == "pusher:unsubscribe":
                self._unsubscribe(data)
            elif name == "pusher:signin":
                self._signin(data)
            elif name.startswith("client-"):
                self._client_event(name, msg)
            else:
                self._pusher_error(None, f"unsupported event {name[:80]!r}")
        except Exception:  # noqa: BLE001 - answered, logged
            self._failed_op(Failure(), name)

    def _failed_op(self, f: Failure, name: str) -> None:
        if f.check(JournalUnavailable):
            # an outage the broker already logs: answered, no traceback per message
            self._pusher_error(None, f"{name} failed: the journal is unavailable; try again shortly", False)
            return
        if not self._failure_logged:  # once per connection: a client cannot flood the log
            self._failure_logged = True
            _log.failure("handling {name} from {peer}", f, name=name, peer=self.peer)
        self._pusher_error(None, "the server failed to handle this message; it was logged", False)

    def _subscribe_failed(self, f: Failure, channel: str) -> None:
        """A subscription that could not be set up is undone (a retry subscribes again), and answered."""
        if channel in self.channels and not self._closing:
            self._unsubscribe({"channel": channel})
            self._sub_error(channel, 503, "the subscription could not be set up; try again shortly")
        self._failed_op(f, "pusher:subscribe")

    def _subscribe(self, data: Any) -> Deferred[None] | None:
        if not isinstance(data, dict) or not isinstance(data.get("channel"), str):
            self._pusher_error(None, "pusher:subscribe needs data.channel")
            return None
        channel: str = data["channel"]
        if channel.startswith("#server-to-user-"):
            # pusher-js subscribes its signed-in user's channel: accepted, nothing is sent there
            if self.user_id is not None and channel == f"#server-to-user-{self.user_id}":
                self._succeeded(channel)
            else:
                self._sub_error(channel, 403, "sign in first")
            return None
        try:
            validate_channel(channel)
        except ChannelError as e:
            self._pusher_error(4009, f"invalid channel name {channel[:80]!r}: {e}")
            self._sub_error(channel, 400, f"invalid channel name: {e}")
            return None
        if channel in self.channels:
            self._succeeded(channel)
            return None
        f = self.factory
        limit = f.app.config.websocket.max_subscriptions
        if limit and len(self.channels) >= limit:
            self._pusher_error(4100, f"at most {limit} subscriptions per connection", False)
            return None
        conf = f.app.config.pusher
        presence = channel.startswith("presence-")
        if presence or channel.startswith("private-"):
            channel_data = data.get("channel_data") if presence else None
            if presence and not isinstance(channel_data, str):
                self._pusher_error(4009, f"subscription to {channel!r} needs channel_data")
                self._sub_error(channel, 401, "channel_data is missing")
                return None
            try:
                check_channel_auth(conf.key, conf.secret, self.socket_id, channel, data.get("auth"), channel_data)
            except PusherAuthError as e:
                self._pusher_error(4009, f"Invalid signature: {e}")
                self._sub_error(channel, 401, str(e))
                return None
            if presence:
                assert isinstance(channel_data, str)
                return self._join(channel, channel_data)
        elif not any(matches(pat, channel) for pat in conf.public_channels):
            self._pusher_error(4009, f"{channel!r} is not a public channel here: use a private- channel")
            self._sub_error(channel, 403, "not a public channel ([pusher] public_channels)")
            return None
        self.channels[channel] = None
        f.join_index(channel, self)
        return self._listen(channel)

    def _listen(self, channel: str, presence: dict[str, Any] | None = None) -> Deferred[None]:
        """Answer C{subscription_succeeded}, then deliver the channel (after its last event, for C{cache-})."""
        return ensureDeferred(self._listen_async(channel, presence))

    async def _listen_async(self, channel: str, presence: dict[str, Any] | None) -> None:
        sub = self.subscriber
        assert sub is not None
        since: int | None = None
        if _is_cache(channel):
            last = await self.factory.app.broker.last_offset(channel)
            if channel not in self.channels or sub.closed:
                return
            since = max(0, last - 1) if last else None
            if not last:
                self._succeeded(channel, presence)
                self._push({"event": "pusher:cache_miss", "channel": channel})
                since = None
                await self._add(channel, None)
                return
        self._succeeded(channel, presence)
        await self._add(channel, since)

    async def _add(self, channel: str, since: int | None) -> None:
        sub = self.subscriber
        assert sub is not None
        if sub.closed or channel not in self.channels:
            return
        stats = self.factory.app.stats
        stats.subscriptions[self.stat_name] += 1
        try:
            await sub.add(channel, since)
        except Exception:
            if channel not in sub.patterns and not sub.closed:
                stats.subscriptions[self.stat_name] -= 1
            raise

    def _succeeded(self, channel: str, presence: dict[str, Any] | None = None) -> None:
        self._push({"event": "pusher_internal:subscription_succeeded", "channel": channel,
                    "data": _text({"presence": presence} if presence is not None else {})})

    def _join(self, channel: str, channel_data: str) -> Deferred[None] | None:
        try:
            cd = loads(channel_data)
        except ValueError:
            cd = None
        user = cd.get("user_id") if isinstance(cd, dict) else None
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        info = cd.get("user_info") if isinstance(cd, dict) else None
        if not isinstance(user, str) or not 1 <= len(user) <= 200 or not (info is None or isinstance(info, dict)):
            self._pusher_error(4009, "channel_data must be a JSON object with a user_id (and an optional user_info object)")
            self._sub_error(channel, 400, "bad channel_data")
            return None
        if info is not None and len(dumps(info)) > MAX_INFO_BYTES:
            # as the JWT 'info' claim: every member list and join carries it
            self._pusher_error(4009, f"user_info is over {MAX_INFO_BYTES} bytes of JSON")
            self._sub_error(channel, 400, "user_info too large")
            return None
        f = self.factory
        presence = f.presence
        self.channels[channel] = user
        f.join_index(channel, self)
        self._register(user)
        presence.watch(channel, self)
        presence.add(channel, user, info, self)
        return ensureDeferred(self._joined(presence, channel, user, info))

    async def _joined(self, presence: Presence, channel: str, user: str, info: dict[str, Any] | None) -> None:
        members: list[Member] = await presence.members(channel)
        if self.channels.get(channel) != user:
            return
        hash_: dict[str, Any] = {}
        for m in members:
            hash_[str(m["user"])] = m.get("info")
        hash_.setdefault(user, info)  # a store that has not seen this connection's add yet
        ids = sorted(hash_)
        await self._listen_async(channel, {"ids": ids, "hash": hash_, "count": len(ids)})

    def _unsubscribe(self, data: Any) -> None:
        channel = data.get("channel") if isinstance(data, dict) else None
        if not isinstance(channel, str) or channel not in self.channels:
            return  # Pusher ignores it
        f = self.factory
        user = self.channels.pop(channel)
        f.leave_index(channel, self)
        sub = self.subscriber
        if sub is not None and sub.remove(channel):
            f.app.stats.subscriptions[self.stat_name] -= 1
        presence = f.presence
        if user is not None:
            f.left(presence, channel, user, self)
            if user != self.user_id and user not in self.channels.values():
                self._unregister(user)

    def _signin(self, data: Any) -> None:
        conf = self.factory.app.config.pusher
        user_data = data.get("user_data") if isinstance(data, dict) else None
        if not isinstance(user_data, str):
            self._pusher_error(4009, "pusher:signin needs data.user_data and data.auth")
            return
        try:
            check_user_auth(conf.key, conf.secret, self.socket_id, user_data, data.get("auth"))
        except PusherAuthError as e:
            self._pusher_error(4009, f"Invalid signature: {e}")
            return
        try:
            ud = loads(user_data)
        except ValueError:
            ud = None
        user = ud.get("id") if isinstance(ud, dict) else None
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        if not isinstance(user, str) or not 1 <= len(user) <= 200:
            self._pusher_error(4009, "user_data must be a JSON object with an 'id'")
            return
        if self.user_id is not None and self.user_id != user and self.user_id not in self.channels.values():
            self._unregister(self.user_id)
        self.user_id = user
        self._register(user)
        self._push({"event": "pusher:signin_success", "data": {"user_data": user_data}})

    def _register(self, user: str) -> None:
        if self._users is None:
            self._users = set()
        if user not in self._users:
            self._users.add(user)
            self.factory.register(user, self)

    def _unregister(self, user: str) -> None:
        if self._users is not None and user in self._users:
            self._users.discard(user)
            self.factory.unregister(user, self)

    def _client_event(self, name: str, msg: dict[str, Any]) -> None:
        f = self.factory
        if not f.app.config.pusher.client_events:
            self._pusher_error(None, "client events are not enabled for this app ([pusher] client_events)")
            return
        channel = msg.get("channel")
        if not isinstance(channel, str) or channel not in self.channels:
            self._pusher_error(None, f"client event {name[:80]!r}: not subscribed to that channel")
            return
        if not (channel.startswith("private-") or channel.startswith("presence-")):
            self._pusher_error(None, "client events are allowed on private- and presence- channels only")
            return
        if len(name) > 200:
            self._pusher_error(None, "the event name is longer than 200 characters")
            return
        now = f.reactor.seconds()
        if now - self._client_window >= 1.0:
            self._client_window = now
            self._client_count = 0
        self._client_count += 1
        if self._client_count > CLIENT_EVENTS_PER_SECOND:
            self._pusher_error(4301, f"client event rejected: more than {CLIENT_EVENTS_PER_SECOND} per second",
                               False)
            return
        message: Control = {"channel": channel, "event": name, "data": msg.get("data"),
                            "socket_id": self.socket_id}
        user = self.channels[channel]
        if user is not None:
            message["user_id"] = user
        f.app.broker.broadcast(KIND_CLIENT, message).addErrback(self._client_failed)
        f.client_event_sent(message)

    def _client_failed(self, f: Failure) -> None:
        self._pusher_error(None, "the client event could not be relayed (the cluster is unavailable)", False)


def _is_cache(channel: str) -> bool:
    return channel.startswith(("cache-", "private-cache-", "presence-cache-", "private-encrypted-cache-"))


class _LocalPresence(Presence):
    """
    Members of this node only: used when the service built no
    L{twisted_rt.interfaces.Presence} (C{App.presence} is C{None}).
    """

    def __init__(self) -> None:
        self.conns: dict[str, dict[str, set[object]]] = {}
        self.infos: dict[tuple[str, str], Mapping[str, Any] | None] = {}
        self.watchers: dict[str, set[PresenceWatcher]] = {}

    def add(self, channel: str, user: str, info: Mapping[str, Any] | None, conn: object) -> None:
        users = self.conns.setdefault(channel, {})
        first = user not in users
        users.setdefault(user, set()).add(conn)
        if first:
            self.infos[channel, user] = info
            self._tell("join", channel, user, info)

    def remove(self, channel: str, user: str, conn: object) -> None:
        users = self.conns.get(channel, {})
        held = users.get(user)
        if held is None or conn not in held:
            return
        held.discard(conn)
        if not held:
            del users[user]
            self.infos.pop((channel, user), None)
            if not users:
                del self.conns[channel]
            self._tell("leave", channel, user, None)

    def _tell(self, op: str, channel: str, user: str, info: Mapping[str, Any] | None) -> None:
        for w in list(self.watchers.get(channel, ())):
            w.presence_changed(op, channel, user, info)

    def members(self, channel: str) -> Deferred[list[Member]]:
        out: list[Member] = []
        for user in sorted(self.conns.get(channel, {}))[:MAX_MEMBERS_LISTED]:
            info = self.infos.get((channel, user))
            out.append({"user": user, "info": dict(info)} if info is not None else {"user": user})
        return succeed(out)

    def counts(self) -> Deferred[dict[str, int]]:
        return succeed({c: len(u) for c, u in self.conns.items() if u})

    def watch(self, channel: str, watcher: PresenceWatcher) -> None:
        self.watchers.setdefault(channel, set()).add(watcher)

    def unwatch(self, channel: str, watcher: PresenceWatcher) -> None:
        ws = self.watchers.get(channel)
        if ws is not None:
            ws.discard(watcher)
            if not ws:
                del self.watchers[channel]


class PusherFactory(RTWebSocketFactory):
    """The factory of every C{/app/<key>} connection."""

    protocol = PusherProtocol
    stat_name = "pusher"

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.max_pusher_message = app.config.pusher.max_message_bytes
        # no permessage-deflate for Pusher clients: every connection shares the event's frame
        self.setProtocolOptions(
            perMessageCompressionAccept=lambda offers: None,
            maxFramePayloadSize=self.max_pusher_message,
            maxMessagePayloadSize=self.max_pusher_message,
        )
        self.sockets: dict[str, PusherProtocol] = {}
        #: this node's Pusher connections per channel (client events, occupancy)
        self.by_channel: dict[str, set[PusherProtocol]] = {}
        #: this node's Pusher connections per user (when the app has no connection registry)
        self.by_user: dict[str, set[PusherProtocol]] = {}
        self._fallback_presence: Presence | None = None
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = app.reactor  # type: ignore[assignment]  # a Reactor is an IReactorTime
        self.webhooks: Any = None  # set by twisted_rt.routes.pusher_api (Pusher webhooks)
        app.broker.on_broadcast(KIND_CLIENT, self._relay_client_event)
        app.broker.on_broadcast(KIND_TERMINATE, self._terminate_local)

    @property
    def presence(self) -> Presence:
        """The app's presence store (or, without one, this node's)."""
        p = self.app.presence
        if p is not None:
            return p
        if self._fallback_presence is None:
            self._fallback_presence = _LocalPresence()
        return self._fallback_presence

    def frame(self, event: Event) -> bytes:
        """The event's Pusher frame: built once, cached on the event (beside the C{/ws} one)."""
        frame: bytes | None = event.cached("pusher")
        if frame is None:
            text = dumps({"event": event.type or "message", "channel": event.channel, "data": pusher_data(event)})
            frame = event.cache("pusher", self.prepareMessage(text).payloadHybi)
        self._last_event = event
        self._last_frame = frame
        return frame

    # channel index

    def join_index(self, channel: str, proto: PusherProtocol) -> None:
        conns = self.by_channel.get(channel)
        if conns is None:
            conns = self.by_channel[channel] = set()
        conns.add(proto)
        if len(conns) == 1 and self.webhooks is not None:
            self.webhooks.local_occupied(channel)

    def leave_index(self, channel: str, proto: PusherProtocol) -> None:
        conns = self.by_channel.get(channel)
        if conns is not None:
            conns.discard(proto)
            if not conns:
                del self.by_channel[channel]
                if self.webhooks is not None:
                    self.webhooks.local_vacated(channel)

    def left(self, presence: Presence, channel: str, user: str, proto: PusherProtocol) -> None:
        """C{proto} (as C{user}) left the presence channel C{channel}."""
        presence.unwatch(channel, proto)
        presence.remove(channel, user, proto)
        hooks = self.webhooks
        if hooks is not None:
            def check(members: list[Member]) -> None:
                if all(m["user"] != user for m in members):
                    hooks.member("member_removed", channel, user)

            presence.members(channel).addCallback(check).addErrback(
                lambda f: _log.failure("reading presence members", f, log_category="RT-P03"))

    # users

    def register(self, user: str, proto: PusherProtocol) -> None:
        reg = self.app.connections
        if reg is not None:
            reg.register(user, proto)
        else:
            self.by_user.setdefault(user, set()).add(proto)

    def unregister(self, user: str, proto: PusherProtocol) -> None:
        reg = self.app.connections
        if reg is not None:
            reg.unregister(user, proto)
            return
        conns = self.by_user.get(user)
        if conns is not None:
            conns.discard(proto)
            if not conns:
                del self.by_user[user]

    def terminate(self, user: str) -> Deferred[Any]:
        """Close every connection of C{user} on every node."""
        reg = self.app.connections
        if reg is not None:
            return reg.disconnect(user)
        return self.app.broker.broadcast(KIND_TERMINATE, {"user": user})

    def _terminate_local(self, message: Control, sender: str) -> None:
        user = message.get("user")
        if isinstance(user, str):
            for proto in list(self.by_user.get(user, ())):
                proto.disconnect()

    # client events

    def _relay_client_event(self, message: Control, sender: str) -> None:
        channel = message.get("channel")
        conns = self.by_channel.get(channel) if isinstance(channel, str) else None
        if not conns:
            return
        out: dict[str, Any] = {"event": message.get("event"), "channel": channel, "data": message.get("data")}
        if "user_id" in message:
            out["user_id"] = message["user_id"]
        frame = self.prepareMessage(dumps(out)).payloadHybi
        sid = message.get("socket_id")
        for proto in conns:
            if proto.socket_id != sid:
                proto._enqueue(frame, 1)

    def client_event_sent(self, message: Control) -> None:
        """A client event left this node (the Pusher webhook C{client_event})."""
        if self.webhooks is not None:
            self.webhooks.client_event(message)

    # activity

    def start_sweeping(self) -> None:
        """Start the activity check (the app's start-up hook)."""
        timeout = self.app.config.pusher.activity_timeout_seconds
        if not self._sweeper.running:
            self._sweeper.start(max(1.0, min(timeout, PONG_TIMEOUT) / 4), now=False)

    def stop_sweeping(self) -> None:
        """Stop the activity check."""
        if self._sweeper.running:
            self._sweeper.stop()

    def sweep(self) -> None:
        """Ping connections silent for C{activity_timeout}; close (4201) those that did not answer."""
        now = self.reactor.seconds()
        timeout = self.app.config.pusher.activity_timeout_seconds
        for proto in list(self.sockets.values()):
            idle = now - proto.last_seen
            if proto.pinged:
                if idle > timeout + PONG_TIMEOUT:
                    proto.close_with(4201, "Pong reply not received")
            elif idle > timeout:
                proto.pinged = True
                proto._push({"event": "pusher:ping", "data": {}})


class _Resource(WebSocketEndpoint):
    """C{/app/<key>}: the upgrade, as C{/ws}'s (a plain HTTP request is a JSON 426, other methods 405)."""

    not_upgraded = "/app/<key> is the Pusher WebSocket endpoint"


def resource(app: App) -> tuple[IResource, PusherFactory]:
    """The C{/app} resource and its factory (started and stopped with the app)."""
    factory = PusherFactory(app)

    def start() -> None:
        factory.doStart()
        factory.start_sweeping()

    def stop() -> Deferred[None]:
        factory.stop_sweeping()
        return factory.shutdown()

    app.on_startup(start)
    app.on_shutdown(stop)
    r: IResource = _Resource(factory)
    return r, factory


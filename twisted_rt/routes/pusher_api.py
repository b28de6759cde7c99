# -*- test-case-name: tests.test_pusher_api -*-
"""
Pusher's HTTP API (what Pusher's server libraries call), and Pusher webhooks.

Every request is signed as Pusher signs it (L{twisted_rt.core.pusher_auth}:
C{auth_key}, C{auth_timestamp} within 600 s, C{auth_version=1.0},
C{body_md5}, C{auth_signature}); anything else is 401.

  - C{POST /apps/<id>/events} C{{"name","data","channels"|"channel","socket_id"?}}:
    one event to up to L{MAX_CHANNELS} channels, journaled in one commit
    (source C{pusher}, type = the event name; C{data}, a string, is kept
    parsed when it is a JSON object or array, else as the string itself);
    C{socket_id} leaves that connection out.  Answer C{{}}.
  - C{POST /apps/<id>/batch_events} C{{"batch":[...]}}: up to L{MAX_BATCH}
    events, one commit.  Answer C{{"batch":[{},...]}}.
  - C{GET /apps/<id>/channels?filter_by_prefix=&info=user_count}: occupied
    channels of the whole cluster.
  - C{GET /apps/<id>/channels/<name>?info=subscription_count,user_count}.
  - C{GET /apps/<id>/channels/<presence-name>/users}.
  - C{POST /apps/<id>/users/<user>/terminate_connections} (also
    C{POST /users/<user>/terminate_connections}): every Pusher connection
    whose presence or sign-in C{user_id} is C{<user>}, on every node.

Errors are the daemon's JSON C{{error, message}} with Pusher's statuses
(400, 401, 404, 413, 503); Pusher's libraries report the status.
"""

from __future__ import annotations

import time
from typing import Any, Callable
from urllib.parse import unquote

from twisted.logger import Logger
from twisted.web.server import Request

from twisted_rt.app import App
from twisted_rt.core.event import Draft, dumps, loads, new_id
from twisted_rt.core.matcher import ChannelError, validate_channel
from twisted_rt.core.pusher_auth import PusherAuthError, check_request, webhook_signature
from twisted_rt.interfaces import Control
from twisted_rt.routes.pusher import PusherFactory
from twisted_rt.web.resource import JsonError, JsonResource

__all__ = ["MAX_BATCH", "MAX_CHANNELS", "MAX_NAME", "PusherWebhooks", "Users", "Apps"]

#: channels one C{events} call may name
MAX_CHANNELS = 100
#: events one C{batch_events} call may carry
MAX_BATCH = 10
#: the longest event name
MAX_NAME = 200

_log = Logger()

#: INCRBY the occupancy counter KEYS[1] by ARGV[1]; delete it when it is back at (or below) 0
_OCCUPANCY = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n <= 0 then redis.call('DEL', KEYS[1]) end
return n
"""


def _bad(message: str, code: str = "bad_request") -> JsonError:
    return JsonError(400, code, message)


def _params(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, vs in (request.args or {}).items():
        if len(vs) != 1:
            raise JsonError(401, "invalid_signature", f"the query parameter {k!r} is given more than once")
        out[k.decode("utf-8", "replace")] = vs[0].decode("utf-8", "replace")
    return out


class _Signed(JsonResource):
    """A leaf of the Pusher API: every request's signature is checked before anything else."""

    def __init__(self, app: App, factory: PusherFactory, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.app = app
        self.factory = factory
        self.clock = clock

    def verify(self, request: Request) -> tuple[dict[str, str], bytes]:
        """The request's query parameters and body, once its signature verified; else 401."""
        conf = self.app.config.pusher
        params = _params(request)
        body = request.content.read() if request.content is not None else b""
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        try:
            try:
                check_request(conf.key, conf.secret, method, path, params, body, self.clock())
            except PusherAuthError:
                decoded = unquote(path)
                if decoded == path:
                    raise
                check_request(conf.key, conf.secret, method, decoded, params, body, self.clock())
        except PusherAuthError as e:
            raise JsonError(401, "invalid_signature", str(e)) from None
        return params, body

    def _json(self, body: bytes) -> Any:
        try:
            return loads(body)
        except ValueError:
            raise _bad("the body is not JSON", "bad_json") from None

    def _app_path(self, request: Request) -> list[str]:
        """The path below C{/apps/<id>/} (the app id checked: another is 404)."""
        post = [p.decode("utf-8", "replace") for p in (request.postpath or [])]
        if not post or post[0] != self.app.config.pusher.app_id:
            raise JsonError(404, "unknown_app", "no app with this id on this server")
        return post[1:]

    def _channel(self, name: str) -> str:
        try:
            return validate_channel(name)
        except ChannelError as e:
            raise _bad(f"invalid channel {name[:80]!r}: {e}", "invalid_channel") from None

    # publishing

    def _draft(self, obj: Any, where: str, channels_key: bool = True) -> list[Draft]:
        if not isinstance(obj, dict):
            raise _bad(f"{where}: an event is a JSON object")
        name = obj.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            raise _bad(f"{where}: 'name' must be a string of 1-{MAX_NAME} characters")
        if "data" not in obj:
            raise _bad(f"{where}: 'data' is required")
        data = obj["data"]
        limit = self.app.config.pusher.max_message_bytes
        size = len(data.encode("utf-8")) if isinstance(data, str) else len(dumps(data))
        if size > limit:
            raise JsonError(413, "payload_too_large", f"{where}: 'data' is over {limit} bytes")
        if isinstance(data, str):
            try:
                parsed = loads(data)
            except ValueError:
                parsed = None
            if isinstance(parsed, (dict, list)):
                data = parsed  # /ws and /sse subscribers see the object
        if channels_key and "channels" in obj:
            names = obj["channels"]
            if not isinstance(names, list) or not 1 <= len(names) <= MAX_CHANNELS:
                raise _bad(f"{where}: 'channels' must be a list of 1-{MAX_CHANNELS} channel names")
        elif isinstance(obj.get("channel"), str):
            names = [obj["channel"]]
        else:
            raise _bad(f"{where}: 'channel' (or 'channels') is required")
        channels = [self._channel(n) if isinstance(n, str) else self._channel(repr(n)) for n in names]
        socket_id = obj.get("socket_id")
        if socket_id is not None and not isinstance(socket_id, str):
            raise _bad(f"{where}: 'socket_id' must be a string")
        headers = {"socket_id": socket_id} if socket_id else None
        return [Draft(channel=c, data=data, source="pusher", type=name, headers=headers) for c in channels]

    async def _publish(self, drafts: list[Draft]) -> None:
        accepted = await self.app.broker.publish(drafts)
        fresh = sum(1 for a in accepted if not a.duplicate)
        if fresh:
            self.app.stats.events_in["pusher"] += fresh

    # queries

    async def _occupied(self) -> dict[str, int]:
        """Channels with subscribers anywhere in the cluster -> their subscriber counts."""
        broker = self.app.broker
        out = {c["name"]: int(c.get("subscribers") or 0) for c in await broker.channels()}
        # the broker lists journaled channels only: add this node's subscribed channels without events
        for name in self.factory.by_channel:
            if name not in out:
                out[name] = broker.local_subscribers(name)
        return {name: n for name, n in out.items() if n > 0}

    async def _user_counts(self) -> dict[str, int]:
        return await self.factory.presence.counts()


class Apps(_Signed):
    """C{/apps/<id>/...}."""

    #: an event trigger is journaled and fanned out whether or not its client waits
    #: for the answer: the handler runs on to count it (rt_events_in_total)
    finish_when_gone = True

    async def handle_POST(self, request: Request) -> Any:
        _, body = self.verify(request)
        path = self._app_path(request)
        if path == ["events"]:
            drafts = self._draft(self._json(body), "event")
            await self._publish(drafts)
            return {}
        if path == ["batch_events"]:
            obj = self._json(body)
            batch = obj.get("batch") if isinstance(obj, dict) else None
            if not isinstance(batch, list) or not 1 <= len(batch) <= MAX_BATCH:
                raise _bad(f"'batch' must be a list of 1-{MAX_BATCH} events")
            drafts = [d for i, e in enumerate(batch) for d in self._draft(e, f"batch[{i}]", channels_key=False)]
            await self._publish(drafts)
            return {"batch": [{} for _ in batch]}
        if len(path) == 3 and path[0] == "users" and path[2] == "terminate_connections":
            await self.factory.terminate(path[1])
            return {}
        raise JsonError(404, "not_found", f"no Pusher API route POST {request.path.decode('utf-8', 'replace')}")

    async def handle_GET(self, request: Request) -> Any:
        params, _ = self.verify(request)
        path = self._app_path(request)
        info = {i for i in params.get("info", "").split(",") if i}
        if path == ["channels"]:
            prefix = params.get("filter_by_prefix", "")
            if "user_count" in info and not prefix.startswith("presence-"):
                raise _bad("info=user_count needs filter_by_prefix=presence-")
            occupied = await self._occupied()
            counts = await self._user_counts()
            names = set(occupied) | set(counts)
            channels: dict[str, dict[str, int]] = {}
            for name in sorted(n for n in names if n.startswith(prefix)):
                entry: dict[str, int] = {}
                if "user_count" in info:
                    entry["user_count"] = counts.get(name, 0)
                if "subscription_count" in info:
                    entry["subscription_count"] = occupied.get(name, 0)
                channels[name] = entry
            return {"channels": channels}
        if len(path) == 2 and path[0] == "channels":
            name = self._channel(path[1])
            if "user_count" in info and not name.startswith("presence-"):
                raise _bad("user_count is only for presence- channels")
            subs = (await self._occupied()).get(name, 0)
            users = (await self._user_counts()).get(name, 0) if name.startswith("presence-") else 0
            out: dict[str, Any] = {"occupied": bool(subs or users)}
            if "subscription_count" in info:
                out["subscription_count"] = subs
            if "user_count" in info:
                out["user_count"] = users
            return out
        if len(path) == 3 and path[0] == "channels" and path[2] == "users":
            name = self._channel(path[1])
            if not name.startswith("presence-"):
                raise _bad("users are only listed for presence- channels")
            members = await self.factory.presence.members(name)
            return {"users": [{"id": m["user"]} for m in members]}
        raise JsonError(404, "not_found", f"no Pusher API route GET {request.path.decode('utf-8', 'replace')}")


class Users(_Signed):
    """C{POST /users/<user>/terminate_connections} (the path Pusher's Python library uses)."""

    async def handle_POST(self, request: Request) -> Any:
        self.verify(request)
        post = [p.decode("utf-8", "replace") for p in (request.postpath or [])]
        if len(post) == 2 and post[1] == "terminate_connections" and post[0]:
            await self.factory.terminate(post[0])
            return {}
        raise JsonError(404, "not_found", f"no Pusher API route POST {request.path.decode('utf-8', 'replace')}")


class PusherWebhooks:
    """
    Pusher webhooks through the destination named by C{[pusher] webhooks}
    (C{App.outbound.enqueue}): C{{"time_ms", "events":[...]}}, signed with
    C{X-Pusher-Key} and C{X-Pusher-Signature}.

    C{channel_occupied} / C{channel_vacated} follow this node's Pusher
    subscribers (with the Redis broker, a shared counter per channel
    makes them cluster-wide); C{client_event} is sent by the node its
    sender is on.
    """

    def __init__(self, app: App, destination: str, clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.destination = destination
        self.clock = clock

    def send(self, events: list[dict[str, Any]]) -> None:
        """Sign and hand one webhook to the outbound engine."""
        conf = self.app.config.pusher
        body = dumps({"time_ms": int(self.clock() * 1000), "events": events})
        headers = {"Content-Type": "application/json", "X-Pusher-Key": conf.key,
                   "X-Pusher-Signature": webhook_signature(conf.secret, body)}
        outbound: Any = self.app.outbound
        enqueue = getattr(outbound, "enqueue", None)
        if enqueue is None:
            _log.warn("Pusher webhook {names} dropped: no outbound engine", names=[e["name"] for e in events],
                      log_category="RT-P01")
            return
        try:
            result = enqueue(self.destination, body, list(headers.items()), new_id())
        except Exception:  # noqa: BLE001 - a webhook must never break a subscription
            _log.failure("enqueueing a Pusher webhook", log_category="RT-P02")
            return
        if hasattr(result, "addErrback"):
            result.addErrback(lambda f: _log.failure("enqueueing a Pusher webhook", f, log_category="RT-P02"))

    def _shared(self, channel: str, delta: int, name: str, when: int) -> None:
        command = getattr(self.app.broker, "command", None)
        key = getattr(self.app.broker, "key", None)
        if command is None or key is None:
            self.send([{"name": name, "channel": channel}])
            return

        def counted(n: Any) -> None:
            if int(n) == when:
                self.send([{"name": name, "channel": channel}])

        # a counter back at 0 is deleted in the same step: channels an anonymous client
        # subscribes once and leaves leave no key behind in Redis
        d = command("EVAL", _OCCUPANCY, 1, key("pusher-occupancy", channel), delta)
        d.addCallback(counted)
        d.addErrback(lambda f: _log.failure("counting Pusher occupancy", f, log_category="RT-P03"))

    def local_occupied(self, channel: str) -> None:
        """The first Pusher subscriber of C{channel} on this node."""
        self._shared(channel, 1, "channel_occupied", 1)

    def local_vacated(self, channel: str) -> None:
        """The last Pusher subscriber of C{channel} on this node left."""
        self._shared(channel, -1, "channel_vacated", 0)

    def client_event(self, message: Control) -> None:
        """A client event sent from this node."""
        data = message.get("data")
        event: dict[str, Any] = {"name": "client_event", "channel": message["channel"], "event": message["event"],
                                 "data": data if isinstance(data, str) else dumps(data).decode("utf-8"),
                                 "socket_id": message["socket_id"]}
        if "user_id" in message:
            event["user_id"] = message["user_id"]
        self.send([event])

    def member(self, name: str, channel: str, user: str) -> None:
        """C{member_added} or C{member_removed}."""
        self.send([{"name": name, "channel": channel, "user_id": user}])


def mount(root: Any, app: App, factory: PusherFactory) -> None:
    """Put C{/apps} and C{/users} under C{root}; wire the webhooks when C{[pusher] webhooks} names a destination."""
    root.putChild(b"apps", Apps(app, factory))
    root.putChild(b"users", Users(app, factory))
    if app.config.pusher.webhooks:
        factory.webhooks = PusherWebhooks(app, app.config.pusher.webhooks)


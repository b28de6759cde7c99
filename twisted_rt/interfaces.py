# -*- test-case-name: tests.test_broker -*-
"""
The interfaces the layers share, and the exceptions that cross them.

  - L{Broker}: what the transports and the API ask of a store (publish,
    history, replay, live subscriptions); L{twisted_rt.store.local} and
    L{twisted_rt.store.redis} implement it, L{twisted_rt.testing} fakes it.
  - L{Listener}: what a broker hands live events to.
  - L{JournalUnavailable}, L{UnencodableEvent}, L{AuthError}: raised low,
    mapped to HTTP and WebSocket answers high (L{twisted_rt.web.resource}).
  - L{Reactor}: the reactor methods the package uses, as a typing Protocol
    (a real reactor, or C{Clock}/C{MemoryReactorClock} in tests).

This module imports no other module of the package at run time: every
layer may import it (the import contract in C{setup.cfg}).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IDelayedCall

    from twisted_rt.core.event import Accepted, Draft, Event

__all__ = [
    "PAGE_BYTES",
    "Closable",
    "ConnectionRegistry",
    "Member",
    "Presence",
    "PresenceWatcher",
    "AuthError",
    "Broker",
    "ChannelInfo",
    "Control",
    "ControlHandler",
    "JournalUnavailable",
    "Listener",
    "Reactor",
    "UnencodableEvent",
]

#: the most event JSON one history or replay page holds (about; at least one event)
PAGE_BYTES = 4 * 1024 * 1024


class JournalUnavailable(Exception):
    """The journal cannot take or give events right now (answered 503: nothing was accepted)."""


class UnencodableEvent(ValueError):
    """An event whose data cannot be written as JSON (refused alone, before its batch)."""


class AuthError(Exception):
    """Authentication failed: answered 401 (or 403 with C{status=403})."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class Reactor(Protocol):
    """The reactor as the package uses it: time and delayed calls (C{IReactorTime})."""

    def seconds(self) -> float:
        """The current time, in seconds."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall:
        """Call C{callable} in C{delay} seconds."""


class Listener(Protocol):
    """
    Something that receives live events (a connection's subscriber).

    A listener may also have C{deliver_many(events)}: several live events of
    one channel, consecutive in C{seq} and in order (a commit's, or a few
    commits'), in one call, as C{deliver} of each in turn would take them.
    The local broker hands a commit's events that way (L{IndexedBroker.fanout_many}).
    """

    def deliver(self, event: Event) -> None:
        """Take one live event (must not raise, must not block)."""


ChannelInfo = dict[str, Any]  # {"name", "subscribers", "last_offset"}
#: a control message between nodes: a small JSON object (see L{Broker.broadcast})
Control = dict[str, Any]
ControlHandler = Callable[[Control, str], None]  # (message, the sending node's id)


class Broker(abc.ABC):
    """
    What every broker offers the transports and the API.

    @ivar node_id: this node's name in the cluster (a random id per process).
    @ivar live_in_order: every event reaches the matching local listeners
        after its commit, in C{seq} order, none left out: a reader that has
        caught up with the journal may take them as they come instead of
        reading them back (the SQLite node's broker; not Redis, whose nodes'
        events arrive in their own order).
    """

    node_id: str = "local"
    live_in_order: bool = False

    # live subscriptions (local to this node in every broker)

    @abc.abstractmethod
    def subscribe(self, pattern: str, listener: Listener) -> None:
        """Deliver live events of channels matching C{pattern} to C{listener}."""

    @abc.abstractmethod
    def unsubscribe(self, pattern: str, listener: Listener) -> None:
        """Stop delivering C{pattern} to C{listener}."""

    @abc.abstractmethod
    def local_subscribers(self, channel: str) -> int:
        """How many local listeners would receive an event on C{channel}."""

    # the durable part

    @abc.abstractmethod
    def start(self) -> Deferred[None]:
        """Open the store (fires even if it is not ready yet)."""

    @abc.abstractmethod
    def stop(self) -> Deferred[None]:
        """Flush and close."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether events can be accepted now."""

    @property
    @abc.abstractmethod
    def not_ready_reason(self) -> str:
        """Why not L{ready} (empty when ready)."""

    @abc.abstractmethod
    def publish(self, drafts: Sequence[Draft]) -> Deferred[list[Accepted]]:
        """
        Make C{drafts} durable in one commit, then deliver the new ones.

        Fires with one L{Accepted} per draft once durable; fails with
        L{JournalUnavailable} when nothing was accepted.
        """

    @abc.abstractmethod
    def history(
        self, channel: str, after: int = 0, limit: int = 1000, *, max_bytes: int = PAGE_BYTES
    ) -> Deferred[list[Event]]:
        """
        Events of one channel with offsets above C{after}, oldest first: at
        most C{limit} events and about C{max_bytes} of event JSON (always at
        least one event if any exists).
        """

    @abc.abstractmethod
    def replay(
        self,
        pattern: str | Sequence[str],
        since: Mapping[str, int],
        limit: int = 1000,
        *,
        after_seq: int = 0,
        max_bytes: int = PAGE_BYTES,
    ) -> Deferred[list[Event]]:
        """
        Events of every channel matching C{pattern} (or any of several
        patterns) with C{offset > since.get(channel, 0)} and C{seq >
        after_seq}, in increasing C{seq} (for one channel: offset order): at
        most C{limit} events and about C{max_bytes} of event JSON (always at
        least one event if any exists).  A page may be short because of
        C{max_bytes}: page with C{after_seq=page[-1].seq} until a page comes
        back empty.  C{since} may be a mapping whose C{get} gives a floor for
        channels it does not name; leave it unchanged until this fires.
        """

    @abc.abstractmethod
    def position(self) -> Deferred[int]:
        """The largest C{seq} journaled so far (0 when none)."""

    @abc.abstractmethod
    def last_offset(self, channel: str) -> Deferred[int]:
        """A channel's last offset (0 if it has none)."""

    @abc.abstractmethod
    def channels(self) -> Deferred[list[ChannelInfo]]:
        """Every known channel with its subscriber count and last offset."""

    # the control plane: small messages to every node (presence, disconnects, leases)

    @abc.abstractmethod
    def broadcast(self, kind: str, message: Control) -> Deferred[None]:
        """
        Send C{message} to the C{kind} handlers of every node, this one
        included (not journaled; at most once; a node that is disconnected
        from the cluster misses it).  Fails with L{JournalUnavailable} when
        it cannot be sent.
        """

    @abc.abstractmethod
    def on_broadcast(self, kind: str, handler: ControlHandler) -> None:
        """Call C{handler(message, sender_node_id)} for every C{kind} message from any node."""


# -- presence and connection control (CONTRACT "Presence", "Connection control") --

#: a presence member as the API and the protocols show it: C{{"user": ..., "info": {...}}} (no C{info} when none)
Member = dict[str, Any]


class PresenceWatcher(Protocol):
    """Something told about joins and leaves of the presence channels it watches (a connection)."""

    def presence_changed(self, op: str, channel: str, user: str, info: Mapping[str, Any] | None) -> None:
        """C{op} is C{"join"} (with the member's C{info}) or C{"leave"}; once per user, whichever node it is on."""


class Presence(abc.ABC):
    """
    Who is in each presence channel: one member per user however many
    connections it has, the same on every node (L{twisted_rt.store}).

    A connection is any hashable object; C{add} of a user's first connection
    to a channel anywhere in the cluster is its join, C{remove} of its last
    one its leave; watchers of the channel on every node hear each once.
    """

    @abc.abstractmethod
    def add(self, channel: str, user: str, info: Mapping[str, Any] | None, conn: object) -> None:
        """C{conn} is subscribed to C{channel} as C{user} (no-op if it already is)."""

    @abc.abstractmethod
    def remove(self, channel: str, user: str, conn: object) -> None:
        """C{conn} left C{channel} (no-op if it was not in it)."""

    @abc.abstractmethod
    def members(self, channel: str) -> Deferred[list[Member]]:
        """Every member of C{channel} in the cluster, sorted by user."""

    @abc.abstractmethod
    def counts(self) -> Deferred[dict[str, int]]:
        """Members per presence channel with at least one member, cluster-wide."""

    @abc.abstractmethod
    def watch(self, channel: str, watcher: PresenceWatcher) -> None:
        """Tell C{watcher} of every join and leave of C{channel} from now on."""

    @abc.abstractmethod
    def unwatch(self, channel: str, watcher: PresenceWatcher) -> None:
        """Stop telling C{watcher} about C{channel}."""


class Closable(Protocol):
    """A user's connection the operator may close (WebSocket 4003, SSE ended, Pusher closed)."""

    def disconnect(self) -> None:
        """Close this connection because the operator asked (the client should not reconnect with the same token)."""


class ConnectionRegistry(abc.ABC):
    """This node's connections by user, and the cluster-wide disconnect (L{twisted_rt.store})."""

    @abc.abstractmethod
    def register(self, user: str, conn: Closable) -> None:
        """C{conn} belongs to C{user} (a JWT C{sub}, or a Pusher C{user_id})."""

    @abc.abstractmethod
    def unregister(self, user: str, conn: Closable) -> None:
        """C{conn} is gone."""

    @abc.abstractmethod
    def disconnect(self, user: str) -> Deferred[int]:
        """Close every connection of C{user} on every node; fires with how many this node closed."""

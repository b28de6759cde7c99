# -*- test-case-name: tests.test_daemon -*-
"""
The shared parts one daemon is made of, handed to every route module.

Each route module exposes C{resource(app) -> IResource}; L{twisted_rt.routes.build_root} mounts
them.  Modules that hold connections register a shutdown hook with
L{App.on_shutdown} so the service can close them (WebSocket with 1001) when
it stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from twisted_rt.core.auth import Authenticator, Principal
from twisted_rt.core.config import Config
from twisted_rt.core.metrics import Stats
from twisted_rt.interfaces import Broker, ConnectionRegistry, Presence, Reactor

if TYPE_CHECKING:
    from twisted_rt.outbound import Outbound

__all__ = ["App"]

ShutdownHook = Callable[[], "Deferred[Any] | None"]


@dataclass
class App:
    """Everything a route needs: config, reactor, broker, auth and counters."""

    config: Config
    reactor: Reactor
    broker: Broker
    auth: Authenticator
    stats: Stats
    #: presence members (C{None} until the service builds it; every presence channel uses it)
    presence: Presence | None = None
    #: this node's connections by user, and the cluster-wide disconnect
    connections: ConnectionRegistry | None = None
    #: outgoing webhooks (C{[[destinations]]}); C{None} when none are configured
    outbound: Outbound | None = None
    shutdown_hooks: list[ShutdownHook] = field(default_factory=list)
    startup_hooks: list[ShutdownHook] = field(default_factory=list)
    stopping: bool = False

    def on_shutdown(self, hook: ShutdownHook) -> None:
        """Call C{hook} when the daemon stops (before the journal closes)."""
        self.shutdown_hooks.append(hook)

    def on_startup(self, hook: ShutdownHook) -> None:
        """Call C{hook} when the daemon starts (after the broker opened)."""
        self.startup_hooks.append(hook)

    def principal(self, request: Request) -> Principal:
        """
        The caller of an HTTP request (C{Authorization: Bearer} or
        C{?token=}).  @raise AuthError: a bad token.
        """
        header = request.getHeader(b"authorization")
        query = (request.args or {}).get(b"token", [None])[0]
        return self.auth.bearer(header, query)

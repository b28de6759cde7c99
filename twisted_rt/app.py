# -*- test-case-name: tests.test_daemon -*-
"""
The shared parts one daemon is made of, handed to every route module.

Each route module exposes C{resource(app) -> IResource}; L{build_root} mounts
them.  Modules that hold connections register a shutdown hook with
L{App.on_shutdown} so the service can close them (WebSocket with 1001) when
it stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.web.resource import IResource
from twisted.web.server import Request

from twisted_rt.auth import Authenticator, Principal
from twisted_rt.broker import Broker
from twisted_rt.config import Config
from twisted_rt.metrics import Stats

__all__ = ["App", "build_root"]

ShutdownHook = Callable[[], "Deferred[Any] | None"]


@dataclass
class App:
    """Everything a route needs: config, reactor, broker, auth and counters."""

    config: Config
    reactor: Any
    broker: Broker
    auth: Authenticator
    stats: Stats
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


def build_root(app: App) -> IResource:
    """The resource tree of the daemon: every route of the contract."""
    from twisted_rt import api, health, hooks, inspector, sse, ws
    from twisted_rt.web import Root

    root = Root()
    root.putChild(b"healthz", health.Healthz(app))
    root.putChild(b"readyz", health.Readyz(app))
    root.putChild(b"hooks", hooks.resource(app))
    root.putChild(b"ws", ws.resource(app))
    root.putChild(b"sse", sse.resource(app))
    root.putChild(b"poll", sse.poll_resource(app))
    api.mount(root, app)
    inspector.mount(root, app)
    return root

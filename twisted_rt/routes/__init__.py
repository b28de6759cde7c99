"""
The routes and transports: webhooks in, the JSON API, WebSocket, SSE, long-poll, health, the inspector.

L{build_root} mounts them.  A route imports the web layer, the subscriber, the store's interfaces and the core; never another layer above it.
"""

from __future__ import annotations

from twisted.web.resource import IResource

from twisted_rt.app import App
from twisted_rt.routes import api, destinations, health, hooks, inspector, openapi, poll, sse, ws
from twisted_rt.web.resource import Root

__all__ = ["build_root"]


def build_root(app: App) -> IResource:
    """The resource tree of the daemon: every route of the contract."""
    root = Root()
    root.putChild(b"healthz", health.Healthz(app))
    root.putChild(b"readyz", health.Readyz(app))
    root.putChild(b"hooks", hooks.resource(app))
    root.putChild(b"ws", ws.resource(app))
    root.putChild(b"sse", sse.resource(app))
    root.putChild(b"poll", poll.resource(app))
    api.mount(root, app)
    destinations.mount(root, app)  # /api/destinations (issue 17)
    root.putChild(b"openapi.json", openapi.resource(app))
    inspector.mount(root, app)
    if app.config.pusher.enabled:  # the Pusher protocol: /app/<key> and the HTTP API
        from twisted_rt.routes import pusher, pusher_api

        app_resource, pusher_factory = pusher.resource(app)
        root.putChild(b"app", app_resource)
        pusher_api.mount(root, app, pusher_factory)
    return root

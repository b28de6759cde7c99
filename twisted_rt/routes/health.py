# -*- test-case-name: tests.test_daemon -*-
"""
C{/healthz} (the process answers) and C{/readyz} (it can accept events:
journal or broker up, not shutting down).
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from twisted_rt.app import App
from twisted_rt.web.resource import JsonResource, Reply

__all__ = ["Healthz", "Readyz"]


class Healthz(JsonResource):
    """C{GET /healthz}: 200 while the process runs."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    def handle_GET(self, request: Request) -> dict[str, Any]:
        return {"status": "ok"}


class Readyz(JsonResource):
    """C{GET /readyz}: 200 when events can be accepted, else 503 with why."""

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    def handle_GET(self, request: Request) -> Reply:
        broker = self.app.broker
        if self.app.stopping:
            return Reply(503, {"error": "stopping", "message": "the daemon is shutting down"})
        if not broker.ready:
            return Reply(503, {"error": "not_ready", "message": broker.not_ready_reason})
        return Reply(200, {"status": "ready"})

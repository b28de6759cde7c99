# -*- test-case-name: tests.test_ws -*-
"""C{/ws}: WebSocket subscribers (placeholder until issue 4 lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import IResource

from twisted_rt.web import json_page

if TYPE_CHECKING:
    from twisted_rt.app import App


def resource(app: App) -> IResource:
    """The C{/ws} resource."""
    return json_page(404, "not_found", "WebSocket is not served yet")

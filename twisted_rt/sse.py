# -*- test-case-name: tests.test_sse -*-
"""C{/sse} and C{/poll} (placeholder until issue 4 lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import IResource

from twisted_rt.web import json_page

if TYPE_CHECKING:
    from twisted_rt.app import App


def resource(app: App) -> IResource:
    """The C{/sse} resource."""
    return json_page(404, "not_found", "SSE is not served yet")


def poll_resource(app: App) -> IResource:
    """The C{/poll} resource."""
    return json_page(404, "not_found", "long-poll is not served yet")

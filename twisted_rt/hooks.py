# -*- test-case-name: tests.test_hooks -*-
"""C{/hooks/<source>}: signed webhooks in (placeholder until issue 3 lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import IResource

from twisted_rt.web import json_page

if TYPE_CHECKING:
    from twisted_rt.app import App


def resource(app: App) -> IResource:
    """The C{/hooks} subtree."""
    return json_page(404, "unknown_source", "no webhook sources are served yet")

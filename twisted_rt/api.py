# -*- test-case-name: tests.test_api -*-
"""C{/api/*}, C{/metrics}, C{/openapi.json} (placeholder until issue 5 lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource

if TYPE_CHECKING:
    from twisted_rt.app import App


def mount(root: Resource, app: App) -> None:
    """Put the API routes under C{root}."""

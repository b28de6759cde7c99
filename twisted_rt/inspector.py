# -*- test-case-name: tests.test_inspector -*-
"""C{GET /} and C{/client.js} (placeholder until issue 9 lands)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource

if TYPE_CHECKING:
    from twisted_rt.app import App


def mount(root: Resource, app: App) -> None:
    """Put the inspector page and client under C{root}."""

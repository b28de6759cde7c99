# -*- test-case-name: tests.test_tls -*-
"""TLS listeners (placeholder until issue 7 lands: plain endpoint strings are used)."""

from __future__ import annotations

from typing import Any

from twisted_rt.config import Config


def server_endpoint(reactor: Any, description: str, config: Config) -> Any:
    """
    The endpoint for an C{ssl:} description built with the project's
    context factory, or C{None} to let Twisted parse C{description}.
    """
    return None

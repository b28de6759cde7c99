"""
Outgoing webhooks: events delivered to HTTP endpoints (C{[[destinations]]}), durably, with retries.

Above the web layer (it uses Twisted's HTTP client and the store), below L{twisted_rt.app}.
"""

from __future__ import annotations

__all__ = ["Outbound"]


class Outbound:
    """The delivery engine of every configured destination (issue 17 fills this in)."""

# -*- test-case-name: tests.test_dest_http -*-
"""
What every outgoing HTTP request of the package shares (C{twisted-rt tail
--forward} in L{twisted_rt.client}, destinations in L{twisted_rt.outbound}):
the headers never passed on, and a body already in memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = ["FORWARD_DROPPED_HEADERS", "HOP_BY_HOP_HEADERS", "SECRET_HEADERS", "BytesBody"]

#: request headers that carry a credential rather than describe the event:
#: never stored, served or forwarded (CONTRACT "Safety rules")
SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-gitlab-token"})

#: request headers that describe one hop or that the HTTP client sets itself
HOP_BY_HOP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-connection",
    }
)

#: a stored webhook's headers never sent on when it is forwarded
FORWARD_DROPPED_HEADERS = SECRET_HEADERS | HOP_BY_HOP_HEADERS


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory (written at once, no cooperator)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

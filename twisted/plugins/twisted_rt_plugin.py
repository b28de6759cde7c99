"""
The C{rt} plugin for C{twistd} and C{twist}: C{twistd -n rt}.

Kept tiny: the real code is loaded lazily from L{twisted_rt.tap}, so that a
plugin scan imports nothing heavy.  There is no C{__init__.py} here, on
purpose: C{twisted/plugins} is a namespace shared with Twisted.
"""

from twisted.application.service import ServiceMaker

TwistedRT = ServiceMaker(
    "twisted_rt",
    "twisted_rt.tap",
    "Real-time event daemon: signed webhooks and a publish API in, "
    "WebSocket / SSE / long-poll out, with a durable journal.",
    "rt",
)

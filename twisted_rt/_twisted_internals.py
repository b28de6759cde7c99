# -*- test-case-name: tests.test_internals -*-
"""
The one module that touches Twisted's private names.

Every other module of twisted_rt uses Twisted's public API only; each
private reach is here, with a comment naming the public API that is
missing.  Filled in step by step (issue 14).
"""

from __future__ import annotations

from typing import Any


def clear_exit_signal(reactor: Any) -> None:
    """
    Forget the signal (SIGTERM, SIGINT) that stopped C{reactor}, so that
    twistd exits 0 after a clean shutdown instead of re-raising the signal
    and dying "by signal".

    Missing public API: twistd reads the reactor's C{_exitSignal}
    (L{twisted.internet.interfaces._ISupportsExitSignalCapturing}, itself
    private) and there is no public way to say "the shutdown was clean".
    A reactor without the attribute (a test's fake) is left alone.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None

# -*- test-case-name: tests.test_sentinel_unit -*-
"""
Finding the Redis primary through Redis Sentinel, and following failovers.

This follows Redis's "Sentinel clients" guidelines rather than
C{txredisapi.Sentinel}, whose discovery takes the first Sentinel's
C{SENTINEL MASTERS} answer with a fixed 10 s timeout on the global reactor,
keeps lazy connections of its own to every Sentinel (with their own retry
loop outside our backoff), never listens for C{+switch-master}, and hands
out a pooled handler where the broker needs the protocol of one
L{ClientService}-kept link.  Here:

  - L{SentinelLocator.primary} asks the Sentinels in turn (each on a short
    connection of its own, with a connect and a reply timeout),
    C{SENTINEL get-master-addr-by-name <master>}; the first that knows the
    master answers, and it is asked first next time;
  - L{SentinelEndpoint} asks the locator before every connection attempt
    of a link, so a reconnect after a failover reaches the new primary;
    the link then checks C{ROLE} (a stale answer, or a demoted primary,
    is refused and retried with backoff);
  - L{SentinelWatcher} keeps one pub/sub connection to one Sentinel at a
    time (the next one when it fails) subscribed to C{+switch-master}, so
    that the links move at once when a failover completes, and asks for a
    check each time it (re)connects, in case it missed a switch meanwhile.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, cast

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import protocol
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_rt.interfaces import Reactor

__all__ = ["NoPrimary", "SentinelEndpoint", "SentinelLocator", "SentinelWatcher", "parse_hostport"]

#: Seconds to connect to a Sentinel, and to wait for its answer.
SENTINEL_TIMEOUT = 1.0
#: Seconds between PINGs of the watcher's connection (a Sentinel that stops
#: answering is left for the next one).
WATCH_PING = 5.0


class NoPrimary(Exception):
    """No Sentinel gave the primary's address (all down, or none knows the master)."""


def parse_hostport(text: str) -> tuple[str, int]:
    """C{"host:port"} (C{"[::1]:26379"} for IPv6) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _protocol(cls: type, reactor: Reactor, password: str | None) -> Any:
    p = cls(charset="utf-8", replyTimeout=SENTINEL_TIMEOUT, convertNumbers=False)
    p.callLater = reactor.callLater
    p.factory = _NullFactory()
    p.sentinel_password = password
    return p


class _NullFactory(protocol.Factory):
    """What txredisapi's protocol calls back into (AUTH is done by us, not by txredisapi)."""

    isLazy = True
    noisy = False

    def stopTrying(self) -> None:
        """Nothing to stop: our connections are one-shot or kept by a ClientService."""

    def connectionError(self, why: str) -> None:
        """Reported through the failing command instead."""


async def _auth(proto: Any) -> None:
    """AUTH with the password, if any; a Sentinel without one configured is fine."""
    password = proto.sentinel_password
    if not password:
        return
    try:
        await proto.execute_command("AUTH", password)
    except txredisapi.ResponseError as e:
        if "without any password configured" not in str(e) and "no password is set" not in str(e):
            raise


class SentinelLocator:
    """
    Asks Sentinels for the current primary of C{master}.

    @ivar sentinels: the (host, port) of each Sentinel, the one that answered
        last first.
    @ivar error: why the last question failed ("" after a success).
    """

    log = Logger()

    def __init__(self, reactor: Reactor, sentinels: Sequence[tuple[str, int]], master: str,
                 password: str | None = None, timeout: float = SENTINEL_TIMEOUT) -> None:
        if not sentinels:
            raise ValueError("no sentinels")
        self.reactor = reactor
        self.sentinels = list(sentinels)
        self.master = master
        self.password = password or None
        self.timeout = timeout
        self.error = ""

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        """A client endpoint for C{host:port} (overridden by tests)."""
        return HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)

    def primary(self) -> Deferred[tuple[str, int]]:
        """The primary's (host, port) from the first Sentinel that knows it; fails with L{NoPrimary}."""
        return ensureDeferred(self._primary())

    async def _primary(self) -> tuple[str, int]:
        errors: list[str] = []
        for addr in list(self.sentinels):
            try:
                found = await self._ask(addr)
            except Exception as e:  # noqa: BLE001 - any failure: ask the next Sentinel
                errors.append(f"{addr[0]}:{addr[1]}: {e or type(e).__name__}")
                continue
            if found is None:
                errors.append(f"{addr[0]}:{addr[1]}: knows no master named {self.master!r}")
                continue
            if self.sentinels[0] != addr:
                self.sentinels.remove(addr)
                self.sentinels.insert(0, addr)
            self.error = ""
            return found
        self.error = "no Sentinel gave the primary (" + "; ".join(errors) + ")"
        raise NoPrimary(self.error)

    async def _ask(self, addr: tuple[str, int]) -> tuple[str, int] | None:
        proto = _protocol(txredisapi.BaseRedisProtocol, self.reactor, self.password)
        await connectProtocol(self.endpoint(*addr), proto)
        try:
            await proto.whenConnected()
            await _auth(proto)
            reply = await proto.execute_command("SENTINEL", "get-master-addr-by-name", self.master)
        finally:
            if proto.transport is not None:
                proto.transport.loseConnection()
        if not reply:
            return None
        return _s(reply[0]), int(_s(reply[1]))


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """Connects to the primary the Sentinels name at the time of each attempt."""

    def __init__(self, locator: SentinelLocator, timeout: float = 5.0) -> None:
        self.locator = locator
        self.timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        d = self.locator.primary()

        def found(addr: tuple[str, int]) -> Deferred[Any]:
            host, port = addr
            return self.locator.endpoint(host, port).connect(protocolFactory)

        return d.addCallback(found)


class _WatchProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """The watcher's pub/sub connection to one Sentinel."""

    watcher: SentinelWatcher

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.watcher.switched(_s(message))

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.watcher.lost(self)


@implementer(IStreamClientEndpoint)
class _RotatingEndpoint:
    """Each attempt goes to the next Sentinel of the locator's list."""

    def __init__(self, locator: SentinelLocator) -> None:
        self.locator = locator
        self.attempt = 0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        sentinels = self.locator.sentinels
        host, port = sentinels[self.attempt % len(sentinels)]
        self.attempt += 1
        return self.locator.endpoint(host, port).connect(protocolFactory)


class _WatchFactory(protocol.Factory):
    noisy = False

    def __init__(self, watcher: SentinelWatcher) -> None:
        self.watcher = watcher

    def buildProtocol(self, addr: Any) -> Any:
        w = self.watcher
        p = _protocol(_WatchProtocol, w.locator.reactor, w.locator.password)
        p.watcher = w
        return p


class SentinelWatcher:
    """
    Listens for C{+switch-master} of C{locator.master} on one Sentinel at a
    time and calls C{on_change()} when the primary changed, and each time
    the watch (re)connects (it may have missed a switch while away).
    """

    log = Logger()

    def __init__(self, locator: SentinelLocator, on_change: Callable[[], None],
                 retry: Callable[[int], float]) -> None:
        self.locator = locator
        self.on_change = on_change
        self.retry = retry
        self.refused = 0
        self.proto: Any = None
        self.service = ClientService(
            _RotatingEndpoint(locator), _WatchFactory(self), retryPolicy=self._retry_delay,
            clock=cast(IReactorTime, locator.reactor), prepareConnection=self._prepare,
        )
        self._ping = LoopingCall(self._send_ping)
        self._ping.clock = cast(IReactorTime, locator.reactor)

    def start(self) -> None:
        self.service.startService()
        self._ping.start(WATCH_PING, now=False).addErrback(lambda f: None)

    def stop(self) -> Deferred[None]:
        if self._ping.running:
            self._ping.stop()
        return self.service.stopService()

    def _retry_delay(self, attempt: int) -> float:
        return self.retry(attempt + self.refused)

    def _prepare(self, proxy: Any) -> None:
        # As redis._Link._prepare: answer ClientService at once, close on failure.
        def failed(f: Failure, proto: Any) -> None:
            self.log.warn("sentinel: watching failed: {e}", e=f.getErrorMessage(), log_category="RT-S03")
            if proto.transport is not None:
                proto.transport.loseConnection()

        def connected(proto: Any) -> None:
            ensureDeferred(self._watch(proto)).addErrback(failed, proto)

        proxy.whenConnected().addCallback(connected)

    async def _watch(self, proto: Any) -> None:
        await _auth(proto)
        await proto.subscribe("+switch-master")
        if proto.transport is None or not proto.connected:
            return
        self.proto = proto
        self.refused = 0
        self.log.info("sentinel: watching {master} for failovers", master=self.locator.master,
                      log_category="RT-S01")
        self.on_change()

    def _send_ping(self) -> None:
        proto = self.proto
        if proto is not None:
            maybeDeferred(proto.execute_command, "PING").addErrback(lambda f: None)

    def lost(self, proto: Any) -> None:
        if self.proto is proto:
            self.proto = None
        else:
            self.refused += 1  # lost before it watched

    def switched(self, message: str) -> None:
        """C{+switch-master <master> <old ip> <old port> <new ip> <new port>}."""
        parts = message.split()
        if len(parts) == 5 and parts[0] == self.locator.master:
            self.log.warn("sentinel: {master} failed over from {old} to {new}", master=parts[0],
                          old=f"{parts[1]}:{parts[2]}", new=f"{parts[3]}:{parts[4]}", log_category="RT-S02")
            self.on_change()

# -*- test-case-name: tests.test_daemon -*-
"""
The daemon as one Twisted service: builds the parts from a L{Config}, opens
the broker, listens, tells systemd, and shuts down in order.

Start: broker (journal) opens -> startup hooks -> every endpoint listens ->
C{READY=1}.  A listener that cannot bind stops the daemon with one log
line and exit status 1.

Stop (SIGTERM/SIGINT): C{STOPPING=1} -> stop listening -> shutdown hooks
(WebSocket clients closed with 1001, streams ended) -> wait for in-flight
requests up to C{shutdown_timeout_seconds} -> flush and close the journal.

Building, starting and stopping an L{RTService} changes no process-wide
setting (GC, the GIL switch interval, log observers, signal handling, the
process's exit): a test may run one in-process.  That policy belongs to the
entry point, L{twisted_rt.tap.makeService}, which registers it with
L{RTService.on_starting}, L{RTService.on_ready}, L{RTService.on_stopped}
and L{RTService.on_fatal}.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from twisted_rt.app import App
from twisted_rt.core.auth import Authenticator
from twisted_rt.core.config import Config
from twisted_rt.core.metrics import Stats
from twisted_rt.core.systemd import Notifier, WatchdogService
from twisted_rt.interfaces import Broker
from twisted_rt.outbound import Outbound
from twisted_rt.routes import build_root
from twisted_rt.store.deliveries import DeliveryStore, MemoryDeliveries, RedisDeliveries, SqliteDeliveries
from twisted_rt.store.journal import Journal, ThreadedReactor
from twisted_rt.store.local import LocalBroker
from twisted_rt.store.presence import Connections, make_presence
from twisted_rt.web.site import RTSite

__all__ = ["RTService", "make_broker", "make_outbound"]

#: what L{RTService.on_starting}, L{RTService.on_ready} and L{RTService.on_stopped} call
Hook = Callable[[], object]


def make_broker(config: Config, reactor: ThreadedReactor, stats: Stats) -> Broker:
    """The broker the config asks for."""
    if config.broker.kind == "redis":
        from twisted_rt.store.redis import RedisBroker

        return RedisBroker(config, reactor, stats)
    j = config.journal
    journal = Journal(
        reactor,
        j.path,
        max_events_per_channel=j.max_events_per_channel,
        retention_seconds=j.retention_seconds,
        max_batch=j.max_batch,
        trim_interval_seconds=j.trim_interval_seconds,
        on_commit=stats.on_commit,
        rules=config.channels,
    )
    return LocalBroker(journal)


def make_outbound(app: App) -> Outbound | None:
    """The outgoing-webhook engine when C{[[destinations]]} exist (its state beside the broker's events)."""
    if not app.config.destinations:
        return None
    broker = app.broker
    store: DeliveryStore
    if isinstance(broker, LocalBroker):
        store = SqliteDeliveries(broker.journal)
    else:
        from twisted_rt.store.redis import RedisBroker

        store = RedisDeliveries(broker) if isinstance(broker, RedisBroker) else MemoryDeliveries()
    outbound = Outbound(app.config, app.reactor, broker, store, app.stats.destinations)
    app.on_startup(outbound.start)
    app.on_shutdown(outbound.stop)
    return outbound


class RTService(MultiService):
    """
    The whole daemon, with no process-wide side effect (see the module's
    docstring): what the process does around it is given as hooks.

    @ivar start_failure: why the start failed (the one line L{on_fatal}
        hooks get), or C{None}.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: ThreadedReactor | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            # The global reactor's declared type leaves out its threads (IReactorFromThreads).
            reactor = cast(ThreadedReactor, _reactor)
        self.config = config
        self.reactor = reactor
        self.notifier = notifier or Notifier()
        self.stats = Stats()
        self.broker = make_broker(config, reactor, self.stats)
        # presence members (in Redis with the Redis broker) and the user registry
        self.presence = make_presence(
            self.broker, reactor, config.presence.heartbeat_seconds, config.presence.node_timeout_seconds
        )
        self.stats.presence_gauge = lambda: self.presence.gauge
        self.app = App(
            config=config,
            reactor=reactor,
            broker=self.broker,
            auth=Authenticator(config.auth),
            stats=self.stats,
            presence=self.presence,
            connections=Connections(self.broker),
        )
        self.app.outbound = make_outbound(self.app)  # [[destinations]]: started after the broker opened
        self.root = build_root(self.app)
        self.site = self._make_site()
        self.ports: list[IListeningPort] = []
        self.start_failure: str | None = None
        self._started: Deferred[None] | None = None
        self._starting: list[Hook] = []
        self._ready: list[Hook] = []
        self._stopped: list[Hook] = []
        self._fatal_hooks: list[Callable[[str], object]] = []
        WatchdogService(self.notifier, reactor).setServiceParent(self)

    def on_starting(self, hook: Hook) -> None:
        """Call C{hook} first thing in L{startService}, before anything is logged or opened."""
        self._starting.append(hook)

    def on_ready(self, hook: Hook) -> None:
        """Call C{hook} once every endpoint listens, just before C{READY=1}."""
        self._ready.append(hook)

    def on_stopped(self, hook: Hook) -> None:
        """Call C{hook} at the end of a clean stop (the journal is closed)."""
        self._stopped.append(hook)

    def on_fatal(self, hook: Callable[[str], object]) -> None:
        """
        Call C{hook} with one line saying why, when the start fails (a
        listener cannot bind, a start-up step raised).  The service
        itself only logs it: leaving the process is the entry point's policy.
        """
        self._fatal_hooks.append(hook)

    def _make_site(self) -> RTSite:
        stats = self.stats

        def too_large(request: Request) -> None:
            stats.dropped["body_too_large"] += 1

        def refused(reason: str) -> None:
            stats.dropped[reason] += 1

        server = self.config.server
        return RTSite(
            self.root,
            max_body_bytes=server.max_body_bytes,
            log_requests=server.access_log,
            on_too_large=too_large,
            reactor=self.reactor,
            head_timeout=server.request_head_timeout_seconds,
            max_connections=server.max_connections,
            max_connections_per_ip=server.max_connections_per_ip,
            on_refused=refused,
        )

    def endpoint(self, desc: str) -> IStreamServerEndpoint:
        """The server endpoint of one C{[server] listen} entry."""
        from twisted.internet.endpoints import serverFromString

        from twisted_rt.web import tls

        endpoint: IStreamServerEndpoint = tls.server_endpoint(self.reactor, desc, self.config) or serverFromString(
            self.reactor, desc
        )
        return endpoint

    def _listen(self, desc: str) -> Deferred[IListeningPort]:
        try:
            return self.endpoint(desc).listen(self.site)
        except (IndexError, KeyError):
            if not desc.startswith("systemd:"):
                return defer.fail()
            return defer.fail(
                OSError("systemd passed no such socket (is the .socket unit active? LISTEN_FDS/LISTEN_FDNAMES)")
            )
        except Exception:  # noqa: BLE001 - any failure to build the endpoint is reported by _start
            return defer.fail()

    def startService(self) -> None:
        super().startService()
        for hook in self._starting:
            hook()
        for s in self.config.sources:
            if s.verify == "none":
                self.log.warn(
                    "source {name!r} has verify = \"none\": anyone who can reach it can post events;"
                    " use it only on a trusted network",
                    name=s.name,
                    log_category="RT-C01",
                )
        self._started = defer.ensureDeferred(self._start())
        self._started.addErrback(self._fatal)

    async def _start(self) -> None:
        await self.broker.start()
        if self.config.pusher.enabled or any(rule.presence for rule in self.config.channels):  # presence- channels
            self.presence.start()
        for hook in self.app.startup_hooks:
            await _maybe(hook())
        # each result is (True, port) or (False, Failure)
        results: list[tuple[bool, Any]] = await DeferredList(
            [self._listen(desc) for desc in self.config.server.listen], consumeErrors=True
        )
        failed = []
        for desc, (ok, value) in zip(self.config.server.listen, results, strict=True):
            if ok:
                self.ports.append(value)
                self.log.info("listening on {desc}", desc=desc, log_category="RT-S01")
            else:
                failed.append(f"cannot listen on {desc}: {value.getErrorMessage()}")
        if failed:
            raise _StartError("; ".join(failed))
        for ready in self._ready:
            ready()
        self.notifier.ready(f"serving {len(self.ports)} listener(s)")
        self.log.info("twisted_rt ready", log_category="RT-S02")

    def _fatal(self, f: Failure) -> None:
        msg = f.getErrorMessage() if f.check(_StartError) else f"start failed: {f.getErrorMessage()}"
        if not f.check(_StartError):
            self.log.failure("start failed", f)
        self.log.critical("{msg}", msg=msg, log_category="RT-S99")
        self.start_failure = msg
        for hook in self._fatal_hooks:
            hook(msg)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.app.stopping = True
        self.notifier.stopping()
        self.log.info("stopping: no new connections", log_category="RT-S10")
        ports, self.ports = self.ports, []
        await DeferredList([defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)
        await DeferredList(
            [_maybe(hook()) for hook in self.app.shutdown_hooks], consumeErrors=True
        )
        await self._drain(self.config.server.shutdown_timeout_seconds)
        await self.presence.stop()  # this node's members leave, on every node
        await self.broker.stop()
        self.log.info("stopped", log_category="RT-S11")
        for hook in self._stopped:
            hook()

    async def _drain(self, timeout: float) -> None:
        """Wait until no request is in flight, or C{timeout} passes."""
        from twisted.internet.task import deferLater

        waited = 0.0
        step = 0.05
        while self.site.inflight and waited < timeout:
            await deferLater(cast(IReactorTime, self.reactor), step, lambda: None)
            waited += step
        if self.site.inflight:
            self.log.warn(
                "{n} request(s) still in flight after {t}s; closing them",
                n=len(self.site.inflight),
                t=timeout,
            )
            for request in list(self.site.inflight):
                transport = getattr(request, "transport", None) or getattr(request.channel, "transport", None)
                if transport is not None:
                    transport.abortConnection() if hasattr(transport, "abortConnection") else transport.loseConnection()


class _StartError(Exception):
    pass


def _maybe(result: Any) -> Deferred[Any]:
    if isinstance(result, Deferred):
        return result
    if result is not None and hasattr(result, "__await__"):
        return defer.ensureDeferred(result)
    return defer.succeed(result)

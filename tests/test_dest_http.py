"""
The destination's HTTP client (outbound._http.Sender) against a real
twisted.web receiver on loopback in the test reactor: 2xx, 500 with a
capped body, Retry-After, slow (timeout), refused, no redirect followed;
and the SQLite delivery store on a real journal (Journal.run_in_writer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import free_port
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from twisted_rt.core.config import DestinationConfig
from twisted_rt.outbound import Sender
from twisted_rt.outbound._http import BODY_CAP
from twisted_rt.store.deliveries import Delivery, DestState, SqliteDeliveries
from twisted_rt.store.journal import Journal

reactor: Any = _reactor


class Scripted(Resource):
    """Answers by path: /ok 204, /fail 500 (long body), /busy 429 + Retry-After, /slow never, /moved 302."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[tuple[bytes, dict[bytes, list[bytes]]]] = []

    def render_POST(self, request: Any) -> bytes | int:
        self.bodies.append((request.content.read(), dict(request.requestHeaders.getAllRawHeaders())))
        path = request.path
        if path == b"/ok":
            request.setResponseCode(204)
            return b""
        if path == b"/fail":
            request.setResponseCode(500)
            return b"x" * (BODY_CAP * 20)
        if path == b"/busy":
            request.setResponseCode(429)
            request.setHeader(b"retry-after", b"42")
            return b"slow down"
        if path == b"/moved":
            request.setResponseCode(302)
            request.setHeader(b"location", b"/ok")
            return b""
        return NOT_DONE_YET  # /slow: never answers


@pytest.fixture(autouse=True, params=["fast", "agent"])
def client_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on both client paths: the protocol-direct fast path and Agent."""
    import twisted_rt.outbound._http as http_module

    monkeypatch.setattr(http_module, "fast_paths_enabled", lambda: request.param == "fast")
    return str(request.param)


@pytest.fixture
def server() -> Any:
    resource = Scripted()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield resource, port.getHost().port
    port.stopListening()


def _sender(url: str, timeout: float = 5.0) -> Sender:
    return Sender(reactor, DestinationConfig(name="t", url=url, channels=("a",), timeout_seconds=timeout))


@pytest_twisted.ensureDeferred
async def test_2xx_is_success_and_the_connection_is_reused(server: Any) -> None:
    """A 204 is ok; two sequential requests go over one kept-alive connection with the given headers."""
    resource, port = server
    s = _sender(f"http://127.0.0.1:{port}/ok")
    try:
        a = await s.send(b"one", [("X-A", "1")])
        b = await s.send(b"two", [])
        assert a.ok and b.ok and a.status == 204
        assert resource.bodies[0][0] == b"one" and resource.bodies[0][1][b"X-A"] == [b"1"]
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_500_is_a_failure_with_a_capped_body(server: Any) -> None:
    """A 500 is a 'status' failure whose message holds only the start of the (long) body."""
    _, port = server
    s = _sender(f"http://127.0.0.1:{port}/fail")
    try:
        out = await s.send(b"{}", [])
        assert out.kind == "status" and out.status == 500 and len(out.message) < 300
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_retry_after_and_redirects(server: Any) -> None:
    """429 carries its Retry-After; a 302 is a failure (redirects are not followed)."""
    resource, port = server
    s = _sender(f"http://127.0.0.1:{port}/busy")
    m = _sender(f"http://127.0.0.1:{port}/moved")
    try:
        out = await s.send(b"{}", [])
        assert (out.kind, out.status, out.retry_after) == ("status", 429, "42")
        moved = await m.send(b"{}", [])
        assert moved.kind == "status" and moved.status == 302
        assert len(resource.bodies) == 2  # /ok was never asked
    finally:
        await s.close()
        await m.close()


@pytest_twisted.ensureDeferred
async def test_slow_receiver_times_out(server: Any) -> None:
    """No answer within timeout_seconds is a 'timeout' failure."""
    _, port = server
    s = _sender(f"http://127.0.0.1:{port}/slow", timeout=0.3)
    try:
        out = await s.send(b"{}", [])
        assert out.kind == "timeout"
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_refused_connection() -> None:
    """Nothing listening is a 'refused' failure."""
    s = _sender(f"http://127.0.0.1:{free_port()}/x")
    out = await s.send(b"{}", [])
    assert out.kind == "refused" and "cannot connect" in out.message
    await s.close()


@pytest_twisted.ensureDeferred
async def test_https_is_verified_by_default_and_ca_file_trusts_a_private_ca(tmp_path: Path) -> None:
    """A self-signed https receiver is refused ('tls') by the system store; with ca_file naming its cert it is ok."""
    from twisted.internet import ssl

    from twisted_rt.core.config import Config, ConfigError
    from twisted_rt.outbound import check
    from twisted_rt.web.tls import gen_cert

    cert_path, key_path = gen_cert("localhost", str(tmp_path / "tls"))
    cert = ssl.PrivateCertificate.loadPEM(Path(cert_path).read_bytes() + Path(key_path).read_bytes())
    port = reactor.listenSSL(0, Site(Scripted()), cert.options(), interface="127.0.0.1")
    url = f"https://localhost:{port.getHost().port}/ok"
    try:
        plain = _sender(url, timeout=3)
        out = await plain.send(b"{}", [])
        assert out.kind == "tls", out
        await plain.close()
        dest = DestinationConfig(name="t", url=url, channels=("a",), ca_file=cert_path, timeout_seconds=3)
        check(Config(destinations=(dest,)))
        trusted = Sender(reactor, dest)
        out = await trusted.send(b"{}", [])
        assert out.ok, out
        await trusted.close()
    finally:
        await port.stopListening()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="ca_file"):
        check(Config(destinations=(DestinationConfig(name="t", url=url, channels=("a",), ca_file=str(bad)),)))
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.url.*does not resolve"):
        check(Config(destinations=(DestinationConfig(name="t", url="http://no-such-host.invalid/x", channels=("a",)),)))


@pytest_twisted.ensureDeferred
async def test_sqlite_store_round_trip(tmp_path: Path) -> None:
    """State rows and queue rows survive in the journal's file: due, next_due, dead letters, revive, delete."""
    path = str(tmp_path / "j.sqlite3")
    journal = Journal(reactor, path)
    await journal.open()
    try:
        store = SqliteDeliveries(journal)
        await store.start()
        await store.save("d", DestState(position=7, delivered=3, last_error="x"))
        rows = [
            Delivery(id="a", body=b"\x00body", headers=(("H", "v"),), seq=1, next_at=10.0, attempts=1),
            Delivery(id="b", body=b"b", headers=(), seq=2, next_at=20.0),
            Delivery(id="c", body=b"c", headers=(), seq=3, next_at=5.0, dead=True, last_error="HTTP 500"),
        ]
        await store.put("d", rows)
        state = await store.load("d")
        assert (state.position, state.delivered, state.retrying, state.dead) == (7, 3, 2, 1)
        due = await store.due("d", 15.0, 10)
        assert [r.id for r in due] == ["a"] and due[0].body == b"\x00body" and due[0].headers == (("H", "v"),)
        assert await store.due("d", 15.0, 10, skip=["a"]) == []
        assert await store.next_due("d") == 10.0
        dead = await store.dead_letters("d", 10)
        assert [r.id for r in dead] == ["c"] and dead[0].last_error == "HTTP 500"
        assert await store.revive("d", ["c"], 1.0) == 1
        assert await store.revive("d", None, 1.0) == 0
        await store.delete("d", ["a", "b", "c"])
        assert (await store.load("d")).retrying == 0
        assert store.flushes >= 1
    finally:
        await journal.close()
    # a fresh journal on the same file sees the state
    journal = Journal(reactor, path)
    await journal.open()
    try:
        store = SqliteDeliveries(journal)
        await store.start()
        assert (await store.load("d")).position == 7
    finally:
        await journal.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_store_fails_with_journal_unavailable_when_closed(tmp_path: Path) -> None:
    """Writes to a closed journal fail with JournalUnavailable (the engine retries them)."""
    from twisted_rt.interfaces import JournalUnavailable

    journal = Journal(reactor, str(tmp_path / "j.sqlite3"))
    await journal.open()
    await journal.close()
    store = SqliteDeliveries(journal)
    with pytest.raises(JournalUnavailable):
        await store.save("d", DestState(position=1))
    await deferLater(reactor, 0, lambda: None)
    assert isinstance(Deferred, type)


@pytest_twisted.ensureDeferred
async def test_ca_file_adds_to_the_system_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ca_file naming CA A, a receiver whose cert is in the system store (SSL_CERT_FILE = B) is still trusted."""
    from twisted.internet import ssl

    from twisted_rt.web.tls import gen_cert

    system_cert, system_key = gen_cert("localhost", str(tmp_path / "system"))
    private_cert, _ = gen_cert("localhost", str(tmp_path / "private"))
    assert Path(system_cert).read_bytes() != Path(private_cert).read_bytes()
    monkeypatch.setenv("SSL_CERT_FILE", system_cert)  # OpenSSL's default verify paths: the "system store"
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
    cert = ssl.PrivateCertificate.loadPEM(Path(system_cert).read_bytes() + Path(system_key).read_bytes())
    port = reactor.listenSSL(0, Site(Scripted()), cert.options(), interface="127.0.0.1")
    url = f"https://localhost:{port.getHost().port}/ok"
    try:
        dest = DestinationConfig(name="t", url=url, channels=("a",), ca_file=private_cert, timeout_seconds=3)
        s = Sender(reactor, dest)
        out = await s.send(b"{}", [])
        assert out.ok, out
        await s.close()
    finally:
        await port.stopListening()


def test_system_and_file_trust_loads_default_paths_and_the_file() -> None:
    """The ca_file trust root calls set_default_verify_paths() and load_verify_locations(ca_file) on the context."""
    from twisted_rt._twisted_internals import SystemAndFileTrust

    calls: list[tuple[str, tuple[Any, ...]]] = []

    class Ctx:
        def set_default_verify_paths(self) -> None:
            calls.append(("default", ()))

        def load_verify_locations(self, *a: Any) -> None:
            calls.append(("file", a))

    SystemAndFileTrust("/etc/x.pem")._addCACertsToContext(Ctx())
    assert calls == [("default", ()), ("file", (b"/etc/x.pem",))]


@pytest_twisted.ensureDeferred
async def test_host_name_still_verified_with_ca_file(tmp_path: Path) -> None:
    """A cert trusted through ca_file but issued for another name is refused ('tls')."""
    from twisted.internet import ssl

    from twisted_rt.web.tls import gen_cert

    cert_path, key_path = gen_cert("other.example", str(tmp_path / "tls"))
    cert = ssl.PrivateCertificate.loadPEM(Path(cert_path).read_bytes() + Path(key_path).read_bytes())
    port = reactor.listenSSL(0, Site(Scripted()), cert.options(), interface="127.0.0.1")
    try:
        url = f"https://localhost:{port.getHost().port}/ok"
        s = Sender(reactor, DestinationConfig(name="t", url=url, channels=("a",), ca_file=cert_path, timeout_seconds=3))
        out = await s.send(b"{}", [])
        assert out.kind == "tls", out
        await s.close()
    finally:
        await port.stopListening()

"""
TLS listeners (issue 7): the context factory's settings, the start-time
checks, SIGHUP reload, and the daemon over HTTPS, HTTP/2 and wss:// with
certificate verification against a CA made here.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, DEFAULT_CONFIG, Daemon, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import EventLoggingObserver, MemoryReactor

from twisted_rt.checks import parse
from twisted_rt.core.config import Config, ConfigError, ServerConfig, TLSConfig
from twisted_rt.web import tls

# -- a test CA ---------------------------------------------------------------


class CA:
    """A certificate authority made for the tests, issuing server certificates."""

    def __init__(self, name: str = "twisted_rt test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, out: Path, name: str = "server") -> tuple[Path, Path, int]:
        """An RSA server certificate for localhost/127.0.0.1: (cert, key, serial)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        out.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path, serial


def client_context(cafile: Path) -> ssl.SSLContext:
    """A verifying client context trusting only C{cafile}."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    return ctx


def peer_serial(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> int:
    """The serial number of the certificate a new connection gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def handshake(port: int, **opts: Any) -> str:
    """Try a TLS handshake with a client limited by C{opts}; the cipher on success."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if "maximum_version" in opts:
        ctx.minimum_version = opts.get("minimum_version", ssl.TLSVersion.MINIMUM_SUPPORTED)
        ctx.maximum_version = opts["maximum_version"]
    if "ciphers" in opts:
        ctx.set_ciphers(opts["ciphers"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            cipher = s.cipher()
            assert cipher is not None
            return f"{s.version()} {cipher[0]}"


# -- unit tests: parsing, checks, context, reload ------------------------------


def test_parse_description_follows_twisted_syntax() -> None:
    """Endpoint descriptions split on unescaped colons; the first '=' makes a keyword."""
    args, kw = tls.parse_description(r"ssl:8443:interface=\:\:1:privateKey=C\:\\k.pem:certKey=a=b.pem")
    assert args == ["ssl", "8443"]
    assert kw == {"interface": "::1", "privateKey": "C:\\k.pem", "certKey": "a=b.pem"}


def test_certfiles_from_string_or_tls_section(tmp_path: Path) -> None:
    """The description's privateKey/certKey win; without them [tls] is used; neither is an error."""
    section = TLSConfig(cert="c.pem", key="k.pem", chain="chain.pem", curves=("X25519",))
    own = tls.CertFiles.for_description("ssl:1:privateKey=both.pem", section, "server.listen[0]")
    assert (own.cert, own.key, own.chain) == ("both.pem", "both.pem", "")
    shared = tls.CertFiles.for_description("ssl:1", section, "server.listen[0]")
    assert (shared.cert, shared.key, shared.chain, shared.curves) == ("c.pem", "k.pem", "chain.pem", ("X25519",))
    with pytest.raises(ConfigError, match=r"server.listen\[0\]: 'ssl:1' names no certificate"):
        tls.CertFiles.for_description("ssl:1", TLSConfig(), "server.listen[0]")
    with pytest.raises(ConfigError, match="unknown ssl: option 'privatekey'"):
        tls.CertFiles.for_description("ssl:1:privatekey=x", section, "server.listen[0]")


@pytest.fixture(scope="module")
def ca() -> CA:
    """One test CA for the module."""
    return CA()


@pytest.fixture(scope="module")
def pki(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The CA file, a server pair, a second pair and a garbage file."""
    d = tmp_path_factory.mktemp("pki")
    (d / "ca.pem").write_bytes(ca.pem())
    cert, key, _ = ca.issue(d, "a")
    cert2, key2, _ = ca.issue(d, "b")
    (d / "garbage.pem").write_text("not a certificate\n")
    return {"ca": d / "ca.pem", "cert": cert, "key": key, "cert2": cert2, "key2": key2,
            "garbage": d / "garbage.pem"}


def _cfg(listen: str, tls_section: TLSConfig | None = None, **server: Any) -> Config:
    return Config(server=ServerConfig(listen=(listen,), **server), tls=tls_section or TLSConfig())


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("missing", "cannot read the certificate"),
        ("garbage", "holds no PEM certificate"),
        ("mismatch", "does not match the certificate"),
        ("badkey", "is not a PEM private key"),
    ],
)
def test_check_refuses_bad_files_with_one_line(pki: dict[str, Path], which: str, message: str) -> None:
    """A missing, non-PEM or mismatched certificate/key is one ConfigError line naming the listener."""
    cert, key = pki["cert"], pki["key"]
    if which == "missing":
        cert = pki["cert"].with_name("nope.crt")
    elif which == "garbage":
        cert = pki["garbage"]
    elif which == "mismatch":
        key = pki["key2"]
    else:
        key = pki["garbage"]
    with pytest.raises(ConfigError) as e:
        tls.check(_cfg(f"ssl:0:privateKey={key}:certKey={cert}"))
    assert e.value.key == "server.listen[0]"
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_with_bad_tls_section_is_refused(pki: dict[str, Path]) -> None:
    """check-config's parse() (twisted_rt.checks, which runs web.tls.check) refuses a [tls] cert that does not load, naming tls.cert."""
    text = f"""
    [server]
    listen = ["ssl:8443"]
    [tls]
    cert = "{pki['garbage']}"
    key = "{pki['key']}"
    """
    with pytest.raises(ConfigError, match=r"^tls.cert: the certificate .* holds no PEM certificate$"):
        parse(textwrap.dedent(text), env={})
    good = parse(textwrap.dedent(text.replace(str(pki["garbage"]), str(pki["cert"]))), env={})
    assert good.tls.cert == str(pki["cert"])


def test_redirect_without_ssl_listener_is_a_warning() -> None:
    """redirect_http_to_https with no ssl: listener (e.g. a file completed by --listen) only warns."""
    observer = EventLoggingObserver()
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(observer)
    try:
        tls.check(_cfg("tcp:8080", redirect_http_to_https=True))
        cfg = _cfg("tcp:8080", redirect_http_to_https=True)
        assert tls.server_endpoint(MemoryReactor(), "tcp:8080", cfg) is None
    finally:
        globalLogPublisher.removeObserver(observer)
    assert [e["log_category"] for e in observer if e.get("log_category") == "RT-T10"] == ["RT-T10"]


def test_context_is_strict(pki: dict[str, Path]) -> None:
    """The context: TLS 1.2+, no compression/tickets/renegotiation, server order, PFS AEAD ciphers only."""
    loaded = tls.load_options(tls.CertFiles(str(pki["cert"]), str(pki["key"])))
    ctx = loaded.options.getContext()
    opts = ctx.set_options(0)
    for flag in ("OP_NO_SSLv3", "OP_NO_TLSv1", "OP_NO_TLSv1_1", "OP_NO_COMPRESSION",
                 "OP_CIPHER_SERVER_PREFERENCE", "OP_NO_TICKET", "OP_NO_RENEGOTIATION"):
        assert opts & getattr(SSL, flag), flag
    assert not opts & SSL.OP_NO_TLSv1_3 and not opts & SSL.OP_NO_TLSv1_2
    ciphers = SSL.Connection(ctx, None).get_cipher_list()
    tls12 = [c for c in ciphers if not c.startswith("TLS_")]
    assert tls12 and all(c.startswith(("ECDHE-", "DHE-")) for c in tls12), tls12
    assert all("GCM" in c or "CHACHA20" in c for c in tls12), tls12
    assert ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF


def test_reload_swaps_certificate_or_keeps_old(
    pki: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reload_all serves the new files to new connections; bad files keep the old context, each with one log line."""
    import shutil

    monkeypatch.setattr(tls, "install_sighup", lambda *a, **k: None)  # no real handler in pytest

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    shutil.copy(pki["cert"], cert)
    shutil.copy(pki["key"], key)
    cfg = _cfg(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    ep = tls.server_endpoint(MemoryReactor(), cfg.server.listen[0], cfg)
    assert isinstance(ep, tls.TLSEndpoint)
    factory = ep.context
    first = factory.loaded
    observer = EventLoggingObserver()
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(observer)
    try:
        sync = lambda f: maybeDeferred(f)  # noqa: E731 - the files are read inline in this test
        shutil.copy(pki["cert2"], cert)
        shutil.copy(pki["key2"], key)
        results = []
        tls.reload_all(MemoryReactor(), sync).addCallback(results.append)
        assert results and all(results[-1])
        second = factory.loaded
        assert second is not first
        assert second.leaf.serial_number != first.leaf.serial_number
        cert.write_text("broken")
        tls.reload_all(MemoryReactor(), sync).addCallback(results.append)
        assert False in results[-1]
        assert factory.loaded is second
    finally:
        globalLogPublisher.removeObserver(observer)
    cats = [e.get("log_category") for e in observer if e.get("log_namespace") == "twisted_rt.web.tls"]
    assert "RT-T01" in cats and "RT-T02" in cats
    kept = [e for e in observer if e.get("log_category") == "RT-T02"][-1]
    assert "holds no PEM certificate" in kept["problem"]


class FakeNotifier:
    """Records systemd notifications."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def reloading(self) -> bool:
        self.sent.append("RELOADING=1")
        return True

    def ready(self, status: str = "") -> bool:
        self.sent.append(f"READY=1 {status}")
        return True


class ThreadlessReactor(MemoryReactor):
    """A memory reactor whose callFromThread runs later, on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []

    def callFromThread(self, f: Any, *a: Any) -> None:
        self.calls.append((f, a))


def test_sighup_handler_reloads_and_tells_systemd() -> None:
    """The SIGHUP handler schedules a reload in the reactor, chains the old handler, and sends RELOADING=1 then READY=1."""
    reactor = ThreadlessReactor()
    notifier = FakeNotifier()
    reloader = tls.Reloader(reactor, notifier, in_thread=lambda f: maybeDeferred(f))
    chained: list[int] = []
    reloader.previous = lambda signum, frame: chained.append(signum)
    reloader.on_signal(signal.SIGHUP, None)
    assert chained == [signal.SIGHUP] and notifier.sent == []
    [(f, a)] = reactor.calls
    f(*a)
    assert notifier.sent[0] == "RELOADING=1"
    assert notifier.sent[1].startswith("READY=1 TLS reload: ")


def pump(client: SSL.Connection, server: SSL.Connection) -> None:
    """Run a handshake between two memory-BIO connections."""
    for _ in range(10):
        for x, y in ((client, server), (server, client)):
            try:
                x.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                y.bio_write(x.bio_read(65536))
            except SSL.WantReadError:
                pass


def test_renegotiation_refused(pki: dict[str, Path]) -> None:
    """A TLS 1.2 client asking to renegotiate gets an error from the server, not a new handshake."""
    loaded = tls.load_options(tls.CertFiles(str(pki["cert"]), str(pki["key"])))
    server = SSL.Connection(loaded.options.getContext(), None)
    server.set_accept_state()
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    cctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    client = SSL.Connection(cctx, None)
    client.set_connect_state()
    pump(client, server)
    assert server.get_protocol_version_name() == "TLSv1.2"
    assert client.renegotiate()
    with pytest.raises(SSL.WantReadError):
        client.do_handshake()  # sends the new ClientHello
    server.bio_write(client.bio_read(65536))
    with pytest.raises(SSL.WantReadError):
        server.recv(1024)  # the server answers it with a no_renegotiation alert
    client.bio_write(server.bio_read(65536))
    with pytest.raises(SSL.Error, match="no renegotiation"):
        client.do_handshake()


def test_full_chain_is_sent(ca: CA, tmp_path: Path) -> None:
    """With an intermediate CA in [tls] chain, a client trusting only the root verifies the server."""
    inter = CA("twisted_rt test intermediate")
    now = datetime.datetime.now(datetime.UTC)
    inter.cert = (  # the intermediate, signed by the root
        x509.CertificateBuilder()
        .subject_name(inter.cert.subject).issuer_name(ca.cert.subject).public_key(inter.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(inter.cert.extensions.get_extension_for_class(x509.KeyUsage).value, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter.key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert, key, _ = inter.issue(tmp_path)
    (tmp_path / "chain.pem").write_bytes(inter.pem())
    loaded = tls.load_options(tls.CertFiles(str(cert), str(key), chain=str(tmp_path / "chain.pem")))
    server = SSL.Connection(loaded.options.getContext(), None)
    server.set_accept_state()
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    (tmp_path / "root.pem").write_bytes(ca.pem())
    cctx.load_verify_locations(str(tmp_path / "root.pem"))
    cctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    client = SSL.Connection(cctx, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    pump(client, server)
    chain = client.get_verified_chain()
    assert chain is not None
    assert [c.to_cryptography().subject for c in chain] == [
        x509.load_pem_x509_certificate(cert.read_bytes()).subject, inter.cert.subject, ca.cert.subject
    ]


def test_curves_are_checked(pki: dict[str, Path]) -> None:
    """[tls] curves limits the key-exchange groups; an unknown name is a config error."""
    files = tls.CertFiles(str(pki["cert"]), str(pki["key"]), curves=("X25519", "P-256"))
    tls.load_options(files)
    with pytest.raises(ConfigError, match=r"tls\.curves: OpenSSL does not know one of nope"):
        tls.load_options(tls.CertFiles(str(pki["cert"]), str(pki["key"]), curves=("nope",)))


def test_curves_need_a_pyopenssl_that_can_set_them(pki: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where pyOpenSSL's binding cannot be reached, [tls] curves is a config error that says so."""
    monkeypatch.setattr(tls, "set_curves", lambda ctx, curves: None)
    with pytest.raises(ConfigError, match=r"tls\.curves: this pyOpenSSL offers no way to set the key-exchange groups"):
        tls.load_options(tls.CertFiles(str(pki["cert"]), str(pki["key"]), curves=("X25519",)))


def test_no_renegotiation_is_set_on_the_context_connections_use(pki: dict[str, Path]) -> None:
    """context_options itself forbids renegotiation, on the one cached context every connection is made from."""
    loaded = tls.load_options(tls.CertFiles(str(pki["cert"]), str(pki["key"])))
    opts = loaded.options
    assert opts.getContext() is opts.getContext()
    assert opts.getContext().set_options(0) & getattr(SSL, "OP_NO_RENEGOTIATION", 0) == getattr(SSL, "OP_NO_RENEGOTIATION", 0)


class HostRequest:
    """Just what HTTPSPolicy.location reads from a request."""

    def __init__(self, host: bytes | None, uri: bytes = b"/a?b=1") -> None:
        self.host = host
        self.uri = uri

    def getHeader(self, name: bytes) -> bytes | None:
        return self.host if name == b"host" else None

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "10.0.0.1", 80)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        (b"example.com:8080", 8443, "https://example.com:8443/a?b=1"),
        (b"example.com", 443, "https://example.com/a?b=1"),
        (b"[::1]:8080", 8443, "https://[::1]:8443/a?b=1"),
        (None, 443, "https://10.0.0.1/a?b=1"),
    ],
)
def test_redirect_location(host: bytes | None, port: int, expected: str) -> None:
    """The redirect keeps host, path and query, swaps the port (none for 443), and handles IPv6 literals."""
    from twisted.web.resource import Resource

    policy = tls.HTTPSPolicy(Resource(), port, 0)
    assert policy.location(HostRequest(host)) == expected


def test_plain_descriptions_are_left_to_twisted() -> None:
    """server_endpoint returns None for anything but ssl:."""
    assert tls.server_endpoint(MemoryReactor(), "tcp:8080", Config()) is None


def test_gen_cert_writes_a_usable_pair(tmp_path: Path) -> None:
    """gen-cert writes a self-signed cert (SAN DNS:localhost, IP:127.0.0.1) and a 0600 key that match."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "twisted-rt"), "gen-cert", "--host", "localhost",
         "--out", str(tmp_path / "dev")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    cert_path, key_path = Path(out[0]), Path(out[1])
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    tls.load_options(tls.CertFiles(str(cert_path), str(key_path)))  # loads and matches


# -- against the daemon ------------------------------------------------------


def _tls_config(pki: dict[str, Path], extra: str = "") -> str:
    return DEFAULT_CONFIG + textwrap.dedent(
        f"""
        [tls]
        cert = "{pki['cert']}"
        key = "{pki['key']}"
        """
    ) + extra


@pytest.fixture(scope="module")
def tls_daemon(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with an ssl: listener from [tls], HSTS, and the plain listener redirecting."""
    port = free_port()
    config = _tls_config(pki).replace(
        "[journal]", "[server]\nredirect_http_to_https = true\nhsts_seconds = 31536000\n\n[journal]"
    )
    d = Daemon(tmp_path_factory.mktemp("tlsd"), textwrap.dedent(config),
               extra_args=["--listen", f"ssl:{port}:interface=127.0.0.1"])
    d.tls_port = port  # type: ignore[attr-defined]
    d.start()
    yield d
    try:
        d.stop()
    except Exception:
        d.kill()


def _https(d: Daemon) -> str:
    return f"https://localhost:{d.tls_port}"  # type: ignore[attr-defined]


def test_https_request_with_verification(tls_daemon: Daemon, pki: dict[str, Path]) -> None:
    """HTTPS with the test CA: publish and read back; responses carry HSTS."""
    import urllib.request

    ctx = client_context(pki["ca"])
    req = urllib.request.Request(
        _https(tls_daemon) + "/api/publish", method="POST",
        data=json.dumps({"channel": "tls.one", "data": {"n": 1}}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        assert r.status == 202
        assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert json.loads(r.read())["offset"] >= 1
    with pytest.raises(ssl.SSLCertVerificationError):
        peer_serial(tls_daemon.tls_port, ssl.create_default_context())  # type: ignore[attr-defined]


def test_plain_listener_redirects_to_https(tls_daemon: Daemon) -> None:
    """With redirect_http_to_https the plain listener answers 308 to the https URL, health probes excepted."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", tls_daemon.port, timeout=10)
    try:
        conn.request("GET", "/api/channels?x=1", headers={"Host": f"localhost:{tls_daemon.port}"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 308
        assert r.getheader("Location") == f"{_https(tls_daemon)}/api/channels?x=1"
        assert r.getheader("Strict-Transport-Security") is None
        assert body["error"] == "https_required"
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        r.read()
        assert r.status == 200
    finally:
        conn.close()


def test_http2_negotiated_by_alpn(tls_daemon: Daemon, pki: dict[str, Path]) -> None:
    """An h2-capable client gets HTTP/2 by ALPN (POST and GET work over it); HTTP/1.1 clients still work."""
    import httpx

    ctx = client_context(pki["ca"])
    with httpx.Client(http2=True, verify=ctx, timeout=10) as c:
        r = c.post(_https(tls_daemon) + "/api/publish", json={"channel": "tls.h2", "data": {"h": 2}},
                   headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.http_version == "HTTP/2" and r.status_code == 202, r.text
        r = c.get(_https(tls_daemon) + "/api/channels/tls.h2/history",
                  headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.http_version == "HTTP/2"
        assert [e["data"] for e in r.json()["events"]] == [{"h": 2}]
        assert r.headers["strict-transport-security"] == "max-age=31536000"
    with httpx.Client(http2=False, verify=ctx, timeout=10) as c:
        r = c.get(_https(tls_daemon) + "/healthz")
        assert r.http_version == "HTTP/1.1" and r.status_code == 200


def test_sse_streams_share_one_http2_connection(tls_daemon: Daemon, pki: dict[str, Path]) -> None:
    """Two /sse streams run at once on one HTTP/2 connection and both get a published event."""
    import httpx

    base = _https(tls_daemon)
    with httpx.Client(http2=True, verify=client_context(pki["ca"]), timeout=10) as c:
        with c.stream("GET", base + "/sse?channel=public.h2a") as a, \
                c.stream("GET", base + "/sse?channel=public.h2b") as b:
            assert a.http_version == b.http_version == "HTTP/2"
            assert a.headers["content-type"].startswith("text/event-stream")
            assert len(c._transport._pool.connections) == 1  # type: ignore[attr-defined]
            for ch in ("public.h2a", "public.h2b"):
                r = c.post(base + "/api/publish", json={"channel": ch, "data": {"to": ch}},
                           headers={"Authorization": f"Bearer {API_KEY}"})
                assert r.status_code == 202 and r.http_version == "HTTP/2"
            for stream, ch in ((a, "public.h2a"), (b, "public.h2b")):
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        assert json.loads(line[5:])["data"] == {"to": ch}
                        break
        assert len(c._transport._pool.connections) == 1  # type: ignore[attr-defined]


def test_old_tls_versions_refused(tls_daemon: Daemon) -> None:
    """TLS 1.0 and 1.1 handshakes fail with the server's alert; TLS 1.2 and 1.3 succeed."""
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1 is deprecated: that's the point
    port = tls_daemon.tls_port  # type: ignore[attr-defined]
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError) as e:
            handshake(port, minimum_version=version, maximum_version=version, ciphers="ALL:@SECLEVEL=0")
        assert "ALERT_PROTOCOL_VERSION" in str(e.value)  # the server's alert: it refused, not the client
    assert handshake(port, maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ALL:@SECLEVEL=0").startswith("TLSv1.2")
    assert handshake(port).startswith("TLSv1.3")


@pytest.mark.parametrize("cipher", ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA"])
def test_weak_cipher_refused(tls_daemon: Daemon, cipher: str) -> None:
    """Non-forward-secret or non-AEAD TLS 1.2 suites are refused by the server."""
    port = tls_daemon.tls_port  # type: ignore[attr-defined]
    with pytest.raises(ssl.SSLError) as e:
        handshake(port, maximum_version=ssl.TLSVersion.TLSv1_2, ciphers=f"{cipher}:@SECLEVEL=0")
    assert "ALERT_HANDSHAKE_FAILURE" in str(e.value)  # the server's alert


def test_strong_cipher_accepted(tls_daemon: Daemon) -> None:
    """An ECDHE AES-GCM suite is what a TLS 1.2 client gets."""
    port = tls_daemon.tls_port  # type: ignore[attr-defined]
    got = handshake(port, maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
    assert got == "TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256"


def _ws_connect(url: str, ctx_file: Path) -> Any:
    import websocket

    try:
        return websocket.create_connection(url, sslopt={"ca_certs": str(ctx_file)}, timeout=10)
    except websocket.WebSocketBadStatusException as e:  # /ws not served yet (issue 4)
        if e.status_code == 404:
            pytest.skip("the /ws resource is not served yet; the TLS upgrade reached it")
        raise


def _ws_recv(ws: Any, op: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg: dict[str, Any] = json.loads(ws.recv())
        if msg.get("op") == op:
            return msg
    raise AssertionError(f"no {op} message")


def test_wss_subscribe_with_verification(tls_daemon: Daemon, pki: dict[str, Path]) -> None:
    """A wss:// client verifying the test CA subscribes and receives an event published over HTTPS."""
    import urllib.request

    ws = _ws_connect(f"wss://localhost:{tls_daemon.tls_port}/ws", pki["ca"])  # type: ignore[attr-defined]
    try:
        ws.send(json.dumps({"op": "subscribe", "channel": "public.tls", "ref": 1}))
        assert _ws_recv(ws, "subscribed")["ref"] == 1
        req = urllib.request.Request(
            _https(tls_daemon) + "/api/publish", method="POST",
            data=json.dumps({"channel": "public.tls", "data": {"over": "wss"}}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=client_context(pki["ca"]), timeout=10) as r:
            assert r.status == 202
        ev = _ws_recv(ws, "event")
        assert ev["channel"] == "public.tls" and ev["data"] == {"over": "wss"}
    finally:
        ws.close()


def test_sighup_reload_keeps_open_connections(make_daemon: Any, pki: dict[str, Path], tmp_path: Path) -> None:
    """SIGHUP: new connections get the new cert while an open wss:// stays connected; bad files keep it."""
    import shutil
    import urllib.request

    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(pki["cert"], cert)
    shutil.copy(pki["key"], key)
    port = free_port()
    d = make_daemon(
        extra_args=["--listen", f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]
    )
    ca_ctx = client_context(pki["ca"])
    old_serial = peer_serial(port, ca_ctx)
    ws = _ws_connect(f"wss://localhost:{port}/ws", pki["ca"])
    try:
        ws.send(json.dumps({"op": "subscribe", "channel": "public.reload", "ref": 1}))
        _ws_recv(ws, "subscribed")

        # renew with a self-signed pair from gen-cert (a different issuer and serial)
        new_cert, new_key = tls.gen_cert("localhost", str(tmp_path / "renewed"))
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        new_ctx = client_context(Path(new_cert))
        new_serial = x509.load_pem_x509_certificate(Path(new_cert).read_bytes()).serial_number
        deadline = time.monotonic() + 15
        while True:
            try:
                if peer_serial(port, new_ctx) == new_serial:
                    break
            except ssl.SSLError:
                pass
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        assert new_serial != old_serial
        assert "TLS certificate reloaded" in d.log()

        # the connection made before the reload still works
        req = urllib.request.Request(
            f"https://localhost:{port}/api/publish", method="POST",
            data=json.dumps({"channel": "public.reload", "data": {"after": "reload"}}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=new_ctx, timeout=10) as r:
            assert r.status == 202
        assert _ws_recv(ws, "event")["data"] == {"after": "reload"}
        ws.send(json.dumps({"op": "ping", "ref": 9}))
        assert _ws_recv(ws, "pong")["ref"] == 9

        # bad files: the renewed certificate stays
        cert.write_text("half-written file\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "keeping the old certificate" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        assert peer_serial(port, new_ctx) == new_serial
        assert d.proc.poll() is None
    finally:
        ws.close()


@pytest.mark.parametrize("which", ["missing", "mismatch", "garbage"])
def test_bad_cert_files_refused_at_start(make_daemon: Any, pki: dict[str, Path], which: str) -> None:
    """The daemon does not start with a missing, mismatched or non-PEM cert: exit 1 and one line, no traceback."""
    cert, key = pki["cert"], pki["key"]
    if which == "missing":
        key = key.with_name("missing.key")
    elif which == "mismatch":
        key = pki["key2"]
    else:
        cert = pki["garbage"]
    d = make_daemon(start=False, extra_args=["--listen", f"ssl:{free_port()}:privateKey={key}:certKey={cert}"])
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    lines = [ln for ln in d.log().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("twisted-rt: ") and "server.listen[1]" in lines[0]
    assert "Traceback" not in d.log()

# -*- test-case-name: tests.test_tls -*-
"""
TLS listeners: C{ssl:} endpoints with the project's own context factory,
certificate reload on C{SIGHUP}, ALPN with HTTP/2, the optional
HTTP-to-HTTPS redirect and HSTS, and C{twisted-rt gen-cert}.

An C{ssl:} description takes its certificate from the string itself
(C{privateKey=}, C{certKey=}, C{extraCertChain=}, C{dhParameters=}, as
Twisted's own C{ssl:} parser does) or, when it names none, from C{[tls]}
(C{cert}, C{key}, C{chain}, C{dh}, C{curves})::

    ssl:8443:interface=0.0.0.0
    ssl:8443:privateKey=key.pem:certKey=cert.pem:extraCertChain=chain.pem

Every context is built by L{context_options}: TLS 1.2 minimum (1.3
preferred, being the newest), forward-secret AEAD ciphers only (ECDHE/DHE
with AES-GCM or ChaCha20-Poly1305), the server's cipher order, no
compression, no renegotiation, no session tickets and no session cache
(so no long-lived ticket key exists to rotate), and the full chain sent.
ALPN offers C{h2} then C{http/1.1}; a browser's WebSocket connection only
offers C{http/1.1}, so C{/ws} stays HTTP/1.1.

With C{[server] redirect_http_to_https}, plain listeners answer C{308}
to the first C{ssl:} listener's port (C{/healthz} and C{/readyz} excepted:
probes speak plain HTTP); with C{hsts_seconds}, TLS responses carry
C{Strict-Transport-Security: max-age=N}.  Both are put in front of the
site's root by L{TLSEndpoint.listen}.  C{sslmethod=} is accepted and
ignored: the versions are always TLS 1.2 and newer.

C{SIGHUP} re-reads the files of every C{ssl:} listener in a thread and swaps
the context for new connections; open connections keep the one they were
made with.  Files that do not load keep the old certificate.  One log line
says which happened (C{RT-T01} reloaded, C{RT-T02} kept), and systemd hears
C{RELOADING=1} then C{READY=1}.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from twisted_rt._twisted_internals import set_curves
from twisted_rt.core.config import Config, ConfigError, TLSConfig

__all__ = [
    "ALPN_PROTOCOLS",
    "CIPHERS",
    "CertFiles",
    "Loaded",
    "Reloader",
    "ReloadingContextFactory",
    "TLSEndpoint",
    "check",
    "context_options",
    "gen_cert",
    "install_sighup",
    "load_options",
    "parse_description",
    "reload_all",
    "server_endpoint",
]

log = Logger()

#: TLS 1.2 suites: forward secret (ECDHE/DHE) and AEAD (GCM, ChaCha20-Poly1305)
#: only, in Mozilla's "intermediate" order.  TLS 1.3 suites are all of that kind.
CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

#: Offered by ALPN, most preferred first.
ALPN_PROTOCOLS = (b"h2", b"http/1.1")

_SSL_KEYS = (
    "port",
    "interface",
    "backlog",
    "privateKey",
    "certKey",
    "extraCertChain",
    "dhParameters",
    "sslmethod",
)

#: Paths that a plain listener answers itself even with redirect_http_to_https:
#: load balancers and the service manager probe them over plain HTTP.
_NO_REDIRECT = (b"/healthz", b"/readyz")


# -- endpoint descriptions ---------------------------------------------------


def parse_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description the way Twisted does: C{:} separates
    arguments, C{\\} escapes the next character, and the first unescaped
    C{=} makes an argument a keyword.  The endpoint type is the first
    positional argument.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    cur: list[str] = []
    eq: int | None = None
    i = 0

    def end() -> None:
        text = "".join(cur)
        if eq is None:
            args.append(text)
        else:
            kwargs[text[:eq]] = text[eq + 1 :]

    while i < len(description):
        c = description[i]
        if c == "\\" and i + 1 < len(description):
            cur.append(description[i + 1])
            i += 2
            continue
        if c == ":":
            end()
            cur, eq = [], None
        elif c == "=" and eq is None:
            eq = len(cur)
            cur.append(c)
        else:
            cur.append(c)
        i += 1
    end()
    return args, kwargs


@dataclass(frozen=True)
class CertFiles:
    """The files one C{ssl:} listener is served from."""

    cert: str
    key: str
    chain: str = ""
    dh: str = ""
    curves: tuple[str, ...] = ()
    key_name: str = "tls.cert"  # the config key named in errors

    @classmethod
    def for_description(cls, description: str, tls: TLSConfig, key_name: str) -> CertFiles:
        """
        The files of an C{ssl:} description: its own C{privateKey}/C{certKey}
        or else C{[tls]}.  @raise ConfigError: nothing names a certificate.
        """
        _args, kw = parse_description(description)
        unknown = sorted(set(kw) - set(_SSL_KEYS))
        if unknown:
            raise ConfigError(key_name, f"unknown ssl: option {unknown[0]!r} (known: {', '.join(_SSL_KEYS)})")
        if "privateKey" in kw or "certKey" in kw:
            key = kw.get("privateKey") or kw.get("certKey", "")
            return cls(
                cert=kw.get("certKey") or key,
                key=key,
                chain=kw.get("extraCertChain", ""),
                dh=kw.get("dhParameters", "") or tls.dh,
                curves=tls.curves,
                key_name=key_name,
            )
        if not tls.cert:
            raise ConfigError(
                key_name,
                f"{description!r} names no certificate: give privateKey=/certKey= or set [tls] cert and key",
            )
        return cls(tls.cert, tls.key, tls.chain, tls.dh, tls.curves, "tls.cert")


def _port_and_interface(description: str, key_name: str) -> tuple[int, str, int]:
    args, kw = parse_description(description)
    port_s = kw.get("port", args[1] if len(args) > 1 else "")
    try:
        port = int(port_s)
        backlog = int(kw.get("backlog", "50"))
    except ValueError:
        raise ConfigError(key_name, f"{description!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(key_name, f"{description!r}: port {port} is out of range")
    return port, kw.get("interface", ""), backlog


# -- loading and checking the files ------------------------------------------


def _read(path: str, what: str, key_name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(key_name, f"cannot read the {what} {path}: {e.strerror}") from None


def _load_certs(path: str, what: str, key_name: str) -> list[x509.Certificate]:
    data = _read(path, what, key_name)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(key_name, f"the {what} {path} holds no PEM certificate")
    return certs


@dataclass(frozen=True)
class Loaded:
    """A listener's L{CertificateOptions} and the certificate they serve."""

    options: Any
    leaf: x509.Certificate


def load_options(files: CertFiles) -> Loaded:
    """
    Read the files and build the L{CertificateOptions} (with its context
    already made, so every problem shows here).

    @raise ConfigError: a file is missing, unreadable, not PEM, the key does
        not match the certificate, or a curve is unknown.
    """
    k = files.key_name
    certs = _load_certs(files.cert, "certificate", k)
    key_data = _read(files.key, "private key", k)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise ConfigError(k, f"the private key {files.key} is encrypted; give an unencrypted key") from None
    except Exception as e:  # noqa: BLE001 - any parse error is the same problem
        raise ConfigError(k, f"the private key {files.key} is not a PEM private key ({type(e).__name__})") from None
    pub = certs[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != pub:
        raise ConfigError(k, f"the private key {files.key} does not match the certificate {files.cert}")
    chain = certs[1:]
    if files.chain:
        chain += _load_certs(files.chain, "certificate chain", k)
    dh = None
    if files.dh:
        from twisted.internet.ssl import DiffieHellmanParameters
        from twisted.python.filepath import FilePath

        _read(files.dh, "DH parameters", k)
        dh = DiffieHellmanParameters.fromFile(FilePath(files.dh))
    try:
        opts = context_options(key, certs[0], chain, dh)
        ctx = opts.getContext()
    except SSL.Error as e:
        raise ConfigError(k, f"OpenSSL refused {files.cert}/{files.key}: {e}") from None
    if files.curves:
        _set_curves(ctx, files.curves)
    return Loaded(opts, certs[0])


def _set_curves(ctx: SSL.Context, curves: tuple[str, ...]) -> None:
    """Limit the key-exchange groups (C{[tls] curves}, e.g. X25519, P-256)."""
    done = set_curves(ctx, curves)
    if done is None:
        raise ConfigError("tls.curves", "this pyOpenSSL offers no way to set the key-exchange groups")
    if not done:
        raise ConfigError("tls.curves", f"OpenSSL does not know one of {', '.join(curves)}")


def context_options(key: Any, cert: x509.Certificate, chain: list[x509.Certificate], dh: Any = None) -> Any:
    """
    The project's L{CertificateOptions} for a server certificate (given as
    C{cryptography} objects, which pyOpenSSL takes directly).
    """
    from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion

    opts = CertificateOptions(
        privateKey=key,
        certificate=cert,  # type: ignore[arg-type]
        extraCertChain=chain,  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
        dhParameters=dh,
        enableSessions=False,
        enableSessionTickets=False,
        acceptableProtocols=list(ALPN_PROTOCOLS),
    )
    # getContext() builds and caches the context every connection is made
    # from (its documented contract), so an option set on it holds for all
    opts.getContext().set_options(getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    return opts


def check(config: Config) -> None:
    """
    Check every C{ssl:} listener's files and the TLS options before the
    daemon starts.  @raise ConfigError: one line naming the key and problem.
    """
    if (config.tls.cert == "") != (config.tls.key == ""):
        raise ConfigError("tls.key" if config.tls.cert else "tls.cert", "tls.cert and tls.key go together")
    listeners = [d for d in config.server.listen if _is_ssl(d)]
    for i, desc in enumerate(config.server.listen):
        if _is_ssl(desc):
            key = f"server.listen[{i}]"
            _port_and_interface(desc, key)
            load_options(CertFiles.for_description(desc, config.tls, key))
    if config.tls.cert and not listeners:
        load_options(CertFiles(config.tls.cert, config.tls.key, config.tls.chain, config.tls.dh, config.tls.curves))


def _is_ssl(description: str) -> bool:
    return description.split(":", 1)[0] == "ssl"


# -- the context factory and reload ------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingContextFactory:
    """
    Makes each new server connection from the current L{CertificateOptions};
    L{swap} replaces them for new connections only.
    """

    def __init__(self, files: CertFiles, loaded: Loaded, name: str) -> None:
        self.files = files
        self.loaded = loaded
        self.name = name

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A connection from the current context (ALPN h2, http/1.1)."""
        return self.loaded.options.serverConnectionForTLS(tlsProtocol)  # type: ignore[no-any-return]

    def load(self) -> Loaded:
        """Read the files again (blocking: call it in a thread)."""
        return load_options(self.files)

    def swap(self, loaded: Loaded) -> None:
        """Serve new connections with C{loaded}."""
        self.loaded = loaded
        leaf = loaded.leaf
        log.info(
            "TLS certificate reloaded for {name}: {subject}, serial {serial:x}, valid until {until}",
            name=self.name,
            subject=leaf.subject.rfc4514_string(),
            serial=leaf.serial_number,
            until=leaf.not_valid_after_utc.isoformat(),
            log_category="RT-T01",
        )

    def keep(self, problem: str) -> None:
        """Log that a reload failed and the old certificate stays."""
        log.error(
            "TLS reload failed for {name}: {problem}; keeping the old certificate",
            name=self.name,
            problem=problem,
            log_category="RT-T02",
        )


_factories: weakref.WeakSet[ReloadingContextFactory] = weakref.WeakSet()
_installed: dict[str, Any] = {}


def reload_all(reactor: Any, in_thread: Callable[..., Deferred[Any]] | None = None) -> Deferred[list[bool]]:
    """
    Reload every live C{ssl:} listener's files; fires with one C{bool} per
    listener (C{True} when the new certificate is served).  The files are
    read in a thread (C{in_thread}, by default the reactor's pool).
    """
    if in_thread is None:
        from twisted.internet.threads import deferToThreadPool

        def in_thread(f: Callable[[], Any]) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), f)

    def one(factory: ReloadingContextFactory) -> Deferred[bool]:
        d = in_thread(factory.load)

        def ok(loaded: Loaded) -> bool:
            factory.swap(loaded)
            return True

        def bad(f: Failure) -> bool:
            factory.keep(str(f.value) if isinstance(f.value, ConfigError) else repr(f.value))
            return False

        return d.addCallbacks(ok, bad)

    ds = [one(f) for f in sorted(_factories, key=lambda f: f.name)]
    return DeferredList(ds).addCallback(lambda rs: [bool(v) for _, v in rs])


class Reloader:
    """
    What C{SIGHUP} does: C{RELOADING=1}, reload every listener, C{READY=1}
    with a status line saying how many were renewed.
    """

    def __init__(
        self,
        reactor: Any,
        notifier: Any = None,
        in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        from twisted_rt.core.systemd import Notifier

        self.reactor = reactor
        self.notifier = notifier if notifier is not None else Notifier()
        self.in_thread = in_thread
        self.previous: Any = None

    def reload(self) -> Deferred[list[bool]]:
        """Reload now (in the reactor thread)."""
        log.info("SIGHUP: reloading TLS certificates", log_category="RT-T00")
        self.notifier.reloading()

        def done(results: list[bool]) -> list[bool]:
            self.notifier.ready(f"TLS reload: {sum(results)} of {len(results)} listener(s) renewed")
            return results

        d = reload_all(self.reactor, self.in_thread).addCallback(done)
        d.addErrback(lambda f: log.failure("TLS reload", f, log_category="RT-T03"))
        return d

    def on_signal(self, signum: int, frame: Any) -> None:
        """The signal handler: schedule L{reload}, then run the handler that was there before."""
        self.reactor.callFromThread(self.reload)
        if callable(self.previous):
            self.previous(signum, frame)


def install_sighup(reactor: Any, notifier: Any = None) -> Reloader | None:
    """
    Reload certificates on C{SIGHUP} (installed once per process, from the
    reactor's thread when the first C{ssl:} listener is built; twistd and
    the reactor install no C{SIGHUP} handler of their own, and one that was
    there before still runs after ours).
    """
    if "sighup" in _installed:
        return _installed["sighup"]  # type: ignore[no-any-return]
    if not hasattr(signal, "SIGHUP"):
        return None
    reloader = Reloader(reactor, notifier)
    reloader.previous = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, reloader.on_signal)
    _installed["sighup"] = reloader
    return reloader


# -- the endpoint --------------------------------------------------------------


class TLSEndpoint:
    """
    An C{ssl:} listener served through a L{ReloadingContextFactory}; it also
    puts the HTTPS policy (redirect, HSTS) in front of the site's root.
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        context: ReloadingContextFactory,
        interface: str = "",
        backlog: int = 50,
        config: Config | None = None,
    ) -> None:
        self.reactor = reactor
        self.port = port
        self.context = context
        self.interface = interface
        self.backlog = backlog
        self.config = config or Config()

    def listen(self, factory: Factory) -> Deferred[IListeningPort]:
        """Listen with TLS; the site's root gets the HTTPS policy."""
        from twisted.internet.endpoints import SSL4ServerEndpoint

        install_policy(factory, self.config)
        ep: Any = SSL4ServerEndpoint(
            self.reactor, self.port, self.context, backlog=self.backlog, interface=self.interface
        )
        d: Deferred[IListeningPort] = ep.listen(factory)
        return d


def server_endpoint(reactor: Any, description: str, config: Config) -> Any:
    """
    The endpoint for an C{ssl:} description built with the project's
    context factory, or C{None} to let Twisted parse C{description}.

    @raise ConfigError: the certificate files are missing, unreadable or
        do not match.
    """
    if not _is_ssl(description):
        if config.server.redirect_http_to_https and not any(_is_ssl(d) for d in config.server.listen):
            log.warn(
                "redirect_http_to_https is set but no ssl: listener exists; {desc} serves plain HTTP",
                desc=description,
                log_category="RT-T10",
            )
        return None
    idx = config.server.listen.index(description) if description in config.server.listen else 0
    key = f"server.listen[{idx}]"
    port, interface, backlog = _port_and_interface(description, key)
    files = CertFiles.for_description(description, config.tls, key)
    factory = ReloadingContextFactory(files, load_options(files), description)
    _factories.add(factory)
    install_sighup(reactor)
    return TLSEndpoint(reactor, port, factory, interface, backlog, config)


# -- redirect and HSTS -------------------------------------------------------


class _RedirectPage(Resource):
    isLeaf = True

    def __init__(self, location: str) -> None:
        super().__init__()
        self.location = location

    def render(self, request: Any) -> bytes:
        from twisted_rt.web.resource import error_body

        request.setResponseCode(308)
        request.setHeader(b"location", self.location.encode("utf-8"))
        request.setHeader(b"content-type", b"application/json")
        return error_body("https_required", f"this server is served over HTTPS: {self.location}")


class HTTPSPolicy(Resource):
    """
    The site's root behind the HTTPS policy: plain requests are redirected
    with 308 to the first C{ssl:} listener (except the health probes), and
    TLS responses carry C{Strict-Transport-Security}.
    """

    def __init__(self, inner: IResource, redirect_port: int | None, hsts_seconds: int) -> None:
        super().__init__()
        self.inner: Any = inner
        self.redirect_port = redirect_port
        self.hsts_seconds = hsts_seconds

    def getChildWithDefault(self, path: bytes, request: Any) -> IResource:
        if request.isSecure():
            if self.hsts_seconds:
                request.setHeader(b"strict-transport-security", b"max-age=%d" % self.hsts_seconds)
        elif self.redirect_port is not None and request.path not in _NO_REDIRECT:
            return _RedirectPage(self.location(request))
        child: IResource = self.inner.getChildWithDefault(path, request)
        return child

    def putChild(self, path: bytes, child: IResource) -> None:
        self.inner.putChild(path, child)

    def render(self, request: Any) -> Any:
        return self.inner.render(request)

    def location(self, request: Any) -> str:
        """The https URL of C{request}."""
        host = (request.getHeader(b"host") or b"").decode("latin-1").strip()
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        if not host:
            host = request.getHost().host
        port = "" if self.redirect_port == 443 else f":{self.redirect_port}"
        return f"https://{host}{port}{request.uri.decode('utf-8', 'replace')}"


def install_policy(factory: Any, config: Config) -> None:
    """Put L{HTTPSPolicy} in front of a site's root, once, if configured."""
    server = config.server
    root = getattr(factory, "resource", None)
    if root is None or isinstance(root, HTTPSPolicy):
        return
    if not (server.redirect_http_to_https or server.hsts_seconds):
        return
    port = None
    if server.redirect_http_to_https:
        for desc in server.listen:
            if _is_ssl(desc):
                port = _port_and_interface(desc, "server.listen")[0]
                break
    factory.resource = HTTPSPolicy(root, port, server.hsts_seconds)


# -- gen-cert ----------------------------------------------------------------


def gen_cert(host: str, out_dir: str) -> list[str]:
    """
    Write a self-signed certificate for C{host} (SAN C{DNS:host}, plus
    C{IP:127.0.0.1} and C{::1} for localhost, or C{IP:host} for an address)
    and its P-256 key (mode 0600) to C{out_dir}; returns both paths
    (certificate first).
    """
    os.makedirs(out_dir, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
        if host == "localhost":
            names += [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(out_dir, "cert.pem")
    key_path = os.path.join(out_dir, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return [cert_path, key_path]

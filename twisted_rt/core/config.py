# -*- test-case-name: tests.test_config -*-
"""
The daemon's configuration: a TOML file checked whole before anything starts.

The frozen dataclasses below are the schema: every key of the contract's
sample is a field, and its type says how the TOML value is checked
(C{str}, C{int}, C{float}, C{bool}, C{tuple[str, ...]}, a C{Literal} of the
allowed words; C{Annotated} adds a lower bound or the noun an unknown word
is called by).  The relations between the keys of one section are checked
by the functions registered for it in L{SECTION_CHECKS}.  Checks that need
a file or a library of a higher layer (PEM certificates and keys) belong to
their owners and are run by L{twisted_rt.checks}; L{parse}, L{load} and
L{check_file} here do the pure checks only.

A bad file raises L{ConfigError} whose C{str()} is one line naming the key
and the problem, e.g. C{sources[1].verify: unknown verifier 'gitbub'
(expected one of github, stripe, ...)}.  C{${VAR}} in any string is
replaced from the environment; a variable that is not set is an error
naming the key.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import (
    Annotated,
    Any,
    Callable,
    Literal,
    Mapping,
    Sequence,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

from twisted_rt.core.matcher import PatternError, matches, validate_pattern
from twisted_rt.core.template import ChannelTemplate, TemplateError

__all__ = [
    "SECTION_CHECKS",
    "AtLeast",
    "AuthConfig",
    "BrokerConfig",
    "BrokerKind",
    "Called",
    "ChannelRule",
    "DestinationConfig",
    "DestinationFormat",
    "Config",
    "ConfigError",
    "JournalConfig",
    "LogFormat",
    "PresenceConfig",
    "PusherConfig",
    "ServerConfig",
    "SignatureEncoding",
    "SourceConfig",
    "SSEConfig",
    "TLSConfig",
    "VERIFIERS",
    "Verifier",
    "WebSocketConfig",
    "check_file",
    "load",
    "parse",
    "section_check",
    "validate",
]


class ConfigError(Exception):
    """
    A configuration problem, reported as one line: C{<key>: <problem>}.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# -- what a field's annotation may carry besides its type ----------------------


@dataclass(frozen=True)
class AtLeast:
    """C{Annotated[int, AtLeast(1)]}: the smallest value allowed (or, C{exclusive}, a bound above it)."""

    bound: float
    exclusive: bool = False

    def problem(self, value: float) -> str | None:
        """The message for C{value}, or C{None} when it is allowed."""
        if self.exclusive and value <= self.bound:
            return f"must be more than {self.bound:g}"
        if value < self.bound:
            return f"must be at least {self.bound:g}"
        return None


@dataclass(frozen=True)
class Called:
    """C{Annotated[Literal[...], Called("broker")]}: an unknown word is named as an unknown C{broker}."""

    noun: str


BrokerKind = Literal["local", "redis"]
LogFormat = Literal["text", "json"]
DestinationFormat = Literal["event", "raw"]
#: C{headers = { "X-Env" = "prod" }}: a TOML table of strings, kept as ordered pairs
Headers = tuple[tuple[str, str], ...]
SignatureEncoding = Literal["hex", "base64"]
# The names of twisted_rt.routes.verify.VERIFIERS (tests/test_config.py checks they agree).
Verifier = Literal[
    "github",
    "stripe",
    "slack",
    "standard",
    "shopify",
    "gitlab",
    "meta",
    "twitter",
    "zoom",
    "hmac-sha256",
    "none",
]
VERIFIERS: tuple[str, ...] = get_args(Verifier)


# -- the schema ------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """C{[server]}: listeners and HTTP-wide limits."""

    listen: tuple[str, ...] = ("tcp:8080",)
    max_body_bytes: Annotated[int, AtLeast(1)] = 1048576
    allowed_origins: tuple[str, ...] = ()
    shutdown_timeout_seconds: float = 10.0
    rate_limit_per_ip_per_second: float = 0.0
    access_log: bool = True
    redirect_http_to_https: bool = False
    hsts_seconds: int = 0
    request_head_timeout_seconds: Annotated[float, AtLeast(0, exclusive=True)] = 10.0
    max_connections_per_ip: int = 256
    max_connections: int = 20000
    signature_failures_per_ip_per_minute: int = 60


@dataclass(frozen=True)
class JournalConfig:
    """C{[journal]}: the durable store of every accepted event."""

    path: str = "var/journal.sqlite3"
    max_events_per_channel: Annotated[int, AtLeast(1)] = 10000
    retention_seconds: int = 604800
    trim_interval_seconds: float = 60.0
    max_batch: Annotated[int, AtLeast(1)] = 1000


@dataclass(frozen=True)
class WebSocketConfig:
    """C{[websocket]}: limits and heartbeats of C{/ws}."""

    max_message_bytes: int = 1048576
    ping_interval_seconds: float = 20.0
    ping_timeout_seconds: float = 10.0
    max_send_buffer_bytes: int = 4194304
    compression: bool = False
    max_subscriptions: int = 100
    max_since_channels: int = 10000
    max_connections_per_ip: int = 0


@dataclass(frozen=True)
class SSEConfig:
    """C{[sse]}: Server-Sent Events and long-poll."""

    heartbeat_seconds: float = 15.0
    retry_ms: int = 2000
    max_poll_timeout_seconds: float = 60.0


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class BrokerConfig:
    """C{[broker]}: C{local} (one node) or C{redis} (several)."""

    kind: Annotated[BrokerKind, Called("broker")] = "local"
    url: str = ""  # empty: DEFAULT_REDIS_URL (unless sentinels are given); see effective_url
    prefix: str = "rt"
    sentinels: tuple[str, ...] = ()  # "host:port" of each Sentinel, instead of url
    sentinel_master: str = ""  # the monitored master's name (needed with sentinels)
    password: str = ""  # for the data nodes (and Sentinels that ask for one)
    min_replicas: int = 0  # acknowledge only after WAIT saw this many replicas
    replica_timeout_ms: Annotated[int, AtLeast(1)] = 1000

    @property
    def effective_url(self) -> str:
        """The Redis URL to connect to when no Sentinels are configured."""
        return self.url or DEFAULT_REDIS_URL


@dataclass(frozen=True)
class AuthConfig:
    """C{[auth]}: API keys, JWT verification and anonymous rights."""

    api_keys: tuple[str, ...] = ()
    jwt_secret: str = ""
    jwt_public_key_file: str = ""
    jwt_audience: str = ""
    anonymous_subscribe: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSConfig:
    """C{[tls]}: certificate material for C{ssl:} listeners (checked by L{twisted_rt.web.tls.check})."""

    cert: str = ""
    key: str = ""
    chain: str = ""
    dh: str = ""
    curves: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceConfig:
    """One C{[[sources]]} table: a webhook sender and how to check it."""

    name: str
    verify: Annotated[Verifier, Called("verifier")]
    secrets: tuple[str, ...] = ()
    channel: str = "{source}"
    tolerance_seconds: int = 300
    rate_limit_per_second: float = 0.0
    verify_token: str = ""
    signature_header: str = "X-Signature"
    signature_encoding: SignatureEncoding = "hex"
    redact_headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChannelRule:
    """One C{[[channels]]} table: rules for the channels its pattern matches (the first match wins)."""

    pattern: str
    presence: bool = False
    max_events: int = 0  # 0: [journal] max_events_per_channel
    retention_seconds: int = 0  # 0: [journal] retention_seconds


@dataclass(frozen=True)
class PresenceConfig:
    """C{[presence]}: how nodes keep their members alive in the cluster (Redis broker)."""

    heartbeat_seconds: Annotated[float, AtLeast(0, exclusive=True)] = 5.0  # each node refreshes its members
    node_timeout_seconds: Annotated[float, AtLeast(0, exclusive=True)] = 20.0  # a silent node's members leave


@dataclass(frozen=True)
class DestinationConfig:
    """One C{[[destinations]]} table: an HTTP endpoint events are delivered to, durably."""

    name: str
    url: str
    channels: tuple[str, ...] = ()
    format: Annotated[DestinationFormat, Called("format")] = "event"
    secret: str = ""  # Standard Webhooks key: "whsec_" + base64 (empty: unsigned)
    headers: Headers = ()
    timeout_seconds: Annotated[float, AtLeast(0, exclusive=True)] = 10.0
    max_attempts: Annotated[int, AtLeast(1)] = 10
    max_in_flight: Annotated[int, AtLeast(1)] = 8
    disable_after_seconds: float = 432000.0
    ca_file: str = ""  # a PEM file of CA certificates trusted besides the system store

    def secret_key(self) -> bytes:
        """The signing key bytes (base64 after C{whsec_}, else the UTF-8 text); empty when unsigned."""
        if self.secret.startswith("whsec_"):
            return base64.b64decode(self.secret[6:], validate=True)
        return self.secret.encode("utf-8")


@dataclass(frozen=True)
class PusherConfig:
    """C{[pusher]}: the Pusher Channels protocol (off while C{app_id} is empty)."""

    app_id: str = ""
    key: str = ""
    secret: str = ""
    client_events: bool = False
    webhooks: str = ""  # a destination name: receives Pusher-format webhooks
    #: channels without private-/presence- a Pusher client may subscribe to unsigned (as on Pusher: all)
    public_channels: tuple[str, ...] = (">",)
    activity_timeout_seconds: Annotated[int, AtLeast(1)] = 120
    max_message_bytes: Annotated[int, AtLeast(1)] = 10240  # client events and other frames (Pusher: 10 KB)

    @property
    def enabled(self) -> bool:
        """Whether C{/app/<key>} and C{/apps/<id>/...} are served."""
        return bool(self.app_id)


@dataclass(frozen=True)
class Config:
    """The whole configuration: one field per section (C{sources} an array of tables), and C{log_format}."""

    server: ServerConfig = field(default_factory=ServerConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    sse: SSEConfig = field(default_factory=SSEConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    sources: tuple[SourceConfig, ...] = ()
    channels: tuple[ChannelRule, ...] = ()
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    pusher: PusherConfig = field(default_factory=PusherConfig)
    log_format: LogFormat = "text"

    def rule(self, channel: str) -> ChannelRule | None:
        """The first C{[[channels]]} rule whose pattern matches C{channel}, or C{None}."""
        for r in self.channels:
            if matches(r.pattern, channel):
                return r
        return None

    def destination(self, name: str) -> DestinationConfig | None:
        """The destination called C{name}, or C{None}."""
        for d in self.destinations:
            if d.name == name:
                return d
        return None

    def source(self, name: str) -> SourceConfig | None:
        """The source called C{name}, or C{None}."""
        for s in self.sources:
            if s.name == name:
                return s
        return None

    def with_overrides(
        self,
        listen: list[str] | None = None,
        journal: str | None = None,
    ) -> Config:
        """This config with command-line overrides applied."""
        cfg = self
        if listen:
            cfg = replace(cfg, server=replace(cfg.server, listen=tuple(listen)))
        if journal:
            cfg = replace(cfg, journal=replace(cfg.journal, path=journal))
        return cfg


# -- the typed checker: TOML value -> field value --------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_T = TypeVar("_T")


_HINTS: dict[Any, dict[str, Any]] = {}


def _hints(cls: Any) -> dict[str, Any]:
    """A schema class's field annotations, resolved (with their C{Annotated} extras)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls, include_extras=True)
    return hints


def _unwrap(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """C{(type, extras)} of an annotation: C{Annotated[int, AtLeast(1)]} gives C{(int, (AtLeast(1),))}."""
    if get_origin(hint) is Annotated:
        base, *extras = get_args(hint)
        return base, tuple(extras)
    return hint, ()


def _is_schema(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _expand(value: str, key: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            raise ConfigError(key, f"environment variable {name} is not set")
        return env[name]

    return _VAR.sub(sub, value)


def _coerce(value: Any, hint: Any, key: str, env: Mapping[str, str]) -> Any:
    """Check one TOML value against a field's type and convert it (strings expanded)."""
    base, _ = _unwrap(hint)
    if base == Headers:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(key, "expected a table of strings, like { \"X-Env\" = \"prod\" }")
        return tuple((k, _expand(v, f"{key}.{k}", env)) for k, v in value.items())
    if get_origin(base) is tuple and get_args(base) == (str, ...):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "expected a list of strings")
        return tuple(_expand(v, f"{key}[{i}]", env) for i, v in enumerate(value))
    if base is str or get_origin(base) is Literal:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_toml_type(value)}")
        return _expand(value, key, env)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_toml_type(value)}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_toml_type(value)}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_toml_type(value)}")
        return float(value)
    raise AssertionError(f"{key}: no checker for {hint!r}")  # pragma: no cover - a schema mistake


def _check_expanded(raw: Any, value: Any, key: str) -> None:
    """A string that named a C{${VAR}} must not be empty once expanded (an unset secret)."""
    raws = raw if isinstance(raw, list) else [raw]
    values = value if isinstance(value, tuple) else (value,)
    for i, (r, v) in enumerate(zip(raws, values, strict=False)):
        if isinstance(r, str) and isinstance(v, str) and _VAR.search(r) and not v.strip():
            where = f"{key}[{i}]" if isinstance(raw, list) else key
            raise ConfigError(where, f"is empty after expanding {r!r}")


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _table(cls: Callable[..., _T], raw: Any, prefix: str, env: Mapping[str, str]) -> _T:
    """One TOML table as the schema class C{cls}; C{prefix} is its key in messages."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"expected a table, got {_toml_type(raw)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in hints:
            what = "unknown section" if not prefix else "unknown key"
            raise ConfigError(key, f"{what} (known: {', '.join(sorted(hints))})")
        kwargs[k] = _value(hints[k], v, key, env)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}.{f.name}", "is required")
    return cls(**kwargs)


def _value(hint: Any, raw: Any, key: str, env: Mapping[str, str]) -> Any:
    """A field's value from TOML: a section, an array of sections or a plain value."""
    base, _ = _unwrap(hint)
    if _is_schema(base):
        return _table(base, raw, key, env)
    if get_origin(base) is tuple and _is_schema(get_args(base)[0]):
        if not isinstance(raw, list):
            raise ConfigError(key, f"expected an array of tables [[{key}]]")
        return tuple(_table(get_args(base)[0], item, f"{key}[{i}]", env) for i, item in enumerate(raw))
    value = _coerce(raw, hint, key, env)
    _check_expanded(raw, value, key)
    return value


# -- the checks of one value and of one section ----------------------------------


def _choices(words: tuple[str, ...]) -> str:
    return " or ".join(words) if len(words) == 2 else "one of " + ", ".join(words)


def _check_value(value: Any, hint: Any, key: str) -> None:
    """The checks a field's type carries: no negative numbers, its bounds, the words of a C{Literal}."""
    base, extras = _unwrap(hint)
    if base == Headers:
        for name, _v in value:
            if not _HEADER_NAME.match(name):
                raise ConfigError(f"{key}.{name}", "not an HTTP header name")
    elif base in (int, float):
        if value < 0:
            raise ConfigError(key, "must not be negative")
        for extra in extras:
            if isinstance(extra, AtLeast) and (problem := extra.problem(value)):
                raise ConfigError(key, problem)
    elif get_origin(base) is Literal and value not in get_args(base):
        expected = _choices(get_args(base))
        called = [e.noun for e in extras if isinstance(e, Called)]
        raise ConfigError(key, f"unknown {called[0]} {value!r} (expected {expected})" if called else f"expected {expected}")


_S = TypeVar("_S")
SectionCheck = Callable[[Any, str], None]
#: The relational checks of each schema class, in order: C{check(section, key)}
#: raises L{ConfigError}; C{key} is the section's key (C{"server"},
#: C{"sources[2]"}, C{""} for the whole L{Config}).
SECTION_CHECKS: dict[type, list[SectionCheck]] = {}


def section_check(cls: type[_S]) -> Callable[[Callable[[_S, str], None]], Callable[[_S, str], None]]:
    """Register the decorated function as a check of every C{cls} section (see L{SECTION_CHECKS})."""

    def register(check: Callable[[_S, str], None]) -> Callable[[_S, str], None]:
        SECTION_CHECKS.setdefault(cls, []).append(check)
        return check

    return register


def _check_section(section: Any, prefix: str) -> None:
    """Every field of C{section} (sections within first), then its registered checks."""
    for name, hint in _hints(type(section)).items():
        value = getattr(section, name)
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(value):
            _check_section(value, key)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _check_section(item, f"{key}[{i}]")
        else:
            _check_value(value, hint, key)
    for check in SECTION_CHECKS.get(type(section), ()):
        check(section, prefix)


def validate(cfg: Config) -> None:
    """
    The pure checks of a whole config (also one built in code or changed by
    command-line overrides).  @raise ConfigError: the first problem.
    """
    _check_section(cfg, "")


@section_check(ServerConfig)
def _server(server: ServerConfig, key: str) -> None:
    if not server.listen:
        raise ConfigError(f"{key}.listen", "at least one endpoint is needed")
    for i, desc in enumerate(server.listen):
        _check_endpoint(desc, f"{key}.listen[{i}]")
    for i, origin in enumerate(server.allowed_origins):
        if not re.match(r"^(https?://[^/\s]+|\*)$", origin):
            raise ConfigError(f"{key}.allowed_origins[{i}]", f"not an origin like https://app.example.com: {origin!r}")


def _check_endpoint(desc: str, key: str) -> None:
    """Parse an endpoint description without listening on it."""
    from twisted.internet import endpoints
    from twisted.internet.testing import MemoryReactor

    if desc.startswith("ssl:"):
        return  # parsed and its files checked by twisted_rt.web.tls.check
    if desc.startswith("systemd:"):
        # The systemd endpoint reads LISTEN_FDS at parse time; only the
        # syntax is checked here.
        return
    try:
        endpoints.serverFromString(MemoryReactor(), desc)
    except Exception as e:  # noqa: BLE001 - any parse failure is a config error
        raise ConfigError(key, f"bad endpoint {desc!r}: {e}") from None


@section_check(BrokerConfig)
def _broker(broker: BrokerConfig, key: str) -> None:
    if broker.url and broker.sentinels:
        raise ConfigError(f"{key}.sentinels", "give url or sentinels, not both")
    if broker.kind == "redis" and not broker.effective_url.startswith(("redis://", "unix://")):
        raise ConfigError(f"{key}.url", "expected a redis:// or unix:// URL")
    for i, hostport in enumerate(broker.sentinels):
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{key}.sentinels[{i}]", f"expected host:port, got {hostport!r}")
    if broker.sentinels and not broker.sentinel_master:
        raise ConfigError(f"{key}.sentinel_master", "is required with sentinels (the monitored master's name)")
    if broker.sentinel_master and not broker.sentinels:
        raise ConfigError(f"{key}.sentinel_master", "needs sentinels")


def _pattern(pattern: str, key: str) -> None:
    """C{pattern} is a valid channel pattern.  @raise ConfigError: for C{key}, saying why."""
    try:
        validate_pattern(pattern)
    except PatternError as e:
        raise ConfigError(key, str(e)) from None


def _patterns(patterns: Sequence[str], key: str) -> None:
    """Every pattern of the list C{key} is valid (the first bad one is named C{key[i]})."""
    for i, pat in enumerate(patterns):
        _pattern(pat, f"{key}[{i}]")


@section_check(AuthConfig)
def _auth(auth: AuthConfig, key: str) -> None:
    # jwt_public_key_file's contents: twisted_rt.checks, with core.auth.load_public_key.
    if auth.jwt_secret and auth.jwt_public_key_file:
        raise ConfigError(f"{key}.jwt_public_key_file", "give jwt_secret or jwt_public_key_file, not both")
    if auth.jwt_audience and not (auth.jwt_secret or auth.jwt_public_key_file):
        raise ConfigError(f"{key}.jwt_audience", "needs jwt_secret or jwt_public_key_file (JWTs are off)")
    for i, api_key in enumerate(auth.api_keys):
        if not api_key:
            raise ConfigError(f"{key}.api_keys[{i}]", "must not be empty")
    _patterns(auth.anonymous_subscribe, f"{key}.anonymous_subscribe")


_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,128}$")


@section_check(SourceConfig)
def _source(s: SourceConfig, key: str) -> None:
    if not _SOURCE_NAME.match(s.name):
        raise ConfigError(f"{key}.name", f"{s.name!r} is not 1-64 characters of A-Z a-z 0-9 _ -")
    if s.verify != "none" and not s.secrets:
        raise ConfigError(f"{key}.secrets", f"verifier {s.verify!r} needs at least one secret")
    for j, secret in enumerate(s.secrets):
        _check_secret(secret, s.verify, f"{key}.secrets[{j}]")
    for j, name in enumerate(s.redact_headers):
        if not _HEADER_NAME.match(name):
            raise ConfigError(f"{key}.redact_headers[{j}]", f"not an HTTP header name: {name!r}")
    if s.verify == "meta" and not s.verify_token:
        raise ConfigError(f"{key}.verify_token", "the meta verifier needs verify_token for the GET handshake")
    try:
        ChannelTemplate(s.channel, s.name)
    except TemplateError as e:
        raise ConfigError(f"{key}.channel", str(e)) from None


def _check_secret(secret: str, verifier: str, key: str) -> None:
    if not secret:
        raise ConfigError(key, "must not be empty")
    if secret.strip() == "whsec_":
        raise ConfigError(key, "whsec_ secret has no key material after the prefix")
    if secret.startswith("whsec_") and verifier in ("standard", "gitlab"):
        # Standard Webhooks (and GitLab's signing tokens): base64 key bytes after the
        # prefix; Stripe's whsec_ secrets are used whole, as they are.
        try:
            material = base64.b64decode(secret[6:], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(key, "whsec_ secret is not valid base64") from None
        if not material:
            raise ConfigError(key, "whsec_ secret has no key material after the prefix")
    elif not secret.strip():
        raise ConfigError(key, "must not be blank")


@section_check(Config)
def _sources_together(cfg: Config, key: str) -> None:
    seen: set[str] = set()
    for i, s in enumerate(cfg.sources):
        if s.name in seen:
            raise ConfigError(f"sources[{i}].name", f"duplicate source name {s.name!r}")
        seen.add(s.name)
    # X's crc handshake answers HMAC(secret, token) for any token: with a secret shared
    # with another source it would sign that source's bodies.
    for i, s in enumerate(cfg.sources):
        if s.verify != "twitter":
            continue
        for k, other in enumerate(cfg.sources):
            if k != i and set(s.secrets) & set(other.secrets):
                raise ConfigError(
                    f"sources[{i}].secrets",
                    f"an X (twitter) secret must not be shared with another source ({other.name!r}): "
                    "its crc handshake would sign that source's bodies",
                )


@section_check(ChannelRule)
def _channel_rule(rule: ChannelRule, key: str) -> None:
    _pattern(rule.pattern, f"{key}.pattern")


_DEST_URL = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+)(:[0-9]{1,5})?(/[^\s#]*)?$")


@section_check(DestinationConfig)
def _destination(d: DestinationConfig, key: str) -> None:
    if not _SOURCE_NAME.match(d.name):
        raise ConfigError(f"{key}.name", f"{d.name!r} is not 1-64 characters of A-Z a-z 0-9 _ -")
    m = _DEST_URL.match(d.url)
    if not m or (m.group(2) and not 0 < int(m.group(2)[1:]) < 65536):
        shown = re.sub(r"//[^/@]*@", "//REDACTED@", d.url)  # a password in the URL never reaches the console
        raise ConfigError(f"{key}.url", f"not an http:// or https:// URL with a host: {shown!r}")
    if d.ca_file and not d.url.startswith("https://"):
        raise ConfigError(f"{key}.ca_file", "only for an https:// url")
    _patterns(d.channels, f"{key}.channels")
    if d.secret:
        if d.secret.startswith("whsec_"):
            try:
                material = base64.b64decode(d.secret[6:], validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"{key}.secret", "whsec_ secret is not valid base64") from None
            if not material:
                raise ConfigError(f"{key}.secret", "whsec_ secret has no key material after the prefix")
        elif not d.secret.strip():
            raise ConfigError(f"{key}.secret", "must not be blank")


@section_check(PresenceConfig)
def _presence(p: PresenceConfig, key: str) -> None:
    if p.node_timeout_seconds <= p.heartbeat_seconds:
        raise ConfigError(f"{key}.node_timeout_seconds", "must be more than heartbeat_seconds")
    if p.node_timeout_seconds + p.heartbeat_seconds > 30:
        raise ConfigError(
            f"{key}.node_timeout_seconds",
            "with heartbeat_seconds must be at most 30 (a dead node's members leave within 30 s)",
        )


@section_check(PusherConfig)
def _pusher(p: PusherConfig, key: str) -> None:
    given = {"app_id": p.app_id, "key": p.key, "secret": p.secret}
    if any(given.values()):
        for name, value in given.items():
            if not value:
                raise ConfigError(f"{key}.{name}", "is required when [pusher] is set")
    _patterns(p.public_channels, f"{key}.public_channels")
    for name in ("app_id", "key"):
        value = given[name]
        if value and not re.match(r"^[A-Za-z0-9_\-.]{1,64}$", value):
            raise ConfigError(f"{key}.{name}", f"{value!r} is not 1-64 characters of A-Z a-z 0-9 _ - .")


@section_check(Config)
def _rules_and_destinations(cfg: Config, key: str) -> None:
    seen: set[str] = set()
    for i, d in enumerate(cfg.destinations):
        if d.name in seen:
            raise ConfigError(f"destinations[{i}].name", f"duplicate destination name {d.name!r}")
        seen.add(d.name)
    if cfg.pusher.webhooks and cfg.pusher.webhooks not in seen:
        raise ConfigError("pusher.webhooks", f"no [[destinations]] is called {cfg.pusher.webhooks!r}")
    for i, d in enumerate(cfg.destinations):
        # the destination of Pusher webhooks may take nothing else
        if not d.channels and d.name != cfg.pusher.webhooks:
            raise ConfigError(f"destinations[{i}].channels", "at least one channel pattern is needed")


# -- entry points ----------------------------------------------------------------


def parse(text: str, env: Mapping[str, str] | None = None) -> Config:
    """
    Parse TOML text and run the pure checks (L{validate}).

    @raise ConfigError: on the first problem found.
    """
    if env is None:
        env = os.environ
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(file)", f"not valid TOML: {e}") from None
    cfg = _table(Config, raw, "", env)
    validate(cfg)
    return cfg


def read(path: str) -> str:
    """The text of a config file.  @raise ConfigError: unreadable or not UTF-8."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError("(file)", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("(file)", f"{path} is not UTF-8 text") from None


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read a config file and run the pure checks.  @raise ConfigError: on any problem."""
    return parse(read(path), env)


def check_file(path: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The problems the pure checks find in a config file, one line each (empty when it is good)."""
    try:
        load(path, env)
    except ConfigError as e:
        return [str(e)]
    return []

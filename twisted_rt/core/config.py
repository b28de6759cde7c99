# -*- test-case-name: tests.test_config -*-
"""
The daemon's configuration: a TOML file checked whole before anything starts.

Every key of the contract's sample lives in a frozen dataclass below.  A bad
file raises L{ConfigError} whose C{str()} is one line naming the key and the
problem, e.g. C{sources[1].verify: unknown verifier 'gitbub' (expected one of
github, stripe, ...)}.  C{${VAR}} in any string is replaced from the
environment; a variable that is not set is an error naming the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, TypeVar

__all__ = [
    "AuthConfig",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "JournalConfig",
    "ServerConfig",
    "SourceConfig",
    "SSEConfig",
    "TLSConfig",
    "VERIFIERS",
    "WebSocketConfig",
    "check_file",
    "load",
    "parse",
]

VERIFIERS = (
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
)

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """
    A configuration problem, reported as one line: C{<key>: <problem>}.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class ServerConfig:
    """C{[server]}: listeners and HTTP-wide limits."""

    listen: tuple[str, ...] = ("tcp:8080",)
    max_body_bytes: int = 1048576
    allowed_origins: tuple[str, ...] = ()
    shutdown_timeout_seconds: float = 10.0
    rate_limit_per_ip_per_second: float = 0.0
    access_log: bool = True
    redirect_http_to_https: bool = False
    hsts_seconds: int = 0
    request_head_timeout_seconds: float = 10.0
    max_connections_per_ip: int = 256
    max_connections: int = 20000
    signature_failures_per_ip_per_minute: int = 60


@dataclass(frozen=True)
class JournalConfig:
    """C{[journal]}: the durable store of every accepted event."""

    path: str = "var/journal.sqlite3"
    max_events_per_channel: int = 10000
    retention_seconds: int = 604800
    trim_interval_seconds: float = 60.0
    max_batch: int = 1000


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


@dataclass(frozen=True)
class BrokerConfig:
    """C{[broker]}: C{local} (one node) or C{redis} (several)."""

    kind: str = "local"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "rt"


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
    """C{[tls]}: certificate material for C{ssl:} listeners."""

    cert: str = ""
    key: str = ""
    chain: str = ""
    dh: str = ""
    curves: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceConfig:
    """One C{[[sources]]} table: a webhook sender and how to check it."""

    name: str
    verify: str
    secrets: tuple[str, ...] = ()
    channel: str = "{source}"
    tolerance_seconds: int = 300
    rate_limit_per_second: float = 0.0
    verify_token: str = ""
    signature_header: str = "X-Signature"
    signature_encoding: str = "hex"
    redact_headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    sse: SSEConfig = field(default_factory=SSEConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    sources: tuple[SourceConfig, ...] = ()
    log_format: str = "text"

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


_T = TypeVar("_T")


def _expand(value: str, key: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            raise ConfigError(key, f"environment variable {name} is not set")
        return env[name]

    return _VAR.sub(sub, value)


def _coerce(value: Any, annotation: str, key: str, env: Mapping[str, str]) -> Any:
    """Check and convert one TOML value against a field's annotation."""
    if annotation == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "expected a list of strings")
        return tuple(_expand(v, f"{key}[{i}]", env) for i, v in enumerate(value))
    if annotation == "str":
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_toml_type(value)}")
        return _expand(value, key, env)
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_toml_type(value)}")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_toml_type(value)}")
        if value < 0:
            raise ConfigError(key, "must not be negative")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_toml_type(value)}")
        if value < 0:
            raise ConfigError(key, "must not be negative")
        return float(value)
    raise AssertionError(annotation)  # pragma: no cover


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
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"expected a table, got {_toml_type(raw)}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}"
        if k not in known:
            raise ConfigError(key, f"unknown key (known: {', '.join(sorted(known))})")
        kwargs[k] = _coerce(v, str(known[k].type), key, env)
        _check_expanded(v, kwargs[k], key)
    try:
        return cls(**kwargs)
    except TypeError:
        missing = [
            n
            for n, f in known.items()
            if n not in kwargs
            and f.default is f.default_factory  # both MISSING
        ]
        raise ConfigError(f"{prefix}.{missing[0]}", "is required") from None


_SECTIONS: dict[str, Callable[..., Any]] = {
    "server": ServerConfig,
    "journal": JournalConfig,
    "websocket": WebSocketConfig,
    "sse": SSEConfig,
    "broker": BrokerConfig,
    "auth": AuthConfig,
    "tls": TLSConfig,
}


def parse(text: str, env: Mapping[str, str] | None = None) -> Config:
    """
    Parse and check TOML text.

    @raise ConfigError: on the first problem found.
    """
    if env is None:
        env = os.environ
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(file)", f"not valid TOML: {e}") from None
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "sources":
            if not isinstance(value, list):
                raise ConfigError("sources", "expected an array of tables [[sources]]")
            kwargs["sources"] = tuple(
                _table(SourceConfig, s, f"sources[{i}]", env) for i, s in enumerate(value)
            )
        elif name == "log_format":
            kwargs["log_format"] = _coerce(value, "str", name, env)
        elif name in _SECTIONS:
            kwargs[name] = _table(_SECTIONS[name], value, name, env)
        else:
            raise ConfigError(
                name,
                "unknown section (known: "
                + ", ".join(sorted([*_SECTIONS, "sources", "log_format"]))
                + ")",
            )
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check the relations between keys.  @raise ConfigError: on a problem."""
    from twisted.internet import endpoints

    from twisted_rt.core.matcher import PatternError, validate_pattern

    if not cfg.server.listen:
        raise ConfigError("server.listen", "at least one endpoint is needed")
    for i, desc in enumerate(cfg.server.listen):
        _check_endpoint(endpoints, desc, f"server.listen[{i}]")
    from twisted_rt.web.tls import check as check_tls  # ssl: listeners and [tls] files

    check_tls(cfg)
    if cfg.server.max_body_bytes < 1:
        raise ConfigError("server.max_body_bytes", "must be at least 1")
    if cfg.journal.max_events_per_channel < 1:
        raise ConfigError("journal.max_events_per_channel", "must be at least 1")
    if cfg.journal.max_batch < 1:
        raise ConfigError("journal.max_batch", "must be at least 1")
    if cfg.broker.kind not in ("local", "redis"):
        raise ConfigError("broker.kind", f"unknown broker {cfg.broker.kind!r} (expected local or redis)")
    if cfg.broker.kind == "redis" and not cfg.broker.url.startswith(("redis://", "unix://")):
        raise ConfigError("broker.url", "expected a redis:// or unix:// URL")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError("log_format", "expected text or json")
    if cfg.auth.jwt_secret and cfg.auth.jwt_public_key_file:
        raise ConfigError("auth.jwt_public_key_file", "give jwt_secret or jwt_public_key_file, not both")
    if cfg.auth.jwt_audience and not (cfg.auth.jwt_secret or cfg.auth.jwt_public_key_file):
        raise ConfigError("auth.jwt_audience", "needs jwt_secret or jwt_public_key_file (JWTs are off)")
    if cfg.server.request_head_timeout_seconds <= 0:
        raise ConfigError("server.request_head_timeout_seconds", "must be more than 0")
    if cfg.auth.jwt_public_key_file:
        _check_public_key(cfg.auth.jwt_public_key_file)
    for i, key in enumerate(cfg.auth.api_keys):
        if not key:
            raise ConfigError(f"auth.api_keys[{i}]", "must not be empty")
    for i, pat in enumerate(cfg.auth.anonymous_subscribe):
        try:
            validate_pattern(pat)
        except PatternError as e:
            raise ConfigError(f"auth.anonymous_subscribe[{i}]", str(e)) from None
    for i, origin in enumerate(cfg.server.allowed_origins):
        if not re.match(r"^(https?://[^/\s]+|\*)$", origin):
            raise ConfigError(f"server.allowed_origins[{i}]", f"not an origin like https://app.example.com: {origin!r}")
    if (cfg.tls.cert == "") != (cfg.tls.key == ""):
        raise ConfigError("tls.key" if cfg.tls.cert else "tls.cert", "tls.cert and tls.key go together")
    seen: set[str] = set()
    for i, s in enumerate(cfg.sources):
        key = f"sources[{i}]"
        if not _SOURCE_NAME.match(s.name):
            raise ConfigError(f"{key}.name", f"{s.name!r} is not 1-64 characters of A-Z a-z 0-9 _ -")
        if s.name in seen:
            raise ConfigError(f"{key}.name", f"duplicate source name {s.name!r}")
        seen.add(s.name)
        if s.verify not in VERIFIERS:
            raise ConfigError(
                f"{key}.verify",
                f"unknown verifier {s.verify!r} (expected one of {', '.join(VERIFIERS)})",
            )
        if s.verify not in ("none",) and not s.secrets:
            raise ConfigError(f"{key}.secrets", f"verifier {s.verify!r} needs at least one secret")
        for j, secret in enumerate(s.secrets):
            if not secret:
                raise ConfigError(f"{key}.secrets[{j}]", "must not be empty")
            if secret.strip() == "whsec_":
                raise ConfigError(f"{key}.secrets[{j}]", "whsec_ secret has no key material after the prefix")
            if secret.startswith("whsec_") and s.verify in ("standard", "gitlab"):
                # Standard Webhooks (and GitLab's signing tokens): base64 key bytes after the
                # prefix; Stripe's whsec_ secrets are used whole, as they are.
                import base64
                import binascii

                try:
                    material = base64.b64decode(secret[6:], validate=True)
                except (binascii.Error, ValueError):
                    raise ConfigError(f"{key}.secrets[{j}]", "whsec_ secret is not valid base64") from None
                if not material:
                    raise ConfigError(f"{key}.secrets[{j}]", "whsec_ secret has no key material after the prefix")
            elif not secret.strip():
                raise ConfigError(f"{key}.secrets[{j}]", "must not be blank")
        for j, name in enumerate(s.redact_headers):
            if not re.match(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,128}$", name):
                raise ConfigError(f"{key}.redact_headers[{j}]", f"not an HTTP header name: {name!r}")
        if s.signature_encoding not in ("hex", "base64"):
            raise ConfigError(f"{key}.signature_encoding", "expected hex or base64")
        if s.verify == "meta" and not s.verify_token:
            raise ConfigError(f"{key}.verify_token", "the meta verifier needs verify_token for the GET handshake")
        problem = template_problem(s.channel)
        if problem:
            raise ConfigError(f"{key}.channel", problem)
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


def _check_public_key(path: str) -> None:
    from twisted_rt.core.auth import load_public_key

    key = "auth.jwt_public_key_file"
    if not os.path.isfile(path):
        raise ConfigError(key, f"no such file: {path}")
    try:
        with open(path, "rb") as f:
            load_public_key(f.read())
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(key, f"{path}: {str(e).removeprefix('jwt_public_key_file: ')}") from None


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def template_problem(template: str) -> str | None:
    """What is wrong with a channel template, or C{None}."""
    if not template:
        return "must not be empty"
    for m in _PLACEHOLDER.finditer(template):
        inner = m.group(1)
        if inner == "source":
            continue
        kind, _, arg = inner.partition(":")
        if kind not in ("header", "json") or not arg:
            return f"unknown placeholder {{{inner}}} (expected {{source}}, {{header:Name}} or {{json:path}})"
    rest = _PLACEHOLDER.sub("x", template)
    if "{" in rest or "}" in rest:
        return "unbalanced braces"
    if not re.match(r"^[A-Za-z0-9_\-.:@]+$", rest):
        return "contains characters not allowed in a channel name"
    return None


def _check_endpoint(endpoints: Any, desc: str, key: str) -> None:
    """Parse an endpoint description without listening on it."""
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


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read and check a config file.  @raise ConfigError: on any problem."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError("(file)", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("(file)", f"{path} is not UTF-8 text") from None
    return parse(text, env)


def check_file(path: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The problems of a config file, one line each (empty when it is good)."""
    try:
        load(path, env)
    except ConfigError as e:
        return [str(e)]
    return []

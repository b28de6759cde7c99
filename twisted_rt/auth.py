# -*- test-case-name: tests.test_auth -*-
"""
Who is asking, and what they may do.

A request carries C{Authorization: Bearer <api key or JWT>} (or C{?token=}
on the streaming routes).  An API key may do everything.  A JWT (HS256 with
C{jwt_secret}, or RS256/ES256 with C{jwt_public_key_file}) must have C{sub}
and C{exp}; C{nbf} and C{iat} are checked when present; its rights are the
C{subscribe} and C{publish} lists of channel patterns.  No token at all gives
the anonymous principal, who may subscribe to C{anonymous_subscribe}.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jwt

from twisted_rt.config import AuthConfig
from twisted_rt.matcher import PatternError, covers, matches, validate_pattern

__all__ = ["AuthError", "Authenticator", "Principal"]


class AuthError(Exception):
    """Authentication failed: answered 401 (or 403 with C{status=403})."""

    def __init__(self, code: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Principal:
    """
    An authenticated caller and its rights.

    @ivar admin: an API key holder: may do everything.
    @ivar exp: when the token expires (epoch seconds), or C{None}.
    """

    sub: str
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    admin: bool = False
    exp: float | None = None
    anonymous: bool = False

    def can_subscribe(self, pattern: str) -> bool:
        """Whether every channel C{pattern} matches is readable."""
        return self.admin or any(covers(r, pattern) for r in self.subscribe)

    def can_read(self, channel: str) -> bool:
        """Whether C{channel}'s events and history are readable."""
        return self.admin or any(matches(r, channel) for r in self.subscribe)

    def can_publish(self, channel: str) -> bool:
        """Whether events may be published to C{channel}."""
        return self.admin or any(matches(r, channel) for r in self.publish)


def _rights(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthError("invalid_token", f"the {name!r} claim must be a list of channel patterns")
    try:
        return tuple(validate_pattern(v) for v in value)
    except PatternError as e:
        raise AuthError("invalid_token", f"the {name!r} claim has a bad pattern: {e}") from None


class Authenticator:
    """Checks API keys and JWTs against the C{[auth]} config."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._keys = [k.encode("utf-8") for k in config.api_keys]
        self._verify_key: Any = None
        self._algorithms: list[str] = []
        self._sign_key: Any = None
        if config.jwt_secret:
            self._verify_key = config.jwt_secret
            self._sign_key = config.jwt_secret
            self._algorithms = ["HS256"]
        elif config.jwt_public_key_file:
            from cryptography.hazmat.primitives.asymmetric import ec, rsa
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            with open(config.jwt_public_key_file, "rb") as f:
                key = load_pem_public_key(f.read())
            if isinstance(key, rsa.RSAPublicKey):
                self._algorithms = ["RS256"]
            elif isinstance(key, ec.EllipticCurvePublicKey):
                self._algorithms = ["ES256"]
            else:
                raise ValueError("jwt_public_key_file must hold an RSA or EC public key")
            self._verify_key = key
        self._anonymous = Principal(
            sub="anonymous", subscribe=tuple(config.anonymous_subscribe), anonymous=True
        )

    @property
    def algorithm(self) -> str | None:
        """The one JWT algorithm accepted, or C{None} when JWTs are off."""
        return self._algorithms[0] if self._algorithms else None

    def anonymous(self) -> Principal:
        """The principal of a caller with no token."""
        return self._anonymous

    def is_api_key(self, token: str) -> bool:
        """Whether C{token} is one of the configured API keys (constant time)."""
        t = token.encode("utf-8")
        found = False
        for k in self._keys:
            found |= hmac.compare_digest(k, t)
        return found

    def authenticate(self, token: str | None) -> Principal:
        """
        The principal for C{token} (C{None} or empty: anonymous).

        @raise AuthError: a token that is not a key and not a valid JWT.
        """
        if not token:
            return self._anonymous
        if self.is_api_key(token):
            return Principal(sub="api-key", admin=True)
        if self._verify_key is None:
            raise AuthError("invalid_token", "the token is not a known API key")
        if token.count(".") != 2:
            raise AuthError("invalid_token", "the token is not a known API key or a JWT")
        try:
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=self._algorithms,
                options={"require": ["exp", "sub"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token_not_yet_valid", "the token is not valid yet (nbf or iat in the future)") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError("invalid_token", f"the token lacks the {e.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("invalid_token", f"the token's algorithm is not {self._algorithms[0]}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid_token", "the token's signature does not verify") from None
        except jwt.InvalidTokenError as e:
            raise AuthError("invalid_token", f"the token is not valid: {e}") from None
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid_token", "the 'sub' claim must be a non-empty string")
        return Principal(
            sub=sub,
            subscribe=_rights(claims, "subscribe"),
            publish=_rights(claims, "publish"),
            exp=float(claims["exp"]),
        )

    def bearer(self, header: bytes | str | None, query_token: bytes | str | None = None) -> Principal:
        """
        The principal of a request from its C{Authorization} header or a
        C{token} query argument.
        """
        token: str | None = None
        if header:
            h = header.decode("latin-1") if isinstance(header, bytes) else header
            scheme, _, value = h.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError("invalid_token", "use 'Authorization: Bearer <api key or JWT>'")
            token = value.strip()
        elif query_token:
            token = query_token.decode("utf-8", "replace") if isinstance(query_token, bytes) else query_token
        return self.authenticate(token)

    def mint(
        self,
        sub: str,
        subscribe: Iterable[str] = (),
        publish: Iterable[str] = (),
        ttl: float = 3600,
    ) -> str:
        """A JWT signed with the configured secret (HS256 only)."""
        if self._sign_key is None:
            raise ValueError("minting tokens needs [auth] jwt_secret")
        now = int(self._clock())
        claims: dict[str, Any] = {
            "sub": sub,
            "iat": now,
            "exp": now + int(ttl),
            "subscribe": list(subscribe),
            "publish": list(publish),
        }
        return jwt.encode(claims, self._sign_key, algorithm="HS256")

# -*- test-case-name: tests.test_auth -*-
"""
Who is asking, and what they may do.

A request carries C{Authorization: Bearer <api key or JWT>} (or C{?token=}
on the streaming routes).  An API key may do everything.  A JWT (HS256 with
C{jwt_secret}, or RS256/ES256 with C{jwt_public_key_file}) must have C{sub}
and C{exp}; C{nbf} and C{iat} are checked when present; with C{[auth]
jwt_audience} set it must also carry that C{aud} (RFC 7519: a string, or a
list of strings that includes it), and without it an C{aud} is not looked at;
its rights are the C{subscribe} and C{publish} lists of channel patterns.  No token at all gives
the anonymous principal, who may subscribe to C{anonymous_subscribe}.
"""

from __future__ import annotations

import hmac
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import jwt

from twisted_rt.core.config import AuthConfig
from twisted_rt.core.event import dumps
from twisted_rt.core.matcher import PatternError, covers, matches, validate_pattern
from twisted_rt.interfaces import AuthError

__all__ = ["MAX_INFO_BYTES", "AuthError", "Authenticator", "Principal", "load_public_key", "require", "validate_info"]

#: the largest C{info} claim, as compact JSON
MAX_INFO_BYTES = 1024


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
    #: the JWT's C{info} claim (a JSON object of at most L{MAX_INFO_BYTES}): a presence member's description
    info: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def member(self) -> str | None:
        """The presence identity: a JWT's C{sub}; C{None} for API keys and anonymous callers."""
        return None if self.admin or self.anonymous else self.sub

    def can_subscribe(self, pattern: str) -> bool:
        """Whether every channel C{pattern} matches is readable."""
        return self.admin or any(covers(r, pattern) for r in self.subscribe)

    def can_read(self, channel: str) -> bool:
        """Whether C{channel}'s events and history are readable."""
        return self.admin or any(matches(r, channel) for r in self.subscribe)

    def can_publish(self, channel: str) -> bool:
        """Whether events may be published to C{channel}."""
        return self.admin or any(matches(r, channel) for r in self.publish)

    @property
    def scope(self) -> str:
        """
        The idempotency scope of this caller's event ids (L{Draft.scope}):
        one shared scope for API keys, one per JWT C{sub}.  Webhook source
        names have no C{:}, so these never meet a source's delivery ids.
        """
        return "pub:key" if self.admin else f"pub:sub:{self.sub}"


def _info_claim(claims: dict[str, Any]) -> Mapping[str, Any] | None:
    """The C{info} claim: absent, or a JSON object of at most L{MAX_INFO_BYTES} (compact JSON)."""
    if "info" not in claims:
        return None
    info = claims["info"]
    if not isinstance(info, dict):
        raise AuthError("invalid_token", "the 'info' claim must be a JSON object (the presence member's description)")
    try:
        size = len(dumps(info))
    except (TypeError, ValueError):
        raise AuthError("invalid_token", "the 'info' claim cannot be written as JSON") from None
    if size > MAX_INFO_BYTES:
        raise AuthError(
            "invalid_token", f"the 'info' claim is {size} bytes of JSON; at most {MAX_INFO_BYTES} are allowed"
        )
    return info


def validate_info(info: Any) -> Mapping[str, Any]:
    """
    An C{info} claim as the daemon accepts it (a JSON object of at most
    L{MAX_INFO_BYTES}), for the tools that mint tokens.  @raise AuthError: otherwise.
    """
    checked = _info_claim({"info": info})
    assert checked is not None
    return checked


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
    """
    Checks API keys and JWTs against the C{[auth]} config.

    @param clock: the time source for C{exp}, C{nbf} and C{iat} (and for
        L{mint}); a test passes a fake.
    @param leeway: seconds of clock skew tolerated for C{nbf} and C{iat}
        (never for C{exp}).
    """

    def __init__(
        self,
        config: AuthConfig,
        clock: Callable[[], float] = time.time,
        leeway: float = 5.0,
    ) -> None:
        self.config = config
        self._clock = clock
        self._leeway = leeway
        self._keys = [k.encode("utf-8") for k in config.api_keys]
        self._audience = config.jwt_audience
        self._verify_key: Any = None
        self._algorithms: list[str] = []
        self._sign_key: Any = None
        if config.jwt_secret:
            self._verify_key = config.jwt_secret
            self._sign_key = config.jwt_secret
            self._algorithms = ["HS256"]
        elif config.jwt_public_key_file:
            with open(config.jwt_public_key_file, "rb") as f:
                self._verify_key, alg = load_public_key(f.read())
            self._algorithms = [alg]
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
        claims = self._decode(token)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid_token", "the 'sub' claim must be a non-empty string")
        exp = self._check_times(claims)
        if self._audience:
            self._check_audience(claims)
        return Principal(
            sub=sub,
            subscribe=_rights(claims, "subscribe"),
            publish=_rights(claims, "publish"),
            exp=exp,
            info=_info_claim(claims),
        )

    def _decode(self, token: str) -> dict[str, Any]:
        """Verify the signature and algorithm; the time claims are checked after."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("invalid_token", "the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise AuthError(
                "invalid_token",
                f"the token's algorithm {alg!r} is not the configured {self._algorithms[0]}",
            )
        try:
            claims = jwt.decode(
                token,
                self._verify_key,
                algorithms=self._algorithms,
                options={
                    "require": ["exp", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # checked by _check_audience, with clear messages (PyJWT
                    # would refuse every token with an aud when given none)
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.MissingRequiredClaimError as e:
            raise AuthError("invalid_token", f"the token lacks the {e.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(
                "invalid_token", f"the token's algorithm is not the configured {self._algorithms[0]}"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid_token", "the token's signature does not verify") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid_token", "the token is not a valid JWT") from None
        if not isinstance(claims, dict):  # pragma: no cover - PyJWT always gives a dict
            raise AuthError("invalid_token", "the token's claims are not an object")
        return claims

    def _check_audience(self, claims: dict[str, Any]) -> None:
        """C{aud} must be the configured audience, or a list that includes it."""
        want = self._audience
        if "aud" not in claims:
            raise AuthError("invalid_token", f"the token has no 'aud' claim; this server needs aud = {want!r}")
        aud = claims["aud"]
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not all(isinstance(a, str) for a in auds):
            raise AuthError("invalid_token", "the 'aud' claim must be a string or a list of strings")
        if want not in auds:
            raise AuthError(
                "invalid_token", f"the token's audience {aud!r} is not this server's {want!r} (jwt_audience)"
            )

    def _check_times(self, claims: dict[str, Any]) -> float:
        """Check C{exp}, C{nbf} and C{iat} against the clock; return C{exp}."""
        now = self._clock()
        times: dict[str, float] = {}
        for name in ("exp", "nbf", "iat"):
            if name not in claims:
                continue
            value = claims[name]
            # JSON's Infinity/NaN, which PyJWT's decoder accepts, are not times
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AuthError("invalid_token", f"the {name!r} claim must be a number (epoch seconds)")
            times[name] = float(value)
        if times["exp"] <= now:
            raise AuthError("token_expired", "the token has expired")
        if "nbf" in times and times["nbf"] > now + self._leeway:
            raise AuthError("token_not_yet_valid", "the token is not valid yet (its nbf is in the future)")
        if "iat" in times and times["iat"] > now + self._leeway:
            raise AuthError("token_not_yet_valid", "the token was issued in the future (its iat)")
        return times["exp"]

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
        aud: str | Sequence[str] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> str:
        """
        A JWT signed with the configured secret (HS256 only).

        @param aud: the C{aud} claim (one audience, or several); by default
            C{[auth] jwt_audience} when it is set, else none.
        @param info: the C{info} claim (a presence member's description).
        """
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
        if info is not None:
            claims["info"] = dict(info)
        if aud is None:
            aud = self._audience or None
        if aud is not None:
            claims["aud"] = aud if isinstance(aud, str) else list(aud)
        return jwt.encode(claims, self._sign_key, algorithm="HS256")


def load_public_key(pem: bytes) -> tuple[Any, str]:
    """
    A JWT verification key and its one algorithm from a PEM public key:
    RSA gives RS256, EC P-256 gives ES256.  The owner's check of C{[auth]
    jwt_public_key_file} (run by L{twisted_rt.checks} before the start).

    @raise ValueError: not a PEM public key, or any other kind of key; the
        message names the problem, not the key (the caller does).
    """
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("an RSA key needs at least 2048 bits")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("an EC key must be on P-256 for ES256")
        return key, "ES256"
    raise ValueError(f"must be an RSA or EC P-256 public key, not {type(key).__name__}")


def require(principal: Principal) -> Principal:
    """
    C{principal} if it came with a token; the API refuses anonymous callers.

    @raise AuthError: 401 C{missing_token}.
    """
    if principal.anonymous:
        raise AuthError("missing_token", "this route needs 'Authorization: Bearer <api key or JWT>'")
    return principal

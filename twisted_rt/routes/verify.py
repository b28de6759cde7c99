# -*- test-case-name: tests.test_verify -*-
"""
Webhook signature verifiers and provider handshakes: pure functions.

Every verifier takes the raw body bytes exactly as received, the request
headers as a mapping with I{lower-case} names, the L{SourceConfig} and the
current time C{now} (seconds since the epoch), and either returns or raises
L{SignatureError}.  Each follows its provider's published scheme byte for
byte; every comparison of secret material is constant-time
(L{hmac.compare_digest}); every configured secret is tried, so a secret can
be rotated without downtime.

  - C{github} / C{meta}: C{X-Hub-Signature-256: sha256=<hex HMAC-SHA256(body)>}.
  - C{stripe}: C{Stripe-Signature: t=<ts>,v1=<hex>[,v1=...]} over C{"{t}.{body}"}.
  - C{slack}: C{X-Slack-Signature: v0=<hex>} over
    C{"v0:{X-Slack-Request-Timestamp}:{body}"}.
  - C{standard}: Standard Webhooks, C{webhook-signature: v1,<base64> ...}
    over C{"{webhook-id}.{webhook-timestamp}.{body}"}, C{whsec_<base64>} secrets.
  - C{shopify}: C{X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256(body)>}.
  - C{gitlab}: GitLab's signing token (a C{whsec_<base64>} secret) checks
    its Standard Webhooks C{webhook-signature}; any other secret is a plain
    C{X-Gitlab-Token}, compared as it is.  A C{webhook-signature} that a
    signing token can check alone decides.
  - C{twitter}: C{X-Twitter-Webhooks-Signature: sha256=<base64 HMAC-SHA256(body)>},
    over a body that is a JSON object or array (X sends nothing else, and
    the C{crc_token} handshake, which signs what the caller sends, never
    signs such a body: see L{twitter_crc}).
  - C{zoom}: C{x-zm-signature: v0=<hex>} over C{"v0:{x-zm-request-timestamp}:{body}"}.
  - C{hmac-sha256}: the source's C{signature_header}, hex or base64 (an
    optional C{sha256=} prefix is accepted).
  - C{none}: accepts everything (trusted networks only; the service warns).

Timestamps are what the providers send: a whole number of seconds in ASCII
digits (no sign, fraction, exponent, spaces or underscores), and the
signature covers exactly those digits.  A C{tolerance_seconds} of 0 turns
the timestamp check off; otherwise a timestamp further than that from
C{now}, in the past I{or} the future, is refused as stale.

Hex and base64 signatures are compared as the provider writes them (the
generic C{hmac-sha256} alone also takes upper-case hex and a C{sha256=}
prefix in any case).  What each scheme signs, and what it leaves unsigned
(GitHub's C{X-GitHub-Event} and C{X-GitHub-Delivery}, Shopify's topic and
webhook id, ...), is in the README's "What each webhook source promises".

L{SECRET_HEADERS} names the request headers that carry a credential rather
than a signature; they are never stored, served or forwarded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from functools import lru_cache
from typing import Any, Callable, Mapping

from twisted_rt.core.config import SourceConfig
from twisted_rt.web.outgoing import SECRET_HEADERS

__all__ = [
    "SECRET_HEADERS",
    "SignatureError",
    "VERIFIERS",
    "crc_token_problem",
    "identify",
    "meta_challenge",
    "secret_headers",
    "twitter_crc",
    "verify",
    "zoom_validation",
]

Headers = Mapping[str, str]

#: Request headers (lower-case) that carry a credential, not a signature:
#: never stored with an event, served by C{/api/raw} or forwarded
#: (CONTRACT.md, "Safety rules").  GitLab's C{X-Gitlab-Token} I{is} the
#: source's secret.


def secret_headers(source: SourceConfig | None) -> frozenset[str]:
    """The lower-case header names never kept for C{source}: L{SECRET_HEADERS} and its C{redact_headers}."""
    if source is None or not source.redact_headers:
        return SECRET_HEADERS
    return SECRET_HEADERS | {h.lower() for h in source.redact_headers}


class SignatureError(Exception):
    """
    A webhook whose signature is missing, wrong or stale (a 401).

    @ivar code: C{missing_signature}, C{invalid_signature} or C{stale_signature}.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _missing(header: str) -> SignatureError:
    return SignatureError("missing_signature", f"the {header} header is missing")


def _invalid(header: str) -> SignatureError:
    return SignatureError("invalid_signature", f"the {header} header does not match the body with any secret")


def _malformed(header: str, expected: str) -> SignatureError:
    return SignatureError("invalid_signature", f"the {header} header is malformed (expected {expected})")


def _same(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _hmac(secret: bytes, *parts: bytes) -> bytes:
    if len(parts) == 1:
        return hmac.digest(secret, parts[0], "sha256")  # one C call
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for p in parts:
        mac.update(p)
    return mac.digest()


def _hex_digests(secrets: tuple[str, ...], *parts: bytes) -> list[bytes]:
    return [_hmac(s.encode("utf-8"), *parts).hex().encode("ascii") for s in secrets]


def _latin1(value: str) -> bytes:
    return value.encode("latin-1", "replace")


def _b64(value: str) -> bytes | None:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _check_time(stamp: str, header: str, source: SourceConfig, now: float) -> int:
    """
    A Unix timestamp header: ASCII digits only (as every provider sends it:
    no sign, fraction, exponent, space or underscore), within the tolerance.
    """
    if not (0 < len(stamp) <= 12 and stamp.isascii() and stamp.isdigit()):
        raise _malformed(header, "a Unix timestamp in whole seconds")
    t = int(stamp)
    tol = source.tolerance_seconds
    if tol and abs(now - t) > tol:
        raise SignatureError(
            "stale_signature",
            f"the {header} timestamp is {int(now - t)} seconds from the server's clock"
            f" (tolerance {tol} seconds)",
        )
    return t


# -- the verifiers ----------------------------------------------------------


def _prefixed_hex(header: str, prefix: str) -> Callable[[SourceConfig, bytes, Headers, float], None]:
    name = header.lower()

    def check(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
        value = headers.get(name)
        if not value:
            raise _missing(header)
        if not value.startswith(prefix):
            raise _malformed(header, f"{prefix}<hex>")
        given = _latin1(value[len(prefix) :])
        ok = False
        for expected in _hex_digests(source.secrets, body):
            ok |= _same(expected, given)
        if not ok:
            raise _invalid(header)

    return check


verify_github = _prefixed_hex("X-Hub-Signature-256", "sha256=")


def verify_stripe(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
    """
    C{Stripe-Signature: t=<ts>,v1=<hex>[,v1=<hex>...]} over C{"{t}.{body}"}:
    exactly one C{t}, every element C{key=value}; schemes other than
    C{v1} (C{v0}, test-mode signatures) are ignored, as Stripe's libraries do.
    """
    header = "Stripe-Signature"
    value = headers.get("stripe-signature")
    if not value:
        raise _missing(header)
    stamp: str | None = None
    given: list[bytes] = []
    for item in value.split(","):
        k, sep, v = item.strip().partition("=")
        if not sep or not k:
            raise _malformed(header, "t=<timestamp>,v1=<hex>")
        if k == "t":
            if stamp is not None:
                raise _malformed(header, "one t=<timestamp>")
            stamp = v
        elif k == "v1" and v:
            given.append(_latin1(v))
    if stamp is None or not given:
        raise _malformed(header, "t=<timestamp>,v1=<hex>")
    _check_time(stamp, header, source, now)
    expected = _hex_digests(source.secrets, stamp.encode("ascii"), b".", body)
    ok = False
    for e in expected:
        for g in given:
            ok |= _same(e, g)
    if not ok:
        raise _invalid(header)


def _v0_timestamped(
    sig_header: str, ts_header: str
) -> Callable[[SourceConfig, bytes, Headers, float], None]:
    sig_name, ts_name = sig_header.lower(), ts_header.lower()

    def check(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
        value = headers.get(sig_name)
        if not value:
            raise _missing(sig_header)
        stamp = headers.get(ts_name)
        if not stamp:
            raise _missing(ts_header)
        if not value.startswith("v0="):
            raise _malformed(sig_header, "v0=<hex>")
        _check_time(stamp, ts_header, source, now)
        given = _latin1(value[3:])
        ok = False
        for expected in _hex_digests(source.secrets, b"v0:", stamp.encode("ascii"), b":", body):
            ok |= _same(expected, given)
        if not ok:
            raise _invalid(sig_header)

    return check


verify_slack = _v0_timestamped("X-Slack-Signature", "X-Slack-Request-Timestamp")
verify_zoom = _v0_timestamped("x-zm-signature", "x-zm-request-timestamp")


@lru_cache(maxsize=256)
def standard_secret(secret: str) -> bytes:
    """
    The key bytes of a Standard Webhooks secret: C{whsec_<base64>} decodes
    the base64 part (as the reference library does, also without the prefix);
    a secret that is not base64 is used as its UTF-8 bytes.  (Config refuses
    a C{whsec_} secret that is not base64 or holds no key.)
    """
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[6:] + "==")
    try:
        key = base64.b64decode(secret + "=" * (-len(secret) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    return key or secret.encode("utf-8")


#: At most this many signatures of one C{webhook-signature} header are looked at
#: (the reference senders send one per active key, a handful during rotation).
_MAX_SIGNATURES = 16


def _check_standard(secrets: tuple[str, ...], body: bytes, headers: Headers, source: SourceConfig,
                    now: float) -> None:
    value = headers.get("webhook-signature")
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    if not value:
        raise _missing("webhook-signature")
    if not msg_id:
        raise _missing("webhook-id")
    if not stamp:
        raise _missing("webhook-timestamp")
    _check_time(stamp, "webhook-timestamp", source, now)
    given: list[bytes] = []
    for sig in value.split(" ")[:_MAX_SIGNATURES]:
        version, sep, b64 = sig.partition(",")
        if sep and version == "v1":
            raw = _b64(b64)
            if raw is not None:
                given.append(raw)
    if not given:
        raise _malformed("webhook-signature", "v1,<base64> [v1,<base64> ...]")
    content = (_latin1(msg_id), b".", stamp.encode("ascii"), b".", body)
    ok = False
    for secret in secrets:
        expected = _hmac(standard_secret(secret), *content)
        for g in given:
            ok |= _same(expected, g)
    if not ok:
        raise _invalid("webhook-signature")


def verify_standard(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
    """Standard Webhooks: C{webhook-id}, C{webhook-timestamp}, C{webhook-signature}."""
    _check_standard(source.secrets, body, headers, source, now)


#: A JSON object or array, after JSON's insignificant whitespace (a match, not a copy).
_JSON_CONTAINER = re.compile(rb"[ \t\r\n]*[\[{]")


def _base64_body(
    header: str, prefix: str = "", json_container: bool = False
) -> Callable[[SourceConfig, bytes, Headers, float], None]:
    name = header.lower()

    def check(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
        value = headers.get(name)
        if not value:
            raise _missing(header)
        if prefix:
            if not value.startswith(prefix):
                raise _malformed(header, f"{prefix}<base64>")
            value = value[len(prefix) :]
        given = _b64(value)
        if given is None:
            raise _malformed(header, f"{prefix}<base64>")
        if json_container and _JSON_CONTAINER.match(body) is None:
            # X signs JSON objects only; anything else may be a crc_token
            # answer replayed as a signature (see twitter_crc)
            raise SignatureError("invalid_signature", "this source's deliveries are JSON objects; this body is not")
        ok = False
        for secret in source.secrets:
            ok |= _same(_hmac(secret.encode("utf-8"), body), given)
        if not ok:
            raise _invalid(header)

    return check


verify_shopify = _base64_body("X-Shopify-Hmac-Sha256")
verify_twitter = _base64_body("X-Twitter-Webhooks-Signature", "sha256=", json_container=True)


def verify_gitlab(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
    """
    GitLab.  A C{whsec_<base64>} secret is a signing token: it checks the
    Standard Webhooks C{webhook-signature} (which then alone decides), and is
    never accepted as a plain token.  Any other secret is a plain secret
    token, compared with C{X-Gitlab-Token}; those are only consulted when no
    signing token can decide (none configured, or the delivery carries no
    signature), so a source configured with signing tokens only refuses
    unsigned deliveries.
    """
    signing = tuple(s for s in source.secrets if s.startswith("whsec_"))
    tokens = tuple(s for s in source.secrets if not s.startswith("whsec_"))
    if signing and (headers.get("webhook-signature") or not tokens):
        _check_standard(signing, body, headers, source, now)
        return
    token = headers.get("x-gitlab-token")
    if not token:
        raise _missing("X-Gitlab-Token")
    given = hashlib.sha256(_latin1(token)).digest()
    ok = False
    for secret in tokens:
        ok |= _same(hashlib.sha256(secret.encode("utf-8")).digest(), given)
    if not ok:
        raise SignatureError("invalid_signature", "the X-Gitlab-Token header matches no secret")


def verify_hmac_sha256(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
    """A generic HMAC-SHA256 of the body in C{signature_header} (hex or base64)."""
    header = source.signature_header
    value = headers.get(header.lower())
    if not value:
        raise _missing(header)
    value = value.strip()
    if value[:7].lower() == "sha256=":
        value = value[7:]
    if source.signature_encoding == "base64":
        raw = _b64(value)
        if raw is None:
            raise _malformed(header, "base64")
        given = raw
        expected = [_hmac(s.encode("utf-8"), body) for s in source.secrets]
    else:
        given = _latin1(value.lower())
        expected = _hex_digests(source.secrets, body)
    ok = False
    for e in expected:
        ok |= _same(e, given)
    if not ok:
        raise _invalid(header)


def verify_none(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
    """Accept everything (C{verify = "none"})."""


VERIFIERS: dict[str, Callable[[SourceConfig, bytes, Headers, float], None]] = {
    "github": verify_github,
    "meta": verify_github,
    "stripe": verify_stripe,
    "slack": verify_slack,
    "standard": verify_standard,
    "shopify": verify_shopify,
    "gitlab": verify_gitlab,
    "twitter": verify_twitter,
    "zoom": verify_zoom,
    "hmac-sha256": verify_hmac_sha256,
    "none": verify_none,
}


def verify(source: SourceConfig, body: bytes, headers: Headers, now: float) -> None:
    """
    Check one delivery of C{source}.

    @param headers: the request headers with lower-case names.
    @param now: the current time, seconds since the epoch.
    @raise SignatureError: a missing, invalid or stale signature.
    """
    VERIFIERS[source.verify](source, body, headers, now)


# -- what the delivery is: event type and delivery id ----------------------


def _field(data: Any, name: str) -> str:
    if isinstance(data, dict):
        v = data.get(name)
        if isinstance(v, str):
            return v
    return ""


def identify(verify_kind: str, headers: Headers, data: Any) -> tuple[str, str | None]:
    """
    The event type and delivery id of a verified delivery, per provider
    (C{None}: the journal generates an id and nothing is deduplicated).
    """
    get = headers.get
    if verify_kind == "github":
        return get("x-github-event", ""), get("x-github-delivery") or None
    if verify_kind == "stripe":
        return _field(data, "type"), _field(data, "id") or None
    if verify_kind == "slack":
        if isinstance(data, dict):
            kind = _field(data, "type")
            if kind == "event_callback":
                return _field(data.get("event"), "type") or kind, _field(data, "event_id") or None
            if not kind and "command" in data:
                return "slash_command", None
            return kind, None
        return "", None
    if verify_kind == "standard":
        return _field(data, "type"), get("webhook-id") or None
    if verify_kind == "shopify":
        return get("x-shopify-topic", ""), get("x-shopify-webhook-id") or None
    if verify_kind == "gitlab":
        # webhook-id is signed (with webhook-signature); X-Gitlab-Event-UUID is not
        if get("webhook-signature"):
            return get("x-gitlab-event", ""), get("webhook-id") or get("x-gitlab-event-uuid") or None
        return get("x-gitlab-event", ""), get("x-gitlab-event-uuid") or get("webhook-id") or None
    if verify_kind == "meta":
        return _field(data, "object"), None
    if verify_kind == "twitter":
        if isinstance(data, dict):
            for k in data:
                if k.endswith("_events"):
                    return k, None
        return "", None
    if verify_kind == "zoom":
        return _field(data, "event"), None
    # hmac-sha256, none: the sender's own conventions
    return _field(data, "type"), get("idempotency-key") or get("webhook-id") or None


# -- handshakes -------------------------------------------------------------


def meta_challenge(source: SourceConfig, args: Mapping[str, str]) -> str | None:
    """
    Meta's subscription handshake (C{GET ?hub.mode=subscribe&hub.verify_token=
    &hub.challenge=}): the challenge to echo, or C{None} if this GET is not
    a handshake.  @raise SignatureError: a wrong or missing verify token.
    """
    if args.get("hub.mode") != "subscribe" or "hub.challenge" not in args:
        return None
    token = args.get("hub.verify_token", "")
    if not _same(hashlib.sha256(token.encode("utf-8")).digest(),
                 hashlib.sha256(source.verify_token.encode("utf-8")).digest()) or not source.verify_token:
        raise SignatureError("invalid_verify_token", "hub.verify_token does not match this source's verify_token")
    return args["hub.challenge"]


#: The longest C{crc_token} answered (X's are a few dozen characters).
MAX_CRC_TOKEN = 1024


def crc_token_problem(crc_token: str) -> str | None:
    """
    Why X's C{crc_token} handshake must not answer this token, or C{None}.

    The answer is C{base64(HMAC(secret, crc_token))} for anyone who asks,
    which is exactly the signature L{verify_twitter} checks for a body equal
    to the token.  Deliveries are JSON objects (arrays at most), which begin
    with C{{} or C{[} after whitespace: a token of printable ASCII without
    those two characters can never be such a body, so no answer is ever a
    delivery's signature.
    """
    if not 0 < len(crc_token) <= MAX_CRC_TOKEN:
        return f"crc_token must be 1 to {MAX_CRC_TOKEN} characters"
    if not (crc_token.isascii() and crc_token.isprintable()) or "{" in crc_token or "[" in crc_token:
        return "crc_token must be printable ASCII without { or ["
    return None


def twitter_crc(source: SourceConfig, crc_token: str) -> dict[str, str]:
    """
    X's CRC answer: C{{"response_token": "sha256=<base64 HMAC-SHA256(secret, crc_token)>"}}.

    @raise ValueError: a token L{crc_token_problem} refuses (never signed).
    """
    problem = crc_token_problem(crc_token)
    if problem is not None:
        raise ValueError(problem)
    digest = _hmac(source.secrets[0].encode("utf-8"), crc_token.encode("utf-8"))
    return {"response_token": "sha256=" + base64.b64encode(digest).decode("ascii")}


def zoom_validation(source: SourceConfig, plain_token: str) -> dict[str, str]:
    """Zoom's C{endpoint.url_validation} answer: the token and its hex HMAC-SHA256."""
    digest = _hmac(source.secrets[0].encode("utf-8"), plain_token.encode("utf-8"))
    return {"plainToken": plain_token, "encryptedToken": digest.hex()}

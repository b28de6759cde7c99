"""
The webhook verifiers of L{twisted_rt.routes.verify}: each provider's scheme, signed
by its official library where one is on PyPI (C{standardwebhooks},
C{slack_sdk}, C{stripe}), else by its published example or algorithm.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Callable

import pytest
import standardwebhooks
import stripe
from conftest import SHARED_DATA
from hypothesis import given, settings
from hypothesis import strategies as st
from slack_sdk.signature import SignatureVerifier

from twisted_rt.core.config import SourceConfig
from twisted_rt.routes.verify import (
    SECRET_HEADERS,
    SignatureError,
    crc_token_problem,
    identify,
    meta_challenge,
    secret_headers,
    standard_secret,
    twitter_crc,
    verify,
    zoom_validation,
)

NOW = 1_763_750_000.0
SECRET = "s3cret-for-tests"
WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
WHSEC2 = "whsec_" + base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()
GITHUB_PUSH = (SHARED_DATA / "octokit-webhook-examples" / "push_payload.json").read_bytes()

Signer = Callable[[bytes, str, int], dict[str, str]]


def _hex(secret: str, msg: bytes) -> str:
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def _b64(secret: str, msg: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()


def sign_github(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {"x-hub-signature-256": "sha256=" + _hex(secret, body)}


def sign_stripe(body: bytes, secret: str, ts: int) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=ts)
    return {"stripe-signature": header}


def sign_slack(body: bytes, secret: str, ts: int) -> dict[str, str]:
    sig = SignatureVerifier(secret).generate_signature(timestamp=str(ts), body=body)
    assert sig is not None
    return {"x-slack-signature": sig, "x-slack-request-timestamp": str(ts)}


def sign_standard(body: bytes, secret: str, ts: int) -> dict[str, str]:
    wh = standardwebhooks.Webhook(secret)
    sig = wh.sign("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", datetime.fromtimestamp(ts, tz=UTC), body.decode())
    return {"webhook-id": "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", "webhook-timestamp": str(ts), "webhook-signature": sig}


def sign_shopify(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {"x-shopify-hmac-sha256": _b64(secret, body)}


def sign_gitlab(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {"x-gitlab-token": secret}


def sign_twitter(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {"x-twitter-webhooks-signature": "sha256=" + _b64(secret, body)}


def sign_zoom(body: bytes, secret: str, ts: int) -> dict[str, str]:
    msg = f"v0:{ts}:".encode() + body
    return {"x-zm-signature": "v0=" + _hex(secret, msg), "x-zm-request-timestamp": str(ts)}


def sign_hmac_hex(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {"x-signature": _hex(secret, body)}


def sign_hmac_b64(body: bytes, secret: str, ts: int) -> dict[str, str]:
    return {"x-body-mac": "sha256=" + _b64(secret, body)}


# (verify kind, signer, secret, rotated secret, timestamped, signature header, extra config)
PROVIDERS: list[tuple[str, Signer, str, str, bool, str, dict[str, str]]] = [
    ("github", sign_github, SECRET, "other-secret", False, "x-hub-signature-256", {}),
    ("meta", sign_github, SECRET, "other-secret", False, "x-hub-signature-256", {"verify_token": "vt"}),
    ("stripe", sign_stripe, "whsec_stripe_test", "whsec_stripe_old", True, "stripe-signature", {}),
    ("slack", sign_slack, "8f742231b10e8888abcd99yyyzzz85a5", "other-secret", True, "x-slack-signature", {}),
    ("standard", sign_standard, WHSEC, WHSEC2, True, "webhook-signature", {}),
    ("shopify", sign_shopify, SECRET, "other-secret", False, "x-shopify-hmac-sha256", {}),
    ("gitlab", sign_gitlab, SECRET, "other-secret", False, "x-gitlab-token", {}),
    ("twitter", sign_twitter, SECRET, "other-secret", False, "x-twitter-webhooks-signature", {}),
    ("zoom", sign_zoom, SECRET, "other-secret", True, "x-zm-signature", {}),
    ("hmac-sha256", sign_hmac_hex, SECRET, "other-secret", False, "x-signature", {}),
    (
        "hmac-sha256",
        sign_hmac_b64,
        SECRET,
        "other-secret",
        False,
        "x-body-mac",
        {"signature_header": "X-Body-Mac", "signature_encoding": "base64"},
    ),
]
IDS = [p[0] if i != len(PROVIDERS) - 1 else "hmac-sha256-base64" for i, p in enumerate(PROVIDERS)]
BODY = b'{"id":"evt_1","type":"thing.happened","object":"page","event":"meeting.started","n":1}'


def source(kind: str, secrets: tuple[str, ...], extra: dict[str, str]) -> SourceConfig:
    return SourceConfig(name="src", verify=kind, secrets=secrets, **extra)  # type: ignore[arg-type]


def _code(kind: str, body: bytes, headers: dict[str, str], secrets: tuple[str, ...],
          extra: dict[str, str], now: float = NOW) -> str:
    try:
        verify(source(kind, secrets, extra), body, headers, now)
    except SignatureError as e:
        return e.code
    return "ok"


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), PROVIDERS, ids=IDS)
def test_valid_signature(kind: str, sign: Signer, secret: str, rotated: str, timed: bool, header: str,
                         extra: dict[str, str]) -> None:
    """A body signed by the provider's scheme with the configured secret is accepted."""
    assert _code(kind, BODY, sign(BODY, secret, int(NOW)), (secret,), extra) == "ok"


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), PROVIDERS, ids=IDS)
def test_tampered_body(kind: str, sign: Signer, secret: str, rotated: str, timed: bool, header: str,
                       extra: dict[str, str]) -> None:
    """A body changed by one byte after signing is refused as invalid (except GitLab's plain token)."""
    headers = sign(BODY, secret, int(NOW))
    expected = "ok" if kind == "gitlab" else "invalid_signature"
    assert _code(kind, BODY.replace(b"1", b"2", 1), headers, (secret,), extra) == expected


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), PROVIDERS, ids=IDS)
def test_wrong_secret(kind: str, sign: Signer, secret: str, rotated: str, timed: bool, header: str,
                      extra: dict[str, str]) -> None:
    """A body signed with a secret the source does not have is refused."""
    headers = sign(BODY, rotated, int(NOW))
    assert _code(kind, BODY, headers, (secret,), extra) == "invalid_signature"


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), PROVIDERS, ids=IDS)
def test_rotated_secret(kind: str, sign: Signer, secret: str, rotated: str, timed: bool, header: str,
                        extra: dict[str, str]) -> None:
    """During rotation a body signed with the second configured secret is accepted."""
    headers = sign(BODY, rotated, int(NOW))
    assert _code(kind, BODY, headers, (secret, rotated), extra) == "ok"


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), PROVIDERS, ids=IDS)
def test_missing_header(kind: str, sign: Signer, secret: str, rotated: str, timed: bool, header: str,
                        extra: dict[str, str]) -> None:
    """Without the signature header the delivery is refused as missing_signature."""
    headers = sign(BODY, secret, int(NOW))
    del headers[header]
    assert _code(kind, BODY, headers, (secret,), extra) == "missing_signature"


TIMED = [p for p in PROVIDERS if p[4]]


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), TIMED,
                         ids=[p[0] for p in TIMED])
@pytest.mark.parametrize("skew", [-301, 301], ids=["stale", "future"])
def test_timestamp_out_of_tolerance(kind: str, sign: Signer, secret: str, rotated: str, timed: bool,
                                    header: str, extra: dict[str, str], skew: int) -> None:
    """A correctly signed delivery whose timestamp is past the tolerance, either way, is refused as stale."""
    headers = sign(BODY, secret, int(NOW) + skew)
    assert _code(kind, BODY, headers, (secret,), extra) == "stale_signature"


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), TIMED,
                         ids=[p[0] for p in TIMED])
def test_timestamp_within_tolerance(kind: str, sign: Signer, secret: str, rotated: str, timed: bool,
                                    header: str, extra: dict[str, str]) -> None:
    """A timestamp just inside the tolerance is accepted, and tolerance 0 turns the check off."""
    assert _code(kind, BODY, sign(BODY, secret, int(NOW) - 299), (secret,), extra) == "ok"
    old = sign(BODY, secret, int(NOW) - 86400 * 30)
    assert _code(kind, BODY, old, (secret,), {**extra, "tolerance_seconds": 0}) == "ok"  # type: ignore[dict-item]


def test_github_documented_example() -> None:
    """GitHub's documented test vector ("It's a Secret to Everybody" / "Hello, World!") verifies."""
    src = source("github", ("It's a Secret to Everybody",), {})
    sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    verify(src, b"Hello, World!", {"x-hub-signature-256": sig}, NOW)


def test_github_real_payload() -> None:
    """A real GitHub push payload verifies byte for byte, and its type and id come from the headers."""
    headers = {**sign_github(GITHUB_PUSH, SECRET, 0), "x-github-event": "push", "x-github-delivery": "d-1"}
    verify(source("github", (SECRET,), {}), GITHUB_PUSH, headers, NOW)
    reformatted = json.dumps(json.loads(GITHUB_PUSH)).encode()
    with pytest.raises(SignatureError):
        verify(source("github", (SECRET,), {}), reformatted, headers, NOW)
    assert identify("github", headers, json.loads(GITHUB_PUSH)) == ("push", "d-1")


def test_github_requires_prefix() -> None:
    """A bare hex digest without "sha256=" is malformed for GitHub."""
    headers = {"x-hub-signature-256": _hex(SECRET, BODY)}
    assert _code("github", BODY, headers, (SECRET,), {}) == "invalid_signature"


def test_slack_documented_example() -> None:
    """Slack's documented example request verifies, and slack_sdk agrees on our own signature."""
    secret = "8f742231b10e8888abcd99yyyzzz85a5"
    body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
        b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
        b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
        b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    headers = {
        "x-slack-request-timestamp": "1531420618",
        "x-slack-signature": "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
    }
    verify(source("slack", (secret,), {}), body, headers, 1531420618 + 10)
    assert _code("slack", body, headers, (secret,), {}, now=1531420618 + 301) == "stale_signature"


def test_stripe_several_v1_and_library_agrees() -> None:
    """Stripe headers with several v1 signatures verify if any matches, and stripe's verifier agrees."""
    header = stripe.WebhookSignature.generate_signature_header(BODY.decode(), "whsec_new", timestamp=int(NOW))
    other = _hex("whsec_x", f"{int(NOW)}.".encode() + BODY)
    both = f"{header},v1={other},v0=deadbeef"
    verify(source("stripe", ("whsec_new",), {}), BODY, {"stripe-signature": both}, NOW)
    assert _code("stripe", BODY, {"stripe-signature": f"t={int(NOW)}"}, ("whsec_new",), {}) == "invalid_signature"
    assert _code("stripe", BODY, {"stripe-signature": "t=abc,v1=00"}, ("whsec_new",), {}) == "invalid_signature"
    mine = f"t={int(NOW)},v1=" + _hex("whsec_new", f"{int(NOW)}.".encode() + BODY)
    stripe.WebhookSignature.verify_header(BODY, mine, "whsec_new", tolerance=None)


def test_standard_library_and_spec_example() -> None:
    """The Standard Webhooks reference library accepts what we accept, including several signatures."""
    headers = sign_standard(BODY, WHSEC, int(NOW))
    headers["webhook-signature"] = "v1a,abcd " + sign_standard(BODY, WHSEC2, int(NOW))["webhook-signature"] + " " \
        + headers["webhook-signature"]
    verify(source("standard", (WHSEC,), {}), BODY, headers, NOW)
    # The spec's example (svix): this secret, id, timestamp and payload give this signature.
    ex = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    verify(source("standard", ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",), {}), b'{"test": 2432232314}', ex,
           1614265330)
    assert standard_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") == standard_secret(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert standard_secret("not base64!") == b"not base64!"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp"])
def test_standard_missing_id_or_timestamp(missing: str) -> None:
    """Standard Webhooks without webhook-id or webhook-timestamp is refused as missing_signature."""
    headers = sign_standard(BODY, WHSEC, int(NOW))
    del headers[missing]
    assert _code("standard", BODY, headers, (WHSEC,), {}) == "missing_signature"


def test_gitlab_standard_signing() -> None:
    """GitLab deliveries carrying Standard Webhooks headers are checked by that signature alone."""
    headers = {**sign_standard(BODY, WHSEC, int(NOW)), "x-gitlab-event": "Push Hook"}
    verify(source("gitlab", (WHSEC,), {}), BODY, headers, NOW)
    headers["x-gitlab-token"] = WHSEC
    assert _code("gitlab", BODY.replace(b"1", b"2", 1), headers, (WHSEC,), {}) == "invalid_signature"
    assert identify("gitlab", {"x-gitlab-event": "Push Hook", "webhook-id": "w1"}, {}) == ("Push Hook", "w1")
    assert identify("gitlab", {"x-gitlab-event-uuid": "u1"}, {}) == ("", "u1")


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), TIMED,
                         ids=[p[0] for p in TIMED])
def test_timestamp_not_a_number(kind: str, sign: Signer, secret: str, rotated: str, timed: bool,
                                header: str, extra: dict[str, str]) -> None:
    """A timestamp that is not a number is refused as invalid, not crashed on."""
    headers = sign(BODY, secret, int(NOW))
    if kind == "stripe":
        headers[header] = headers[header].replace(f"t={int(NOW)}", "t=nan")
    else:
        ts_header = {"slack": "x-slack-request-timestamp", "standard": "webhook-timestamp",
                     "zoom": "x-zm-request-timestamp"}[kind]
        headers[ts_header] = "soon"
    assert _code(kind, BODY, headers, (secret,), extra) == "invalid_signature"


def test_malformed_signature_values() -> None:
    """Garbage in a signature header (non-ASCII, bad base64, wrong prefix) is invalid, never an exception."""
    assert _code("github", BODY, {"x-hub-signature-256": "sha256=\xe9\xe9"}, (SECRET,), {}) == "invalid_signature"
    assert _code("shopify", BODY, {"x-shopify-hmac-sha256": "%%%"}, (SECRET,), {}) == "invalid_signature"
    assert _code("twitter", BODY, {"x-twitter-webhooks-signature": _b64(SECRET, BODY)}, (SECRET,), {}) \
        == "invalid_signature"
    assert _code("slack", BODY, {"x-slack-signature": "v1=00", "x-slack-request-timestamp": str(int(NOW))},
                 (SECRET,), {}) == "invalid_signature"
    assert _code("standard", BODY, {"webhook-id": "m", "webhook-timestamp": str(int(NOW)),
                                    "webhook-signature": "v1,%%%"}, (WHSEC,), {}) == "invalid_signature"
    extra = {"signature_header": "X-Body-Mac", "signature_encoding": "base64"}
    assert _code("hmac-sha256", BODY, {"x-body-mac": "!!"}, (SECRET,), extra) == "invalid_signature"


def test_slack_missing_timestamp() -> None:
    """A Slack signature without X-Slack-Request-Timestamp is refused as missing_signature."""
    headers = sign_slack(BODY, SECRET, int(NOW))
    del headers["x-slack-request-timestamp"]
    assert _code("slack", BODY, headers, (SECRET,), {}) == "missing_signature"


def test_hmac_sha256_prefix_and_case() -> None:
    """The generic verifier accepts an optional sha256= prefix and upper-case hex."""
    assert _code("hmac-sha256", BODY, {"x-signature": "sha256=" + _hex(SECRET, BODY)}, (SECRET,), {}) == "ok"
    assert _code("hmac-sha256", BODY, {"x-signature": _hex(SECRET, BODY).upper()}, (SECRET,), {}) == "ok"


def test_none_accepts_everything() -> None:
    """verify = "none" accepts an unsigned delivery."""
    verify(SourceConfig(name="open", verify="none"), BODY, {}, NOW)


def test_identify_per_provider() -> None:
    """Each provider's event type and delivery id come from the documented header or body field."""
    assert identify("stripe", {}, {"id": "evt_1", "type": "charge.succeeded"}) == ("charge.succeeded", "evt_1")
    assert identify("stripe", {}, "text") == ("", None)
    slack_event = {"type": "event_callback", "event_id": "Ev1", "event": {"type": "app_mention"}}
    assert identify("slack", {}, slack_event) == ("app_mention", "Ev1")
    assert identify("slack", {}, {"command": "/x"}) == ("slash_command", None)
    assert identify("slack", {}, {"payload": {"type": "block_actions"}, "type": "block_actions"}) == (
        "block_actions", None)
    assert identify("slack", {}, None) == ("", None)
    assert identify("standard", {"webhook-id": "msg_1"}, {"type": "invoice.paid"}) == ("invoice.paid", "msg_1")
    assert identify("shopify", {"x-shopify-topic": "orders/create", "x-shopify-webhook-id": "w"}, {}) == (
        "orders/create", "w")
    assert identify("meta", {}, {"object": "page"}) == ("page", None)
    assert identify("twitter", {}, {"for_user_id": "1", "tweet_create_events": []}) == ("tweet_create_events", None)
    assert identify("twitter", {}, []) == ("", None)
    assert identify("zoom", {}, {"event": "meeting.started"}) == ("meeting.started", None)
    assert identify("hmac-sha256", {"idempotency-key": "k"}, {"type": "t"}) == ("t", "k")
    assert identify("none", {}, {}) == ("", None)


def test_meta_handshake() -> None:
    """Meta's GET handshake echoes hub.challenge for the right token, refuses a wrong one, ignores others."""
    src = source("meta", (SECRET,), {"verify_token": "vt-1"})
    args = {"hub.mode": "subscribe", "hub.verify_token": "vt-1", "hub.challenge": "1158201444"}
    assert meta_challenge(src, args) == "1158201444"
    with pytest.raises(SignatureError) as e:
        meta_challenge(src, {**args, "hub.verify_token": "nope"})
    assert e.value.code == "invalid_verify_token"
    assert meta_challenge(src, {"hub.mode": "unsubscribe", "hub.challenge": "x"}) is None
    with pytest.raises(SignatureError):
        meta_challenge(replace(src, verify_token=""), {**args, "hub.verify_token": ""})


def test_twitter_crc() -> None:
    """X's CRC answer is sha256= and the base64 HMAC-SHA256 of crc_token under the consumer secret."""
    src = source("twitter", ("consumer-secret", "old"), {})
    expected = base64.b64encode(hmac.new(b"consumer-secret", b"crc-abc", hashlib.sha256).digest()).decode()
    assert twitter_crc(src, "crc-abc") == {"response_token": "sha256=" + expected}


def test_zoom_validation() -> None:
    """Zoom's url_validation answer echoes plainToken with its hex HMAC-SHA256 under the secret token."""
    src = source("zoom", ("zoom-secret",), {})
    expected = hmac.new(b"zoom-secret", b"qgg8vlvZRS6UYooatFL8Aw", hashlib.sha256).hexdigest()
    assert zoom_validation(src, "qgg8vlvZRS6UYooatFL8Aw") == {
        "plainToken": "qgg8vlvZRS6UYooatFL8Aw",
        "encryptedToken": expected,
    }


# -- issue 13: what each scheme accepts, and nothing more -------------------------------------

def _signed_at(kind: str, stamp: str, secret: str, body: bytes = BODY) -> dict[str, str]:
    """A delivery of C{kind} correctly signed over the timestamp text C{stamp}, whatever it is."""
    if kind == "stripe":
        return {"stripe-signature": f"t={stamp},v1=" + _hex(secret, stamp.encode() + b"." + body)}
    if kind == "slack":
        return {"x-slack-signature": "v0=" + _hex(secret, f"v0:{stamp}:".encode() + body),
                "x-slack-request-timestamp": stamp}
    if kind == "zoom":
        return {"x-zm-signature": "v0=" + _hex(secret, f"v0:{stamp}:".encode() + body),
                "x-zm-request-timestamp": stamp}
    key = standard_secret(secret)
    sig = base64.b64encode(hmac.new(key, b"msg_1." + stamp.encode() + b"." + body, hashlib.sha256).digest())
    return {"webhook-id": "msg_1", "webhook-timestamp": stamp, "webhook-signature": "v1," + sig.decode()}


@pytest.mark.parametrize(("kind", "sign", "secret", "rotated", "timed", "header", "extra"), TIMED,
                         ids=[p[0] for p in TIMED])
@pytest.mark.parametrize("stamp", [f"{int(NOW)}.0", f"+{int(NOW)}", "1_763_750_000", f" {int(NOW)}",
                                   "1.76375e9", f"{int(NOW)}\u0660", "\uff11" * 10, "-1"])
def test_timestamp_must_be_ascii_digits(kind: str, sign: Signer, secret: str, rotated: str, timed: bool,
                                        header: str, extra: dict[str, str], stamp: str) -> None:
    """A timestamp that is not plain ASCII digits is refused even when the signature covers it as written."""
    assert _code(kind, BODY, _signed_at(kind, stamp, secret), (secret,), extra) == "invalid_signature"
    assert _code(kind, BODY, _signed_at(kind, str(int(NOW)), secret), (secret,), extra) == "ok"


@pytest.mark.parametrize("header", [
    "t={ts},t={ts},v1={sig}",          # two timestamps: which one is signed?
    "t={ts},v1={sig},junk",            # an element that is not key=value
    "t={ts},=x,v1={sig}",              # an empty key
    "v1={sig}",                        # no timestamp
    "t={ts},v0={sig}",                 # only a scheme Stripe's libraries ignore
])
def test_stripe_header_parsed_strictly(header: str) -> None:
    """A Stripe-Signature with a repeated t, a bare element, an empty key or no v1 is refused."""
    ts = str(int(NOW))
    sig = _hex("whsec_x", ts.encode() + b"." + BODY)
    value = header.format(ts=ts, sig=sig)
    assert _code("stripe", BODY, {"stripe-signature": value}, ("whsec_x",), {}) == "invalid_signature"
    assert _code("stripe", BODY, {"stripe-signature": f"t={ts},v1={sig}"}, ("whsec_x",), {}) == "ok"


@pytest.mark.parametrize(("kind", "header", "value"), [
    ("github", "x-hub-signature-256", "sha256=" + _hex(SECRET, BODY).upper()),
    ("github", "x-hub-signature-256", "sha256= " + _hex(SECRET, BODY)),
    ("github", "x-hub-signature-256", "SHA256=" + _hex(SECRET, BODY)),
    ("twitter", "x-twitter-webhooks-signature", "SHA256=" + _b64(SECRET, BODY)),
])
def test_provider_signatures_compared_as_written(kind: str, header: str, value: str) -> None:
    """Providers' hex is lower case after an exact prefix: upper-case hex, a space or SHA256= are refused."""
    assert _code(kind, BODY, {header: value}, (SECRET,), {}) == "invalid_signature"


def test_twitter_signs_json_containers_only() -> None:
    """X's verifier refuses a correctly signed body that is not a JSON object or array (what crc answers sign)."""
    for body in (b"abc123", b"123", b'"a string"', b"null", b"", b"\xef\xbb\xbf{}"):
        headers = {"x-twitter-webhooks-signature": "sha256=" + _b64(SECRET, body)}
        assert _code("twitter", body, headers, (SECRET,), {}) == "invalid_signature", body
    for body in (b'{"for_user_id":"1"}', b' \r\n\t[1]'):
        headers = {"x-twitter-webhooks-signature": "sha256=" + _b64(SECRET, body)}
        assert _code("twitter", body, headers, (SECRET,), {}) == "ok"


@pytest.mark.parametrize("token", ['{"tweet_create_events":[]}', "[1]", "a{b", "x" * 1025, "", "caf\u00e9",
                                   "tab\there", "nul\x00"])
def test_crc_refuses_tokens_that_could_be_bodies(token: str) -> None:
    """The crc handshake signs no token that could be a JSON container, nor an empty, huge or non-ASCII one."""
    src = source("twitter", ("consumer-secret",), {})
    assert crc_token_problem(token) is not None
    with pytest.raises(ValueError):
        twitter_crc(src, token)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=64))
def test_no_crc_answer_is_a_delivery_signature(token: str) -> None:
    """Whatever crc_token is asked, its answer never verifies as the X signature of a body equal to the token."""
    src = source("twitter", ("consumer-secret",), {})
    try:
        answer = twitter_crc(src, token)["response_token"]
    except ValueError:
        return
    headers = {"x-twitter-webhooks-signature": answer}
    assert _code("twitter", token.encode(), headers, ("consumer-secret",), {}) == "invalid_signature"


def test_handshake_answers_are_no_signatures() -> None:
    """Zoom's url_validation answer (HMAC of plainToken) is not a Zoom delivery signature of that token."""
    src = source("zoom", ("zoom-secret",), {})
    answer = zoom_validation(src, "tok")["encryptedToken"]
    headers = {"x-zm-signature": "v0=" + answer, "x-zm-request-timestamp": str(int(NOW))}
    assert _code("zoom", b"tok", headers, ("zoom-secret",), {}) == "invalid_signature"


def test_gitlab_signing_token_is_never_a_plain_token() -> None:
    """A whsec_ signing token is checked only against webhook-signature: sent as X-Gitlab-Token it is refused."""
    assert _code("gitlab", BODY, {"x-gitlab-token": WHSEC}, (WHSEC,), {}) == "missing_signature"
    assert _code("gitlab", BODY, sign_standard(BODY, WHSEC, int(NOW)), (WHSEC,), {}) == "ok"
    # with a plain token and a signing token (a rotation), an unsigned delivery needs the plain token
    both = (WHSEC, "plain-token")
    assert _code("gitlab", BODY, {"x-gitlab-token": "plain-token"}, both, {}) == "ok"
    assert _code("gitlab", BODY, {"x-gitlab-token": WHSEC}, both, {}) == "invalid_signature"
    # and a signature present decides alone, even with the right plain token beside it
    bad = {**sign_standard(BODY, WHSEC2, int(NOW)), "x-gitlab-token": "plain-token"}
    assert _code("gitlab", BODY, bad, both, {}) == "invalid_signature"


def test_gitlab_plain_token_ignores_signature_it_cannot_check() -> None:
    """With plain tokens only, a webhook-signature (GitLab also has a signing token we lack) does not refuse it."""
    headers = {**sign_standard(BODY, WHSEC, int(NOW)), "x-gitlab-token": "plain-token"}
    assert _code("gitlab", BODY, headers, ("plain-token",), {}) == "ok"
    assert _code("gitlab", BODY, {**headers, "x-gitlab-token": "no"}, ("plain-token",), {}) == "invalid_signature"


def test_gitlab_signed_delivery_id_is_the_signed_one() -> None:
    """A signed GitLab delivery's id is its webhook-id (signed), not the unsigned X-Gitlab-Event-UUID."""
    signed = {"webhook-signature": "v1,x", "webhook-id": "w1", "x-gitlab-event-uuid": "u1"}
    assert identify("gitlab", signed, {})[1] == "w1"
    assert identify("gitlab", {"webhook-id": "w1", "x-gitlab-event-uuid": "u1"}, {})[1] == "u1"


def test_standard_signature_list_is_bounded() -> None:
    """Only the first 16 signatures of a webhook-signature header are looked at (no unbounded work per request)."""
    headers = sign_standard(BODY, WHSEC, int(NOW))
    padded = " ".join(["v1," + base64.b64encode(b"x" * 32).decode()] * 16 + [headers["webhook-signature"]])
    assert _code("standard", BODY, {**headers, "webhook-signature": padded}, (WHSEC,), {}) == "invalid_signature"


def test_secret_headers() -> None:
    """The secret-bearing header names are the contract's four plus a source's redact_headers, lower-cased."""
    assert SECRET_HEADERS == {"authorization", "cookie", "proxy-authorization", "x-gitlab-token"}
    assert secret_headers(None) == SECRET_HEADERS
    assert secret_headers(SourceConfig(name="a", verify="none", redact_headers=("X-Api-Key",))) == (
        SECRET_HEADERS | {"x-api-key"})

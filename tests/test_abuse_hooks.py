"""
The webhook ingest attacked over loopback, the way an outsider would: one
real daemon with a source per verifier, forged and replayed deliveries for
each scheme, the X handshake as a signing oracle, oversized and malformed
bodies and headers, and a flood of bad signatures from one address (and from
thousands) while the daemon's memory is measured and a genuine sender on
another address is still served.

Where a provider's scheme leaves something unsigned (GitHub's event and
delivery headers, Shopify's topic and webhook id, every scheme without a
timestamp), the test pins down what an attacker who saw one delivery can do
with it rather than pretending the daemon could prevent it; the README's
"What each webhook source promises" says the same in prose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client as httpclient
import json
import socket
import time
from datetime import UTC, datetime
from typing import Any, Callable, Iterator

import psutil
import pytest
import standardwebhooks
import stripe
from conftest import API_KEY, DEFAULT_CONFIG, SHARED_DATA, Daemon, http
from slack_sdk.signature import SignatureVerifier

EXAMPLES = SHARED_DATA / "octokit-webhook-examples"
PAYLOADS = {p.name.split("_")[0]: p.read_bytes() for p in sorted(EXAMPLES.glob("*.json"))}
PUSH = (EXAMPLES / "push_payload.json").read_bytes()
ISSUES = (EXAMPLES / "issues_opened.payload.json").read_bytes()

GH = "gh-secret-0123456789"
STRIPE = "whsec_Zs7bTq2LmN4vX9yA1cD3eF5gH6jK8pR0"  # the shape of Stripe's own (32 characters)
SLACK = "slack-signing-secret-0123"
STANDARD = "whsec_" + base64.b64encode(b"standard-webhooks-key-32-bytes!!").decode()
SHOPIFY = "shopify-client-secret"
GITLAB = "gitlab-plain-token"
GITLAB_SIGNING = "whsec_" + base64.b64encode(b"gitlab-signing-token-32-bytes!!!").decode()
META = "meta-app-secret"
X = "x-consumer-secret"
ZOOM = "zoom-secret-token"
INHOUSE = "inhouse-secret"

CONFIG = DEFAULT_CONFIG + f"""
[server]
max_body_bytes = 262144
signature_failures_per_ip_per_minute = 200   # the module's own 401s from 127.0.0.1 stay under it

[[sources]]
name = "github"
verify = "github"
secrets = ["{GH}"]
channel = "github.{{header:X-GitHub-Event}}"

[[sources]]
name = "stripe"
verify = "stripe"
secrets = ["{STRIPE}"]
channel = "stripe.{{json:type}}"

[[sources]]
name = "slack"
verify = "slack"
secrets = ["{SLACK}"]
channel = "slack.events"

[[sources]]
name = "standard"
verify = "standard"
secrets = ["{STANDARD}"]
channel = "standard.{{json:type}}"

[[sources]]
name = "shopify"
verify = "shopify"
secrets = ["{SHOPIFY}"]
channel = "shopify.{{header:X-Shopify-Topic}}"

[[sources]]
name = "gitlab"
verify = "gitlab"
secrets = ["{GITLAB}"]
channel = "gitlab.{{header:X-Gitlab-Event}}"

[[sources]]
name = "gitlab-signed"
verify = "gitlab"
secrets = ["{GITLAB_SIGNING}"]
channel = "gitlabs.{{header:X-Gitlab-Event}}"

[[sources]]
name = "meta"
verify = "meta"
secrets = ["{META}"]
verify_token = "meta-verify-token"
channel = "meta.{{json:object}}"

[[sources]]
name = "x"
verify = "twitter"
secrets = ["{X}"]
channel = "x.events"

[[sources]]
name = "zoom"
verify = "zoom"
secrets = ["{ZOOM}"]
channel = "zoom.{{json:event}}"

[[sources]]
name = "inhouse"
verify = "hmac-sha256"
secrets = ["{INHOUSE}"]
signature_header = "X-Signature"
channel = "inhouse.{{json:type}}"
"""


def _hex(secret: str, *parts: bytes) -> str:
    return hmac.new(secret.encode(), b"".join(parts), hashlib.sha256).hexdigest()


def _b64(secret: str, *parts: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), b"".join(parts), hashlib.sha256).digest()).decode()


def github(body: bytes, secret: str = GH, event: str = "push", delivery: str = "d-1") -> dict[str, str]:
    return {"Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": "sha256=" + _hex(secret, body)}


def stripe_sig(body: bytes, ts: int, secret: str = STRIPE) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=ts)
    return {"Content-Type": "application/json", "Stripe-Signature": header}


def slack_sig(body: bytes, ts: int, secret: str = SLACK) -> dict[str, str]:
    sig = SignatureVerifier(secret).generate_signature(timestamp=str(ts), body=body)
    assert sig is not None
    return {"Content-Type": "application/json", "X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": sig}


def standard_sig(body: bytes, ts: int, msg_id: str = "msg_1", secret: str = STANDARD) -> dict[str, str]:
    sig = standardwebhooks.Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), body.decode())
    return {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sig}


def shopify_sig(body: bytes, topic: str = "orders/create", hook_id: str = "w-1",
                secret: str = SHOPIFY) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Shopify-Topic": topic, "X-Shopify-Webhook-Id": hook_id,
            "X-Shopify-Hmac-Sha256": _b64(secret, body)}


def zoom_sig(body: bytes, ts: int, secret: str = ZOOM) -> dict[str, str]:
    return {"Content-Type": "application/json", "x-zm-request-timestamp": str(ts),
            "x-zm-signature": "v0=" + _hex(secret, f"v0:{ts}:".encode(), body)}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the whole module (its sources are independent; each test uses its own ids)."""
    import textwrap

    d = Daemon(tmp_path_factory.mktemp("abuse-hooks"), textwrap.dedent(CONFIG))
    d.start()
    yield d
    try:
        d.stop()
    except Exception:
        d.kill()


def post(d: Daemon, source: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    status, _, raw = http("POST", f"{d.url}/hooks/{source}", body, headers)
    return status, json.loads(raw) if raw else None


def now() -> int:
    return int(time.time())


# -- forged and replayed, per verifier --------------------------------------------------------


def test_github_forgery_and_what_a_replay_can_do(target: Daemon) -> None:
    """GitHub: a wrong secret or another body is 401; a seen delivery replays under a new id and a new event name."""
    d = target
    assert post(d, "github", PUSH, github(PUSH, secret="guess", delivery="gh-f1"))[0] == 401
    forged = github(PUSH, delivery="gh-f2")
    assert post(d, "github", ISSUES, forged)[0] == 401  # the signature of another body
    status, first = post(d, "github", PUSH, github(PUSH, delivery="gh-r1"))
    assert status == 202
    assert post(d, "github", PUSH, github(PUSH, delivery="gh-r1")) == (200, {**first, "duplicate": True})
    # not signed by GitHub, so not protected: X-GitHub-Delivery and X-GitHub-Event
    status, again = post(d, "github", PUSH, github(PUSH, delivery="gh-r2"))
    assert status == 202 and again["offset"] == first["offset"] + 1
    status, relabelled = post(d, "github", PUSH, github(PUSH, event="release", delivery="gh-r3"))
    assert (status, relabelled["channel"]) == (202, "github.release")


def test_github_every_octokit_example_verifies_byte_for_byte(target: Daemon) -> None:
    """Every real payload of octokit/webhooks verifies as sent, and fails once re-encoded (the signature is over bytes)."""
    for i, (event, body) in enumerate(PAYLOADS.items()):
        assert post(target, "github", body, github(body, event=event, delivery=f"gh-ex-{i}"))[0] == 202
        reencoded = json.dumps(json.loads(body)).encode()
        assert post(target, "github", reencoded, github(body, event=event, delivery=f"gh-rx-{i}"))[0] == 401


def test_stripe_forged_stale_future_and_replayed(target: Daemon) -> None:
    """Stripe: wrong secret, other body, stale or future t are 401; a replay inside the tolerance is a duplicate."""
    d, t = target, now()
    body = b'{"id":"evt_abuse_1","object":"event","type":"charge.succeeded","data":{"object":{}}}'
    assert post(d, "stripe", body, stripe_sig(body, t, secret="whsec_guess"))[0] == 401
    other = body.replace(b"charge.succeeded", b"charge.refunded")
    assert post(d, "stripe", other, stripe_sig(body, t))[0] == 401
    for skew in (-400, 400, -86400):
        status, err = post(d, "stripe", body, stripe_sig(body, t + skew))
        assert (status, err["error"]) == (401, "stale_signature")
    status, first = post(d, "stripe", body, stripe_sig(body, t))
    assert (status, first["id"]) == (202, "evt_abuse_1")
    assert post(d, "stripe", body, stripe_sig(body, t))[1] == {**first, "duplicate": True}
    # the same signature with a timestamp the attacker moved: not what Stripe signed
    moved = stripe_sig(body, t)["Stripe-Signature"].replace(f"t={t}", f"t={t + 1}")
    assert post(d, "stripe", body, {"Content-Type": "application/json", "Stripe-Signature": moved})[0] == 401
    fraction = stripe_sig(body, t)["Stripe-Signature"].replace(f"t={t}", f"t={t}.0")
    assert post(d, "stripe", body, {"Content-Type": "application/json", "Stripe-Signature": fraction})[0] == 401


def test_slack_forged_stale_future_and_replayed(target: Daemon) -> None:
    """Slack: wrong secret, other body, stale or future timestamps are 401; a replayed event_callback is a duplicate."""
    d, t = target, now()
    body = b'{"type":"event_callback","event_id":"Ev-abuse-1","event":{"type":"app_mention"}}'
    assert post(d, "slack", body, slack_sig(body, t, secret="guess"))[0] == 401
    assert post(d, "slack", body.replace(b"app_mention", b"message"), slack_sig(body, t))[0] == 401
    for skew in (-400, 400):
        assert post(d, "slack", body, slack_sig(body, t + skew))[1]["error"] == "stale_signature"
    status, first = post(d, "slack", body, slack_sig(body, t))
    assert status == 202
    assert post(d, "slack", body, slack_sig(body, t))[1] == {**first, "duplicate": True}
    # the url_verification answer echoes a challenge only for a signed request
    challenge = b'{"type":"url_verification","challenge":"chal-1"}'
    assert post(d, "slack", challenge, {"Content-Type": "application/json"})[0] == 401
    assert post(d, "slack", challenge, slack_sig(challenge, t)) == (200, {"challenge": "chal-1"})


def test_standard_webhooks_id_and_timestamp_are_signed(target: Daemon) -> None:
    """Standard Webhooks: stale/future, a changed webhook-id or timestamp is 401; a replay is a duplicate."""
    d, t = target, now()
    body = b'{"type":"invoice.paid","data":{"n":1}}'
    for skew in (-400, 400):
        assert post(d, "standard", body, standard_sig(body, t + skew, "msg_abuse_s"))[0] == 401
    headers = standard_sig(body, t, "msg_abuse_1")
    status, first = post(d, "standard", body, headers)
    assert (status, first["id"]) == (202, "msg_abuse_1")
    assert post(d, "standard", body, headers)[1] == {**first, "duplicate": True}
    assert post(d, "standard", body, {**headers, "webhook-id": "msg_abuse_2"})[0] == 401
    assert post(d, "standard", body, {**headers, "webhook-timestamp": str(t + 1)})[0] == 401
    assert post(d, "standard", body, standard_sig(body, t, "msg_abuse_3", secret="whsec_" + "A" * 43 + "="))[0] == 401


def test_shopify_forgery_and_what_a_replay_can_do(target: Daemon) -> None:
    """Shopify signs only the body: forgeries are 401; a seen body replays under a new webhook id and topic."""
    d = target
    body = b'{"id":820982911946154508,"email":"jon@example.com"}'
    assert post(d, "shopify", body, shopify_sig(body, secret="guess"))[0] == 401
    assert post(d, "shopify", body + b" ", shopify_sig(body))[0] == 401
    status, first = post(d, "shopify", body, shopify_sig(body, hook_id="shop-1"))
    assert (status, first["channel"]) == (202, "shopify.orders_create")
    assert post(d, "shopify", body, shopify_sig(body, hook_id="shop-1"))[1]["duplicate"] is True
    status, relabelled = post(d, "shopify", body, shopify_sig(body, topic="orders/cancelled", hook_id="shop-2"))
    assert (status, relabelled["channel"]) == (202, "shopify.orders_cancelled")


def test_gitlab_plain_token_and_signing_token(target: Daemon) -> None:
    """GitLab: the plain token is the secret (whoever saw one delivery can post anything); a signing token is not."""
    d = target
    base = {"Content-Type": "application/json", "X-Gitlab-Event": "Push Hook"}
    assert post(d, "gitlab", b"{}", {**base, "X-Gitlab-Token": "guess"})[0] == 401
    assert post(d, "gitlab", b'{"object_kind":"forged"}', {**base, "X-Gitlab-Token": GITLAB})[0] == 202
    # with a signing token only: unsigned is refused, the token itself is no plain token, the id is signed
    assert post(d, "gitlab-signed", b"{}", base)[0] == 401
    assert post(d, "gitlab-signed", b"{}", {**base, "X-Gitlab-Token": GITLAB_SIGNING})[0] == 401
    body, t = b'{"object_kind":"push"}', now()
    headers = {**base, **standard_sig(body, t, "gl-msg-1", secret=GITLAB_SIGNING)}
    status, first = post(d, "gitlab-signed", body, headers)
    assert (status, first["id"]) == (202, "gl-msg-1")
    assert post(d, "gitlab-signed", body, headers)[1]["duplicate"] is True
    assert post(d, "gitlab-signed", body, {**headers, "webhook-id": "gl-msg-2"})[0] == 401


def test_meta_forgery_handshake_and_replay(target: Daemon) -> None:
    """Meta: forgeries are 401, a wrong hub.verify_token is 403; a seen delivery replays as a new event."""
    d = target
    body = b'{"object":"page","entry":[{"id":"1","time":1}]}'
    sig = {"Content-Type": "application/json", "X-Hub-Signature-256": "sha256=" + _hex(META, body)}
    assert post(d, "meta", body, {**sig, "X-Hub-Signature-256": "sha256=" + _hex("guess", body)})[0] == 401
    q = "/hooks/meta?hub.mode=subscribe&hub.challenge=42&hub.verify_token="
    assert http("GET", d.url + q + "guess")[0] == 403
    assert http("GET", d.url + q + "meta-verify-token")[::2] == (200, b"42")
    first = post(d, "meta", body, sig)[1]
    status, again = post(d, "meta", body, sig)  # no delivery id, no timestamp: nothing to recognise
    assert status == 202 and again["offset"] == first["offset"] + 1


def test_x_crc_oracle_is_closed(target: Daemon) -> None:
    """X: the crc answer for any token never signs a POST of it; only JSON object bodies with a true signature pass."""
    d = target
    for token in ("abc", "123", "true", "null", " 1 "):
        status, _, raw = http("GET", f"{d.url}/hooks/x?crc_token={token.replace(' ', '%20')}")
        assert status == 200
        answer = json.loads(raw)["response_token"]
        for ctype in ("application/json", "text/plain", "application/x-www-form-urlencoded"):
            status, _ = post(d, "x", token.encode(), {"Content-Type": ctype, "X-Twitter-Webhooks-Signature": answer})
            assert status in (401, 415), (token, ctype, status)
    for token in ("{}", '{"tweet_create_events":[]}', "[]", " [1]"):
        status, _, _ = http("GET", f"{d.url}/hooks/x?crc_token={token.replace(' ', '%20')}")
        assert status == 400
    body = b'{"for_user_id":"1","favorite_events":[]}'
    sig = {"Content-Type": "application/json", "X-Twitter-Webhooks-Signature": "sha256=" + _b64(X, body)}
    assert post(d, "x", body, sig)[0] == 202
    assert post(d, "x", body, sig)[0] == 202  # no id, no timestamp: a replay is a new event


def test_zoom_forged_stale_and_validation(target: Daemon) -> None:
    """Zoom: stale, future and forged are 401; url_validation is answered only when signed, and never journaled."""
    d, t = target, now()
    body = b'{"event":"meeting.started","payload":{"object":{"id":"1"}},"event_ts":1}'
    for skew in (-400, 400):
        assert post(d, "zoom", body, zoom_sig(body, t + skew))[0] == 401
    assert post(d, "zoom", body, zoom_sig(body, t, secret="guess"))[0] == 401
    assert post(d, "zoom", body, zoom_sig(body, t))[0] == 202
    validation = b'{"event":"endpoint.url_validation","payload":{"plainToken":"tok"}}'
    assert post(d, "zoom", validation, {"Content-Type": "application/json"})[0] == 401
    status, answer = post(d, "zoom", validation, zoom_sig(validation, t))
    assert (status, answer["plainToken"]) == (200, "tok")
    # that answer, HMAC(secret, plainToken), is no delivery signature of the token
    forged = {"Content-Type": "application/json", "x-zm-request-timestamp": str(t),
              "x-zm-signature": "v0=" + answer["encryptedToken"]}
    assert post(d, "zoom", b"tok", forged)[0] == 401


def test_generic_hmac_forged(target: Daemon) -> None:
    """The generic hmac-sha256 source refuses a wrong secret, another body and a malformed header."""
    d = target
    body = b'{"type":"deploy","n":1}'
    assert post(d, "inhouse", body, {"Content-Type": "application/json", "X-Signature": _hex("guess", body)})[0] == 401
    assert post(d, "inhouse", b'{"type":"deploy","n":2}',
                {"Content-Type": "application/json", "X-Signature": _hex(INHOUSE, body)})[0] == 401
    assert post(d, "inhouse", body, {"Content-Type": "application/json", "X-Signature": "\u00e9" * 64})[0] == 401
    assert post(d, "inhouse", body, {"Content-Type": "application/json", "X-Signature": _hex(INHOUSE, body)})[0] == 202


# -- malformed and oversized ------------------------------------------------------------------


def _raw_exchange(d: Daemon, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read what comes back until the server closes or 5 s pass."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(data)
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
                if b"\r\n\r\n" in got and b"connection: close" not in got.lower():
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return got


@pytest.mark.parametrize("body,headers,expected", [
    (b'{"pad":"' + b"x" * 300000 + b'"}', {"Content-Type": "application/json"}, 413),
    (b"\x89PNG\r\n\x1a\n", {"Content-Type": "image/png"}, 415),
    (b"{" * 50000, {"Content-Type": "application/json"}, 400),
    (b'{"a": NaN}', {"Content-Type": "application/json"}, 400),
    (b'{"a": "\\ud800"}', {"Content-Type": "application/json"}, 400),
    (b'{"n": 1e999}', {"Content-Type": "application/json"}, 400),
    (b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}, 400),
])
def test_signed_but_malformed_bodies(target: Daemon, body: bytes, headers: dict[str, str], expected: int) -> None:
    """Correctly signed bodies that are too big, binary or not JSON are refused with the right 4xx, never a 5xx."""
    status, err = post(target, "github", body, {**github(body, delivery=f"bad-{hash(body)}"), **headers})
    assert status == expected and set(err) == {"error", "message"}


@pytest.mark.parametrize("head", [
    b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: " + b"a" * 70000 + b"\r\n\r\n",
    b"POST /hooks/github HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(600)) + b"\r\n",
    b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /hooks/gith\xffub HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: sha256=\xff\xfe\r\nContent-Length: 2\r\n\r\n{}",
])
def test_malformed_heads_get_a_4xx(target: Daemon, head: bytes) -> None:
    """Huge or too many headers, bad lengths, bad chunking and non-ASCII bytes get a 4xx (or a close), never a 5xx."""
    got = _raw_exchange(target, head)
    if got:
        status = int(got.split(b" ", 2)[1])
        assert 400 <= status < 500, got[:200]
    assert http("GET", target.url + "/healthz", timeout=5)[0] == 200


# -- floods -----------------------------------------------------------------------------------


class Conn:
    """One keep-alive HTTP connection from a chosen loopback address."""

    def __init__(self, d: Daemon, source_ip: str) -> None:
        self.c = httpclient.HTTPConnection("127.0.0.1", d.port, timeout=10, source_address=(source_ip, 0))

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        self.c.request("POST", path, body=body, headers=headers)
        r = self.c.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}

    def close(self) -> None:
        self.c.close()


def _rss(d: Daemon) -> int:
    assert d.proc is not None
    return int(psutil.Process(d.proc.pid).memory_info().rss)


def test_thousands_of_bad_signatures_from_one_address(target: Daemon) -> None:
    """3,000 forged deliveries from one address: 429 once its 200 failures are used, memory flat, others still 202."""
    d = target
    before = _rss(d)
    attacker = Conn(d, "127.0.0.3")
    statuses: dict[int, int] = {}
    started = time.monotonic()
    try:
        for i in range(3000):
            body = PAYLOADS["push"] if i % 2 else PAYLOADS["issues"]
            status, headers = attacker.post("/hooks/github", body, github(body, secret=f"guess-{i}",
                                                                          delivery=f"flood-{i}"))
            statuses[status] = statuses.get(status, 0) + 1
            if status == 429:
                assert int(headers["retry-after"]) >= 1
    finally:
        attacker.close()
    refilled = (time.monotonic() - started) * 200 / 60  # the budget refills while the flood runs
    assert statuses.get(401, 0) <= 200 + refilled + 1 and statuses[429] >= 2500, statuses
    assert set(statuses) <= {401, 429}
    genuine = Conn(d, "127.0.0.4")
    try:
        status, _ = genuine.post("/hooks/github", PUSH, github(PUSH, delivery="after-flood-1"))
        assert status == 202
    finally:
        genuine.close()
    assert http("GET", d.url + "/healthz", timeout=5)[0] == 200
    assert _rss(d) - before < 32 * 1024 * 1024


def test_bad_signatures_from_thousands_of_addresses(target: Daemon) -> None:
    """2,000 addresses each failing once: the per-address table stays bounded and a genuine sender is still served."""
    d = target
    before = _rss(d)
    body = PAYLOADS["star"]
    for i in range(2000):
        ip = f"127.{10 + i // 65536}.{(i // 256) % 256}.{i % 256 or 1}"
        c = Conn(d, ip)
        try:
            assert c.post("/hooks/github", body, github(body, secret="guess", delivery=f"many-{i}"))[0] == 401
        finally:
            c.close()
    assert post(d, "github", PUSH, github(PUSH, delivery="after-many-1"))[0] == 202
    assert http("GET", d.url + "/healthz", timeout=5)[0] == 200
    assert _rss(d) - before < 32 * 1024 * 1024


def test_junk_never_uses_up_a_source_limit(make_daemon: Callable[..., Daemon]) -> None:
    """With a strict source limit and the failure throttle off, 500 forged requests leave the limit to GitHub."""
    d = make_daemon(DEFAULT_CONFIG + f"""
[server]
signature_failures_per_ip_per_minute = 0

[[sources]]
name = "github"
verify = "github"
secrets = ["{GH}"]
channel = "github.{{header:X-GitHub-Event}}"
rate_limit_per_second = 0.01
""")
    c = Conn(d, "127.0.0.5")
    try:
        for i in range(500):
            assert c.post("/hooks/github", PUSH, github(PUSH, secret="junk", delivery=f"j-{i}"))[0] == 401
    finally:
        c.close()
    assert post(d, "github", PUSH, github(PUSH, delivery="genuine"))[0] == 202


def test_deliveries_whose_sender_hangs_up_are_kept_and_counted(target: Daemon) -> None:
    """Signed webhooks whose connection closes before the 202 are journaled once each and counted per source."""
    d = target
    auth = {"Authorization": f"Bearer {API_KEY}"}
    _, before = d.get("/api/stats", headers=auth)
    counted = before["events_in_by_source"].get("github", 0)
    _, page = d.get("/api/channels/github.hangup/history", headers=auth)
    assert page["events"] == []
    socks = []
    for i in range(20):  # the close reaches the daemon while most of these commits are in flight
        headers = github(PUSH, event="hangup", delivery=f"gh-hang-{i}")
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s = socket.create_connection(("127.0.0.1", d.port))
        s.sendall(f"POST /hooks/github HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(PUSH)}\r\n\r\n".encode()
                  + PUSH)
        socks.append(s)
    for s in socks:
        s.close()
    status, _ = post(d, "github", PUSH, github(PUSH, event="hangup", delivery="gh-hang-last"))
    assert status == 202
    deadline = time.monotonic() + 10
    while True:
        _, page = d.get("/api/channels/github.hangup/history?limit=100", headers=auth)
        _, stats = d.get("/api/stats", headers=auth)
        kept = len(page["events"])
        if stats["events_in_by_source"]["github"] - counted == kept == 21 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert kept == 21 and stats["events_in_by_source"]["github"] - counted == 21  # every one kept, and counted

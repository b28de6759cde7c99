"""
Tokens and rights: API keys, JWT (HS256, RS256, ES256) with every way a token
can be wrong, and wildcard rights; unit tests with a fake clock, plus the
daemon answering 401/403 for them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable

import jwt
import pytest
from conftest import API_KEY, JWT_SECRET, Daemon, http_json
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twisted_rt.core.auth import Authenticator, Principal, load_public_key, require
from twisted_rt.core.config import AuthConfig
from twisted_rt.interfaces import AuthError

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is")

NOW = 1_800_000_000.0
SECRET = "unit-secret-0123456789abcdef0123456789abcdef"


def _auth(clock: float = NOW, **kw: Any) -> Authenticator:
    cfg = AuthConfig(
        api_keys=kw.pop("api_keys", ("key-one", "key-two")),
        jwt_secret=kw.pop("jwt_secret", SECRET),
        anonymous_subscribe=kw.pop("anonymous_subscribe", ("public.>",)),
        **kw,
    )
    return Authenticator(cfg, clock=lambda: clock)


def _hs(claims: dict[str, Any], secret: str = SECRET, **kw: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", **kw)


def _claims(**kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"sub": "alice", "exp": NOW + 60, "subscribe": ["github.>"], "publish": ["chat.*"]}
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _code(auth: Authenticator, token: str) -> tuple[str, int]:
    with pytest.raises(AuthError) as e:
        auth.authenticate(token)
    return e.value.code, e.value.status


def test_api_keys_all_work_and_may_do_everything() -> None:
    """Every configured API key (several, for rotation) authenticates as an admin."""
    auth = _auth()
    for key in ("key-one", "key-two"):
        p = auth.authenticate(key)
        assert p.admin and p.can_publish("any.thing") and p.can_subscribe("a.>") and p.can_read("x")
    assert auth.is_api_key("key-two") and not auth.is_api_key("key-three")


def test_no_token_is_anonymous_with_anonymous_subscribe() -> None:
    """No token gives the anonymous principal: it may read the anonymous_subscribe channels only."""
    p = _auth().authenticate(None)
    assert p.anonymous and p.can_read("public.news") and p.can_subscribe("public.*")
    assert not p.can_read("private.x") and not p.can_publish("public.news")


def test_require_refuses_anonymous() -> None:
    """The API's require() turns the anonymous principal into a 401 missing_token."""
    with pytest.raises(AuthError) as e:
        require(_auth().anonymous())
    assert (e.value.code, e.value.status) == ("missing_token", 401)
    p = Principal(sub="x")
    assert require(p) is p


def test_valid_hs256_token_carries_rights() -> None:
    """A valid HS256 token gives its sub, exp and rights."""
    p = _auth().authenticate(_hs(_claims(iat=NOW, nbf=NOW)))
    assert p.sub == "alice" and p.exp == NOW + 60 and not p.admin
    assert p.subscribe == ("github.>",) and p.publish == ("chat.*",)


def test_expired_token() -> None:
    """A token whose exp has passed is refused 401 token_expired (no leeway on exp)."""
    auth = _auth()
    assert _code(auth, _hs(_claims(exp=NOW - 1))) == ("token_expired", 401)
    assert _code(auth, _hs(_claims(exp=NOW))) == ("token_expired", 401)


def test_not_yet_valid_token() -> None:
    """A token with nbf or iat in the future (past the leeway) is refused 401 token_not_yet_valid."""
    auth = _auth()
    assert _code(auth, _hs(_claims(nbf=NOW + 30))) == ("token_not_yet_valid", 401)
    assert _code(auth, _hs(_claims(iat=NOW + 30))) == ("token_not_yet_valid", 401)
    assert auth.authenticate(_hs(_claims(nbf=NOW + 2))).sub == "alice"


def test_the_clock_decides() -> None:
    """The injected clock, not the wall clock, decides expiry."""
    token = _hs(_claims())
    assert _auth(clock=NOW + 59).authenticate(token).sub == "alice"
    assert _code(_auth(clock=NOW + 61), token)[0] == "token_expired"


def test_wrong_signature() -> None:
    """A token signed with another secret is refused 401 invalid_token."""
    assert _code(_auth(), _hs(_claims(), secret="another-secret-0123456789abcdef012345")) == ("invalid_token", 401)


def test_tampered_payload() -> None:
    """Changing the claims of a signed token breaks its signature."""
    h, _, s = _hs(_claims()).split(".")
    forged = f"{h}.{_b64(_claims(publish=['>']))}.{s}"
    assert _code(_auth(), forged) == ("invalid_token", 401)


def test_alg_none_refused() -> None:
    """An unsigned token (alg none) is refused."""
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."
    assert _code(_auth(), token) == ("invalid_token", 401)
    token = jwt.encode(_claims(), None, algorithm="none")
    assert _code(_auth(), token) == ("invalid_token", 401)


def test_other_hmac_algorithm_refused() -> None:
    """An HS512 token is refused when HS256 is configured, even with the right secret."""
    token = jwt.encode(_claims(), SECRET, algorithm="HS512")
    code, status = _code(_auth(), token)
    assert (code, status) == ("invalid_token", 401)


@pytest.mark.parametrize("missing", ["sub", "exp"])
def test_required_claims(missing: str) -> None:
    """sub and exp are required."""
    c = _claims()
    del c[missing]
    assert _code(_auth(), _hs(c)) == ("invalid_token", 401)


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": ""},
        {"sub": 5},
        {"exp": "tomorrow"},
        {"nbf": "now"},
        {"subscribe": "bad..pattern"},
        {"publish": [1, 2]},
        {"publish": {"a": 1}},
        {"subscribe": ["a.>.b"]},
    ],
)
def test_malformed_claims(claims: dict[str, Any]) -> None:
    """Claims of the wrong type or bad rights patterns are refused 401."""
    c = {**_claims(), **claims}
    assert _code(_auth(), jwt.encode(c, SECRET, algorithm="HS256"))[1] == 401


def test_single_string_right_is_a_list_of_one() -> None:
    """A right given as one string is taken as a list of one pattern."""
    p = _auth().authenticate(_hs(_claims(publish="chat.room1")))
    assert p.publish == ("chat.room1",)


@pytest.mark.parametrize("token", ["", "garbage", "a.b", "a.b.c", "not-a-key.with.dots"])
def test_garbage_tokens(token: str) -> None:
    """Anything that is neither a key nor a JWT is refused 401 (an empty token is anonymous)."""
    auth = _auth()
    if token == "":
        assert auth.authenticate(token).anonymous
    else:
        assert _code(auth, token)[1] == 401


def test_jwt_refused_when_jwt_is_off() -> None:
    """Without jwt_secret or a key file, only API keys are accepted."""
    auth = _auth(jwt_secret="")
    assert auth.algorithm is None
    assert _code(auth, _hs(_claims())) == ("invalid_token", 401)
    with pytest.raises(ValueError):
        auth.mint("x")


def test_bearer_header_and_query() -> None:
    """bearer() reads 'Authorization: Bearer' first, then ?token=, and refuses other schemes."""
    auth = _auth()
    assert auth.bearer(b"Bearer key-one").admin
    assert auth.bearer("bearer   key-two  ").admin
    assert auth.bearer(None, b"key-one").admin
    assert auth.bearer(None, None).anonymous
    for bad in (b"Basic a2V5LW9uZQ==", b"Bearer", b"Token key-one"):
        with pytest.raises(AuthError):
            auth.bearer(bad)


def test_mint_round_trip() -> None:
    """A minted token verifies and carries its rights and ttl."""
    auth = _auth()
    p = auth.authenticate(auth.mint("bob", ["a.*"], ["b.>"], ttl=30))
    assert (p.sub, p.subscribe, p.publish, p.exp) == ("bob", ("a.*",), ("b.>",), NOW + 30)


def test_wildcard_rights() -> None:
    """Rights use the subscription wildcards: * one segment, > one or more."""
    p = _auth().authenticate(_hs(_claims(subscribe=["github.>", "chat.*"], publish=["chat.*", "billing.>"])))
    assert p.can_read("github.push") and p.can_read("github.a.b")
    assert not p.can_read("github") and not p.can_read("gitlab.push")
    assert p.can_subscribe("github.*") and p.can_subscribe("github.>") and p.can_subscribe("chat.room1")
    assert not p.can_subscribe("chat.>") and not p.can_subscribe(">")
    assert p.can_publish("chat.room1") and not p.can_publish("chat.room1.x")
    assert p.can_publish("billing.invoice.paid") and not p.can_publish("billing")


def _rsa_pem(tmp_path: Path, bits: int = 2048) -> tuple[Any, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path = tmp_path / "jwt.pub.pem"
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, path


def _ec_pem(tmp_path: Path, curve: ec.EllipticCurve | None = None) -> tuple[Any, Path]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    path = tmp_path / "jwt-ec.pub.pem"
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, path


def test_rs256_key_file(tmp_path: Path) -> None:
    """An RSA public key file selects RS256: RS256 tokens pass, HS256 (even keyed with the PEM) fail."""
    key, path = _rsa_pem(tmp_path)
    auth = _auth(jwt_secret="", jwt_public_key_file=str(path))
    assert auth.algorithm == "RS256"
    assert auth.authenticate(jwt.encode(_claims(), key, algorithm="RS256")).sub == "alice"
    assert _code(auth, _hs(_claims()))[0] == "invalid_token"
    assert _code(auth, jwt.encode(_claims(), key, algorithm="RS512"))[0] == "invalid_token"
    (tmp_path / "other").mkdir()
    other, _ = _rsa_pem(tmp_path / "other")
    assert _code(auth, jwt.encode(_claims(), other, algorithm="RS256"))[0] == "invalid_token"


def test_es256_key_file(tmp_path: Path) -> None:
    """An EC P-256 public key file selects ES256; an RS256 token is refused."""
    key, path = _ec_pem(tmp_path)
    auth = _auth(jwt_secret="", jwt_public_key_file=str(path))
    assert auth.algorithm == "ES256"
    assert auth.authenticate(jwt.encode(_claims(), key, algorithm="ES256")).sub == "alice"
    rkey, _ = _rsa_pem(tmp_path)
    assert _code(auth, jwt.encode(_claims(), rkey, algorithm="RS256"))[0] == "invalid_token"


def test_unsupported_key_files(tmp_path: Path) -> None:
    """Keys that fit neither RS256 nor ES256 are refused at start."""
    _, path = _ec_pem(tmp_path, ec.SECP384R1())
    with pytest.raises(ValueError, match="P-256"):
        load_public_key(path.read_bytes())
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError):
        load_public_key(pem)


# -- against the daemon ----------------------------------------------------


def _get(d: Daemon, path: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http_json("GET", d.url + path, headers=headers)


def test_daemon_token_errors(daemon: Daemon) -> None:
    """The daemon answers 401 with a JSON error and WWW-Authenticate for every kind of bad token."""
    import time

    now = time.time()
    good = {"sub": "alice", "exp": now + 600, "subscribe": [">"]}
    cases = {
        "expired": jwt.encode({**good, "exp": now - 10}, JWT_SECRET, algorithm="HS256"),
        "not yet valid": jwt.encode({**good, "nbf": now + 600}, JWT_SECRET, algorithm="HS256"),
        "wrong signature": jwt.encode(good, "x" * 40, algorithm="HS256"),
        "alg none": f"{_b64({'alg': 'none'})}.{_b64(good)}.",
        "wrong algorithm": jwt.encode(good, JWT_SECRET, algorithm="HS384"),
        "not a key": "nope",
    }
    for why, token in cases.items():
        status, body = _get(daemon, "/api/stats", token)
        assert status == 401, why
        assert set(body) == {"error", "message"}, why
    assert _get(daemon, "/api/stats", jwt.encode(good, JWT_SECRET, algorithm="HS256"))[0] == 200
    assert _get(daemon, "/api/stats", API_KEY)[0] == 200


def test_daemon_rs256(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """With jwt_public_key_file the daemon takes RS256 tokens and refuses HS256 ones."""
    import time

    key, path = _rsa_pem(tmp_path)
    d = make_daemon(f"""
        [journal]
        path = "var/journal.sqlite3"
        [auth]
        api_keys = ["{API_KEY}"]
        jwt_public_key_file = "{path}"
    """)
    claims = {"sub": "svc", "exp": time.time() + 600, "publish": ["chat.*"], "subscribe": ["chat.*"]}
    rs = jwt.encode(claims, key, algorithm="RS256")
    hs = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    body = {"channel": "chat.room1", "data": 1}
    status, got = http_json("POST", d.url + "/api/publish", body, {"Authorization": f"Bearer {rs}"})
    assert status == 202 and got["offset"] == 1
    status, got = http_json("POST", d.url + "/api/publish", body, {"Authorization": f"Bearer {hs}"})
    assert status == 401 and got["error"] == "invalid_token"
    status, got = http_json(
        "POST", d.url + "/api/publish", {"channel": "other", "data": 1}, {"Authorization": f"Bearer {rs}"}
    )
    assert status == 403 and got["error"] == "forbidden"


# -- audience ([auth] jwt_audience) ------------------------------------------


def test_audience_unset_accepts_tokens_with_or_without_aud() -> None:
    """Without jwt_audience a token's aud is not looked at (PyJWT alone would refuse any token carrying one)."""
    auth = _auth()
    for aud in (None, "rt.example.com", ["a", "b"], 5):
        assert auth.authenticate(_hs(_claims(aud=aud))).sub == "alice", aud
    with pytest.raises(jwt.InvalidAudienceError):  # the library default this guards against
        jwt.decode(_hs(_claims(aud="x")), SECRET, algorithms=["HS256"], options={"verify_exp": False})


@pytest.mark.parametrize("aud", ["rt.example.com", ["other", "rt.example.com"], ["rt.example.com"]])
def test_audience_set_accepts_the_right_aud(aud: Any) -> None:
    """With jwt_audience, an aud equal to it, or a list holding it (RFC 7519), is accepted."""
    assert _auth(jwt_audience="rt.example.com").authenticate(_hs(_claims(aud=aud))).sub == "alice"


@pytest.mark.parametrize(
    ("aud", "words"),
    [
        (None, "no 'aud' claim"),
        ("other.example.com", "not this server's"),
        (["a", "b"], "not this server's"),
        ([], "not this server's"),
        ("RT.EXAMPLE.COM", "not this server's"),
        (5, "string or a list of strings"),
        ([1], "string or a list of strings"),
        ({"rt.example.com": 1}, "string or a list of strings"),
    ],
)
def test_audience_set_refuses_other_or_missing_aud(aud: Any, words: str) -> None:
    """With jwt_audience, a token without it, with another, or with a malformed aud is 401 invalid_token, said clearly."""
    auth = _auth(jwt_audience="rt.example.com")
    with pytest.raises(AuthError) as e:
        auth.authenticate(_hs(_claims(aud=aud)))
    assert (e.value.code, e.value.status) == ("invalid_token", 401)
    assert words in e.value.message


def test_audience_does_not_apply_to_api_keys() -> None:
    """API keys are not JWTs: jwt_audience does not touch them."""
    assert _auth(jwt_audience="rt.example.com").authenticate("key-one").admin


def test_mint_carries_the_configured_audience() -> None:
    """mint() puts jwt_audience in aud by default, or the aud it is given; the token verifies."""
    auth = _auth(jwt_audience="rt.example.com")
    untimed = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}  # minted on the fake clock
    claims = jwt.decode(auth.mint("bob"), SECRET, algorithms=["HS256"], audience="rt.example.com", options=untimed)
    assert claims["aud"] == "rt.example.com"
    assert auth.authenticate(auth.mint("bob")).sub == "bob"
    two = auth.mint("bob", aud=["rt.example.com", "other"])
    assert jwt.decode(two, SECRET, algorithms=["HS256"], audience="other", options=untimed)["aud"] == [
        "rt.example.com", "other"]
    assert "aud" not in jwt.decode(_auth().mint("bob"), SECRET, algorithms=["HS256"], options=untimed)


def test_daemon_checks_the_audience(make_daemon: Callable[..., Daemon]) -> None:
    """With jwt_audience the daemon answers 401 invalid_token to tokens without it (HTTP and /ws upgrade), 2xx with it."""
    import time

    import websocket

    d = make_daemon(f"""
        [journal]
        path = "var/journal.sqlite3"
        [auth]
        api_keys = ["{API_KEY}"]
        jwt_secret = "{JWT_SECRET}"
        jwt_audience = "rt.example.com"
    """)
    base = {"sub": "svc", "exp": time.time() + 600, "publish": ["aud.*"], "subscribe": ["aud.*"]}
    body = {"channel": "aud.x", "data": 1}
    for aud in (None, "elsewhere", ["elsewhere"]):
        claims = dict(base) if aud is None else {**base, "aud": aud}
        tok = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
        status, got = http_json("POST", d.url + "/api/publish", body, {"Authorization": f"Bearer {tok}"})
        assert (status, got["error"]) == (401, "invalid_token"), aud
        assert "aud" in got["message"]
        with pytest.raises(websocket.WebSocketBadStatusException) as e:
            websocket.create_connection(d.ws_url + f"?token={tok}", timeout=5)
        assert e.value.status_code == 401
    for aud in ("rt.example.com", ["x", "rt.example.com"]):
        tok = jwt.encode({**base, "aud": aud}, JWT_SECRET, algorithm="HS256")
        status, got = http_json("POST", d.url + "/api/publish", body, {"Authorization": f"Bearer {tok}"})
        assert status == 202, got
        ws = websocket.create_connection(d.ws_url + f"?token={tok}", timeout=5)
        ws.send('{"op":"ping"}')
        assert ws.recv() == '{"op":"pong"}'
        ws.close()


def test_daemon_without_audience_accepts_a_token_with_aud(daemon: Daemon) -> None:
    """Without jwt_audience a token that carries an aud (e.g. from a shared issuer) is accepted."""
    import time

    tok = jwt.encode({"sub": "svc", "exp": time.time() + 600, "aud": "anything", "publish": ["a.*"]}, JWT_SECRET,
                     algorithm="HS256")
    status, got = http_json("POST", daemon.url + "/api/publish", {"channel": "a.x", "data": 1},
                            {"Authorization": f"Bearer {tok}"})
    assert status == 202, got


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_times_refused(claim: str, value: str) -> None:
    """A time claim of JSON Infinity/NaN (which PyJWT's decoder accepts) is refused: such a token would never expire."""
    import hashlib
    import hmac as _hmac

    claims = json.dumps(_claims()).rstrip("}") + f', "{claim}": {value}' + "}"
    if claim == "exp":
        claims = claims.replace(f'"exp": {NOW + 60}, ', "")
    header = _b64({"alg": "HS256", "typ": "JWT"})
    body = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
    sig = _hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    tok = f"{header}.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    assert _code(_auth(), tok) == ("invalid_token", 401)

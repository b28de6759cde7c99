"""Config loading: the sample parses, and every kind of bad file is refused with one line."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import pytest
from conftest import BIN, ROOT, free_port

from twisted_rt import checks
from twisted_rt.core import config
from twisted_rt.core.config import (
    SECTION_CHECKS,
    AuthConfig,
    Config,
    ConfigError,
    ServerConfig,
    SourceConfig,
    TLSConfig,
    Verifier,
    check_file,
    parse,
    section_check,
    validate,
)

SAMPLE_ENV = {
    "RT_API_KEY": "k",
    "RT_JWT_SECRET": "s",
    "GITHUB_WEBHOOK_SECRET": "g",
    "META_APP_SECRET": "m",
    "META_VERIFY_TOKEN": "t",
    "INHOUSE_SECRET": "i",
    "BILLING_HOOK_SECRET": "aGVsbG8=",
    "PUSHER_SECRET": "p",
}


SAMPLE = ROOT / "conf" / "twisted-rt.toml"


def _switched_on(text: str) -> str:
    """The sample with its switched-off blocks on: the "#" at the very start of "#[[sources]]", "#name = ..." gone."""
    return re.sub(r"(?m)^#(?=[^\s#])", "", text)


def test_sample_config_parses_with_every_key(tmp_path: Path) -> None:
    """The documented sample conf/twisted-rt.toml, its optional sources switched on, is valid and arrives typed."""
    on = tmp_path / "on.toml"
    on.write_text(_switched_on(SAMPLE.read_text()))
    cfg = checks.load(str(on), SAMPLE_ENV)
    assert cfg.server.listen == ("tcp:8080",)
    assert cfg.server.max_body_bytes == 1048576
    assert cfg.journal.max_events_per_channel == 10000
    assert cfg.websocket.max_send_buffer_bytes == 4194304
    assert cfg.websocket.compression is False
    assert cfg.broker.kind == "local"
    assert cfg.auth.api_keys == ("k",)
    assert cfg.auth.anonymous_subscribe == ("public.>",)
    assert [s.name for s in cfg.sources] == ["github", "meta", "inhouse"]
    assert cfg.source("meta") is not None and cfg.source("meta").verify_token == "t"  # type: ignore[union-attr]
    assert cfg.source("inhouse").signature_header == "X-Signature"  # type: ignore[union-attr]
    assert cfg.source("inhouse").signature_encoding == "hex"  # type: ignore[union-attr]
    assert cfg.rule("chat.room1") is not None and cfg.rule("chat.room1").presence  # type: ignore[union-attr]
    assert cfg.presence.node_timeout_seconds == 20
    billing = cfg.destination("billing-service")
    assert billing is not None and billing.channels == ("stripe.>", "github.push") and billing.secret_key() == b"hello"
    assert cfg.pusher.enabled and cfg.pusher.key == "rt-key" and cfg.pusher.secret == "p"
    assert cfg.broker.min_replicas == 0 and cfg.broker.sentinels == ()


def test_sample_config_as_shipped_needs_only_the_github_secret() -> None:
    """A GitHub-only user runs the sample as it is: Meta and in-house are off, their secrets not needed."""
    env = {k: SAMPLE_ENV[k] for k in ("RT_API_KEY", "RT_JWT_SECRET", "GITHUB_WEBHOOK_SECRET")}
    cfg = checks.load(str(SAMPLE), env)
    assert [s.name for s in cfg.sources] == ["github"]
    assert checks.check_file(str(SAMPLE), env) == []


def test_empty_config_is_the_embedded_defaults() -> None:
    """An empty file gives tcp:8080 and a journal under ./var/."""
    cfg = parse("", {})
    assert cfg == Config()
    assert cfg.server.listen == ("tcp:8080",)
    assert cfg.journal.path == "var/journal.sqlite3"


def test_env_expansion_inside_strings() -> None:
    """${VAR} is replaced from the environment anywhere in a string."""
    cfg = parse('[journal]\npath = "${D}/j.sqlite3"\n', {"D": "/data"})
    assert cfg.journal.path == "/data/j.sqlite3"


BAD = [
    ("unknown key", '[server]\nlisten = ["tcp:1"]\nlisen = 3\n', "server.lisen", "unknown key"),
    ("unknown section", "[servr]\n", "servr", "unknown section"),
    ("wrong type int", '[server]\nmax_body_bytes = "big"\n', "server.max_body_bytes", "expected an integer"),
    ("wrong type bool", "[websocket]\ncompression = 1\n", "websocket.compression", "expected true or false"),
    ("wrong type list", '[server]\nlisten = "tcp:8080"\n', "server.listen", "expected a list of strings"),
    ("negative", "[journal]\nretention_seconds = -1\n", "journal.retention_seconds", "must not be negative"),
    ("missing secret var", '[auth]\njwt_secret = "${NOPE_NOT_SET}"\n', "auth.jwt_secret",
     "environment variable NOPE_NOT_SET is not set"),
    ("bad endpoint", '[server]\nlisten = ["tcpp:80"]\n', "server.listen[0]", "bad endpoint"),
    ("bad endpoint port", '[server]\nlisten = ["tcp:notaport"]\n', "server.listen[0]", "bad endpoint"),
    ("duplicate source", '[[sources]]\nname="a"\nverify="none"\n[[sources]]\nname="a"\nverify="none"\n',
     "sources[1].name", "duplicate source name 'a'"),
    ("unknown verifier", '[[sources]]\nname="a"\nverify="gitbub"\nsecrets=["x"]\n', "sources[0].verify",
     "unknown verifier 'gitbub'"),
    ("source without secret", '[[sources]]\nname="a"\nverify="github"\n', "sources[0].secrets",
     "needs at least one secret"),
    ("source missing name", '[[sources]]\nverify="none"\n', "sources[0].name", "is required"),
    ("bad channel template", '[[sources]]\nname="a"\nverify="none"\nchannel="a.{body:x}"\n',
     "sources[0].channel", "unknown placeholder"),
    ("bad broker", '[broker]\nkind = "kafka"\n', "broker.kind", "unknown broker"),
    ("bad pattern", '[auth]\nanonymous_subscribe = ["a.>.b"]\n', "auth.anonymous_subscribe[0]", "last segment"),
    ("bad origin", '[server]\nallowed_origins = ["app.example.com/x"]\n', "server.allowed_origins[0]",
     "not an origin"),
    ("meta without verify_token", '[[sources]]\nname="m"\nverify="meta"\nsecrets=["x"]\n',
     "sources[0].verify_token", "GET handshake"),
    ("bad whsec", '[[sources]]\nname="s"\nverify="standard"\nsecrets=["whsec_***"]\n', "sources[0].secrets[0]",
     "not valid base64"),
    ("not toml", "[server\n", "(file)", "not valid TOML"),
    ("missing key file", '[auth]\njwt_public_key_file = "/nonexistent.pem"\n', "auth.jwt_public_key_file",
     "no such file"),
    ("bad encoding", '[[sources]]\nname="a"\nverify="none"\nsignature_encoding="hexx"\n',
     "sources[0].signature_encoding", "expected hex or base64"),
    ("bad log format", 'log_format = "xml"\n', "log_format", "expected text or json"),
    ("empty body limit", "[server]\nmax_body_bytes = 0\n", "server.max_body_bytes", "must be at least 1"),
    ("no head timeout", "[server]\nrequest_head_timeout_seconds = 0\n", "server.request_head_timeout_seconds",
     "must be more than 0"),
    ("tls cert without key", '[tls]\ncert = "c.pem"\n', "tls.key", "tls.cert and tls.key go together"),
    # 0.2: channel rules, destinations, Pusher, presence, Sentinel
    ("bad rule pattern", '[[channels]]\npattern="chat..x"\n', "channels[0].pattern", "bad segment"),
    ("rule missing pattern", '[[channels]]\npresence=true\n', "channels[0].pattern", "is required"),
    ("destination bad url", '[[destinations]]\nname="d"\nurl="ftp://x"\nchannels=["a"]\n', "destinations[0].url",
     "not an http:// or https:// URL"),
    ("destination no host", '[[destinations]]\nname="d"\nurl="https:///x"\nchannels=["a"]\n', "destinations[0].url",
     "not an http:// or https:// URL"),
    ("destination bad port", '[[destinations]]\nname="d"\nurl="http://x:99999/"\nchannels=["a"]\n',
     "destinations[0].url", "not an http:// or https:// URL"),
    ("destination bad pattern", '[[destinations]]\nname="d"\nurl="http://x"\nchannels=["a.>.b"]\n',
     "destinations[0].channels[0]", "last segment"),
    ("destination no channels", '[[destinations]]\nname="d"\nurl="http://x"\n', "destinations[0].channels",
     "at least one channel pattern"),
    ("destination duplicate", '[[destinations]]\nname="d"\nurl="https://x.example/h"\nchannels=["a"]\n[[destinations]]\nname="d"\nurl="https://x.example/h"\nchannels=["a"]\n', "destinations[1].name", "duplicate destination name 'd'"),
    ("destination bad secret", '[[destinations]]\nname="d"\nurl="https://x.example/h"\nchannels=["a"]\nsecret="whsec_%%%"\n', "destinations[0].secret", "not valid base64"),
    ("destination empty secret", '[[destinations]]\nname="d"\nurl="https://x.example/h"\nchannels=["a"]\nsecret="whsec_"\n', "destinations[0].secret", "no key material"),
    ("destination bad format", '[[destinations]]\nname="d"\nurl="https://x.example/h"\nchannels=["a"]\nformat="xml"\n', "destinations[0].format", "unknown format 'xml'"),
    ("destination bad header", '[[destinations]]\nname="d"\nurl="https://x.example/h"\nchannels=["a"]\nheaders={"a b"="x"}\n', "destinations[0].headers.a b", "not an HTTP header name"),
    ("destination header not text", '[[destinations]]\nname="d"\nurl="https://x.example/h"\nchannels=["a"]\nheaders={"X"=1}\n', "destinations[0].headers", "expected a table of strings"),
    ("destination zero attempts", '[[destinations]]\nname="d"\nurl="https://x.example/h"\nchannels=["a"]\nmax_attempts=0\n', "destinations[0].max_attempts", "must be at least 1"),
    ("destination ca on http", '[[destinations]]\nname="d"\nurl="http://x"\nchannels=["a"]\nca_file="c.pem"\n',
     "destinations[0].ca_file", "only for an https:// url"),
    ("pusher half", '[pusher]\napp_id="1"\nkey="k"\n', "pusher.secret", "is required when [pusher] is set"),
    ("pusher bad public pattern", '[pusher]\napp_id="1"\nkey="k"\nsecret="s"\npublic_channels=["a..b"]\n',
     "pusher.public_channels[0]", "bad segment"),
    ("destination url password hidden", '[[destinations]]\nname="d"\nurl="ftp://u:hunter2@x"\nchannels=["a"]\n',
     "destinations[0].url", "'ftp://REDACTED@x'"),
    ("pusher bad key", '[pusher]\napp_id="1"\nkey="a b"\nsecret="s"\n', "pusher.key", "is not 1-64 characters"),
    ("pusher unknown webhooks", '[pusher]\napp_id="1"\nkey="k"\nsecret="s"\nwebhooks="nope"\n', "pusher.webhooks",
     "no [[destinations]] is called 'nope'"),
    ("presence timeout", '[presence]\nheartbeat_seconds=5\nnode_timeout_seconds=5\n', "presence.node_timeout_seconds",
     "must be more than heartbeat_seconds"),
    ("presence over 30", '[presence]\nnode_timeout_seconds=26\n', "presence.node_timeout_seconds", "at most 30"),
    ("negative rule", '[[channels]]\npattern="a"\nmax_events=-1\n', "channels[0].max_events", "must not be negative"),
    ("url and sentinels", '[broker]\nurl="redis://x"\nsentinels=["a:1"]\n', "broker.sentinels", "not both"),
    ("bad sentinel", '[broker]\nsentinels=["a"]\nsentinel_master="m"\n', "broker.sentinels[0]", "expected host:port"),
    ("bad sentinel port", '[broker]\nsentinels=["a:0"]\nsentinel_master="m"\n', "broker.sentinels[0]",
     "expected host:port"),
    ("sentinels without master", '[broker]\nsentinels=["a:1"]\n', "broker.sentinel_master", "is required with sentinels"),
    ("master without sentinels", '[broker]\nsentinel_master="m"\n', "broker.sentinel_master", "needs sentinels"),
    ("negative replicas", '[broker]\nmin_replicas=-1\n', "broker.min_replicas", "must not be negative"),
]


@pytest.mark.parametrize("text,key,problem", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_key(text: str, key: str, problem: str) -> None:
    """Each kind of bad file raises ConfigError naming the key and the problem on one line (the whole check)."""
    with pytest.raises(ConfigError) as e:
        checks.parse(text, {})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(key + ": "), msg
    assert problem in msg


def test_unreadable_file_is_reported() -> None:
    """A config path that does not exist is one line, not a traceback."""
    assert check_file("/nonexistent/rt.toml") == ["(file): cannot read /nonexistent/rt.toml: No such file or directory"]


def test_check_config_command(tmp_path: Path) -> None:
    """`twisted-rt check-config` prints one line per problem and exits non-zero; 0 on a good file."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nmax_body_bytes = "x"\n')
    r = subprocess.run([str(BIN / "twisted-rt"), "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"{bad}: server.max_body_bytes: expected an integer, got a string"]
    good = tmp_path / "good.toml"
    good.write_text('[server]\nlisten = ["tcp:8080"]\n')
    r = subprocess.run([str(BIN / "twisted-rt"), "check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("text,key", [
    ('[server]\nbogus = 1\n', "server.bogus"),
    ('[auth]\njwt_secret = "${RT_TEST_UNSET_VAR}"\n', "auth.jwt_secret"),
    ('[server]\nlisten = ["nonsense:1"]\n', "server.listen[0]"),
])
def test_daemon_refuses_bad_config_with_one_line(tmp_path: Path, text: str, key: str) -> None:
    """`twistd -n rt --config bad.toml` exits 1 with a single stderr line naming the key, no traceback."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    r = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--config", str(cfg), "--listen", f"tcp:{free_port()}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert r.returncode == 1
    lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr + r.stdout
    assert f": {key}: " in lines[0]
    assert "Traceback" not in r.stderr


def test_jwt_public_key_of_wrong_kind_is_refused(tmp_path: Path) -> None:
    """A jwt_public_key_file that is not an RSA or P-256 public key is refused at config time, naming the key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "k.pem").write_bytes(pem)
    (tmp_path / "junk.pem").write_text("not a key")
    for name in ("k.pem", "junk.pem"):
        with pytest.raises(ConfigError) as e:
            checks.parse(f'[auth]\njwt_public_key_file = "{tmp_path / name}"\n', {})
        assert str(e.value).startswith(f"auth.jwt_public_key_file: {tmp_path / name}: ")


# -- issue 13 #18: key material that is empty once expanded ------------------------------------

EMPTY_KEYS = [
    ("whsec_ alone", '[[sources]]\nname = "s"\nverify = "standard"\nsecrets = ["whsec_"]\n', "sources[0].secrets[0]"),
    ("whsec_ of a variable that is empty",
     '[[sources]]\nname = "s"\nverify = "standard"\nsecrets = ["whsec_${RT_TEST_EMPTY}"]\n', "sources[0].secrets[0]"),
    ("secret of a variable that is empty",
     '[[sources]]\nname = "g"\nverify = "github"\nsecrets = ["${RT_TEST_EMPTY}"]\n', "sources[0].secrets[0]"),
    ("jwt secret of a variable that is empty", '[auth]\njwt_secret = "${RT_TEST_EMPTY}"\n', "auth.jwt_secret"),
    ("api key of a variable that is empty", '[auth]\napi_keys = ["${RT_TEST_EMPTY}"]\n', "auth.api_keys[0]"),
]


@pytest.mark.parametrize("text,key", [e[1:] for e in EMPTY_KEYS], ids=[e[0] for e in EMPTY_KEYS])
def test_check_config_refuses_empty_key_material(tmp_path: Path, text: str, key: str) -> None:
    """`check-config` exits non-zero with one line naming the key for a secret that is empty after ${VAR} or whsec_."""
    cfg = tmp_path / "empty.toml"
    cfg.write_text(text)
    env = {**os.environ, "RT_TEST_EMPTY": ""}
    r = subprocess.run([str(BIN / "twisted-rt"), "check-config", str(cfg)], capture_output=True, text=True, env=env)
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{cfg}: {key}: "), r.stderr


@pytest.mark.parametrize("text,key", [e[1:] for e in EMPTY_KEYS[:3]], ids=[e[0] for e in EMPTY_KEYS[:3]])
def test_daemon_refuses_empty_key_material(tmp_path: Path, text: str, key: str) -> None:
    """The daemon does not start on such a file: exit 1 and one line naming the key, no listener opened."""
    cfg = tmp_path / "empty.toml"
    cfg.write_text(text)
    port = free_port()
    env = {**os.environ, "RT_TEST_EMPTY": ""}
    r = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "rt", "--config", str(cfg), "--listen", f"tcp:{port}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, env=env,
    )
    assert r.returncode == 1
    lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and f": {key}: " in lines[0], r.stderr + r.stdout
    assert "Traceback" not in r.stderr


def test_stripe_whsec_secret_is_not_base64() -> None:
    """A Stripe signing secret (whsec_ + any characters) is accepted: Stripe keys its HMAC with the whole string."""
    cfg = parse('[[sources]]\nname = "s"\nverify = "stripe"\nsecrets = ["whsec_1234567890abcdefghijklmnopqrstuvwxyzAB"]\n',
                {})
    assert cfg.sources[0].secrets == ("whsec_1234567890abcdefghijklmnopqrstuvwxyzAB",)


def test_x_secret_shared_with_another_source_is_refused() -> None:
    """An X source may not share its secret with another source (the crc handshake would sign its bodies)."""
    text = (
        '[[sources]]\nname = "x"\nverify = "twitter"\nsecrets = ["same"]\n'
        '[[sources]]\nname = "gh"\nverify = "github"\nsecrets = ["other", "same"]\n'
    )
    with pytest.raises(ConfigError) as e:
        parse(text, {})
    assert e.value.key == "sources[0].secrets" and "'gh'" in str(e.value)


# -- issue 14: the typed schema, the section registry, the owners' checks ----------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def test_every_key_written_out_at_its_default_parses_to_the_defaults() -> None:
    """Every field of every section has a checker for its type, and its default passes the checks."""
    lines = []
    for f in dataclasses.fields(Config):
        default = getattr(Config(), f.name)
        if f.name == "sources":
            continue
        if not dataclasses.is_dataclass(default):
            lines.insert(0, f"{f.name} = {_toml(default)}")
            continue
        lines.append(f"[{f.name}]")
        lines += [f"{g.name} = {_toml(getattr(default, g.name))}" for g in dataclasses.fields(default)]
    source = SourceConfig(name="s", verify="github", secrets=("x",))
    lines.append("[[sources]]")
    lines += [f"{g.name} = {_toml(getattr(source, g.name))}" for g in dataclasses.fields(source)]
    assert parse("\n".join(lines), {}) == Config(sources=(source,))


def test_new_sections_parse_and_answer_their_lookups() -> None:
    """[[channels]] rules match first-wins, destinations are found by name with their key bytes, [pusher] is on when set."""
    cfg = parse(
        '[[channels]]\npattern="chat.vip"\nmax_events=5\n[[channels]]\npattern="chat.>"\npresence=true\n'
        '[[destinations]]\nname="p"\nurl="http://127.0.0.1:9/h"\n'
        '[[destinations]]\nname="b"\nurl="https://b.example/h"\nchannels=["stripe.>"]\n'
        'secret="whsec_aGVsbG8="\nheaders={"X-Env"="${ENV}"}\n'
        '[pusher]\napp_id="1"\nkey="k"\nsecret="s"\nwebhooks="p"\n'
        '[broker]\nkind="redis"\nsentinels=["127.0.0.1:26379"]\nsentinel_master="rt"\nmin_replicas=1\n',
        {"ENV": "prod"},
    )
    assert cfg.rule("chat.vip") is not None and cfg.rule("chat.vip").max_events == 5  # type: ignore[union-attr]
    assert cfg.rule("chat.room1") is not None and cfg.rule("chat.room1").presence  # type: ignore[union-attr]
    assert cfg.rule("other") is None
    b = cfg.destination("b")
    assert b is not None and b.headers == (("X-Env", "prod"),) and b.secret_key() == b"hello"
    assert cfg.destination("nope") is None
    assert cfg.pusher.enabled and not Config().pusher.enabled
    assert cfg.broker.effective_url == "redis://127.0.0.1:6379/0" and Config().broker.url == ""


def test_verifier_names_are_the_verifiers_of_the_routes() -> None:
    """The Literal of [[sources]] verify names exactly the verifiers routes/verify.py implements."""
    from twisted_rt.routes.verify import VERIFIERS

    assert get_args(Verifier) == config.VERIFIERS
    assert set(config.VERIFIERS) == set(VERIFIERS)


def test_validate_checks_a_config_built_in_code() -> None:
    """validate() runs the same checks on a Config built or changed in code (e.g. by command-line overrides)."""
    validate(Config())
    with pytest.raises(ConfigError, match=r"^log_format: expected text or json$"):
        validate(replace(Config(), log_format="xml"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^server.listen\[1\]: bad endpoint 'tcpp:1'"):
        validate(Config().with_overrides(listen=["tcp:1", "tcpp:1"]))
    bad = SourceConfig(name="s", verify="gitbub")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^sources\[1\].verify: unknown verifier 'gitbub' \(expected one of github,"):
        validate(Config(sources=(SourceConfig(name="ok", verify="none"), bad)))


def test_section_checks_are_registered_per_section_and_named_by_key() -> None:
    """A check registered for a section runs on every instance of it, with the key it has in the file."""
    seen: list[tuple[str, str]] = []

    @section_check(SourceConfig)
    def spy(source: SourceConfig, key: str) -> None:
        seen.append((source.name, key))

    try:
        parse('[[sources]]\nname = "a"\nverify = "none"\n[[sources]]\nname = "b"\nverify = "none"\n', {})
    finally:
        SECTION_CHECKS[SourceConfig].remove(spy)
    assert seen == [("a", "sources[0]"), ("b", "sources[1]")]
    assert set(SECTION_CHECKS) >= {ServerConfig, AuthConfig, SourceConfig, Config}


def test_pure_checks_read_no_files_and_the_whole_check_does(tmp_path: Path) -> None:
    """config.parse/check_file do the pure checks only; twisted_rt.checks adds the owners' (TLS, JWT key files)."""
    text = '[auth]\njwt_public_key_file = "/nonexistent.pem"\n[tls]\ncert = "/nonexistent.crt"\n'
    cfg = parse(text, {})
    assert cfg.tls.cert == "/nonexistent.crt"
    path = tmp_path / "rt.toml"
    path.write_text(text)
    assert check_file(str(path), {}) == []
    assert checks.check_file(str(path), {}) == ["tls.key: tls.cert and tls.key go together"]
    with pytest.raises(ConfigError, match=r"^auth.jwt_public_key_file: no such file: /nonexistent.pem$"):
        checks.check(replace(cfg, tls=TLSConfig()))
    assert checks.check_file("/nonexistent/rt.toml") == [
        "(file): cannot read /nonexistent/rt.toml: No such file or directory"
    ]


def test_core_config_imports_no_higher_layer() -> None:
    """Loading twisted_rt.core.config pulls in neither web/ (TLS) nor any layer above the core."""
    code = (
        "import sys, twisted_rt.core.config as c; c.parse('[server]\\nlisten=[\"tcp:1\"]\\n', {}); "
        "print(sorted(m for m in sys.modules if m.startswith('twisted_rt.') "
        "and not m.startswith(('twisted_rt.core', 'twisted_rt.interfaces'))))"
    )
    r = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout

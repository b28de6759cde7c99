"""Config loading: the sample parses, and every kind of bad file is refused with one line."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, ROOT, free_port

from twisted_rt.core.config import Config, ConfigError, check_file, load, parse

SAMPLE_ENV = {
    "RT_API_KEY": "k",
    "RT_JWT_SECRET": "s",
    "GITHUB_WEBHOOK_SECRET": "g",
    "META_APP_SECRET": "m",
    "META_VERIFY_TOKEN": "t",
    "INHOUSE_SECRET": "i",
}


SAMPLE = ROOT / "conf" / "twisted-rt.toml"


def _switched_on(text: str) -> str:
    """The sample with its switched-off blocks on: the "#" at the very start of "#[[sources]]", "#name = ..." gone."""
    return re.sub(r"(?m)^#(?=[^\s#])", "", text)


def test_sample_config_parses_with_every_key() -> None:
    """The documented sample conf/twisted-rt.toml, its optional sources switched on, is valid and arrives typed."""
    cfg = parse(_switched_on(SAMPLE.read_text()), SAMPLE_ENV)
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


def test_sample_config_as_shipped_needs_only_the_github_secret() -> None:
    """A GitHub-only user runs the sample as it is: Meta and in-house are off, their secrets not needed."""
    env = {k: SAMPLE_ENV[k] for k in ("RT_API_KEY", "RT_JWT_SECRET", "GITHUB_WEBHOOK_SECRET")}
    cfg = load(str(SAMPLE), env)
    assert [s.name for s in cfg.sources] == ["github"]
    assert check_file(str(SAMPLE), env) == []


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
]


@pytest.mark.parametrize("text,key,problem", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_key(text: str, key: str, problem: str) -> None:
    """Each kind of bad file raises ConfigError naming the key and the problem on one line."""
    with pytest.raises(ConfigError) as e:
        parse(text, {})
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
            parse(f'[auth]\njwt_public_key_file = "{tmp_path / name}"\n', {})
        assert str(e.value).startswith("auth.jwt_public_key_file: ")


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

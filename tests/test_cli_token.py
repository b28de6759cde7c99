"""
C{twisted-rt token}: prints a JWT signed with the config's jwt_secret that
verifies and carries the rights asked for; refuses what it cannot sign.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import API_KEY, BIN, JWT_SECRET, Daemon, http_json

from twisted_rt.cli import main
from twisted_rt.core.auth import Authenticator
from twisted_rt.core.config import load


def _config(tmp_path: Path, auth: str = f'jwt_secret = "{JWT_SECRET}"') -> Path:
    p = tmp_path / "twisted-rt.toml"
    p.write_text(f'[journal]\npath = ":memory:"\n\n[auth]\napi_keys = ["{API_KEY}"]\n{auth}\n')
    return p


def test_token_verifies_and_carries_rights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The printed token verifies with the config's secret and has sub, rights, iat and exp = now + ttl."""
    path = _config(tmp_path)
    before = int(time.time())
    rc = main(["token", "--config", str(path), "--sub", "svc-a", "--subscribe", "github.>",
               "--subscribe", "public.*", "--publish", "chat.*", "--ttl", "120"])
    out = capsys.readouterr().out.strip()
    assert rc == 0 and "\n" not in out
    claims = jwt.decode(out, JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "svc-a"
    assert claims["subscribe"] == ["github.>", "public.*"] and claims["publish"] == ["chat.*"]
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 120
    assert jwt.get_unverified_header(out)["alg"] == "HS256"
    p = Authenticator(load(str(path)).auth).authenticate(out)
    assert p.can_read("github.push") and p.can_subscribe("public.*") and p.can_publish("chat.room1")
    assert not p.can_publish("github.push") and not p.admin


def test_token_default_ttl_and_no_rights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --ttl the token lives an hour; without rights it may do nothing."""
    assert main(["token", "--config", str(_config(tmp_path)), "--sub", "nobody"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["subscribe"] == [] and claims["publish"] == []


def test_token_reads_secret_from_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A ${VAR} jwt_secret is read from the environment, as the daemon does."""
    monkeypatch.setenv("RT_JWT_SECRET_TEST", "env-secret-0123456789abcdef0123456789abcdef")
    path = _config(tmp_path, 'jwt_secret = "${RT_JWT_SECRET_TEST}"')
    assert main(["token", "--config", str(path), "--sub", "e"]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.decode(token, "env-secret-0123456789abcdef0123456789abcdef", algorithms=["HS256"])["sub"] == "e"


def test_token_without_secret_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config with no jwt_secret cannot sign: non-zero exit, one line on stderr, nothing on stdout."""
    assert main(["token", "--config", str(_config(tmp_path, "")), "--sub", "x"]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and "jwt_secret" in captured.err and captured.err.count("\n") == 1


def test_token_bad_config_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing or broken config is one line naming the problem and a non-zero exit."""
    assert main(["token", "--config", str(tmp_path / "missing.toml"), "--sub", "x"]) != 0
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[auth]\njwt_secret = 5\n")
    assert main(["token", "--config", str(bad), "--sub", "x"]) != 0
    assert "auth.jwt_secret" in capsys.readouterr().err


def test_token_bad_pattern_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A right that is not a valid channel pattern is refused before signing."""
    assert main(["token", "--config", str(_config(tmp_path)), "--sub", "x", "--publish", "a.>.b"]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err


def test_token_sub_required(tmp_path: Path) -> None:
    """--sub is required (argparse exits 2)."""
    with pytest.raises(SystemExit) as e:
        main(["token", "--config", str(_config(tmp_path))])
    assert e.value.code == 2


def test_console_script_token_works_on_the_daemon(daemon: Daemon) -> None:
    """The installed twisted-rt script's token is accepted by a daemon with the same config."""
    out = subprocess.run(
        [str(BIN / "twisted-rt"), "token", "--config", str(daemon.config_path), "--sub", "cli",
         "--publish", "cli.*", "--subscribe", "cli.*", "--ttl", "60"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    headers = {"Authorization": f"Bearer {out}"}
    status, body = http_json("POST", daemon.url + "/api/publish", {"channel": "cli.x", "data": 1}, headers)
    assert status == 202 and body["offset"] == 1
    status, body = http_json("GET", daemon.url + "/api/channels/cli.x/history", headers=headers)
    assert status == 200 and body["last_offset"] == 1
    status, _ = http_json("POST", daemon.url + "/api/publish", {"channel": "other", "data": 1}, headers)
    assert status == 403


def test_token_aud_from_config_and_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With [auth] jwt_audience the token carries it; --aud sets it (once: a string, repeated: a list)."""
    path = _config(tmp_path, f'jwt_secret = "{JWT_SECRET}"\njwt_audience = "rt.example.com"')
    assert main(["token", "--config", str(path), "--sub", "a"]) == 0
    tok = capsys.readouterr().out.strip()
    assert jwt.decode(tok, JWT_SECRET, algorithms=["HS256"], audience="rt.example.com")["aud"] == "rt.example.com"
    assert Authenticator(load(str(path)).auth).authenticate(tok).sub == "a"
    assert main(["token", "--config", str(_config(tmp_path)), "--sub", "b", "--aud", "svc.one"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), JWT_SECRET, algorithms=["HS256"], audience="svc.one")
    assert claims["aud"] == "svc.one"
    assert main(["token", "--config", str(path), "--sub", "c", "--aud", "rt.example.com", "--aud", "x"]) == 0
    tok = capsys.readouterr().out.strip()
    assert jwt.decode(tok, JWT_SECRET, algorithms=["HS256"], audience="x")["aud"] == ["rt.example.com", "x"]
    assert Authenticator(load(str(path)).auth).authenticate(tok).sub == "c"
    assert main(["token", "--config", str(_config(tmp_path)), "--sub", "d"]) == 0
    assert "aud" not in jwt.decode(capsys.readouterr().out.strip(), JWT_SECRET, algorithms=["HS256"])
    assert main(["token", "--config", str(path), "--sub", "e", "--aud", " "]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--aud" in captured.err


def test_console_script_token_with_audience_works_on_the_daemon(make_daemon: Any) -> None:
    """A daemon with jwt_audience takes the token the script mints from its config, and refuses one for another aud."""
    d: Daemon = make_daemon(f"""
        [journal]
        path = "var/journal.sqlite3"
        [auth]
        api_keys = ["{API_KEY}"]
        jwt_secret = "{JWT_SECRET}"
        jwt_audience = "rt.example.com"
    """)
    base = [str(BIN / "twisted-rt"), "token", "--config", str(d.config_path), "--sub", "cli", "--publish", "cli.*"]
    good = subprocess.run(base, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    other = subprocess.run([*base, "--aud", "elsewhere"], capture_output=True, text=True, timeout=60,
                           check=True).stdout.strip()
    body = {"channel": "cli.x", "data": 1}
    assert http_json("POST", d.url + "/api/publish", body, {"Authorization": f"Bearer {good}"})[0] == 202
    status, got = http_json("POST", d.url + "/api/publish", body, {"Authorization": f"Bearer {other}"})
    assert (status, got["error"]) == (401, "invalid_token")


def test_token_info_claim_for_presence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--info puts a presence member's description in the token; bad JSON, a non-object or over 1 KiB is refused."""
    path = _config(tmp_path)
    assert main(["token", "--config", str(path), "--sub", "alice", "--info", '{"name": "Alice"}']) == 0
    out = capsys.readouterr().out.strip()
    assert jwt.decode(out, JWT_SECRET, algorithms=["HS256"])["info"] == {"name": "Alice"}
    assert Authenticator(load(str(path)).auth).authenticate(out).info == {"name": "Alice"}
    for bad, says in (("{nope", "not JSON"), ("[1]", "JSON object"), ('{"x": "' + "y" * 1100 + '"}', "at most 1024")):
        assert main(["token", "--config", str(path), "--sub", "alice", "--info", bad]) == 2
        assert says in capsys.readouterr().err

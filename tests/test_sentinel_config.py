"""
The [broker] keys of Redis high availability: each bad value is one config
line naming the key, through config.parse and `twisted-rt check-config`.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import BIN

from twisted_rt.checks import parse
from twisted_rt.core.config import ConfigError

GOOD = """
[broker]
kind = "redis"
sentinels = ["10.0.0.1:26379", "sentinel-b:26379", "[::1]:26379"]
sentinel_master = "rt"
password = "secret"
min_replicas = 1
replica_timeout_ms = 1000
"""


def broker(extra: str) -> str:
    return '[broker]\nkind = "redis"\n' + textwrap.dedent(extra)


def test_good_sentinel_broker_parses() -> None:
    """sentinels, sentinel_master, password, min_replicas and replica_timeout_ms are read as written."""
    b = parse(GOOD).broker
    assert b.sentinels == ("10.0.0.1:26379", "sentinel-b:26379", "[::1]:26379")
    assert (b.sentinel_master, b.password, b.min_replicas, b.replica_timeout_ms) == ("rt", "secret", 1, 1000)


@pytest.mark.parametrize(("text", "key", "words"), [
    (broker('url = "redis://h:6379/0"\nsentinels = ["h:26379"]\nsentinel_master = "rt"'),
     "broker.sentinels", "not both"),
    (broker('sentinels = ["h:26379", "nohostport"]\nsentinel_master = "rt"'),
     "broker.sentinels[1]", "host:port"),
    (broker('sentinels = ["h:99999"]\nsentinel_master = "rt"'), "broker.sentinels[0]", "host:port"),
    (broker('sentinels = [":26379"]\nsentinel_master = "rt"'), "broker.sentinels[0]", "host:port"),
    (broker('sentinels = ["h:26379"]'), "broker.sentinel_master", "required"),
    (broker('sentinel_master = "rt"'), "broker.sentinel_master", "needs sentinels"),
    (broker('sentinels = ["h:26379"]\nsentinel_master = "rt"\nmin_replicas = -1'),
     "broker.min_replicas", "negative"),
    (broker('sentinels = ["h:26379"]\nsentinel_master = "rt"\nreplica_timeout_ms = 0'),
     "broker.replica_timeout_ms", ""),
])
def test_bad_values_are_one_line_naming_the_key(text: str, key: str, words: str) -> None:
    """url with sentinels, a bad host:port, a missing master name, min_replicas < 0, a zero WAIT timeout."""
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.key == key and words in e.value.problem, str(e.value)


def test_check_config_prints_the_line_and_fails(tmp_path: Path) -> None:
    """`twisted-rt check-config` says the same as the start would: one line, non-zero exit; 0 for a good file."""
    bad = tmp_path / "bad.toml"
    bad.write_text(broker('url = "redis://h:6379/0"\nsentinels = ["h:26379"]\nsentinel_master = "rt"'))
    r = subprocess.run([str(BIN / "twisted-rt"), "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert lines == [f"{bad}: broker.sentinels: give url or sentinels, not both"]
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    r = subprocess.run([str(BIN / "twisted-rt"), "check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

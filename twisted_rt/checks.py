# -*- test-case-name: tests.test_config -*-
"""
Everything checked before the daemon starts: the config's pure checks
(L{twisted_rt.core.config}: types, enumerations, the relations within each
section), then the check of every key whose owner lives above the core and
reads files (L{OWNER_CHECKS}: the C{ssl:} listeners and C{[tls]} files in
L{twisted_rt.web.tls.check}, C{[auth] jwt_public_key_file} with
L{twisted_rt.core.auth.load_public_key}, and each C{[[destinations]]}
C{ca_file} and URL host in L{twisted_rt.outbound.check}).

C{twistd rt} and C{twisted-rt check-config} go through here; the first
problem is one L{ConfigError} line naming the key.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

from twisted_rt import outbound
from twisted_rt.core import config as _config
from twisted_rt.core.auth import load_public_key
from twisted_rt.core.config import Config, ConfigError
from twisted_rt.web import tls

__all__ = ["OWNER_CHECKS", "check", "check_file", "load", "parse"]


def _jwt_public_key_file(cfg: Config) -> None:
    """C{[auth] jwt_public_key_file} names a readable PEM public key that JWTs can be checked with."""
    path = cfg.auth.jwt_public_key_file
    if not path:
        return
    key = "auth.jwt_public_key_file"
    if not os.path.isfile(path):
        raise ConfigError(key, f"no such file: {path}")
    try:
        with open(path, "rb") as f:
            load_public_key(f.read())
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(key, f"{path}: {e}") from None


#: The owners' checks of a config the pure checks passed, in order; each
#: raises L{ConfigError}.
OWNER_CHECKS: tuple[Callable[[Config], None], ...] = (tls.check, _jwt_public_key_file, outbound.check)


def _owners(cfg: Config) -> Config:
    for owner_check in OWNER_CHECKS:
        owner_check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """
    Every check of a config (one built in code, or after command-line
    overrides).  @raise ConfigError: the first problem.
    """
    _config.validate(cfg)
    _owners(cfg)


def parse(text: str, env: Mapping[str, str] | None = None) -> Config:
    """TOML text, parsed and checked whole.  @raise ConfigError: the first problem."""
    return _owners(_config.parse(text, env))


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    """A config file, read and checked whole.  @raise ConfigError: the first problem."""
    return parse(_config.read(path), env)


def check_file(path: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The problems of a config file, one line each (empty when it is good)."""
    try:
        load(path, env)
    except ConfigError as e:
        return [str(e)]
    return []

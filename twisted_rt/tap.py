# -*- test-case-name: tests.test_daemon -*-
"""
The C{rt} plugin for C{twistd} and C{twist}: command-line options and
L{makeService}.

A bad config stops the start here, before any service exists, with one
line on stderr naming the key and the problem, and exit status 1.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from twisted_rt.core.config import Config, ConfigError, load, validate

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Options of C{twistd rt} / C{twist rt}."""

    synopsis = "[--config PATH] [--listen ENDPOINT]... [--journal PATH] [--log-format text|json]"
    longdesc = (
        "The twisted_rt real-time event daemon.  With no options it serves on tcp:8080 "
        "with its SQLite journal under ./var/."
    )
    optParameters = [
        ["config", "c", None, "The TOML config file (conf/twisted-rt.toml is the documented sample)."],
        ["journal", "j", None, "The journal's SQLite path (':memory:' allowed); overrides [journal] path."],
        ["log-format", None, None, "text (default) or json: one JSON object per log line."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on this Twisted endpoint (repeatable), e.g. tcp:8080,
        ssl:8443:privateKey=key.pem:certKey=cert.pem, systemd:domain=INET:index=0.
        Overrides [server] listen.
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        try:
            cfg = load(self["config"]) if self["config"] else Config()
            cfg = cfg.with_overrides(listen=self["listen"], journal=self["journal"])
            fmt = self["log-format"]
            if fmt is not None:
                if fmt not in ("text", "json"):
                    raise ConfigError("--log-format", "expected text or json")
                from dataclasses import replace

                cfg = replace(cfg, log_format=fmt)
            validate(cfg)
        except ConfigError as e:
            where = self["config"] or "command line"
            raise SystemExit(f"twisted-rt: {where}: {e}") from None
        self["rtconfig"] = cfg


def makeService(options: Any) -> Any:
    """Build the daemon's service from parsed L{Options}."""
    from twisted_rt.service import RTService

    cfg = options.get("rtconfig")
    if cfg is None:  # called without postOptions (e.g. by tests)
        cfg = Config()
    return RTService(cfg)

# -*- test-case-name: tests.test_dest_engine -*-
"""
Outgoing webhooks: events delivered to HTTP endpoints (C{[[destinations]]}), durably, with retries.

Above the web layer (it uses Twisted's HTTP client and the store), below L{twisted_rt.app}:

  - L{twisted_rt.outbound._engine}: L{Outbound} and its per-destination
    L{Worker} (the at-least-once rule, retries, dead letters, pausing, the lease);
  - L{twisted_rt.outbound._http}: L{Sender}, the HTTP client of a destination;
  - L{twisted_rt.outbound._policy}: backoff, C{Retry-After}, Standard Webhooks
    signing, the headers passed on;
  - L{check}: the checks of C{[[destinations]]} that need files or the network.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

from twisted_rt.core.config import Config, ConfigError
from twisted_rt.outbound._engine import (
    LEASE_RENEW_SECONDS,
    LEASE_SECONDS,
    Outbound,
    UnknownDestination,
    Worker,
)
from twisted_rt.outbound._http import Outcome, Sender, load_ca_file
from twisted_rt.outbound._policy import backoff, forwarded_headers, retry_after, sign

__all__ = [
    "LEASE_RENEW_SECONDS",
    "LEASE_SECONDS",
    "Outbound",
    "Outcome",
    "Sender",
    "UnknownDestination",
    "Worker",
    "backoff",
    "check",
    "forwarded_headers",
    "retry_after",
    "sign",
]


def check(cfg: Config) -> None:
    """
    The owner checks of C{[[destinations]]}: a C{ca_file} is a readable PEM
    file with at least one certificate; a URL's host name resolves (a typo
    there is refused at start, one line; a receiver that is down is not: it
    is retried).  @raise ConfigError: the first problem.
    """
    for i, d in enumerate(cfg.destinations):
        key = f"destinations[{i}]"
        if d.ca_file:
            if not os.path.isfile(d.ca_file):
                raise ConfigError(f"{key}.ca_file", f"no such file: {d.ca_file}")
            try:
                load_ca_file(d.ca_file)
            except OSError as e:
                raise ConfigError(f"{key}.ca_file", f"cannot read {d.ca_file}: {e.strerror}") from None
            except ValueError as e:
                raise ConfigError(f"{key}.ca_file", f"{d.ca_file}: {e}") from None
        host = urlsplit(d.url).hostname or ""
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise ConfigError(f"{key}.url", f"the host {host!r} does not resolve ({e})") from None

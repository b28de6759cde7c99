# -*- test-case-name: tests.test_cli -*-
"""
The C{twisted-rt} console script.

Sub-commands (see CONTRACT.md "Launch"): C{check-config}, C{token},
C{publish}, C{tail}, C{gen-cert}.  Each returns an exit status; problems are
one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

__all__ = ["main"]


def _check_config(args: argparse.Namespace) -> int:
    from twisted_rt.checks import check_file

    problems = check_file(args.path)
    for p in problems:
        print(f"{args.path}: {p}", file=sys.stderr)
    if not problems:
        print(f"{args.path}: ok")
    return 1 if problems else 0


def _token(args: argparse.Namespace) -> int:
    from twisted_rt.checks import load
    from twisted_rt.core.auth import Authenticator, validate_info
    from twisted_rt.core.config import AuthConfig, ConfigError
    from twisted_rt.core.matcher import PatternError, validate_pattern
    from twisted_rt.interfaces import AuthError

    try:
        auth = load(args.config).auth if args.config else AuthConfig()
    except ConfigError as e:
        print(f"twisted-rt token: {args.config}: {e}", file=sys.stderr)
        return 1
    if args.secret:
        auth = AuthConfig(jwt_secret=args.secret, jwt_audience=auth.jwt_audience)
    if not auth.jwt_secret:
        print("twisted-rt token: the config has no [auth] jwt_secret to sign with", file=sys.stderr)
        return 1
    try:
        for p in [*args.subscribe, *args.publish]:
            validate_pattern(p)
    except PatternError as e:
        print(f"twisted-rt token: {e}", file=sys.stderr)
        return 2
    aud: str | list[str] | None = None
    if args.aud:
        if not all(a.strip() for a in args.aud):
            print("twisted-rt token: --aud may not be empty", file=sys.stderr)
            return 2
        aud = args.aud[0] if len(args.aud) == 1 else list(args.aud)
    info: Any = None
    if args.info is not None:
        # the presence member's description, checked as the daemon checks it
        try:
            parsed = json.loads(args.info)
            validate_info(parsed)
        except ValueError as e:
            print(f"twisted-rt token: --info is not JSON: {e}", file=sys.stderr)
            return 2
        except AuthError as e:
            print(f"twisted-rt token: --info: {e.message}", file=sys.stderr)
            return 2
        info = parsed
    # without --aud, the config's [auth] jwt_audience (when set) is the token's aud
    print(Authenticator(auth).mint(args.sub, args.subscribe, args.publish, args.ttl, aud=aud, info=info))
    return 0


def _gen_cert(args: argparse.Namespace) -> int:
    from twisted_rt.web.tls import gen_cert

    paths = gen_cert(args.host, args.out)
    for p in paths:
        print(p)
    return 0


def _publish(args: argparse.Namespace) -> int:
    from twisted_rt.client import publish_main

    return publish_main(args)


def _tail(args: argparse.Namespace) -> int:
    from twisted_rt.client import tail_main

    return tail_main(args)


def parser() -> argparse.ArgumentParser:
    """The argument parser of C{twisted-rt}."""
    p = argparse.ArgumentParser(prog="twisted-rt", description="twisted_rt tools")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("path")
    c.set_defaults(func=_check_config)

    t = sub.add_parser("token", help="print a JWT signed with the config's jwt_secret")
    t.add_argument("--config", help="the daemon's TOML config (for [auth] jwt_secret)")
    t.add_argument("--secret", help=argparse.SUPPRESS)
    t.add_argument("--sub", required=True, help="the token's subject")
    t.add_argument("--subscribe", action="append", default=[], metavar="PATTERN")
    t.add_argument("--publish", action="append", default=[], metavar="PATTERN")
    t.add_argument("--ttl", type=int, default=3600, metavar="SECONDS")
    t.add_argument("--aud", action="append", default=[], metavar="AUDIENCE",
                   help="the token's aud claim (repeatable); default: the config's [auth] jwt_audience, if set")
    t.add_argument("--info", default=None, metavar="JSON",
                   help='the info claim: a presence member\'s description, a JSON object of at most 1 KiB, e.g. \'{"name": "Alice"}\'')
    t.set_defaults(func=_token)

    pub = sub.add_parser("publish", help="publish one event")
    pub.add_argument("channel")
    pub.add_argument("data", help="the event's JSON data")
    pub.add_argument("--url", default="http://127.0.0.1:8080", metavar="HTTP_URL")
    pub.add_argument("--token", default=None, metavar="KEY_OR_JWT")
    pub.add_argument("--id", default=None, help="idempotency key")
    pub.set_defaults(func=_publish)

    tl = sub.add_parser("tail", help="print events as JSON lines")
    tl.add_argument("patterns", nargs="+", metavar="PATTERN")
    tl.add_argument("--url", default="ws://127.0.0.1:8080/ws", metavar="WS_URL")
    tl.add_argument("--token", default=None)
    tl.add_argument("--since", type=int, default=None, metavar="N")
    tl.add_argument("--forward", default=None, metavar="HTTP_URL")
    tl.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    tl.set_defaults(func=_tail)

    g = sub.add_parser("gen-cert", help="a self-signed certificate and key for development")
    g.add_argument("--host", default="localhost")
    g.add_argument("--out", default=".")
    g.set_defaults(func=_gen_cert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run C{twisted-rt}; returns the exit status."""
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

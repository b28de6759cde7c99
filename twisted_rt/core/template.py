# -*- test-case-name: tests.test_template -*-
"""
The channel template of a webhook source (C{[[sources]] channel}): the one
grammar, used by the config check and by C{/hooks} when it routes a delivery.

A template is literal text and placeholders::

    template    = 1*( text / placeholder )
    text        = 1*( ALPHA / DIGIT / "_" / "-" / "." / ":" / "@" )
    placeholder = "{source}" / "{header:" name "}" / "{json:" path "}"
    name, path  = 1*( any character but "{" and "}" )

C{{source}} is the source's name, C{{header:Name}} a request header (any
case), C{{json:a.b.0}} a string or integer field of the parsed body (list
indices as numbers).  L{ChannelTemplate} parses a template once and raises
L{TemplateError} on a bad one, whose message is the config's one-line
problem; L{ChannelTemplate.render} fills it in for one delivery.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from twisted_rt.core.matcher import ChannelError, validate_channel

__all__ = ["ChannelTemplate", "TemplateError", "Unroutable", "template_problem"]

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TEXT = re.compile(r"[A-Za-z0-9_\-.:@]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-.:@]")


class TemplateError(ValueError):
    """A channel template that does not follow the grammar; C{str()} says what is wrong."""


class Unroutable(ValueError):
    """
    A delivery the template cannot route: a header or body field it names is
    missing, or the filled-in channel is not valid.  C{str()} says which.
    """


def template_problem(template: str) -> str | None:
    """What is wrong with a channel template, or C{None} when it follows the grammar."""
    if not template:
        return "must not be empty"
    for m in _PLACEHOLDER.finditer(template):
        inner = m.group(1)
        if inner == "source":
            continue
        kind, _, arg = inner.partition(":")
        if kind not in ("header", "json") or not arg:
            return f"unknown placeholder {{{inner}}} (expected {{source}}, {{header:Name}} or {{json:path}})"
    rest = _PLACEHOLDER.sub("x", template)
    if "{" in rest or "}" in rest:
        return "unbalanced braces"
    if not _TEXT.fullmatch(rest):
        return "contains characters not allowed in a channel name"
    return None


class ChannelTemplate:
    """
    A parsed C{channel} template.

    Filled-in values have every character not allowed in a channel name
    replaced by C{_} (GitLab's C{Push Hook} becomes C{Push_Hook}, Shopify's
    C{orders/create} becomes C{orders_create}); dots are kept as segment
    separators.

    @ivar template: the template as written.
    @ivar parts: C{(kind, argument)} in order: C{("text", str)} (C{{source}}
        is text here), C{("header", (lower-case name, name))} or
        C{("json", (path, path split on dots))}.
    @ivar static: the channel when the template has no header or json
        placeholder, else C{None}.
    @raise TemplateError: the template does not follow the grammar.
    """

    def __init__(self, template: str, source: str) -> None:
        problem = template_problem(template)
        if problem is not None:
            raise TemplateError(problem)
        self.template = template
        self.parts: list[tuple[str, Any]] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(template):
            if m.start() > pos:
                self.parts.append(("text", template[pos : m.start()]))
            kind, _, arg = m.group(1).partition(":")
            if kind == "source":
                self.parts.append(("text", source))
            elif kind == "header":
                self.parts.append(("header", (arg.lower(), arg)))
            else:
                self.parts.append(("json", (arg, arg.split("."))))
            pos = m.end()
        if pos < len(template):
            self.parts.append(("text", template[pos:]))
        self.static: str | None = None
        if all(kind == "text" for kind, _ in self.parts):
            self.static = "".join(arg for _, arg in self.parts)

    def render(self, headers: Mapping[str, str], data: Any) -> str:
        """
        The channel of one delivery.

        @param headers: the request's headers by lower-case name.
        @param data: the parsed body.
        @raise Unroutable: naming the part that could not be filled, or the
            invalid result.
        """
        if self.static is not None:
            channel = self.static
        else:
            out: list[str] = []
            for kind, arg in self.parts:
                if kind == "text":
                    out.append(arg)
                elif kind == "header":
                    value = headers.get(arg[0])
                    if not value:
                        raise Unroutable(f"the channel template needs the {arg[1]} header, which is missing")
                    out.append(_UNSAFE.sub("_", value))
                else:
                    found = _lookup(data, arg[1])
                    if found is None:
                        raise Unroutable(
                            f"the channel template needs the body field {arg[0]}, which is missing or not a"
                            " string or number"
                        )
                    out.append(_UNSAFE.sub("_", found))
            channel = "".join(out)
        try:
            return validate_channel(channel)
        except ChannelError as e:
            raise Unroutable(f"the channel template {self.template!r} gave {channel!r}, which is invalid: {e}") from None


def _lookup(data: Any, path: list[str]) -> str | None:
    """The string or integer at C{path} in a parsed body, or C{None}."""
    for key in path:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        else:
            return None
    if isinstance(data, str):
        return data or None
    if isinstance(data, int) and not isinstance(data, bool):
        return str(data)
    return None

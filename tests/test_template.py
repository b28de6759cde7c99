"""The channel-template grammar: one parser for the config check and for routing a delivery."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_rt.core.config import ConfigError, parse
from twisted_rt.core.template import ChannelTemplate, TemplateError, Unroutable, template_problem

_TEXT_CHARS = "abcXYZ019_-.:@"
text = st.text(alphabet=_TEXT_CHARS, min_size=1, max_size=8)
arg = st.text(alphabet=st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), min_size=1,
              max_size=8)
placeholder = st.one_of(
    st.just("{source}"),
    arg.map(lambda a: "{header:" + a + "}"),
    arg.map(lambda a: "{json:" + a + "}"),
)
good_template = st.lists(st.one_of(text, placeholder), min_size=1, max_size=6).map("".join)


@given(good_template)
def test_every_template_of_the_grammar_parses_and_its_parts_spell_it(template: str) -> None:
    """A template made of text and the three placeholders parses; its parts give back the template."""
    t = ChannelTemplate(template, "src")
    spelled = []
    for kind, value in t.parts:
        if kind == "text":
            spelled.append(value)
        elif kind == "header":
            assert value[0] == value[1].lower()
            spelled.append("{header:" + value[1] + "}")
        else:
            assert value[1] == value[0].split(".")
            spelled.append("{json:" + value[0] + "}")
    assert "".join(spelled) == template.replace("{source}", "src")
    assert t.template == template
    assert (t.static is None) == any(kind != "text" for kind, _ in t.parts)


# The grammar of the module docstring, written once more as one regular expression.
_GRAMMAR = re.compile(r"(?:[A-Za-z0-9_\-.:@]|\{source\}|\{(?:header|json):[^{}]+\})+")
noise = st.sampled_from(["{", "}", "{}", "{header:}", "{json:}", "{x}", "{body:a}", " ", "\n", "/", "{source"])
any_template = st.one_of(
    st.text(max_size=20),
    st.lists(st.one_of(text, placeholder, noise), max_size=6).map("".join),
)


@given(any_template)
def test_a_string_parses_exactly_when_it_follows_the_grammar(template: str) -> None:
    """ChannelTemplate accepts a string iff it matches the documented grammar; else one line says why."""
    if _GRAMMAR.fullmatch(template):
        ChannelTemplate(template, "src")
        assert template_problem(template) is None
    else:
        with pytest.raises(TemplateError) as e:
            ChannelTemplate(template, "src")
        assert str(e.value) == template_problem(template)
        assert str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("", "must not be empty"),
        ("a.{header:}", "unknown placeholder {header:} (expected {source}, {header:Name} or {json:path})"),
        ("a.{json:}", "unknown placeholder {json:} (expected {source}, {header:Name} or {json:path})"),
        ("a.{body:x}", "unknown placeholder {body:x} (expected {source}, {header:Name} or {json:path})"),
        ("a.{x}", "unknown placeholder {x} (expected {source}, {header:Name} or {json:path})"),
        ("a.{source", "unbalanced braces"),
        ("a}.{source}", "unbalanced braces"),
        ("a b.{source}", "contains characters not allowed in a channel name"),
        ("a.{source}\n", "contains characters not allowed in a channel name"),
    ],
)
def test_bad_templates_are_refused_with_one_line(template: str, problem: str) -> None:
    """Each kind of bad template raises TemplateError (a ValueError) with the config's message."""
    with pytest.raises(TemplateError) as e:
        ChannelTemplate(template, "src")
    assert str(e.value) == problem
    assert isinstance(e.value, ValueError)


def test_config_refuses_what_the_router_refuses() -> None:
    """The config check is the same grammar: {header:} is refused there too, naming sources[i].channel."""
    with pytest.raises(ConfigError) as e:
        parse('[[sources]]\nname = "a"\nverify = "none"\nchannel = "a.{header:}"\n', {})
    assert str(e.value) == (
        "sources[0].channel: unknown placeholder {header:} (expected {source}, {header:Name} or {json:path})"
    )
    cfg = parse('[[sources]]\nname = "a"\nverify = "none"\nchannel = "a.{header:X-Kind}.{json:b.0}"\n', {})
    assert ChannelTemplate(cfg.sources[0].channel, "a").parts == [
        ("text", "a."), ("header", ("x-kind", "X-Kind")), ("text", "."), ("json", ("b.0", ["b", "0"])),
    ]


def test_static_template_and_source() -> None:
    """A template without header or json placeholders is one channel, {source} the source's name."""
    t = ChannelTemplate("hooks.{source}", "stripe")
    assert t.parts == [("text", "hooks."), ("text", "stripe")]
    assert t.static == "hooks.stripe"
    assert t.render({}, None) == "hooks.stripe"


@pytest.mark.parametrize(
    ("headers", "data", "channel"),
    [
        ({"x-kind": "push"}, {"a": [{"b": "x"}]}, "gh.push.x"),
        ({"x-kind": "Push Hook"}, {"a": [{"b": 7}]}, "gh.Push_Hook.7"),
        ({"x-kind": "orders/create"}, {"a": [{"b": "a.b"}]}, "gh.orders_create.a.b"),
    ],
)
def test_render_fills_headers_and_body_fields(headers: dict[str, str], data: Any, channel: str) -> None:
    """Headers (by lower-case name) and body fields (dots, list indices) fill in; unsafe characters become _."""
    t = ChannelTemplate("gh.{header:X-Kind}.{json:a.0.b}", "gh")
    assert t.static is None
    assert t.render(headers, data) == channel


@pytest.mark.parametrize(
    ("headers", "data", "message"),
    [
        ({}, {"a": [{"b": "x"}]}, "the channel template needs the X-Kind header, which is missing"),
        ({"x-kind": ""}, {"a": [{"b": "x"}]}, "the channel template needs the X-Kind header, which is missing"),
        ({"x-kind": "p"}, {"a": []}, "the channel template needs the body field a.0.b, which is missing or not a"
                                     " string or number"),
        ({"x-kind": "p"}, {"a": [{"b": True}]}, "the channel template needs the body field a.0.b, which is"
                                                " missing or not a string or number"),
        ({"x-kind": "p"}, {"a": [{"b": ""}]}, "the channel template needs the body field a.0.b, which is"
                                              " missing or not a string or number"),
        ({"x-kind": "p"}, "text body", "the channel template needs the body field a.0.b, which is missing or"
                                       " not a string or number"),
        ({"x-kind": "p"}, {"a": [{"b": ".."}]}, "the channel template 'gh.{header:X-Kind}.{json:a.0.b}' gave"
                                                " 'gh.p...', which is invalid: a channel may not have an empty"
                                                " segment"),
    ],
)
def test_render_names_what_it_could_not_fill(headers: dict[str, str], data: Any, message: str) -> None:
    """A missing header or field, or an invalid result, raises Unroutable naming it."""
    t = ChannelTemplate("gh.{header:X-Kind}.{json:a.0.b}", "gh")
    with pytest.raises(Unroutable) as e:
        t.render(headers, data)
    assert str(e.value) == message

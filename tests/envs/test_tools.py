"""Tests of gradus.envs.tools: every branch of both call styles by hand, hostile texts, and a property test
that parsing never raises on any text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradus.envs.tools import (
    QUOTE_CHARS,
    STYLES,
    Malformed,
    ToolCall,
    format_result,
    parse_tool_call,
    style_for,
)
from gradus.models import build_char_tokenizer


def call(body: str) -> str:
    return f"<tool_call>{body}</tool_call>"


def reason(text: str, style: str) -> str:
    """The reason of a call that must be malformed."""
    parsed = parse_tool_call(text, style)
    assert isinstance(parsed, Malformed), parsed
    assert "\n" not in parsed.reason
    return parsed.reason


# --- tag style -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<tool>calc: 1+2</tool>", ToolCall("calc", "1+2")),
        # text around the call is the model's thinking, not part of it
        ("Let me compute. <tool>calc: 1+2</tool> then answer", ToolCall("calc", "1+2")),
        # name and argument are stripped; the argument keeps inner spaces and newlines
        ("<tool>  calc  :  (1 + 2) *\n3  </tool>", ToolCall("calc", "(1 + 2) *\n3")),
        # only the first ':' separates: the argument may hold more
        ("<tool>lookup: a:b:c</tool>", ToolCall("lookup", "a:b:c")),
        ("<tool>_x9: </tool>", ToolCall("_x9", "")),
        # first call only: the second waits for the first's result
        ("<tool>a: 1</tool><tool>b: 2</tool>", ToolCall("a", "1")),
        # a stray closing tag before the call is ignored
        ("</tool> <tool>a: 1</tool>", ToolCall("a", "1")),
    ],
)
def test_tag_calls(text: str, expected: ToolCall) -> None:
    assert parse_tool_call(text, "tag") == expected


@pytest.mark.parametrize("text", ["", "no call here", "</tool>", "<tools>calc: 1</tools>", "<TOOL>a: 1</TOOL>",
                                  "<tool_call>{\"name\": \"a\"}</tool_call>"])
def test_tag_without_call_is_none(text: str) -> None:
    assert parse_tool_call(text, "tag") is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("<tool>calc: 1+2", "<tool> is never closed by </tool>: 'calc: 1+2'"),
        ("<tool>calc 1+2</tool>", "no ':' in 'calc 1+2'"),
        ("<tool>: 1+2</tool>", "the tool name is empty"),
        ("<tool>   : 1+2</tool>", "the tool name is empty"),
        ("<tool>9calc: 1</tool>", "invalid tool name '9calc'"),
        ("<tool>my calc: 1</tool>", "invalid tool name 'my calc'"),
        ("<tool>my-calc: 1</tool>", "invalid tool name 'my-calc'"),
        ("<tool>calcé: 1</tool>", "invalid tool name 'calcé'"),
        ("<tool>a: <tool>b: 2</tool></tool>", "a second <tool> opens before the first is closed by </tool>"),
    ],
)
def test_tag_malformed(text: str, words: str) -> None:
    assert words in reason(text, "tag")


# --- json style ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # one key: its value, as text
        (call('{"name": "calc", "arguments": {"expression": "1+2"}}'), ToolCall("calc", "1+2")),
        # Qwen writes the call on its own lines
        ('I will call it.\n<tool_call>\n{"name": "calc", "arguments": {"expression": "1+2"}}\n</tool_call>',
         ToolCall("calc", "1+2")),
        # one key whose value is not a string: the value as JSON
        (call('{"name": "add", "arguments": {"numbers": [1, 2.5]}}'), ToolCall("add", "[1, 2.5]")),
        (call('{"name": "neg", "arguments": {"x": -3}}'), ToolCall("neg", "-3")),
        (call('{"name": "flag", "arguments": {"on": true}}'), ToolCall("flag", "true")),
        # several keys: the whole object as JSON, in the model's key order
        (call('{"name": "pow", "arguments": {"base": 2, "exp": "10"}}'), ToolCall("pow", '{"base": 2, "exp": "10"}')),
        # no arguments: the empty text
        (call('{"name": "now"}'), ToolCall("now", "")),
        (call('{"name": "now", "arguments": null}'), ToolCall("now", "")),
        (call('{"name": "now", "arguments": {}}'), ToolCall("now", "")),
        # a string is the argument itself (OpenAI style sends a JSON string; the tool reads it)
        (call('{"name": "calc", "arguments": "1+2"}'), ToolCall("calc", "1+2")),
        # unicode survives as it is, not as \\u escapes
        (call('{"name": "echo", "arguments": {"a": "héllo", "b": "日本"}}'),
         ToolCall("echo", '{"a": "héllo", "b": "日本"}')),
        (call('{"name": "echo", "arguments": {"t": "\\u00e9"}}'), ToolCall("echo", "é")),
        # first call only
        (call('{"name": "a"}') + call('{"name": "b"}'), ToolCall("a", "")),
    ],
)
def test_json_calls(text: str, expected: ToolCall) -> None:
    assert parse_tool_call(text, "json") == expected


@pytest.mark.parametrize("text", ["", "plain answer: 3", "<tool>calc: 1</tool>", "</tool_call>",
                                  '{"name": "calc"}'])
def test_json_without_call_is_none(text: str) -> None:
    assert parse_tool_call(text, "json") is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('<tool_call>{"name": "calc"}', "<tool_call> is never closed by </tool_call>"),
        (call('{"name": "calc", "arguments": {"x": 1}'), "invalid JSON in the tool call (Expecting ',' delimiter"),
        (call("name: calc"), "invalid JSON in the tool call (Expecting value at character 0): 'name: calc'"),
        (call(""), "invalid JSON in the tool call (Expecting value at character 0): ''"),
        (call('["calc", "1+2"]'), "must be a JSON object, not a list"),
        (call('"calc"'), "must be a JSON object, not a string"),
        (call('{"tool": "calc", "arguments": {}}'), 'the tool call has no "name"'),
        (call('{"name": "", "arguments": {}}'), "the tool name is empty"),
        (call('{"name": 7}'), "the tool name must be a string, not a number"),
        (call('{"name": null}'), "the tool name must be a string, not null"),
        (call('{"name": "my calc"}'), "invalid tool name 'my calc'"),
        (call('{"name": "calc", "arguments": [1, 2]}'), '"arguments" must be a JSON object, not a list'),
        (call('{"name": "calc", "arguments": 3}'), '"arguments" must be a JSON object, not a number'),
        ('<tool_call>{"name": "a", <tool_call>{"name": "b"}</tool_call>', "a second <tool_call> opens"),
    ],
)
def test_json_malformed(text: str, words: str) -> None:
    assert words in reason(text, "json")


# --- hostile texts ---------------------------------------------------------------------------------------


def test_quotes_are_cut_to_one_short_line() -> None:
    long_body = "x" * 10_000 + "\n" * 10
    texts = [("<tool>" + long_body, "tag"), (call(long_body), "json"), ("<tool>" + long_body + "</tool>", "tag")]
    for text, style in texts:
        said = reason(text, style)
        # the quote is repr of QUOTE_CHARS characters (+2 quote marks) and "..."; the rest is the fixed words
        assert "x" * QUOTE_CHARS in said and "x" * (QUOTE_CHARS + 1) not in said
        assert said.endswith("...") and len(said) < QUOTE_CHARS + 120


def test_huge_and_deep_texts() -> None:
    huge = "a" * 2_000_000
    assert parse_tool_call(huge, "tag") is None
    assert parse_tool_call(huge, "json") is None
    assert parse_tool_call(f"<tool>calc: {huge}</tool>", "tag") == ToolCall("calc", huge)
    huge_call = call(json.dumps({"name": "echo", "arguments": {"t": huge}}))
    assert parse_tool_call(huge_call, "json") == ToolCall("echo", huge)
    # nesting deep enough to exhaust the JSON reader's recursion: a reason, not a RecursionError
    assert "invalid JSON" in reason(call("[" * 100_000 + "]" * 100_000), "json")
    assert "invalid JSON" in reason(call('{"name": "a", "arguments": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"),
                                    "json")
    # an integer longer than Python reads from text (4300 digits) is a reason too
    assert "invalid JSON" in reason(call('{"name": "a", "arguments": {"x": ' + "9" * 5000 + "}}"), "json")


def test_nested_and_unicode_tags() -> None:
    assert parse_tool_call("<tool><tool>a: 1</tool>", "tag") == Malformed(
        "a second <tool> opens before the first is closed by </tool>: '<tool>a: 1'")
    # a closing tag inside a JSON string ends the call there, as the model's stop would: what is left is not JSON
    assert "invalid JSON" in reason(call('{"name": "a", "arguments": {"t": "</tool_call>"}}'), "json")
    assert parse_tool_call("🙂<tool>emoji: 🙂 ü\u0301</tool>", "tag") == ToolCall("emoji", "🙂 ü\u0301")
    # full-width colon and look-alike letters are not the syntax
    assert "no ':'" in reason("<tool>calc： 1</tool>", "tag")
    assert "invalid tool name" in reason("<tool>саlc: 1</tool>", "tag")  # Cyrillic 'с' and 'а'
    assert parse_tool_call("<tool>a:\x00b</tool>", "tag") == ToolCall("a", "\x00b")


@settings(max_examples=300, deadline=None)
@given(text=st.text(), style=st.sampled_from(STYLES))
def test_parse_never_raises_on_any_text(text: str, style: str) -> None:
    parsed = parse_tool_call(text, style)
    assert parsed is None or isinstance(parsed, (ToolCall, Malformed))
    if isinstance(parsed, Malformed):
        assert "\n" not in parsed.reason


_fragments = st.sampled_from(["<tool>", "</tool>", "<tool_call>", "</tool_call>", ":", "{", "}", "[", "]", '"',
                              '"name"', '"arguments"', "calc", " ", "\n", "1", ",", "null", "é"])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_fragments | st.text(max_size=5), max_size=30), style=st.sampled_from(STYLES))
def test_parse_never_raises_on_near_calls(parts: list[str], style: str) -> None:
    # plain random text rarely holds a tag; these texts are made of the syntax's pieces
    parsed = parse_tool_call("".join(parts), style)
    assert parsed is None or isinstance(parsed, (ToolCall, Malformed))


@given(name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
       argument=st.text().filter(lambda a: "</tool>" not in a and "<tool>" not in a))
def test_tag_round_trip(name: str, argument: str) -> None:
    # what a model writes in the documented format comes back, stripped
    assert parse_tool_call(f"<tool>{name}: {argument}</tool>", "tag") == ToolCall(name, argument.strip())


# --- results and styles ----------------------------------------------------------------------------------


def test_format_result() -> None:
    assert format_result("3", "tag") == "<result>3</result>"
    assert format_result("", "tag") == "<result></result>"
    assert format_result('{"value": 3}', "json") == '{"value": 3}'


def test_unknown_style_is_the_callers_error() -> None:
    for fn in (lambda: parse_tool_call("x", "xml"), lambda: format_result("x", "xml")):
        with pytest.raises(ValueError, match="unknown tool-call style 'xml'; the styles are tag, json"):
            fn()


def test_style_for() -> None:
    tokenizer = build_char_tokenizer()
    assert style_for(tokenizer) == "tag"
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert style_for(tokenizer) == "json"

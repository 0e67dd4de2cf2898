"""Tool calls in the model's text, and how a tool's result is written back: pure functions, no tokenizer work.

Two styles, one per kind of tokenizer (`style_for`), because the model can only learn a format it is shown:

- "tag", for a tokenizer without a chat template (the built-in char tokenizer): the model writes
  `<tool>name: argument</tool>` and the result comes back as `<result>text</result>`, plain text that the
  renderer encodes as it is. Short tags, because every character is a token for the tiny models.
- "json", for a chat template (the Hermes format that Qwen2.5 and Qwen3 are trained on): the model writes
  `<tool_call>{"name": "calc", "arguments": {"expression": "1+2"}}</tool_call>` and the result is the text
  as it is, sent as a message of role "tool", which the chat template wraps in its own markup.

A tool takes one text argument (`gradus.envs.base`). A JSON call's `arguments` become that text by one rule:
no arguments (absent, null or {}) give ""; an object with one key gives that value (a string as it is, any
other value as JSON), so `{"expression": "1+2"}` calls the tool with `1+2`; an object with several keys gives
the whole object as JSON, for the tool to parse; a string is taken as the argument itself.

Only the first call of a turn counts: the environment answers it and the model sees the result before it can
make another. Parsing never raises on the model's text: what is wrong comes back as `Malformed`, whose reason
(one line, quoting at most 80 characters) becomes the observation, so the model can learn from its mistake.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

STYLES: tuple[str, ...] = ("tag", "json")

# The tags of each style: (call opens, call closes).
_TAGS: dict[str, tuple[str, str]] = {"tag": ("<tool>", "</tool>"), "json": ("<tool_call>", "</tool_call>")}

# A tool name is an identifier, as in a Python function name or an OpenAI function name without '-'.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# How much of an offending text a reason quotes: enough to recognise it, short enough for one line.
QUOTE_CHARS = 80


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call: the tool's name and its one text argument."""

    name: str
    argument: str


@dataclass(frozen=True)
class Malformed:
    """A call the model got wrong; `reason` says what, in one line."""

    reason: str


def quote(text: str) -> str:
    """`text` quoted on one line (repr escapes newlines), cut to QUOTE_CHARS characters with '...' after."""
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return repr(text[:QUOTE_CHARS]) + "..."


def check_style(style: str) -> None:
    """A style outside STYLES is the caller's error, not the model's: raise, naming the valid ones."""
    if style not in STYLES:
        raise ValueError(f"unknown tool-call style {style!r}; the styles are {', '.join(STYLES)}")


def style_for(tokenizer: Any) -> str:
    """The style a model with this tokenizer is prompted in: "json" with a chat template, else "tag"
    (the same test as `Task.render_prompt`, so prompts and tool calls agree)."""
    return "json" if getattr(tokenizer, "chat_template", None) else "tag"


def format_result(text: str, style: str) -> str:
    """A tool's result (or error) as the text of the observation: wrapped in <result> for "tag"; as it is
    for "json", whose chat template wraps the tool message itself."""
    check_style(style)
    return f"<result>{text}</result>" if style == "tag" else text


def parse_tool_call(text: str, style: str) -> ToolCall | Malformed | None:
    """The first tool call in the model's turn `text`: a ToolCall, Malformed (saying what is wrong), or None
    when the turn holds no call. Raises only for an unknown `style`."""
    check_style(style)
    body = tagged_body(text, *_TAGS[style])
    if body is None or isinstance(body, Malformed):
        return body
    return parse_tag_body(body) if style == "tag" else parse_json_body(body)


def tagged_body(text: str, opening: str, closing: str) -> str | Malformed | None:
    """The text between the first `opening` and the `closing` after it; None when `opening` is absent.

    A second `opening` before the `closing` is refused rather than read as part of the argument: it means
    the model lost track of its call, and saying so teaches more than a call with a garbled argument."""
    start = text.find(opening)
    if start < 0:
        return None
    start += len(opening)
    end = text.find(closing, start)
    if end < 0:
        return Malformed(f"{opening} is never closed by {closing}: {quote(text[start:])}")
    body = text[start:end]
    if opening in body:
        return Malformed(f"a second {opening} opens before the first is closed by {closing}: {quote(body)}")
    return body


def check_name(name: Any) -> Malformed | None:
    """None when `name` is a valid tool name, else what is wrong with it."""
    if not isinstance(name, str):
        return Malformed(f"the tool name must be a string, not {json_kind(name)}")
    if not name:
        return Malformed("the tool name is empty")
    if not _NAME.fullmatch(name):
        return Malformed(f"invalid tool name {quote(name)}: use letters, digits and '_', not starting with a digit")
    return None


def parse_tag_body(body: str) -> ToolCall | Malformed:
    """`name: argument` -> ToolCall(name, argument), both stripped of surrounding whitespace."""
    name, colon, argument = body.partition(":")
    if not colon:
        return Malformed(f"a tool call is <tool>name: argument</tool>; no ':' in {quote(body)}")
    name = name.strip()
    return check_name(name) or ToolCall(name, argument.strip())


def parse_json_body(body: str) -> ToolCall | Malformed:
    """`{"name": ..., "arguments": ...}` -> ToolCall, with the arguments made one text (module docstring)."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as exc:
        return Malformed(f"invalid JSON in the tool call ({exc.msg} at character {exc.pos}): {quote(body.strip())}")
    except (ValueError, RecursionError) as exc:  # an integer too long to read, nesting too deep
        return Malformed(f"invalid JSON in the tool call ({type(exc).__name__}): {quote(body.strip())}")
    if not isinstance(call, dict):
        return Malformed(f"the tool call must be a JSON object, not {json_kind(call)}: {quote(body.strip())}")
    if "name" not in call:
        return Malformed(f"the tool call has no \"name\": {quote(body.strip())}")
    bad_name = check_name(call["name"])
    if bad_name is not None:
        return bad_name
    argument = argument_text(call.get("arguments"))
    if isinstance(argument, Malformed):
        return argument
    return ToolCall(call["name"], argument)


def argument_text(arguments: Any) -> str | Malformed:
    """A JSON call's `arguments` as the tool's one text argument, by the rule of the module docstring."""
    if arguments is None:
        return ""
    if isinstance(arguments, str):
        return arguments
    if not isinstance(arguments, dict):
        return Malformed(f"\"arguments\" must be a JSON object, not {json_kind(arguments)}")
    if not arguments:
        return ""
    if len(arguments) == 1:
        (value,) = arguments.values()
        return value if isinstance(value, str) else to_json(value)
    return to_json(arguments)


def to_json(value: Any) -> str | Malformed:
    """`value` (parsed from JSON) written back as JSON, keeping non-ASCII text as it is."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError) as exc:  # what json.loads read, json.dumps may still refuse
        return Malformed(f"the arguments cannot be written back as JSON ({type(exc).__name__})")


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages that speak the model's language."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")

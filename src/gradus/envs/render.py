"""How an environment's observation becomes the tokens appended after the model's turn.

An episode's token sequence is the prompt's ids, the model's turn-1 tokens as sampled, the environment's tokens,
the model's turn-2 tokens, and so on. Nothing the model produced is ever decoded and encoded again (that can
change the ids, and then the log-probabilities the update uses belong to tokens the model never sampled), so
the environment's tokens must continue the sequence exactly as if the whole conversation had been rendered at
once. This module computes them; they are masked out of the loss by the caller.

Without a chat template (the built-in char tokenizer) an observation's text is encoded as it is, and a model's
turn ends with EOS, as the training data's completions do.

With a chat template the observation is the conversation's next message (role "user", or "tool" for a tool's
result) plus the generation prompt of the next assistant turn. A chat template renders a whole conversation,
so the renderer finds the text that adding one message appends: it renders a fixed reference conversation
without and with the new message and keeps what comes after the assistant's end-of-turn token. That token
(ChatML's `<|im_end|>`) is the model's own stop token: the model samples it, so the appended text starts after
it; the newline a template writes after it is the environment's. This works only for templates that never
rewrite earlier turns when a message is added; a template that does (Qwen3 drops the reasoning of earlier
turns) is refused when the renderer is built, with the reason, rather than producing sequences the model
would never see at inference time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradus.envs.base import Observation

# The reference conversation: texts that no template has a reason to change, distinct so each can be found.
PROBE_QUESTION = "gradus probe: the question"
PROBE_REPLIES = ("gradus probe: the first reply", "gradus probe: the second reply")
PROBE_OBSERVATION = "gradus probe: the observation"

ROLES: tuple[str, ...] = ("user", "tool")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template (the test `Task.render_prompt` uses)."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer: Any, text: str) -> list[int]:
    """`text`'s ids with nothing added: any special tokens are already in the text (or must not be)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenizer_name(tokenizer: Any) -> str:
    """How messages name a tokenizer: its class and where it was loaded from."""
    where = getattr(tokenizer, "name_or_path", "")
    return f"{type(tokenizer).__name__} {where!r}" if where else f"{type(tokenizer).__name__} (built in memory)"


def short(text: str, limit: int = 120) -> str:
    """`text` quoted on one line, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


class TemplateSplitError(ValueError):
    """A chat template that cannot be split into turns whose tokens never change."""


@dataclass(frozen=True)
class ChatSplit:
    """Where a chat template's rendering of the reference conversation is cut.

    `head` is the rendering of [user question, assistant reply] up to and including the reply's end-of-turn
    text; rendering the same conversation plus any new message starts with `reference` (the rendering without
    it), and the new message's text is what follows `head`."""

    reference: tuple[dict[str, str], ...]
    rendered: str
    head: str
    end_of_turn_text: str
    end_of_turn_ids: tuple[int, ...]


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    """The template's text for `messages`, never tokenized here: the renderer tokenizes only the new text."""
    return str(tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt,
                                             tokenize=False))


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokens that are special: the named ones and every added token marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


class TurnRenderer:
    """The token ids an environment appends after each model turn (module docstring).

    `roles` are the message roles observations may take ("user", and "tool" for an environment with tools);
    each is checked against the chat template here, so a template that cannot take them fails at build time,
    not in the middle of a run. `end_of_turn_ids` is what a model turn ends with (EOS, or the template's
    end-of-turn token): the rollout's stop tokens."""

    def __init__(self, tokenizer: Any, *, roles: Sequence[str] = ("user",)) -> None:
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not roles:
            raise ValueError(f"observation roles must be some of {', '.join(ROLES)}; got {list(roles)!r}")
        self.tokenizer = tokenizer
        self.roles = tuple(roles)
        self.split: ChatSplit | None = None
        if has_chat_template(tokenizer):
            self.split = split_template(tokenizer, self.roles)
            self.end_of_turn_ids = list(self.split.end_of_turn_ids)
        elif tokenizer.eos_token_id is None:
            raise ValueError(f"{tokenizer_name(tokenizer)} has neither a chat template nor an EOS token: a model "
                             "turn would have nothing to end with; set tokenizer.eos_token")
        else:
            self.end_of_turn_ids = [int(tokenizer.eos_token_id)]

    def observation_ids(self, observation: Observation, *, role: str = "user", ended: bool = True) -> list[int]:
        """The ids to append after a model turn, then the observation.

        `ended=False` says the turn was cut by the token limit before its end-of-turn token: the renderer
        closes it first, as an environment token, so every turn in the sequence ends the way it does in
        training data. A list of ids is appended as given (the environment formats it, generation prompt
        included); None appends nothing but that closing."""
        if role not in self.roles:
            raise ValueError(f"an observation of role {role!r}, but the renderer was built for roles "
                             f"{list(self.roles)!r}: pass roles=({role!r}, ...) to TurnRenderer")
        closing = [] if ended else list(self.end_of_turn_ids)
        if observation is None:
            return closing
        if isinstance(observation, list):
            return closing + list(observation)
        if not isinstance(observation, str):
            raise TypeError(f"an observation is text, a list of ids or None, not {type(observation).__name__}")
        if self.split is None:
            return closing + encode(self.tokenizer, observation)
        return closing + encode(self.tokenizer, self.message_text(observation, role))

    def message_text(self, content: str, role: str) -> str:
        """The text a chat template appends after a model turn's end-of-turn for a new message and the next
        assistant turn's generation prompt."""
        assert self.split is not None
        rendered = render(self.tokenizer, [*self.split.reference, message(role, content)], True)
        if not rendered.startswith(self.split.rendered):
            # the probe passed, so this message's content is what changes the earlier turns
            raise TemplateSplitError(f"the chat template of {tokenizer_name(self.tokenizer)} rewrites earlier "
                                     f"turns when the next message is {short(content)} (role {role!r})")
        return rendered[len(self.split.head):]


def split_template(tokenizer: Any, roles: Sequence[str]) -> ChatSplit:
    """Probe the chat template: find the assistant's end-of-turn, then check, for each role, that adding a
    message only appends text, the same text at every turn. Raises TemplateSplitError saying what failed."""
    name = tokenizer_name(tokenizer)
    probing = "a user question and a reply"
    try:
        split = find_end_of_turn(tokenizer)
        for role in roles:
            probing = f"a {role!r} message after a reply"
            check_role(tokenizer, split, role)
    except TemplateSplitError as exc:
        raise TemplateSplitError(f"the chat template of {name} cannot be split into turns: {exc}") from None
    except Exception as exc:  # jinja's errors, raise_exception in the template, a missing key
        raise TemplateSplitError(f"the chat template of {name} failed to render {probing} "
                                 f"({type(exc).__name__}: {exc})") from None
    return split


def find_end_of_turn(tokenizer: Any) -> ChatSplit:
    """Render [question] with the generation prompt and [question, reply] without: the reply must follow the
    generation prompt, and what closes it must start with special tokens, the end-of-turn the model samples."""
    question = [message("user", PROBE_QUESTION)]
    reference = (*question, message("assistant", PROBE_REPLIES[0]))
    prompt = render(tokenizer, question, True)
    rendered = render(tokenizer, reference, False)
    reply_at = prompt + PROBE_REPLIES[0]
    if not rendered.startswith(reply_at):
        raise TemplateSplitError("the reply is not rendered right after the generation prompt: "
                                 + where_they_differ(reply_at, rendered, "the prompt and the reply", "the template"))
    closing = rendered[len(reply_at):]
    eot_ids = leading_special_ids(tokenizer, closing)
    eot_text = "".join(tokenizer.convert_ids_to_tokens(eot_ids))
    if not eot_ids or not closing.startswith(eot_text):
        raise TemplateSplitError(f"the assistant's turn is closed by {short(closing)}, which does not start with "
                                 "a special token: the model has no end-of-turn token to stop at")
    return ChatSplit(reference, rendered, reply_at + eot_text, eot_text, tuple(eot_ids))


def leading_special_ids(tokenizer: Any, text: str) -> list[int]:
    """The special tokens `text` starts with (ChatML's "<|im_end|>\\n" -> [<|im_end|>])."""
    specials = special_ids(tokenizer)
    ids = encode(tokenizer, text)
    count = next((i for i, token in enumerate(ids) if token not in specials), len(ids))
    return ids[:count]


def check_role(tokenizer: Any, split: ChatSplit, role: str) -> None:
    """A message of `role` after the reply, then a second reply and another such message: each rendering
    must extend the one before it, the second reply must end with the same end-of-turn, and the message must
    add the same text both times (so the text found once serves every turn)."""
    observation = message(role, PROBE_OBSERVATION)
    once = render(tokenizer, [*split.reference, observation], True)
    expect_extends(split.rendered, once, f"a {role!r} message after a reply")
    added = once[len(split.head):]
    replied = render(tokenizer, [*split.reference, observation, message("assistant", PROBE_REPLIES[1])], False)
    second_head = once + PROBE_REPLIES[1] + split.end_of_turn_text
    if not replied.startswith(second_head):
        raise TemplateSplitError(f"after a {role!r} message, the next reply is not rendered as the generation "
                                 f"prompt, the reply and {short(split.end_of_turn_text)}: "
                                 + where_they_differ(second_head, replied, "those", "the template"))
    twice = render(tokenizer, [*split.reference, observation, message("assistant", PROBE_REPLIES[1]),
                               observation], True)
    expect_extends(replied, twice, f"a second {role!r} message")
    if twice[len(second_head):] != added:
        raise TemplateSplitError(f"a {role!r} message adds {short(added)} after the first reply but "
                                 f"{short(twice[len(second_head):])} after the second")
    if encode(tokenizer, once) != encode(tokenizer, split.head) + encode(tokenizer, added):
        raise TemplateSplitError(f"the text a {role!r} message adds, {short(added)}, encodes to other ids alone "
                                 "than after the earlier turns")


def expect_extends(before: str, after: str, what: str) -> None:
    """`after` must be `before` with text appended: earlier turns keep every character."""
    if after.startswith(before) and len(after) > len(before):
        return
    if after.startswith(before):
        raise TemplateSplitError(f"adding {what} adds no text")
    raise TemplateSplitError(f"adding {what} changes the earlier turns: "
                             + where_they_differ(before, after, "the conversation without it", "with it"))


def where_they_differ(first: str, second: str, first_name: str, second_name: str) -> str:
    """Where two renderings part, quoting a little of each from there: enough to see what the template does."""
    at = next((i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b), min(len(first),
                                                                                                len(second)))
    return f"at character {at} {first_name} has {short(first[at:at + 60])}, {second_name} {short(second[at:at + 60])}"

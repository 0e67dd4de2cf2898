"""Tests of gradus.envs.render: an episode built from the prompt, the model's turns as sampled and the renderer's
ids is exactly the chat template's rendering of the whole conversation; plain tokenizers get text and EOS;
templates that rewrite earlier turns are refused when the renderer is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from gradus.envs.render import TemplateSplitError, TurnRenderer
from gradus.models import build_char_tokenizer, save_pretrained
from gradus.models.tokenizer import DEFAULT_ALPHABET

CHATML = (Path(__file__).parent.parent / "fixtures" / "chatml_template.jinja").read_text()
IM_START, IM_END = 260, 261  # the two tokens added after the char tokenizer's 260
EOS = 2


def char_ids(text: str) -> list[int]:
    """The char tokenizer's ids worked out from its definition: 4 specials, then DEFAULT_ALPHABET in order."""
    return [4 + DEFAULT_ALPHABET.index(ch) for ch in text]


def chat_tokenizer(template: str = CHATML):
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rendered_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """The whole conversation rendered at once and tokenized, as the model sees it at inference time."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return encode(tokenizer, text)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_fixture_tokens_are_the_ones_worked_out() -> None:
    tokenizer = chat_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]
    assert encode(tokenizer, "ab\n") == char_ids("ab\n") == [71, 72, 5]


def test_chatml_observation_ids_worked_by_hand() -> None:
    renderer = TurnRenderer(chat_tokenizer(), roles=("user", "tool"))
    assert renderer.end_of_turn_ids == [IM_END]
    # the model sampled "...<|im_end|>" and stopped; the template's newline after it is the environment's
    assert renderer.observation_ids("hi") == (
        char_ids("\n") + [IM_START] + char_ids("user\nhi") + [IM_END] + char_ids("\n") + [IM_START]
        + char_ids("assistant\n"))
    assert renderer.observation_ids("3", role="tool") == (
        char_ids("\n") + [IM_START] + char_ids("user\n<tool_response>\n3\n</tool_response>") + [IM_END]
        + char_ids("\n") + [IM_START] + char_ids("assistant\n"))
    # cut by the token limit: the renderer closes the turn first
    assert renderer.observation_ids("hi", ended=False) == [IM_END] + renderer.observation_ids("hi")
    # ids are appended as given; None adds only the closing
    assert renderer.observation_ids([7, 8, IM_START]) == [7, 8, IM_START]
    assert renderer.observation_ids([7], ended=False) == [IM_END, 7]
    assert renderer.observation_ids(None) == []
    assert renderer.observation_ids(None, ended=False) == [IM_END]


# The model's turns as it sampled them (content + its stop token, or cut short) and the environment's answers.
EPISODE = [
    ("assistant", "Let me add: <tool_call>{\"name\": \"calc\", \"arguments\": {\"e\": \"1+2\"}}</tool_call>", True),
    ("tool", "3", None),
    ("assistant", "So the sum is 3.\nIs that right?", True),
    ("user", "Yes. Now multiply it by 7 — ünïcödé is fine.", None),
    ("assistant", "3 * 7 = 2", False),  # cut by the token limit: no <|im_end|> sampled
    ("user", "", None),
    ("assistant", "21", True),
    ("user", "Done.\n", None),
]


@pytest.mark.parametrize("system", [None, "Use the calculator.\nBe brief."])
def test_episode_equals_the_whole_conversation_rendered_at_once(system: str | None) -> None:
    tokenizer = chat_tokenizer()
    renderer = TurnRenderer(tokenizer, roles=("user", "tool"))
    conversation = ([msg("system", system)] if system else []) + [msg("user", "What is 1+2?")]
    # the prompt as render_prompt gives it and encode_prompts tokenizes it
    ids = rendered_ids(tokenizer, conversation, True)
    ended = True
    for role, content, turn_ended in EPISODE:
        if role == "assistant":
            ids += encode(tokenizer, content) + ([IM_END] if turn_ended else [])
            ended = turn_ended
            conversation.append(msg(role, content))
            # (b) the episode so far is what the template renders for the conversation so far, the earlier
            # turns' ids unchanged: the turn and its end-of-turn are a prefix of the rendering
            whole = rendered_ids(tokenizer, conversation, False)
            assert whole[:len(ids) + (0 if ended else 1)] == ids + ([] if ended else [IM_END])
        else:
            ids += renderer.observation_ids(content, role=role, ended=ended)
            conversation.append(msg(role, content))
            # (a) after every observation: exactly the whole conversation's ids with the generation prompt
            assert ids == rendered_ids(tokenizer, conversation, True)
    assert len(conversation) == len(EPISODE) + (2 if system else 1)


def test_end_of_turn_is_found_after_the_models_stop_token_not_after_the_newline() -> None:
    # a template whose end-of-turn is two special tokens and no newline
    template = CHATML.replace('m.content + "<|im_end|>\\n"', 'm.content + "<|im_end|><|im_start|>"')
    tokenizer = chat_tokenizer(template)
    renderer = TurnRenderer(tokenizer)
    assert renderer.end_of_turn_ids == [IM_END, IM_START]
    prompt = rendered_ids(tokenizer, [msg("user", "q")], True)
    ids = prompt + encode(tokenizer, "a") + [IM_END, IM_START] + renderer.observation_ids("u")
    assert ids == rendered_ids(tokenizer, [msg("user", "q"), msg("assistant", "a"), msg("user", "u")], True)


# --- (d) the plain char tokenizer ------------------------------------------------------------------------


def test_plain_tokenizer_encodes_text_as_it_is() -> None:
    renderer = TurnRenderer(build_char_tokenizer(), roles=("user", "tool"))
    assert renderer.split is None
    assert renderer.end_of_turn_ids == [EOS]
    assert renderer.observation_ids("<result>3</result>\n", role="tool") == char_ids("<result>3</result>\n")
    assert renderer.observation_ids("Try again: 12", ended=False) == [EOS] + char_ids("Try again: 12")
    assert renderer.observation_ids("") == []
    assert renderer.observation_ids(None) == [] and renderer.observation_ids(None, ended=False) == [EOS]
    assert renderer.observation_ids([9, 9]) == [9, 9]
    assert renderer.observation_ids([9], ended=False) == [EOS, 9]
    # non-ASCII text: its UTF-8 bytes, one token each, the same ids the tokenizer gives in context
    tokenizer = build_char_tokenizer()
    assert renderer.observation_ids("é!") == encode(tokenizer, "é!") and len(encode(tokenizer, "é!")) == 3


def adds_bos(tokenizer):
    """`tokenizer`, made to put BOS before every text it encodes with special tokens (as Llama's do)."""
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", 1)])
    assert tokenizer("a")["input_ids"] == [1, 71]
    return tokenizer


def test_observations_never_get_the_tokenizers_added_tokens() -> None:
    # a BOS in the middle of an episode would be a token the model never sees there at inference time
    assert TurnRenderer(adds_bos(build_char_tokenizer())).observation_ids("ab") == char_ids("ab")
    chat = TurnRenderer(adds_bos(chat_tokenizer()))
    assert chat.observation_ids("ab") == TurnRenderer(chat_tokenizer()).observation_ids("ab")
    assert 1 not in chat.observation_ids("ab") and chat.end_of_turn_ids == [IM_END]


def test_plain_tokenizer_without_eos_is_refused() -> None:
    tokenizer = build_char_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=rf"{type(tokenizer).__name__} \(built in memory\) has neither a chat "
                                         "template nor an EOS token"):
        TurnRenderer(tokenizer)


def test_roles_are_declared_when_built() -> None:
    renderer = TurnRenderer(build_char_tokenizer())
    with pytest.raises(ValueError, match=r"role 'tool', but the renderer was built for roles \['user'\]"):
        renderer.observation_ids("3", role="tool")
    with pytest.raises(ValueError, match="observation roles must be some of user, tool; got \\['assistant'\\]"):
        TurnRenderer(build_char_tokenizer(), roles=("assistant",))
    with pytest.raises(TypeError, match="not dict"):
        renderer.observation_ids({"text": "x"})  # type: ignore[arg-type]


# --- (e) templates that cannot be split ------------------------------------------------------------------

# Only the last assistant message is kept: adding a message drops the reply before it.
DROPS_EARLIER_REPLIES = """{%- for m in messages -%}
{%- if m.role != "assistant" or loop.last -%}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant
{% endif -%}"""

# Qwen3's pattern: the last reply gets an empty reasoning block, which the generation prompt does not hold.
THINKS_IN_LAST_REPLY = CHATML.replace('"<|im_start|>" + m.role + "\\n" + m.content',
                                      '"<|im_start|>" + m.role + "\\n" + ("<think>\\n\\n</think>\\n\\n" if '
                                      'm.role == "assistant" and loop.last else "") + m.content')

# No special token closes a reply: the model would have nothing to stop at.
PLAIN_TURNS = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
              "{% if add_generation_prompt %}assistant: {% endif %}"

# User turns are numbered: a message adds other text at each turn.
NUMBERED_TURNS = CHATML.replace('"<|im_start|>" + m.role + "\\n"',
                                '"<|im_start|>" + m.role + ((" " + loop.index|string) if m.role == "user" else "")'
                                ' + "\\n"')

# Replies after the first are numbered, but the generation prompt is not: the model would be prompted with one
# header and trained as if it had seen another.
NUMBERED_LATER_REPLIES = CHATML.replace('"<|im_start|>" + m.role + "\\n"',
                                        '"<|im_start|>" + m.role + ((" " + loop.index|string) if m.role == '
                                        '"assistant" and loop.index > 2 else "") + "\\n"')

# Only user and assistant messages: fine for an environment without tools.
NO_TOOL_ROLE = CHATML.replace('m.role == "tool"', 'false')


# The characters are counted by hand: the system turn "<|im_start|>system\nYou answer briefly.<|im_end|>\n" is
# 12 + 7 + 19 + 10 + 1 = 49, "<|im_start|>user\n" ends at 66, the question (26) and "<|im_end|>\n" at 103,
# "<|im_start|>assistant\n" at 125; the first reply (29) and "<|im_end|>" end at 164, then "\n<|im_start|>user\n",
# the observation (29), "<|im_end|>\n<|im_start|>assistant" end at 243.
@pytest.mark.parametrize(
    ("template", "words"),
    [
        (DROPS_EARLIER_REPLIES, "adding a 'user' message after a reply changes the earlier turns: at character 66 "
                                "the conversation without it has 'assistant\\ngradus probe: the first reply"
                                "<|im_end|>\\n', with it 'user\\ngradus probe: the observation"),
        (THINKS_IN_LAST_REPLY, "the reply is not rendered right after the generation prompt: at character 125 the "
                               "prompt and the reply has 'gradus probe: the first reply', the template "
                               "'<think>\\n\\n</think>\\n\\ngradus"),
        (PLAIN_TURNS, "closed by '\\n', which does not start with a special token"),
        (NUMBERED_TURNS, "a 'user' message adds '\\n<|im_start|>user 3\\ngradus probe: the observation<|im_end|>\\n"
                     "<|im_start|>assistant\\n' after the first reply but '\\n<|im_start|>user 5\\n"),
        (NUMBERED_LATER_REPLIES, "after a 'user' message, the next reply is not rendered as the generation prompt, "
                                 "the reply and '<|im_end|>': at character 243 those has '\\ngradus probe: the "
                                 "second reply<|im_end|>', the template ' 4\\ngradus probe: the second reply"),
    ],
)
def test_templates_that_rewrite_or_cannot_close_turns_are_refused(template: str, words: str) -> None:
    tokenizer = chat_tokenizer(template)
    with pytest.raises(TemplateSplitError) as caught:
        TurnRenderer(tokenizer)
    said = str(caught.value)
    assert said.startswith(f"the chat template of {type(tokenizer).__name__} (built in memory) cannot be split "
                           "into turns: ")
    assert words in said, said
    assert isinstance(caught.value, ValueError) and "\n" not in said


def test_a_template_without_the_tool_role_serves_only_user_observations() -> None:
    tokenizer = chat_tokenizer(NO_TOOL_ROLE)
    assert TurnRenderer(tokenizer).observation_ids("u") == TurnRenderer(chat_tokenizer()).observation_ids("u")
    with pytest.raises(TemplateSplitError, match=r"failed to render a 'tool' message after a reply \(TemplateError: "
                                                 r"a message's role is system \(first only\), user, assistant or "
                                                 "tool, not tool"):
        TurnRenderer(tokenizer, roles=("user", "tool"))


class MergesAfterEndOfTurn:
    """A chat tokenizer whose ids depend on context: "<|im_end|>" then a newline, anywhere but at the start of
    the text, is one token (999). Encoding the appended text alone then gives other ids than in the episode."""

    def __init__(self) -> None:
        self.inner = chat_tokenizer()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.inner(text, add_special_tokens=add_special_tokens)["input_ids"]
        merged: list[int] = []
        for token in ids:
            if merged[1:] and merged[-1] == IM_END and token == char_ids("\n")[0]:
                merged[-1] = 999
            else:
                merged.append(token)
        return {"input_ids": merged}


def test_a_tokenizer_whose_ids_depend_on_the_earlier_turns_is_refused() -> None:
    with pytest.raises(TemplateSplitError, match="encodes to other ids alone than after the earlier turns"):
        TurnRenderer(MergesAfterEndOfTurn())


def test_refusal_names_the_tokenizer_it_was_loaded_from(tmp_path: Path) -> None:
    save_pretrained_tokenizer = chat_tokenizer(DROPS_EARLIER_REPLIES)
    save_pretrained_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TemplateSplitError, match=f"the chat template of {type(loaded).__name__} '{tmp_path}'"):
        TurnRenderer(loaded)


def test_a_message_that_makes_the_template_rewrite_earlier_turns_is_refused() -> None:
    # passes the probe, but a message saying "RESET" wipes the conversation before it
    template = ("{%- if messages[-1].content == 'RESET' -%}{%- set messages = messages[-1:] -%}{%- endif -%}"
                + CHATML)
    renderer = TurnRenderer(chat_tokenizer(template))
    assert renderer.observation_ids("fine")
    with pytest.raises(TemplateSplitError, match="rewrites earlier turns when the next message is 'RESET'"):
        renderer.observation_ids("RESET")


def test_saved_and_loaded_chat_tokenizer_renders_the_same(tmp_path: Path) -> None:
    from gradus.models import build_tiny_model

    tokenizer = chat_tokenizer()
    save_pretrained(build_tiny_model("nano", tokenizer=tokenizer, seed=0), tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert TurnRenderer(loaded).observation_ids("hi", ended=False) == TurnRenderer(tokenizer).observation_ids(
        "hi", ended=False)

"""Episodes with a chat template: the sequence a run trains on is the conversation the model would see at
inference time, rendered at once, and tool calls use the template's format."""

import json
from pathlib import Path

from gradus.envs.calls import EnvCalls
from gradus.envs.episodes import EpisodeRunner, Limits
from gradus.models import build_char_tokenizer
from gradus.rollout import SamplingParams
from gradus.tasks import Example

from .scripted import Scripted

ENVS = str(Path(__file__).with_name("sample_envs.py"))
CHATML = (Path(__file__).parent.parent / "fixtures" / "chatml_template.jinja").read_text()


def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_a_tool_episode_is_the_whole_conversation_rendered_at_once():
    tokenizer = chat_tokenizer()
    call = '<tool_call>{"name": "calc", "arguments": {"expression": "6*7"}}</tool_call>'
    conversation = [{"role": "user", "content": "what is 6*7?"}]
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    calls = EnvCalls(f"{ENVS}:Tools", timeout_s=10)
    try:
        runner = EpisodeRunner(calls, tokenizer, Limits(3, 400))
        engine = Scripted(tokenizer, [call, "41", "42"], stop=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        got = runner.run(engine, [prompt_ids], [Example("what is 6*7?", "42")], 1,
                         SamplingParams(max_new_tokens=100), [0])
    finally:
        calls.close()
    assert got.success.tolist() == [True] and got.turns.tolist() == [3]
    assert got.metrics["env/tool_calls"] == 1
    b = got.batch
    episode = prompt_ids + b.completion_ids[0, : b.lengths[0]].tolist()
    conversation += [{"role": "assistant", "content": call}, {"role": "tool", "content": "42"},
                     {"role": "assistant", "content": "41"}, {"role": "user", "content": "wrong:"},
                     {"role": "assistant", "content": "42"}]
    whole = tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)
    whole = whole["input_ids"]
    # the whole rendering ends with the last reply's end-of-turn and the template's newline after it
    assert episode == whole[: len(episode)] and tokenizer.decode(whole[len(episode):]) == "\n"
    # the model's tokens are exactly its three turns, each closed by its own end-of-turn token
    model = b.completion_ids[0][b.action_mask[0] == 1].tolist()
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    want = [t for text in (call, "41", "42") for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [stop]]
    assert model == want
    assert json.loads(call[len("<tool_call>"):-len("</tool_call>")])["name"] == "calc"


def test_a_chat_template_lists_the_environments_tools_in_the_prompt():
    from gradus.tasks import get_task
    from gradus.train.data import encode_prompts

    calls = EnvCalls(f"{ENVS}:Tools", timeout_s=10)
    try:
        tools = calls.tool_schemas()
    finally:
        calls.close()
    assert [t["function"]["name"] for t in tools] == ["boom", "calc", "sleep"]
    calc = tools[1]["function"]
    assert calc["description"] == "Evaluates an arithmetic expression of integers."
    assert calc["parameters"]["required"] == ["argument"]
    task = get_task("countdown")
    chat = encode_prompts(task, chat_tokenizer(), task.train_batch(0, 1), tools).texts[0]
    assert '"name": "calc"' in chat and "<tool_call>" in chat
    plain = encode_prompts(task, build_char_tokenizer(), task.train_batch(0, 1), tools).texts[0]
    assert plain == task.train_example(0).prompt  # no chat template: the prompt as it is

"""Episodes with a chat template: the sequence a run trains on is the conversation the model would see at
inference time, rendered at once, and tool calls use the template's format."""

import json
from pathlib import Path

import torch

from gradus.envs.calls import EnvCalls
from gradus.envs.episodes import EpisodeRunner, Limits
from gradus.models import build_char_tokenizer
from gradus.rollout import RolloutBatch, SamplingParams
from gradus.tasks import Example

ENVS = str(Path(__file__).with_name("sample_envs.py"))
CHATML = (Path(__file__).parent.parent / "fixtures" / "chatml_template.jinja").read_text()


def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


class Scripted:
    """Says the next text of a script, then the chat template's end-of-turn token, for every row."""

    def __init__(self, tokenizer, turns):
        self.tokenizer, self.turns, self.calls = tokenizer, turns, 0
        self.stop = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(self, prompts, n, params, *, seed=None, seeds=None):
        ids = self.tokenizer(self.turns[self.calls], add_special_tokens=False)["input_ids"] + [self.stop]
        self.calls += 1
        B = len(prompts) * n
        prompt = torch.tensor([list(p) for p in prompts for _ in range(n)])  # [B, P]
        return RolloutBatch(
            prompt_ids=prompt, prompt_mask=torch.ones_like(prompt),
            completion_ids=torch.tensor([ids] * B), completion_mask=torch.ones(B, len(ids), dtype=torch.long),
            sampling_logp=torch.full((B, len(ids)), -0.5), lengths=torch.full((B,), len(ids)),
            truncated=torch.zeros(B, dtype=torch.bool), prompt_index=torch.arange(len(prompts)).repeat_interleave(n))


def test_a_tool_episode_is_the_whole_conversation_rendered_at_once():
    tokenizer = chat_tokenizer()
    call = '<tool_call>{"name": "calc", "arguments": {"expression": "6*7"}}</tool_call>'
    conversation = [{"role": "user", "content": "what is 6*7?"}]
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    calls = EnvCalls(f"{ENVS}:Tools", timeout_s=10)
    try:
        runner = EpisodeRunner(calls, tokenizer, Limits(3, 400))
        got = runner.run(Scripted(tokenizer, [call, "41", "42"]), [prompt_ids], [Example("what is 6*7?", "42")], 1,
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

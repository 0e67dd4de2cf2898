"""An engine for episode tests: every row says the next text of a script, then a stop token."""

import torch

from gradus.rollout import RolloutBatch


class Scripted:
    """Turn k of every episode is `turns[k]` (the last one repeats) followed by `stop` (default: EOS), cut to the
    call's max_new_tokens; prompts are left-padded with 0 as the engines do."""

    def __init__(self, tokenizer, turns, stop=None):
        self.tokenizer, self.turns, self.calls = tokenizer, turns, 0
        self.stop = tokenizer.eos_token_id if stop is None else stop

    def generate(self, prompts, n, params, *, seed=None, seeds=None):
        text = self.turns[min(self.calls, len(self.turns) - 1)]
        self.calls += 1
        ids = (self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.stop])[: params.max_new_tokens]
        B, P = len(prompts) * n, max(len(p) for p in prompts)
        prompt = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts for _ in range(n)])  # [B, P]
        return RolloutBatch(
            prompt_ids=prompt, prompt_mask=(prompt != 0).long(),
            completion_ids=torch.tensor([ids] * B), completion_mask=torch.ones(B, len(ids), dtype=torch.long),
            sampling_logp=torch.full((B, len(ids)), -0.5), lengths=torch.full((B,), len(ids)),
            truncated=torch.full((B,), ids[-1] != self.stop),
            prompt_index=torch.arange(len(prompts)).repeat_interleave(n))

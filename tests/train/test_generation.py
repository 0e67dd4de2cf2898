"""Dynamic sampling (DAPO) filling a batch, with a scripted engine behind the engine interface."""

import torch

from gradus.algorithm import resolve_algo
from gradus.config import load_config
from gradus.models import build_char_tokenizer
from gradus.rewards import parse_reward_specs
from gradus.rollout import RolloutBatch, SamplingParams
from gradus.tasks import get_task
from gradus.train.data import PromptSource
from gradus.train.generation import collect
from gradus.train.rollouts import OneTurn
from gradus.train.scoring import Scorer
from gradus.train.sft import pack


class ScriptedEngine:
    """Answers prompt j of each call correctly in `right[j]` of its n samples (the rest say 'x')."""

    def __init__(self, tokenizer, task, source, pattern):
        self.tok, self.task, self.source, self.pattern = tokenizer, task, source, pattern
        self.calls = 0

    def generate(self, prompts, n, params, *, seed=None, seeds=None):
        # the source has just handed out these prompts: recover their examples to know the answers
        first = self.source.position - len(prompts)
        examples = [self.task.train_example(first + j) for j in range(len(prompts))]
        rows_p, rows_c = [], []
        for j, (ids, ex) in enumerate(zip(prompts, examples, strict=True)):
            right = self.pattern[self.calls][j]
            for k in range(n):
                text = ex.answer if k < right else "x"
                rows_p.append(list(ids))
                rows_c.append(self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        self.calls += 1
        batch = pack(rows_p, rows_c, self.tok.pad_token_id, torch.device("cpu"))
        return RolloutBatch(**{**batch.__dict__, "prompt_index": torch.arange(len(prompts)).repeat_interleave(n)})

    def sync(self, weights):
        raise AssertionError("not used")


def _setup(pattern, overrides):
    cfg = load_config(overrides=["algo.name=dapo", "rollout.group_size=4", *overrides])
    tok = build_char_tokenizer()
    task = get_task("arithmetic", seed=0)
    source = PromptSource(task, tok)
    scorer = Scorer(task, parse_reward_specs(None, task.default_reward), timeout_s=5, strict=False)
    rollout = OneTurn(scorer)
    rollout.bind(tok, None)
    return cfg, tok, source, rollout, ScriptedEngine(tok, task, source, pattern)


def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    # 3 groups wanted. Round 1: right counts (4, 2, 0) -> 1 informative; round 2: (1, 4, 3) -> 2 more
    cfg, tok, source, scorer, engine = _setup([[4, 2, 0], [1, 4, 3], [2, 2, 2]], [])
    got = collect(engine, source, scorer, SamplingParams(max_new_tokens=8), resolve_algo(cfg),
                  num_groups=3, group_size=4, seed=0)
    assert engine.calls == 2
    assert got.batch.batch_size == 12
    groups = got.correct.view(3, 4).sum(1).tolist()
    assert groups == [2, 1, 3]  # the informative ones, in order
    assert got.metrics["dapo/rounds"] == 2 and got.metrics["dapo/groups_dropped"] == 3
    assert got.metrics["dapo/groups_kept"] == 3 and got.metrics["dapo/batch_short"] == 0
    # rewards stay aligned with rows: a correct row has a higher reward than a wrong one in its group
    assert torch.all(got.rewards[got.correct] > got.rewards[~got.correct].max())


def test_dynamic_sampling_gives_up_after_max_rounds_and_trains_on_what_there_is():
    cfg, tok, source, scorer, engine = _setup([[4, 0], [0, 1], [4, 4]], ["algo.max_gen_rounds=3"])
    got = collect(engine, source, scorer, SamplingParams(max_new_tokens=8), resolve_algo(cfg),
                  num_groups=2, group_size=4, seed=0)
    assert engine.calls == 3 and got.batch.batch_size == 4
    assert got.metrics["dapo/batch_short"] == 1 and got.metrics["dapo/groups_dropped"] == 5


def test_overlong_shaping_lowers_rewards_of_long_completions():
    cfg, tok, source, scorer, engine = _setup([[4, 0]], ["algo.overlong_cache=2", "algo.dynamic_sampling=false"])
    got = collect(engine, source, scorer, SamplingParams(max_new_tokens=3), resolve_algo(cfg),
                  num_groups=2, group_size=4, seed=0)
    lengths = got.batch.lengths.float()
    # max_len 3, cache 2: lengths <= 1 free, 2 -> -0.5, 3 -> -1, longer -> -1 (added to the 0/1 reward)
    penalty = torch.where(lengths <= 1, 0.0, (1 - lengths) / 2).clamp(min=-1.0)
    expected = got.correct.float() + penalty
    assert (penalty < 0).any() and (penalty == -1).any()
    torch.testing.assert_close(got.rewards, expected)

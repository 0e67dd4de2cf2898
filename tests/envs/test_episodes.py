"""Multi-turn episodes over the local engine: token in, token out, exactly."""

from pathlib import Path

import pytest
import torch

from gradus.envs.calls import EnvCalls
from gradus.envs.episodes import EpisodeRunner, Limits, turn_key
from gradus.envs.render import TurnRenderer
from gradus.logprobs import completion_logprobs
from gradus.models import load_model
from gradus.rollout import SamplingParams
from gradus.rollout.local import LocalEngine
from gradus.tasks import get_task
from gradus.train.data import encode_prompts

ENVS = str(Path(__file__).with_name("sample_envs.py"))


@pytest.fixture(scope="module")
def nano(nano_dir):
    model, tokenizer = load_model(nano_dir, "float32", torch.device("cpu"))
    engine = LocalEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])
    return model, tokenizer, engine


@pytest.fixture(scope="module")
def counter():
    calls = EnvCalls(f"{ENVS}:Counter", timeout_s=10)
    yield calls
    calls.close()


def _prompts(tokenizer, n=3):
    task = get_task("countdown", seed=0)
    return encode_prompts(task, tokenizer, task.train_batch(0, n))


def test_one_turn_environment_reproduces_the_one_turn_rollout(nano):
    """Turn 0 is keyed as a one-turn rollout: with an environment that ends at once, the batch is generate's."""
    _, tokenizer, engine = nano
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_new_tokens=8)
    seeds = [11, 12, 13]
    calls = EnvCalls(f"{ENVS}:OneTurn", timeout_s=10)
    try:
        got = EpisodeRunner(calls, tokenizer, Limits(4, 64)).run(engine, prompts.ids, prompts.examples, 2, params,
                                                                 seeds)
    finally:
        calls.close()
    want = engine.generate(prompts.ids, 2, params, seeds=seeds)
    T = want.completion_ids.shape[1]
    assert got.batch.completion_ids.shape == want.completion_ids.shape
    assert torch.equal(got.batch.completion_ids[:, :T], want.completion_ids)
    assert torch.equal(got.batch.completion_mask[:, :T], want.completion_mask)
    assert torch.equal(got.batch.sampling_logp[:, :T], want.sampling_logp)
    assert torch.equal(got.batch.loss_tokens[:, :T], want.completion_mask)  # every token is the model's
    assert torch.equal(got.batch.truncated, want.truncated)
    assert got.turns.tolist() == [1] * 6
    texts = tokenizer.batch_decode([r[:n] for r, n in zip(want.completion_ids.tolist(), want.lengths.tolist(),
                                                          strict=True)], skip_special_tokens=True)
    assert got.rewards.tolist() == [float(any(c.isdigit() for c in t)) for t in texts]


def test_episode_is_the_model_turns_and_the_answers_in_order(nano, counter):
    """Every model turn is exactly what the engine sampled for that history, and every answer is rendered by the
    renderer; the trainer's forward gives the model's tokens their sampling log-probs (ratio 1 on-policy)."""
    model, tokenizer, engine = nano
    prompts = _prompts(tokenizer, 2)
    params = SamplingParams(max_new_tokens=5)
    got = EpisodeRunner(counter, tokenizer, Limits(3, 40)).run(engine, prompts.ids, prompts.examples, 2, params,
                                                               [5, 6])
    renderer = TurnRenderer(tokenizer)
    b = got.batch
    for row in range(4):
        j, s = divmod(row, 2)
        history = list(prompts.ids[j])
        ids = b.completion_ids[row, : b.lengths[row]].tolist()
        action = b.action_mask[row, : b.lengths[row]].tolist()
        pos = 0
        for turn in range(3):
            if turn == 0:
                one = engine.generate([history], 2, params, seeds=[[5, 6][j]]).select([s])
            else:
                one = engine.generate([history], 1, params, seeds=[turn_key([5, 6][j], s, turn)])
            sampled = one.completion_ids[0, : one.lengths[0]].tolist()
            assert ids[pos : pos + len(sampled)] == sampled and set(action[pos : pos + len(sampled)]) == {1}
            pos += len(sampled)
            history += sampled
            if turn == 2:
                break
            answer = renderer.observation_ids(f"#{turn + 1}:", ended=not bool(one.truncated[0]))
            assert ids[pos : pos + len(answer)] == answer and set(action[pos : pos + len(answer)]) == {0}
            pos += len(answer)
            history += answer
        assert pos == len(ids)
    assert got.turns.tolist() == [3] * 4 and got.rewards.tolist() == [0.75] * 4
    assert torch.all(b.sampling_logp[b.action_mask == 0] == 0)
    logp = completion_logprobs(model, b.input_ids, b.attention_mask, b.completion_start)  # [B, T]
    model_tokens = b.loss_tokens.bool()
    torch.testing.assert_close(logp[model_tokens], b.sampling_logp[model_tokens], atol=2e-5, rtol=0)


def test_an_episode_does_not_depend_on_the_rest_of_the_batch(nano, counter):
    _, tokenizer, engine = nano
    prompts = _prompts(tokenizer, 3)
    params = SamplingParams(max_new_tokens=5)
    runner = EpisodeRunner(counter, tokenizer, Limits(3, 40))
    together = runner.run(engine, prompts.ids, prompts.examples, 2, params, [7, 8, 9]).batch
    alone = runner.run(engine, prompts.ids[1:2], prompts.examples[1:2], 2, params, [8]).batch
    for s in range(2):
        n = int(alone.lengths[s])
        assert together.lengths[2 + s] == n
        assert torch.equal(together.completion_ids[2 + s, :n], alone.completion_ids[s, :n])


def test_the_token_budget_cuts_an_episode_and_flags_it(nano, counter):
    _, tokenizer, engine = nano
    prompts = _prompts(tokenizer, 2)
    got = EpisodeRunner(counter, tokenizer, Limits(10, 12)).run(engine, prompts.ids, prompts.examples, 2,
                                                                SamplingParams(max_new_tokens=5), [1, 2])
    assert int(got.batch.lengths.max()) <= 12
    assert got.batch.truncated.all()  # ten turns never fit twelve tokens
    assert (got.turns < 10).all()


def test_each_turns_reward_sits_on_its_last_model_token(nano, counter):
    _, tokenizer, engine = nano
    prompts = _prompts(tokenizer, 2)
    got = EpisodeRunner(counter, tokenizer, Limits(3, 40)).run(engine, prompts.ids, prompts.examples, 2,
                                                               SamplingParams(max_new_tokens=5), [3, 4])
    b = got.batch
    for row in range(4):
        actions = b.action_mask[row].tolist()
        # the last model token of each turn: a model token followed by an environment token, or the last one
        ends = [t for t in range(int(b.lengths[row])) if actions[t] == 1
                and (t + 1 == int(b.lengths[row]) or actions[t + 1] == 0)]
        assert len(ends) == 3
        assert b.turn_rewards[row, ends].tolist() == [0.25] * 3
        assert float(b.turn_rewards[row].sum()) == float(got.rewards[row])


def test_episodes_fit_the_engines_positions_when_it_serves_fewer(nano):
    """vllm.max_model_len below the model's positions: an episode's history must never outgrow what vLLM serves."""
    from types import SimpleNamespace

    from gradus.train.rollouts import Episodes

    model, tokenizer, _ = nano
    episodes = Episodes(SimpleNamespace(tools=[], name="x"), 4, 1000, engine_positions=40)
    episodes.bind(tokenizer, model)
    assert episodes.runner.limits.positions == 40 and episodes.runner.limits.budget([1] * 10) == 30
    unlimited = Episodes(SimpleNamespace(tools=[], name="x"), 4, 1000)
    unlimited.bind(tokenizer, model)
    assert unlimited.runner.limits.positions == model.config.max_position_embeddings


def test_the_base_reset_costs_no_round_trip(counter, nano):
    """An environment that keeps `BaseEnvironment.reset` starts from the example itself, without asking the
    workers; one with its own `reset` is asked."""
    _, tokenizer, _ = nano
    examples = _prompts(tokenizer, 2).examples
    calls = EnvCalls(f"{ENVS}:OneTurn", timeout_s=10)
    try:
        assert not calls.own_reset
        calls.pool.score = None  # any call to the workers would fail here
        assert calls.reset(examples) == list(examples)
    finally:
        calls.close()
    assert counter.own_reset and counter.reset(examples) == [0, 0]


def test_a_moe_engines_routing_is_spliced_per_position(tmp_path, counter):
    """Mixture of experts: each position of an episode keeps the routing of the engine call that first read it
    (turn 0 exactly as a one-turn rollout's); only each episode's last token and the padding are -1; and the
    training forward replaying it (r3) gives the model's tokens their sampling log-probs."""
    from conftest import save_untrained

    from gradus.models.routing import replay

    model, tokenizer = load_model(save_untrained(tmp_path / "moe", "nano", arch="qwen2_moe"), "float32",
                                  torch.device("cpu"))
    engine = LocalEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])
    prompts = _prompts(tokenizer, 2)
    params = SamplingParams(max_new_tokens=5)
    got = EpisodeRunner(counter, tokenizer, Limits(3, 40)).run(engine, prompts.ids, prompts.examples, 2, params,
                                                               [5, 6])
    b = got.batch
    P = b.prompt_ids.shape[1]
    first = engine.generate(prompts.ids, 2, params, seeds=[5, 6])  # turn 0 of every episode
    for row in range(4):
        start, end = P - len(prompts.ids[row // 2]), P + int(b.lengths[row])
        routed = b.routed_experts[row]  # [P+T, L, k]
        assert torch.all(routed[:start] == -1) and torch.all(routed[end - 1 :] == -1)
        assert torch.all(routed[start : end - 1] >= 0)  # every position read by a later one is known
        fed0 = P + int(first.lengths[row]) - 1  # turn 0's tokens up to its last (fed by the next turn's prefill)
        assert torch.equal(routed[start:fed0], first.routed_experts[row, start:fed0])
    with replay(model, b.routed_experts):
        logp = completion_logprobs(model, b.input_ids, b.attention_mask, b.completion_start)  # [B, T]
    model_tokens = b.loss_tokens.bool()
    torch.testing.assert_close(logp[model_tokens], b.sampling_logp[model_tokens], atol=2e-5, rtol=0)

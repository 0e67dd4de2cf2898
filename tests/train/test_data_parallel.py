"""Two data-parallel processes (gloo on CPU), each holding half of a rollout batch, take exactly the
update one process takes on the whole batch: the loss denominators are global, the gradients are
summed over ranks, and PPO's advantage whitening uses the whole batch's statistics."""

import copy
import dataclasses
import datetime
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradus import parallel
from gradus.config import load_config
from gradus.objectives import group_advantages, masked_whiten
from gradus.runtime import Optim
from gradus.train.generation import collect
from gradus.train.passes import Passes
from gradus.train.trainer import Trainer, _mix
from gradus.train.update import UpdateInputs, global_count, run_updates

from .conftest import tiny_overrides

WORLD = 2


def _sgd(model: torch.nn.Module) -> Optim:
    # plain SGD, not AdamW: Adam's first step is about lr * sign(g), which would hide a gradient that is
    # off by a factor and turn rounding-level differences of near-zero gradients into lr-sized ones
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return Optim(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), grad_clip=1e9)


def _critic(trainer: Trainer) -> torch.nn.Module | None:
    return trainer.critic.model if trainer.critic is not None else None


def _shard(inputs: UpdateInputs, rank: int) -> UpdateInputs:
    n = inputs.batch.batch_size // WORLD  # whole groups per rank: the batch is laid out group by group
    rows = torch.arange(rank * n, (rank + 1) * n)
    cut = {f.name: getattr(inputs, f.name)[rows] for f in dataclasses.fields(inputs)
           if f.name != "batch" and getattr(inputs, f.name) is not None}
    return dataclasses.replace(inputs, batch=inputs.batch.select(rows), **cut)


def _params(policy: torch.nn.Module, critic: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    models = {"actor": policy, **({"critic": critic} if critic is not None else {})}
    return {f"{name}.{k}": v.detach().clone() for name, m in models.items() for k, v in m.named_parameters()}


def _update(inputs: UpdateInputs, payload: dict) -> dict[str, torch.Tensor]:
    actor = _sgd(payload["policy"])
    critic = _sgd(payload["critic"]) if payload["critic"] is not None else None
    run_updates(inputs, actor, payload["algo"], epochs=2, minibatches=1, passes=Passes(10_000, 1.0, 64),
                generator=torch.Generator().manual_seed(0), critic=critic, value_clip=0.2)
    return _params(actor.model, critic.model if critic is not None else None)


def _worker(rank: int, init_file: str, payload_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        payload = torch.load(payload_file, weights_only=False)
        x, mask, rewards = payload["x"], payload["mask"], payload["rewards"]
        n = x.shape[0] // WORLD
        own = slice(rank * n, (rank + 1) * n)
        stats = {"whitened": masked_whiten(x[own], mask[own], total=global_count),
                 "batch_scaled": group_advantages(rewards[own], 2, scale="batch", total=global_count)}
        params = _update(_shard(payload["inputs"], rank), payload)
        torch.save({"params": params, **stats}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_two_ranks_take_the_single_process_step(algo, nano_dir, tmp_path, signal_reward):
    trainer = Trainer(load_config(overrides=tiny_overrides(nano_dir, tmp_path, **{
        "algo.name": algo, "task.rewards": signal_reward, "rollout.prompts_per_step": 4,
        "rollout.group_size": 4, "algo.kl_coef": 0.05})))
    cfg = trainer.cfg
    got = collect(trainer.engine, trainer.source, trainer.rollout, trainer.params, trainer.algo,
                  num_groups=cfg.rollout.prompts_per_step, group_size=cfg.rollout.group_size, seed=_mix(0, 1))
    inputs = trainer.prepare(got, {})
    # completions of different lengths, so per-rank token counts differ from the global ones
    assert len(set(inputs.loss_mask.sum(-1).tolist())) > 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g) * 3 + 2
    mask = (torch.rand(8, 5, generator=g) > 0.3).float()
    rewards = torch.rand(8, generator=g)
    payload = {"policy": copy.deepcopy(trainer.policy), "algo": trainer.algo, "inputs": inputs, "x": x,
               "mask": mask, "rewards": rewards,
               "critic": copy.deepcopy(_critic(trainer))}  # deepcopy(None) is None
    torch.save(payload, tmp_path / "payload.pt")

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "payload.pt"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    half = x.shape[0] // WORLD
    torch.testing.assert_close(torch.cat([r["whitened"] for r in ranks]), masked_whiten(x, mask))
    torch.testing.assert_close(torch.cat([r["batch_scaled"] for r in ranks]),
                               group_advantages(rewards, 2, scale="batch"))
    # a local whitening would differ: the two halves have different means
    assert not torch.allclose(ranks[0]["whitened"], masked_whiten(x[:half], mask[:half]))

    start = _params(trainer.policy, _critic(trainer))
    single = _update(inputs, {"policy": copy.deepcopy(trainer.policy), "algo": trainer.algo,
                              "critic": copy.deepcopy(_critic(trainer))})
    assert set(single) == set(ranks[0]["params"]) and (algo != "ppo" or any(k.startswith("critic.") for k in single))
    moved = sum(float((single[k] - start[k]).abs().max()) for k in single)
    assert moved > 1e-2  # the step is real, so agreeing with it means something
    for k in single:
        torch.testing.assert_close(ranks[0]["params"][k], ranks[1]["params"][k], rtol=0, atol=0)  # replicas in sync
        torch.testing.assert_close(ranks[0]["params"][k], single[k], rtol=1e-5, atol=1e-6, msg=k)


def _trainer_worker(rank: int, init_file: str, overrides: list[str], reward_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, reward_dir)  # the user reward module of `signal_reward`
    # a short timeout: ranks that disagree on the number of collectives fail instead of hanging
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        trainer = Trainer(load_config(overrides=overrides), run_dir=f"{out_dir}/rank{rank}")
        metrics = [trainer.train_step(step) for step in (1, 2, 3)]
        params = {k: v.detach().clone() for k, v in parallel.unwrap_ddp(trainer.policy).named_parameters()}
        torch.save({"params": params, "metrics": metrics}, f"{out_dir}/trainer{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dynamic_sampling_ranks_stay_in_step(nano_dir, tmp_path, signal_reward):
    """DAPO with one generation round: the ranks keep different numbers of groups, yet take the same
    number of optimizer steps (the smallest batch sets it) and end with the same weights."""
    overrides = tiny_overrides(nano_dir, tmp_path, **{
        "algo.name": "dapo", "task.rewards": signal_reward, "algo.max_gen_rounds": 1, "optim.minibatches": 2,
        "rollout.prompts_per_step": 4, "rollout.group_size": 4, "run.steps": 3})
    mp.spawn(_trainer_worker, args=(str(tmp_path / "init"), overrides, str(tmp_path), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"trainer{r}.pt") for r in range(WORLD)]
    kept = [[m["dapo/groups_kept"] for m in r["metrics"]] for r in ranks]
    assert kept[0] != kept[1], kept  # the ranks sampled different data and kept different batches
    updates = [[m["actor/updates"] for m in r["metrics"]] for r in ranks]
    assert updates[0] == updates[1] and sum(updates[0]) > 0
    start = Trainer(load_config(overrides=overrides), run_dir=tmp_path / "start").policy
    assert any(not torch.equal(p, ranks[0]["params"][k]) for k, p in start.named_parameters())
    for k in ranks[0]["params"]:
        torch.testing.assert_close(ranks[0]["params"][k], ranks[1]["params"][k], rtol=0, atol=0, msg=k)


def _name_worker(rank: int, init_file: str, overrides: list[str], reward_dir: str, out_dir: str) -> None:
    import time

    torch.set_num_threads(1)
    sys.path.insert(0, reward_dir)
    if rank == 1:  # this rank's clock is a few seconds ahead (another machine, or a later start)
        real = time.strftime
        time.strftime = lambda fmt, *a: real(fmt, time.localtime(time.time() + 7))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        trainer = Trainer(load_config(overrides=overrides))  # no run.name: named from the clock
        torch.save(str(trainer.run_dir), f"{out_dir}/name{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_uses_rank_0s_run_folder(nano_dir, tmp_path, signal_reward):
    overrides = [o for o in tiny_overrides(nano_dir, tmp_path, **{"task.rewards": signal_reward})
                 if not o.startswith("run.name")]
    mp.spawn(_name_worker, args=(str(tmp_path / "init"), overrides, str(tmp_path), str(tmp_path)), nprocs=WORLD)
    names = [torch.load(tmp_path / f"name{r}.pt") for r in range(WORLD)]
    assert names[0] == names[1], names
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("grpo-")]) == 1

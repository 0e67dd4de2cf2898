"""The one forward path under the wrappers users scale with: log-probs (and their gradients) of a model
wrapped by DDP or sharded by FSDP2 over 2 ranks (gloo) equal the bare model's, and the critic's values
likewise. The PEFT case is in test_lora.py (a PEFT model against its merged copy)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradus import parallel
from gradus.logprobs import completion_logprobs
from gradus.models import build_char_tokenizer, build_critic, build_tiny_model, critic_values

WORLD = 2


def _batch() -> tuple[torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    return ids, mask, 6


def _reference(out: str) -> None:
    model = build_tiny_model("nano", tokenizer=build_char_tokenizer(), seed=1)
    ids, mask, start = _batch()
    logp, entropy = completion_logprobs(model, ids, mask, start, chunk_size=7, with_entropy=True)
    (logp * mask[:, start:]).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    critic = build_critic(model)
    with torch.no_grad():
        critic.score.weight.normal_()  # a nonzero head, so values mean something
    torch.save({"logp": logp.detach(), "entropy": entropy, "grads": grads,
                "values": critic_values(critic, ids, mask).detach(), "critic": critic.state_dict()}, out)


def _worker(rank: int, init: str, ref_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ref = torch.load(ref_file, weights_only=False)
        ids, mask, start = _batch()
        results = {}
        for kind in ("ddp", "fsdp2"):
            model = build_tiny_model("nano", tokenizer=build_char_tokenizer(), seed=1)
            wrapped = parallel.wrap(model, kind, torch.device("cpu"))
            logp, entropy = completion_logprobs(wrapped, ids, mask, start, chunk_size=7, with_entropy=True)
            # the sum over ranks of this rank's loss is WORLD x the single loss: gradients sum over ranks
            (logp * mask[:, start:]).sum().div(WORLD).backward()
            grads = {}
            for k, p in parallel.unwrap_ddp(wrapped).named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[k] = g.clone()
            critic = build_critic(model if kind == "ddp" else build_tiny_model("nano", tokenizer=build_char_tokenizer(),
                                                                                 seed=1))
            critic.load_state_dict(ref["critic"])
            values = critic_values(parallel.wrap(critic, kind, torch.device("cpu")), ids, mask)
            results[kind] = {"logp": logp.detach(), "entropy": entropy, "grads": grads, "values": values.detach()}
        torch.save(results, f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_forward_equal_the_bare_model(tmp_path):
    _reference(str(tmp_path / "ref.pt"))
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "ref.pt"), str(tmp_path / "rank")), nprocs=WORLD)
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for kind, res in got.items():
            torch.testing.assert_close(res["logp"], ref["logp"], rtol=1e-6, atol=1e-6, msg=kind)
            torch.testing.assert_close(res["entropy"], ref["entropy"], rtol=1e-6, atol=1e-6, msg=kind)
            torch.testing.assert_close(res["values"], ref["values"], rtol=1e-6, atol=1e-6, msg=kind)
            assert set(res["grads"]) == set(ref["grads"])
            for k, g in ref["grads"].items():  # rounding only: relative to each gradient's norm
                err = float((res["grads"][k] - g).norm() / g.norm().clamp(min=1e-12))
                assert err < 1e-6, (kind, k, err)

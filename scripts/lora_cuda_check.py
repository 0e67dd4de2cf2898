"""LoRA on CUDA, for a machine with a GPU: in float32 and bfloat16, a PEFT nano model's
log-probs against its merged copy's, their greedy samples, a 2-step LoRA run against 1 step + resume 1 step,
and `gradus export`. Prints one line per check and writes $OUT/gpu_lora.json (default /tmp/out).

    PYTHONPATH=src python scripts/lora_cuda_check.py      # from the repository root
"""

import json
import os
import sys
import time
from pathlib import Path

import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from train.conftest import tiny_overrides  # noqa: E402

from gradus.cli import main  # noqa: E402
from gradus.config import ModelConfig, load_config  # noqa: E402
from gradus.logprobs import completion_logprobs  # noqa: E402
from gradus.models import build_char_tokenizer, build_tiny_model, lora, save_pretrained  # noqa: E402
from gradus.rollout import LocalEngine, SamplingParams  # noqa: E402
from gradus.train.resume import resume_config  # noqa: E402
from gradus.train.trainer import Trainer  # noqa: E402

DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu tries the script on a machine without a GPU


def greedy(model, tokenizer):
    engine = LocalEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[])
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    return engine.generate([[5, 6, 7, 8], [9, 10], [11, 12, 13]], 1, params).completion_ids


def adapter_checks(tokenizer, dtype):
    """A nonzero adapter: PEFT model against its merged copy (log-probs, greedy) and against its base."""
    model = lora.apply_lora(build_tiny_model("nano", tokenizer=tokenizer, seed=0).to(DEVICE, dtype),
                            ModelConfig(lora_r=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.3).to(p))
    ids = torch.randint(5, 60, (3, 14), generator=gen).to(DEVICE)  # [B, S]
    mask = torch.ones_like(ids)  # [B, S]
    merged = lora.merged_copy(model)
    adapted, flat = completion_logprobs(model, ids, mask, 6), completion_logprobs(merged, ids, mask, 6)
    with lora.reference_mode(model):
        base = completion_logprobs(model, ids, mask, 6)
    return {"logp_maxdiff_peft_vs_merged": (adapted - flat).abs().max().item(),
            "adapter_effect": (adapted - base).abs().max().item(),
            "greedy_equal": bool(torch.equal(greedy(model, tokenizer), greedy(merged, tokenizer)))}


def run_checks(nano, tmp, dtype):
    """2 LoRA steps straight against 1 step + resume 1 step (parameters), then export the straight run."""
    start = time.time()
    extra = {"model.lora_r": 4, "optim.lr": 1e-2, "task.rewards": "gpu_rewards:digits:0.5,numeric_match",
             "run.device": DEVICE, "model.dtype": dtype, "run.save_every": 1, "optim.minibatches": 2,
             "algo.kl_coef": 0.05}
    straight = Trainer(load_config(overrides=tiny_overrides(nano, tmp / f"a-{dtype}", **extra)))
    straight.fit()
    one = Trainer(load_config(overrides=tiny_overrides(nano, tmp / f"b-{dtype}", **{**extra, "run.steps": 1})))
    one.fit()
    resumed = Trainer(resume_config(one.run_dir, ["run.steps=2"]), run_dir=one.run_dir, resume=True)
    resumed.fit()
    diffs = [(a - b).abs().max().item() for a, b in zip(straight.policy.parameters(), resumed.policy.parameters(),
                                                        strict=True)]
    rc = main(["export", str(straight.run_dir), "--out", str(tmp / f"exp-{dtype}")])
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp / f"exp-{dtype}")
    return {"resume_max_param_diff": max(diffs), "export_rc": rc,
            "export_dtype": str(next(exported.parameters()).dtype), "seconds": round(time.time() - start, 1)}


def run() -> None:
    print("torch", torch.__version__, "device", DEVICE, "peft", peft.__version__,
          "transformers", transformers.__version__)
    out, tmp = Path(os.environ.get("OUT", "/tmp/out")), Path("/tmp/gpu_lora")
    tmp.mkdir(exist_ok=True)
    tokenizer = build_char_tokenizer()
    nano = save_pretrained(build_tiny_model("nano", tokenizer=tokenizer, seed=0), tokenizer, tmp / "nano")
    (tmp / "gpu_rewards.py").write_text("def digits(prompts, completions, **fields):\n"
                                        "    return [sum(ch.isdigit() for ch in c) / 10 for c in completions]\n")
    sys.path.insert(0, str(tmp))
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        report[str(dtype)] = adapter_checks(tokenizer, dtype)
        print(dtype, report[str(dtype)], flush=True)
    for dtype in ("float32", "bfloat16"):
        report[dtype] = run_checks(nano, tmp, dtype)
        print(dtype, report[dtype], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_lora.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    run()

"""Short runs whose logged metrics are pinned in `pinned_metrics.json`, so that a change to how the trainer is
put together (not to what it computes) is seen to change no result.

Each case is a few steps on the untrained nano model with the digits reward (its groups' rewards differ, so
every update moves the weights), through the paths a restructuring touches: the old log-prob pass
(minibatches), the reference model and KL, the critic and GAE, LoRA's adapter-off reference, the bf16
sampling copy, and MoE routing replay. Timings and the thread count are left out (they are the machine's).
One change was recorded on purpose: the LoRA case's `mismatch/*` and `ppl/rollout`, which measure the sampling
log-probs, were recorded again when the local engine began to sample a LoRA policy from a merged copy with
its fast decoder instead of the PEFT forward: their last bits moved (the sampled completions, and every other
value, did not).

    python -m tests.train.pinned_runs --record   # rewrite the fixture (only on purpose: it pins the results)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from gradus.config import load_config
from gradus.train.runlog import read_metrics
from gradus.train.trainer import train

FIXTURE = Path(__file__).with_name("pinned_metrics.json")

# name -> overrides beyond the common ones
CASES: dict[str, dict[str, str]] = {
    "dapo": {"algo.name": "dapo", "algo.overlong_cache": "2"},
    "grpo_minibatches": {"algo.name": "grpo", "optim.minibatches": "2"},
    "ppo": {"algo.name": "ppo"},
    "grpo_lora": {"algo.name": "grpo", "model.lora_r": "4"},
    "gspo_bf16_rollout": {"algo.name": "gspo", "rollout.dtype": "bfloat16"},
    "moe_r3": {"algo.name": "sapo", "algo.routing_replay": "r3", "optim.minibatches": "2", "@arch": "qwen2_moe"},
}

# timings and the machine's thread count: not results
UNPINNED_PREFIXES = ("time/",)
UNPINNED_KEYS = ("rollout/gen_seconds", "rollout/tokens_per_s")


def machine() -> dict[str, str]:
    """What decides float rounding here: the CPU (its model and instruction sets) and the libraries."""
    import hashlib
    import platform

    import torch
    import transformers

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {"cpu": model, "flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "torch": torch.__version__, "transformers": transformers.__version__}


def pinned(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if not k.startswith(UNPINNED_PREFIXES) and k not in UNPINNED_KEYS}


def run_case(name: str, model_dir: Path, reward_spec: str, out: Path) -> list[dict]:
    extra = dict(CASES[name])
    extra.pop("@arch", None)
    overrides = {
        "model.path": str(model_dir), "run.out_dir": str(out), "run.name": name, "run.progress": "false",
        "run.steps": "3", "run.eval_every": "0", "run.save_every": "0", "task.heldout_size": "8",
        "rollout.prompts_per_step": "4", "rollout.group_size": "4", "rollout.max_new_tokens": "6",
        "run.cache_dir": str(out / "cache"), "run.threads": "1", "task.rewards": reward_spec, **extra,
    }
    result = train(load_config(overrides=[f"{k}={v}" for k, v in overrides.items()]))
    return [pinned(r) for r in read_metrics(result.run_dir / "metrics.jsonl")]


def run_all(folder: Path) -> dict[str, list[dict]]:
    """Every case, in `folder` (models, the reward module and run folders go there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import save_untrained, write_digits_reward

    spec = write_digits_reward(folder, "pinned_rewards")
    sys.path.insert(0, str(folder))
    models: dict[str, Path] = {}
    out = {}
    for name, extra in CASES.items():
        arch = extra.get("@arch", "qwen2")
        if arch not in models:
            models[arch] = save_untrained(folder / f"nano-{arch}", "nano", arch=arch)
        out[name] = run_case(name, models[arch], spec, folder / "runs")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"write {FIXTURE.name}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        got = run_all(Path(tmp))
    if args.record:
        FIXTURE.write_text(json.dumps({"machine": machine(), "runs": got}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE}")
    else:
        print(json.dumps(got, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

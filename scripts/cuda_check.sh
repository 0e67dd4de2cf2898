#!/usr/bin/env bash
# The CUDA paths of issue 12, on a machine with one GPU (the `device` tool's): `gradus train` on CUDA in float32
# and bfloat16 (the default job: built-in micro model, warm start, 250 RL steps), then torchrun with nccl, DDP and
# FSDP2, against a single process on the same global batch. Writes logs and a summary to $OUT (default /tmp/out).
#
#   bash scripts/cuda_check.sh        # from the repository root; needs torch with CUDA, transformers, peft
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CACHE=/tmp/gradus-cache
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu STEPS=3 tries the script on a machine without a GPU (gloo instead of nccl)
STEPS=${STEPS:-250}
# the settings docs/scaling.md measured (the defaults before issue 11)
COMMON="run.progress=false run.cache_dir=$CACHE run.out_dir=/tmp/runs run.device=$DEVICE algo.name=grpo rollout.prompts_per_step=64 sft.steps=300"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || lscpu | grep "Model name"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  local start=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? took=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  echo "$name rc=$rc ${took}s: $(grep -E '^\| [a-z_]+ \|' "$OUT/$name.log" | tail -1)" | tee -a "$OUT/summary.txt"
}

if [ "${ONLY_TORCHRUN:-0}" != 1 ]; then
# 1. the main job on CUDA, float32 then bfloat16 (the warm start is made once, in float32, and cached)
run train_fp32 200 python3 -m gradus train $COMMON run.steps=$STEPS run.name=fp32
run train_bf16 150 python3 -m gradus train $COMMON run.steps=$STEPS model.dtype=bfloat16 run.name=bf16
fi

# 2. torchrun (nccl, one GPU: one rank) with DDP and FSDP2 against one process, same global batch, 6 steps
SHORT="$COMMON run.steps=6 run.eval_every=0 run.save_every=3"
run single 90 python3 -m gradus train $SHORT run.name=single
for p in ddp fsdp2; do
  run torchrun_$p 120 torchrun --standalone --nproc-per-node 1 -m gradus train $SHORT run.parallel=$p run.name=tr_$p
done
# resume: a 3-step checkpoint of the DDP run, continued to 6, against the straight run
rm -rf /tmp/runs/tr_ddp_resumed; cp -r /tmp/runs/tr_ddp /tmp/runs/tr_ddp_resumed \
  && rm -rf /tmp/runs/tr_ddp_resumed/checkpoints/step-000006 /tmp/runs/tr_ddp_resumed/summary.json
run torchrun_ddp_resume 120 torchrun --standalone --nproc-per-node 1 -m gradus train --resume /tmp/runs/tr_ddp_resumed
python3 - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json
from pathlib import Path
from safetensors.torch import load_file

def policy(name):
    path = Path("/tmp/runs") / name / "checkpoints" / "step-000006" / "policy" / "model.safetensors"
    return load_file(path) if path.is_file() else None

def rel(a, b):
    keys = sorted(b)
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in keys) ** 0.5
    return num / sum(float(b[k].float().norm() ** 2) for k in keys) ** 0.5

base = policy("single")
for name in ("tr_ddp", "tr_fsdp2", "tr_ddp_resumed"):
    got = policy(name)
    if base is None or got is None:
        print(name, "missing checkpoint")
        continue
    ref = policy("tr_ddp") if name == "tr_ddp_resumed" else base
    print(f"{name}: relative difference of the final policy to {'tr_ddp' if ref is not base else 'single'}: "
          f"{rel(got, ref):.2e}")
for name in ("fp32", "bf16", "single", "tr_ddp", "tr_fsdp2"):
    path = Path("/tmp/runs") / name / "metrics.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        steps = [r["time/step_seconds"] for r in rows if "time/step_seconds" in r]
        steps = sorted(steps[1:]) or [float("nan")]
        tok = [r["rollout/tokens_per_s"] for r in rows if "rollout/tokens_per_s" in r][1:] or [float("nan")]
        evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
        print(f"{name}: median step {steps[len(steps) // 2]:.3f} s, median rollout {sorted(tok)[len(tok) // 2]:.0f} "
              f"tok/s, eval accuracy {evals}")
EOF
cp /tmp/runs/fp32/summary.json "$OUT/summary_fp32.json" 2>/dev/null
cp /tmp/runs/bf16/summary.json "$OUT/summary_bf16.json" 2>/dev/null

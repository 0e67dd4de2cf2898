"""Multi-turn episodes: what the episode path costs, and how fast the built-in game plays.

1. Overhead on a one-turn task. The countdown task trained twice from the same warm start and seed: as today's
   one-completion path (the countdown reward), and as episodes of `CountdownOnce` below, an environment that
   scores the one turn with the same reward and ends. Both sample the same tokens (turn 1 of an episode is keyed
   as a one-turn rollout), so the difference is the episode path itself: the environment workers' round trips,
   the per-turn bookkeeping, building the batch. Compared: the median time of rollout + score per step, and of
   the whole step, alternating the two paths (A B, then B A) over `--repeats`.
2. The built-in game (`--task guess`, four turns): episodes per second of the rollout stage, and the environment
   calls' share of the step (`env/env_s` / `time/step_seconds`).

    python bench/episodes.py [--steps 30] [--repeats 3] [--threads 2]

Timings on a shared machine are noisy: read the ratios measured in one invocation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from gradus.envs import BaseEnvironment, Step
from gradus.rewards import countdown_reward

HERE = Path(__file__).resolve()


class CountdownOnce(BaseEnvironment):
    """The countdown reward as a one-turn environment (part 1 of the module docstring)."""

    name = "countdown_once"

    def step(self, state, action):
        m = state.meta
        score = countdown_reward([""], [action], numbers=[m["numbers"]], target=[m["target"]])[0]
        return Step(None, reward=score, done=True, state=None, success=score >= 1.0)


def train(out: Path, name: str, steps: int, threads: int, *extra: str) -> list[dict]:
    """One run's step records; each carries `episodes`, the completions or episodes its rollout stage sampled."""
    cmd = [sys.executable, "-m", "gradus", "train", f"run.steps={steps}", "run.eval_every=0", "run.save_every=0",
           f"run.threads={threads}", f"run.out_dir={out}", f"run.name={name}", "--no-progress",
           "task.heldout_size=20", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    cfg = yaml.safe_load((out / name / "config.yaml").read_text())["rollout"]
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()
               if line.strip() and "time/step_seconds" in line]
    for r in records:
        r["episodes"] = r.get("dapo/rounds", 1.0) * cfg["prompts_per_step"] * cfg["group_size"]
    return records


def median(records: list[dict], key, skip: int) -> float:
    return statistics.median(key(r) for r in records[skip:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out (warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    # env.max_tokens = rollout.max_new_tokens: the same length limit, so DAPO's overlong shaping is the same too
    paths = {"one completion": [], "episodes": [f"env.name={HERE}:CountdownOnce", "env.max_tokens=16"]}
    sample = lambda r: r["time/rollout_s"] + r.get("time/score_s", 0.0)  # noqa: E731
    found: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
    with tempfile.TemporaryDirectory(prefix="gradus-episodes-") as tmp:
        for repeat in range(args.repeats):
            order = list(paths) if repeat % 2 == 0 else list(reversed(paths))
            tokens = {}
            for label in order:
                records = train(Path(tmp), f"{label.replace(' ', '-')}-{repeat}", args.steps, args.threads,
                                *paths[label])
                tokens[label] = [r["rollout/tokens"] for r in records]
                found[label].append((median(records, sample, args.skip),
                                     median(records, lambda r: r["time/step_seconds"], args.skip)))
                print(f"repeat {repeat + 1} {label}: rollout+score {found[label][-1][0]:.3f} s, step "
                      f"{found[label][-1][1]:.3f} s", file=sys.stderr, flush=True)
            if tokens["one completion"] != tokens["episodes"]:
                raise RuntimeError("the two paths sampled different tokens: the comparison would be unfair")
        game = train(Path(tmp), "guess", args.steps, args.threads, "--task", "guess")
    base = [statistics.median(v[i] for v in found["one completion"]) for i in (0, 1)]
    print("| path | rollout + score s (median) | vs one completion | step s (median) | vs one completion |")
    print("|---|---:|---:|---:|---:|")
    for label, runs in found.items():
        got = [statistics.median(v[i] for v in runs) for i in (0, 1)]
        print(f"| {label} | {got[0]:.3f} | {got[0] / base[0]:.3f} | {got[1]:.3f} | {got[1] / base[1]:.3f} |")
    skip = args.skip
    episodes = median(game, lambda r: r["episodes"] / r["time/rollout_s"], skip)
    share = median(game, lambda r: r["env/env_s"] / r["time/step_seconds"], skip)
    print(f"\nguess: {episodes:.0f} episodes/s in the rollout stage, "
          f"{median(game, lambda r: r['env/turns_mean'], skip):.2f} turns each; environment calls "
          f"{100 * share:.1f}% of the step ({median(game, lambda r: r['time/step_seconds'], skip):.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

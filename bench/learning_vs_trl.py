"""Learning against TRL: held-out accuracy over training wall time, `gradus train` against TRL's `GRPOTrainer`.

What is measured, for each row and seed: how held-out greedy accuracy grows with training wall time when
gradus and TRL 1.16 train the same model with the same settings. Rows: `dapo` is `gradus train` with its
defaults (the DAPO preset) against TRL's `loss_type="dapo"`; `grpo` is gradus' GRPO preset against TRL's
`loss_type="grpo"`, neither with dynamic sampling, so that the engine and the update are compared without
DAPO's sampling advantage. Per seed and as mean and range over the seeds: the time to +10 points over the
start, the time to TRL's final accuracy, each library's accuracy at TRL's final wall time, and the final
accuracies (measures defined in bench/learning_report.py).

Both libraries, per row and seed:
1. start from one model folder: gradus' warm start for that seed (`gradus.train.bootstrap.initial_model_dir`,
   the function `gradus train` calls; built once by SFT and cached, ~/.cache/gradus or $GRADUS_CACHE);
2. train on the same countdown prompts in the same order: gradus reads its task's training stream
   (examples 0, 1, 2, ... of `build_task` for the seed); TRL gets that stream's first steps x 16 examples as
   its dataset, rendered by the same task code, with `shuffle_dataset=False` (16 prompts a step, in order);
3. score completions with gradus' countdown reward (TRL calls the same function in its own process) and,
   where the gradus preset shapes overlong answers (DAPO), with TRL's own `get_soft_overlong_punishment`,
   the same formula (DAPO eq. 13) with the same L_max and L_cache;
4. take every other setting from gradus' resolved preset for the row (`learning_settings.trl_kwargs`),
   steps included: each preset's unless `--steps` (dapo 1000; grpo 1500, since without dynamic sampling
   most groups carry no signal). The table printed at the start of each row, and written to table.md,
   lists every setting side by side, then what could not be made equal (`learning_settings.differences`).

Timing: training wall time only, for both alike. gradus runs as `gradus train` (a process of its own) with
`run.eval_every=0` and a checkpoint every `--eval-every` steps; its `time/elapsed` (metrics.jsonl) adds up
its steps (`Trainer.train_step`) alone: model loading, the before/after evaluation, checkpoint writes and
the per-step metrics line fall outside it. TRL runs unmodified in a worker process (`trainer.train()`);
a `TrainerCallback` saves the policy at the same steps, and its clock starts when TRL's loop begins
(`on_train_begin`, after model loading) and counts everything between the callback's returns and its next
call (generation, rewards, the update, TRL's own bookkeeping), so the saves are left out. Held-out
accuracy is measured after training, on every saved policy, by the same code for both, `gradus eval`
(greedy, `--heldout-n` problems, default the task's 500): the curve is accuracy against training seconds
at each saved step, the warm start at 0 s (for TRL: the policy as TRL loaded it, saved before its first
step). Each library runs with the same fixed `--threads`, alone (one at a time; seeds alternate which goes
first). On a machine with more cores than one run uses, invocations with different --seeds may run side by
side on the same --out, each pinned to its own cores (`taskset -c 0 ... --threads 1` beside `taskset -c 1 ...
--threads 1`): both libraries then train beside the same kind of neighbour; a last invocation over all the
seeds reuses every curve and writes the tables. Checks, per seed (printed and kept): both starts score the
same; gradus' own before/after evaluations (summary.json) equal gradus eval's on the same weights; TRL's
GRPOConfig holds the values given.

Resume: each (row, seed, library) lives in --out/ROW/seedS/LIB; one whose curve.json exists is reused, not
rerun (its spec.json must match this command, or it stops naming what differs); an unfinished training is
started again from scratch, so that its time is one uninterrupted run; a finished training keeps the
evaluations already made. Intermediate checkpoints are deleted once evaluated (`--keep-checkpoints` keeps
them). Writes, after every seed: --out/results.json (every measurement and curve), --out/table.md
(settings, differences, per-seed and summary tables) and --out/accuracy.png (held-out accuracy against
training wall time and against steps: each seed, the seeds' mean and their range).

    pip install -e ".[bench]"
    PYTHONPATH=src python bench/learning_vs_trl.py [--rows dapo grpo] [--seeds 0 1 2 3 4] [--steps N]
        [--eval-every 50] [--threads N] [--heldout-n 500] [--out runs/learning-vs-trl]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules, as a script or a worker

import learning_report as report  # noqa: E402
from grpo_vs_trl import machine_line, quiet  # noqa: E402
from learning_settings import (  # noqa: E402
    ROWS,
    differences,
    row_config,
    row_overrides,
    settings_table,
    trl_kwargs,
    trl_run_kwargs,
)

REFUSAL = ('learning_vs_trl: TRL is not installed; it is an optional extra of gradus: pip install -e ".[bench]" '
           "(TRL 1.16.0), in a virtual environment of its own if you like")


# ---- one library's run --------------------------------------------------------------------------
class Failed(Exception):
    """A library's run or evaluation did not finish; the message says where its log is."""


def _say(prefix: str, text: str) -> None:
    print(f"{prefix} {text}", flush=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _saved_steps(steps: int, every: int) -> list[int]:
    """The steps whose policy is saved and evaluated: every `every`-th, and the last."""
    return sorted({*range(every, steps + 1, every), steps})


def train_gradus(lib_dir: Path, overrides: list[str], run: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """`gradus train` in a process of its own; returns (step, training seconds, policy folder) per saved step."""
    steps, every = run["steps"], run["eval_every"]
    cmd = [sys.executable, "-m", "gradus", "train", "--out", str(lib_dir), "--name", "run", "--no-progress",
           *overrides, "run.eval_every=0", f"run.save_every={every}",
           f"run.keep_checkpoints={len(_saved_steps(steps, every)) + 1}"]
    log = lib_dir / "train.log"
    metrics = lib_dir / "run" / "metrics.jsonl"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_worker_env(run["threads"]))
        shown = 0
        while proc.poll() is None:
            time.sleep(2.0)
            shown = _show_progress(prefix, _elapsed_by_step(metrics), steps, every, shown)
    if proc.returncode != 0:
        raise Failed(f"gradus train exited {proc.returncode}; log {log}:\n{_tail(log)}")
    elapsed = _elapsed_by_step(metrics)
    _show_progress(prefix, elapsed, steps, every, shown)
    ckpts = lib_dir / "run" / "checkpoints"
    points = [{"step": 0, "train_s": 0.0, "model": run["warm_start"]}]
    for step in _saved_steps(steps, every):
        policy = ckpts / f"step-{step:06d}" / "policy"
        if not policy.is_dir() or step not in elapsed:
            raise Failed(f"gradus' checkpoint of step {step} ({policy}) or its metrics line is missing; log {log}")
        points.append({"step": step, "train_s": elapsed[step], "model": str(policy)})
    return points


def _elapsed_by_step(metrics: Path) -> dict[int, float]:
    """Training seconds up to the end of each step, from a gradus run's metrics.jsonl (`time/elapsed`); the
    run may still be writing it (`read_metrics` leaves a cut last line out)."""
    from gradus.train.runlog import read_metrics

    return {int(r["step"]): float(r["time/elapsed"]) for r in read_metrics(metrics) if "time/elapsed" in r}


def _show_progress(prefix: str, elapsed: dict[int, float], steps: int, every: int, shown: int) -> int:
    for step in _saved_steps(steps, every):
        if shown < step and step in elapsed:
            _say(prefix, f"step {step}/{steps}, {elapsed[step]:.1f} s of training")
            shown = step
    return shown


def _worker_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def train_trl(lib_dir: Path, overrides: list[str], run: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """TRL's GRPOTrainer in a worker process (`trl_worker`); returns its saved steps like `train_gradus`."""
    spec = {"overrides": overrides, "out": str(lib_dir), "prefix": prefix, **run}
    (lib_dir / "worker.json").write_text(json.dumps(spec, indent=1))
    log = lib_dir / "worker.log"
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--trl-worker",
                                str(lib_dir / "worker.json")], stderr=f, env=_worker_env(run["threads"]))
    if code != 0 or not (lib_dir / "train.json").is_file():
        raise Failed(f"the TRL worker exited {code}; log {log}:\n{_tail(log)}")
    return json.loads((lib_dir / "train.json").read_text())["points"]


def trl_worker(spec_file: str) -> None:
    """Runs in its own process: TRL trains the row's run, saving the policy at the measured steps."""
    spec = json.loads(Path(spec_file).read_text())
    quiet()
    import datasets
    import torch
    import trl
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.rewards import get_soft_overlong_punishment

    from gradus.rewards import get_reward
    from gradus.tasks import reward_fields
    from gradus.train.bootstrap import build_task

    threads, out, warm = spec["threads"], Path(spec["out"]), Path(spec["warm_start"])
    torch.set_num_threads(threads)
    cfg = row_config(spec["overrides"])
    steps, every = cfg.run.steps, spec["eval_every"]
    tokenizer = AutoTokenizer.from_pretrained(warm, local_files_only=True)
    task = build_task(cfg, say=False)  # the task `gradus train` builds for this seed: its training stream
    examples = [task.train_example(i) for i in range(steps * cfg.rollout.prompts_per_step)]
    dataset = datasets.Dataset.from_dict({"prompt": [task.render_prompt(ex, tokenizer) for ex in examples],
                                          **reward_fields(examples)})
    rewards = [get_reward(task.default_reward)]
    if cfg.algo.overlong_shaping:
        rewards.append(get_soft_overlong_punishment(cfg.rollout.max_new_tokens, cfg.algo.overlong_cache))
    args = GRPOConfig(**trl_run_kwargs(cfg, out, every))
    (out / "args.json").write_text(args.to_json_string())
    saved = set(_saved_steps(steps, every))
    points: list[dict[str, Any]] = []

    class Clock(TrainerCallback):
        """Adds up the time between its own calls (training) and saves the policy at the measured steps."""

        def __init__(self) -> None:
            self.train_s, self.mark = 0.0, 0.0

        def save(self, step: int) -> None:
            folder = out / "checkpoints" / f"step-{step:06d}"
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp)
            for f in warm.iterdir():  # the warm start's tokenizer files, as they are: one tokenizer for all
                if f.is_file() and not (tmp / f.name).exists() and f.name != "gradus_sft.json":
                    shutil.copy2(f, tmp / f.name)
            os.replace(tmp, folder)
            points.append({"step": step, "train_s": self.train_s, "model": str(folder)})
            if step:
                _say(spec["prefix"], f"step {step}/{steps}, {self.train_s:.1f} s of training")

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            self.save(0)  # the policy as TRL loaded it: its evaluation must equal the warm start's
            self.mark = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            self.train_s += time.perf_counter() - self.mark
            if state.global_step in saved:
                self.save(state.global_step)
            self.mark = time.perf_counter()

    clock = Clock()
    trainer = GRPOTrainer(model=str(warm), reward_funcs=rewards, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict
    torch.set_num_threads(threads)  # in case accelerate or the Trainer changed it
    trainer.train()
    (out / "train.json").write_text(json.dumps({
        "points": points, "train_s": clock.train_s, "threads": torch.get_num_threads(), "trl": trl.__version__,
        "log_history": trainer.state.log_history}, indent=1))


def gradus_eval(model: str, seed: int, run: dict[str, Any]) -> float:
    """Held-out greedy accuracy of the model folder, by `gradus eval` (run in this process)."""
    from gradus.cli import main as gradus_main

    argv = ["eval", "--model", model, "--k", "0", "--json", f"run.seed={seed}", f"run.threads={run['threads']}",
            f"run.device={run['device']}", "--n", str(run["heldout_n"])]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = gradus_main(argv)
    if code != 0:
        raise Failed(f"gradus eval {' '.join(argv)} exited {code}")
    result = json.loads(buffer.getvalue().strip().splitlines()[-1])
    if result["n"] != run["heldout_n"]:
        raise Failed(f"gradus eval scored {result['n']} problems, not {run['heldout_n']}")
    return float(result["accuracy"])


def evaluate_points(lib_dir: Path, points: list[dict[str, Any]], seed: int, run: dict[str, Any],
                    prefix: str) -> list[report.Point]:
    """Accuracy of every saved policy; each result is kept in evals.json as it comes, so a restart redoes none."""
    path = lib_dir / "evals.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    curve = []
    for p in points:
        key = str(p["step"])
        if key not in done:
            start = time.perf_counter()
            done[key] = {"accuracy": gradus_eval(p["model"], seed, run), "eval_s": time.perf_counter() - start}
            path.write_text(json.dumps(done, indent=1))
            _say(prefix, f"step {p['step']} ({p['train_s']:.0f} s of training): held-out accuracy "
                         f"{done[key]['accuracy']:.3f} ({done[key]['eval_s']:.1f} s to evaluate)")
        curve.append({"step": p["step"], "train_s": p["train_s"], "accuracy": done[key]["accuracy"]})
    return curve


def run_library(lib: str, lib_dir: Path, overrides: list[str], seed: int, run: dict[str, Any],
                keep_checkpoints: bool, prefix: str) -> list[report.Point]:
    """One library's curve for one row and seed: reused when finished, else trained (from scratch) and evaluated."""
    curve_file, spec_file, points_file = lib_dir / "curve.json", lib_dir / "spec.json", lib_dir / "points.json"
    if spec_file.is_file() and (points_file.is_file() or curve_file.is_file()):  # a finished training is kept
        kept = json.loads(spec_file.read_text())
        drift = [f"{k} (kept {kept.get(k)!r}, now {v!r})" for k, v in run.items() if kept.get(k) != v]
        if drift:
            raise SystemExit(f"{prefix} the run kept in {lib_dir} was measured otherwise: {'; '.join(drift)}. "
                             "Delete that folder, or use another --out")
    if curve_file.is_file():
        _say(prefix, f"kept from an earlier run ({curve_file})")
        return json.loads(curve_file.read_text())["curve"]
    if not points_file.is_file():  # not trained to the end: train again from the start, so its clock is one run
        shutil.rmtree(lib_dir, ignore_errors=True)
        lib_dir.mkdir(parents=True)
        spec_file.write_text(json.dumps(run, indent=1))
        _say(prefix, f"training {run['steps']} steps, {run['threads']} thread(s); log in {lib_dir}")
        points = (train_gradus if lib == "gradus" else train_trl)(lib_dir, overrides, run, prefix)
        points_file.write_text(json.dumps(points, indent=1))
        _say(prefix, f"trained: {points[-1]['train_s']:.1f} s ({points[-1]['train_s'] / run['steps']:.3f} s/step); "
                     f"evaluating {len(points)} policies on {run['heldout_n']} held-out problems")
    points = json.loads(points_file.read_text())
    curve = evaluate_points(lib_dir, points, seed, run, prefix)
    curve_file.write_text(json.dumps({"curve": curve, "run": run}, indent=1))
    if not keep_checkpoints:  # the curve holds what they were for; the last policy stays
        for p in points[1:-1]:
            shutil.rmtree(Path(p["model"]).parent if lib == "gradus" else p["model"], ignore_errors=True)
        if lib == "trl":
            shutil.rmtree(points[0]["model"], ignore_errors=True)
    return curve


# ---- a seed, the report, the command ---------------------------------------------------------------
def seed_checks(curves: dict[str, list[report.Point]], seed_dir: Path, cfg: Any) -> list[str]:
    """What must hold if the comparison is fair; each failure is one line (printed and kept)."""
    problems = []
    if curves["gradus"][0]["accuracy"] != curves["trl"][0]["accuracy"]:
        problems.append(f"the start differs: gradus {curves['gradus'][0]['accuracy']}, TRL's loaded policy "
                        f"{curves['trl'][0]['accuracy']}, though both are the one warm-start folder")
    summary = seed_dir / "gradus" / "run" / "summary.json"
    if summary.is_file():  # gradus' own evaluations, in the training process, must agree with gradus eval's
        s = json.loads(summary.read_text())
        for key, point in (("heldout_accuracy_before", 0), ("heldout_accuracy_after", -1)):
            if s[key] != curves["gradus"][point]["accuracy"]:
                problems.append(f"gradus' {key} {s[key]} != gradus eval's {curves['gradus'][point]['accuracy']}")
    args_file = seed_dir / "trl" / "args.json"
    if args_file.is_file():  # what GRPOConfig made of the settings given
        made = json.loads(args_file.read_text())
        problems += [f"TRL's {k} is {made.get(k)!r}, not {v!r}" for k, v in trl_kwargs(cfg).items() if made.get(k) != v]
    return problems


def run_seed(row: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from gradus.train.bootstrap import initial_model_dir

    overrides = row_overrides(row, seed, args.steps, args.threads, args.device, args.heldout_n)
    cfg = row_config(overrides)
    prefix = f"[{row} seed {seed}]"
    warm = initial_model_dir(cfg, progress=False)  # what `gradus train` starts from; made by SFT once, then cached
    _say(prefix, f"warm start: {warm}")
    run = {"row": row, "seed": seed, "steps": cfg.run.steps, "eval_every": args.eval_every, "threads": args.threads,
           "device": args.device, "heldout_n": cfg.task.heldout_size, "warm_start": str(warm)}
    seed_dir = Path(args.out) / row / f"seed{seed}"
    curves = {}
    for lib in report.LIBRARIES if seed % 2 == 0 else report.LIBRARIES[::-1]:  # neither always goes first
        curves[lib] = run_library(lib, seed_dir / lib, overrides, seed, run, args.keep_checkpoints, f"{prefix} {lib}:")
    checks = seed_checks(curves, seed_dir, cfg)
    for problem in checks:
        _say(prefix, f"CHECK FAILED: {problem}")
    m = report.seed_measures(curves)
    _say(prefix, "done: " + ", ".join(f"{lib} {m[lib]['start']:.3f} -> {m[lib]['final']:.3f} in "
                                      f"{m[lib]['train_s']:.0f} s" for lib in report.LIBRARIES))
    return {"curves": curves, "measures": m, "checks": checks}


def write_report(out: Path, results: dict[str, Any]) -> str:
    measured = {row: {int(s): r["measures"] for s, r in by.items()} for row, by in results["seeds"].items()}
    lines = [f"command: {results['command']}", results["machine"], ""]
    for row, text in results["settings"].items():
        lines += [f"## {row}: settings", "", *text["table"], "", "What could not be made equal:", "",
                  *[f"- {d}" for d in text["differences"]], ""]
    lines += ["## Per seed", "", *report.per_seed_table(measured), "", "## Mean (min–max) over seeds", "",
              *report.summary_table(measured), "",
              "Times are training wall time to the first evaluation at or past the level (evaluations every "
              f"{results['eval_every']} steps); accuracy at TRL's end: the last evaluation at or before TRL's final "
              "training time. Held-out greedy accuracy by `gradus eval` for both."]
    checks = [f"- {row} seed {s}: {c}" for row, by in results["seeds"].items() for s, r in by.items()
              for c in r["checks"]]
    lines += ["", "Checks: " + ("all passed (same start, gradus' own evaluations equal gradus eval's, TRL's "
                               "settings as given)" if not checks else "FAILED:"), *checks]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    curves = {row: {int(s): r["curves"] for s, r in by.items()} for row, by in results["seeds"].items()}
    if any(curves.values()):
        report.plot(curves, out / "accuracy.png")
    return text


def trl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def parse(argv: list[str] | None) -> argparse.Namespace:
    from gradus.algorithm import resolve_algo
    from gradus.config import load_config

    preset = {row: resolve_algo(load_config(overrides=[f"algo.name={row}"])).steps for row in ROWS}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=None,
                    help="RL steps of every row; default: each gradus preset's, "
                         + ", ".join(f"{r} {n}" for r, n in preset.items())
                         + " (GRPO without dynamic sampling learns from fewer groups a step)")
    ap.add_argument("--eval-every", type=int, default=50, help="save and evaluate the policy every N steps")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of each library")
    ap.add_argument("--heldout-n", type=int, default=None, help="held-out problems scored (default: the task's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for both libraries")
    ap.add_argument("--out", default="runs/learning-vs-trl")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep every evaluated policy")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.eval_every < 1 or (args.steps is not None and args.steps < 1) or args.threads < 1:
        ap.error("--eval-every, --steps and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    if not trl_installed():
        print(REFUSAL, file=sys.stderr)
        return 2
    quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": "PYTHONPATH=src python bench/learning_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_line(args.threads),
        "eval_every": args.eval_every, "settings": {}, "seeds": {}}
    failed = 0
    for row in args.rows:
        cfg = row_config(row_overrides(row, args.seeds[0], args.steps, args.threads, args.device, args.heldout_n))
        table = settings_table(cfg, trl_run_kwargs(cfg, out, args.eval_every), args.threads)
        results["settings"][row] = {"table": table, "differences": differences(cfg)}
        print(f"\n{row}: gradus against TRL, every setting (seed {args.seeds[0]}):\n" + "\n".join(table) + "\n",
              flush=True)
        results["seeds"][row] = {}
        for seed in args.seeds:
            try:
                results["seeds"][row][seed] = run_seed(row, seed, args)
            except Failed as err:
                failed += 1
                print(f"[{row} seed {seed}] FAILED: {err}", file=sys.stderr, flush=True)
            write_report(out, results)  # what is measured so far, after every seed
    print("\n" + write_report(out, results) + f"\nwritten: {out / 'table.md'}, {out / 'results.json'}, "
          f"{out / 'accuracy.png'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The `gradus` command line: train, sft, eval, compare, algos, demo.

Every config key can be set as `section.key=value` after the command (e.g. `algo.clip_high=0.3`);
the common ones also have flags. `gradus train --help-config` lists every key with its meaning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gradus.config import ConfigError, help_text, load_config
from gradus.config_checks import validate
from gradus.objectives import PRESETS

# flag -> config key
SHORTCUTS = {
    "algo": "algo.name", "steps": "run.steps", "device": "run.device", "model": "model.path",
    "task": "task.name", "data": "task.data_file", "out": "run.out_dir", "name": "run.name", "seed": "run.seed",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--config", help="YAML config file (sections: model, task, rollout, algo, optim, sft, run)")
    for flag, key in SHORTCUTS.items():
        p.add_argument(f"--{flag}", dest=f"short_{flag}", metavar=key.split(".")[-1].upper(), help=f"= {key}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (run.progress=false)")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")


def _config_from(args: argparse.Namespace):
    overrides = list(args.overrides)
    for flag, key in SHORTCUTS.items():
        value = getattr(args, f"short_{flag}", None)
        if value is not None:
            overrides.append(f"{key}={value}")
            if flag == "data":
                overrides.append("task.name=file")
    if args.no_progress:
        overrides.append("run.progress=false")
    cfg = load_config(args.config, overrides)
    validate(cfg)  # every command checks its config before any work
    return cfg


def _help_config() -> str:
    from gradus.train.presets import preset_values

    return help_text(preset_values)


def _algos_table() -> str:
    """Each preset's settings side by side, one row per setting."""
    from gradus.train.presets import ALGO_DEFAULTS, describe, resolve_algo

    rows: dict[str, dict[str, str]] = {}
    for name in ALGO_DEFAULTS:
        for key, value in describe(resolve_algo(load_config(overrides=[f"algo.name={name}"]))).items():
            rows.setdefault(key, {})[name] = str(value)
    lines = ["| setting | " + " | ".join(ALGO_DEFAULTS) + " |", "|" + " --- |" * (len(ALGO_DEFAULTS) + 1)]
    for key, by_algo in rows.items():
        lines.append(f"| {key} | " + " | ".join(by_algo.get(a, "-") for a in ALGO_DEFAULTS) + " |")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from gradus.train.trainer import resume_config, train

    if args.resume:
        cfg = resume_config(Path(args.resume), list(args.overrides))
        result = train(cfg, run_dir=Path(args.resume), resume=True)
    else:
        result = train(_config_from(args))
    s = result.summary
    print("\n| algo | task | held-out accuracy before | after | steps | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {s['algo']} | {s['task']} | {s['heldout_accuracy_before']:.3f} | {s['heldout_accuracy_after']:.3f} "
          f"| {s['steps']} | {s['wall_time_s']:.0f} s |")
    print(f"run folder: {result.run_dir} (summary.json, metrics.jsonl, curves.png, tensorboard/, checkpoints/)")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from gradus.models import save_pretrained
    from gradus.train import bootstrap
    from gradus.train.sft import run_sft

    cfg = _config_from(args)
    device = bootstrap.resolve_device(cfg.run.device)
    task = bootstrap.build_task(cfg)
    if cfg.model.path:
        model, tokenizer = bootstrap.load_model(Path(cfg.model.path), cfg, device)
        metrics = run_sft(model, tokenizer, task, cfg.sft, seed=cfg.run.seed, progress=cfg.run.progress)
        out = Path(args.output)
        save_pretrained(model.cpu(), tokenizer, out)
    else:  # the built-in tiny model: train (or reuse) the cached warm start, then copy it
        import shutil

        cached = bootstrap.tiny_model_dir(cfg, progress=cfg.run.progress)
        metrics = json.loads((cached / "gradus_sft.json").read_text())
        out = Path(args.output)
        shutil.copytree(cached, out, dirs_exist_ok=True)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith("sft/")}))
    print(f"saved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gradus.train import bootstrap
    from gradus.train.evaluate import evaluate

    cfg = _config_from(args)
    if not cfg.model.path:
        raise ConfigError("gradus eval needs --model PATH (a HF model directory or a checkpoint's policy/)")
    device = bootstrap.resolve_device(cfg.run.device)
    task = bootstrap.build_task(cfg)
    heldout = task.heldout(args.n or cfg.task.heldout_size)
    bootstrap.check_positions(cfg, task, heldout)
    model, tokenizer = bootstrap.load_model(Path(cfg.model.path), cfg, device)
    result = evaluate(model, tokenizer, task, heldout,
                      max_new_tokens=cfg.rollout.max_new_tokens, k=args.k, temperature=cfg.rollout.temperature,
                      seed=cfg.run.seed)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"held-out: n={result['n']}  greedy accuracy={result['accuracy']:.3f}"
              + (f"  pass@{args.k}={result['pass_at_k']:.3f}" if args.k else ""))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gradus.compare import ComparePlan, load_plan, run_compare, write_report
    from gradus.compare.runner import echo_err

    if args.redraw:
        print(f"report: {write_report(Path(args.redraw))}")
        return 0
    if args.resume:
        if args.algos or args.seeds is not None or args.target is not None or args.overrides or args.config:
            raise ConfigError("--resume continues a comparison as it was asked; give no other options")
        out = Path(args.resume)
        plan = load_plan(out)
    else:
        overrides = list(args.overrides)
        for flag, key in (("steps", "run.steps"), ("task", "task.name"), ("device", "run.device")):
            if getattr(args, flag) is not None:
                overrides.append(f"{key}={getattr(args, flag)}")
        if args.no_progress:
            overrides.append("run.progress=false")
        plan = ComparePlan(overrides=overrides, config_file=args.config, target=args.target)
        if args.algos:
            plan.algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        if args.seeds is not None:
            plan.seeds = args.seeds
        out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    statuses = run_compare(plan, out, resume=bool(args.resume), echo=echo_err)
    failed = [s.name for s in statuses if s.state == "failed"]
    print((out / "report.md").read_text())
    if failed:
        print(f"gradus: {len(failed)} run(s) failed: {', '.join(failed)} (see {out / 'metrics'})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradus", description="RL post-training of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="RL training (no arguments: the built-in tiny model on arithmetic)")
    _add_config_args(p_train)
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p_sft = sub.add_parser("sft", help="supervised warm start on a task's answers")
    _add_config_args(p_sft)
    p_sft.add_argument("--output", required=True, help="where to save the fine-tuned model (HF format)")
    p_eval = sub.add_parser("eval", help="held-out greedy accuracy and pass@k")
    _add_config_args(p_eval)
    p_eval.add_argument("--k", type=int, default=8, help="samples per problem for pass@k (0: greedy only)")
    p_eval.add_argument("--n", type=int, default=None, help="held-out problems (default task.heldout_size)")
    p_eval.add_argument("--json", action="store_true", help="print one JSON object")
    p_cmp = sub.add_parser("compare", help="train several algorithms on one task, same budget; write a report")
    p_cmp.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    p_cmp.add_argument("--algos", help="comma-separated (default: ppo,grpo,dapo,gspo,sapo)")
    p_cmp.add_argument("--seeds", type=int, help="seeds per algorithm (default 2)")
    p_cmp.add_argument("--steps", type=int, help="RL steps per run (= run.steps; default 80)")
    p_cmp.add_argument("--task", help="= task.name")
    p_cmp.add_argument("--device", help="= run.device")
    p_cmp.add_argument("--target", type=float,
                       help="held-out accuracy to time (default: 10 points over each run's start)")
    p_cmp.add_argument("--config", help="YAML config file for every run")
    p_cmp.add_argument("--out", help="report folder (default runs/compare-<time>)")
    p_cmp.add_argument("--resume", metavar="DIR", help="continue an interrupted comparison")
    p_cmp.add_argument("--redraw", metavar="DIR", help="rewrite report.md and the plots from DIR/metrics")
    p_cmp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("algos", help="print every algorithm preset's settings side by side")
    demo = sub.add_parser("demo", help="train a toy policy with each objective (no model needed)")
    demo.add_argument("--algos", default=",".join(PRESETS), help="comma-separated presets")
    demo.add_argument("--steps", type=int, default=30)
    # key=value overrides may stand anywhere among the flags; argparse alone only takes them in one run
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # transformers' own per-file progress bars ("Loading weights") would drown gradus' progress bar
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if getattr(args, "help_config", False):
        print(_help_config())
        return 0
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "sft":
            return cmd_sft(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "algos":
            print(_algos_table())
            return 0
        from gradus.demo import main as demo_main
        from gradus.objectives import resolve_objective

        algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        for a in algos:
            resolve_objective(a)  # fail fast on a typo, listing the valid names
        demo_main(algos, args.steps)
        return 0
    except ConfigError as err:
        print(f"gradus: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

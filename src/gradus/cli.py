"""The `gradus` command line: train, sft, eval, export, compare, algos, demo.

Every config key can be set as `section.key=value` after the command (e.g. `algo.clip_high=0.3`);
the common ones also have flags. `gradus train --help-config` lists every key with its meaning.
gradus' own errors (the table in gradus.errors) end as one line on stderr and an exit code; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from gradus import __version__
from gradus.config import ConfigError, TrainConfig, help_text, load_config
from gradus.config_checks import validate
from gradus.objectives import ALGORITHMS
from gradus.threads import governor_for

# flag -> config key
SHORTCUTS = {
    "algo": "algo.name", "steps": "run.steps", "device": "run.device", "model": "model.path",
    "task": "task.name", "data": "task.data_file", "out": "run.out_dir", "name": "run.name", "seed": "run.seed",
    "env": "env.name",
}


def _default(key: str) -> object:
    """The default value of a dotted config key, e.g. 'task.name' -> 'countdown'."""
    section, name = key.split(".")
    return getattr(getattr(TrainConfig(), section), name)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--config", help="YAML config file (sections: model, task, rollout, algo, optim, sft, run)")
    for flag, key in SHORTCUTS.items():
        default = _default(key)
        p.add_argument(f"--{flag}", dest=f"short_{flag}", metavar=key.split(".")[-1].upper(),
                       help=f"= {key}" + ("" if default is None else f" (default {default})"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar (run.progress=false)")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")


def _overrides_from(args: argparse.Namespace) -> list[str]:
    """The key=value overrides, with the shortcut flags turned into theirs."""
    overrides = list(args.overrides)
    for flag, key in SHORTCUTS.items():
        value = getattr(args, f"short_{flag}", None)
        if value is not None:
            overrides.append(f"{key}={value}")
            if flag == "data":
                overrides.append("task.name=file")
    if args.no_progress:
        overrides.append("run.progress=false")
    return overrides


def _config_from(args: argparse.Namespace, *, rl: bool = True):
    """The command's config, validated before any work (`rl=False`: the command runs no RL step)."""
    cfg = load_config(args.config, _overrides_from(args))
    validate(cfg, rl=rl)
    if cfg.model.path:  # a run or checkpoint folder stands for the policy inside it
        from gradus.train.bootstrap import resolve_model_dir

        path, note = resolve_model_dir(cfg.model.path)
        if note:
            print(f"gradus: {note}", file=sys.stderr)
            cfg.model.path = str(path)
    return cfg


def _help_config() -> str:
    from gradus.algorithm import preset_values

    return help_text(preset_values)


def _algos_table() -> str:
    """Each preset's settings side by side, one row per setting."""
    from gradus.algorithm import describe, resolve_algo

    rows: dict[str, dict[str, str]] = {}
    for name in ALGORITHMS:
        for key, value in describe(resolve_algo(load_config(overrides=[f"algo.name={name}"]))).items():
            rows.setdefault(key, {})[name] = str(value)
    lines = ["| setting | " + " | ".join(ALGORITHMS) + " |", "|" + " --- |" * (len(ALGORITHMS) + 1)]
    for key, by_algo in rows.items():
        lines.append(f"| {key} | " + " | ".join(by_algo.get(a, "-") for a in ALGORITHMS) + " |")
    return "\n".join(lines)


def _resume_command(run_dir: Path) -> str:
    """How to continue a run: with torchrun again when this is a torchrun job."""
    if "LOCAL_WORLD_SIZE" in os.environ and "RANK" in os.environ:
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
        launcher = f"torchrun --nproc-per-node {os.environ['LOCAL_WORLD_SIZE']}" + (
            f" --nnodes {nodes} ..." if nodes > 1 else " --standalone")
        return f"{launcher} -m gradus train --resume {run_dir}"
    return f"gradus train --resume {run_dir}"


def cmd_train(args: argparse.Namespace) -> int:
    from gradus.train.durable import DiskFull
    from gradus.train.interrupts import Interrupted
    from gradus.train.resume import resume_config
    from gradus.train.trainer import train

    try:
        if args.resume:
            if args.config:
                raise ConfigError("--config cannot be combined with --resume: a run continues with its saved "
                                  "config.yaml; change keys with key=value (e.g. run.steps=500) or flags")
            cfg = resume_config(Path(args.resume), _overrides_from(args))
            result = train(cfg, run_dir=Path(args.resume), resume=True)
        else:
            result = train(_config_from(args))
    except Interrupted as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
            print(f"gradus: {err}\ncontinue with: {_resume_command(err.run_dir)}", file=sys.stderr)
        return 128 + err.signum
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        run_dir = err.run_dir if isinstance(err, DiskFull) else None
        hint = f"\ncontinue with: {_resume_command(run_dir)}" if run_dir else ""
        print(f"gradus: {err}{hint}", file=sys.stderr)
        return 1
    s = result.summary
    if not s:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print("\n| algo | task | held-out accuracy before | after | steps | wall time |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {s['algo']} | {s['task']} | {s['heldout_accuracy_before']:.3f} | {s['heldout_accuracy_after']:.3f} "
          f"| {s['steps']} | {s['wall_time_s']:.0f} s |")
    print(f"run folder: {result.run_dir} (summary.json, metrics.jsonl, curves.png, tensorboard/, checkpoints/)")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from gradus.models import load_model, save_pretrained
    from gradus.train import bootstrap
    from gradus.train.sft import run_sft

    cfg = _config_from(args, rl=False)
    device = bootstrap.resolve_device(cfg.run.device)
    task = bootstrap.build_task(cfg)
    if cfg.model.path:
        model, tokenizer = load_model(Path(cfg.model.path), cfg.model.dtype, device)
        bootstrap.check_prompt_lengths(task, tokenizer, model, cfg)  # the rows training would refuse
        metrics = run_sft(model, tokenizer, task, cfg.sft, seed=cfg.run.seed, progress=cfg.run.progress,
                          threads=cfg.run.threads, max_turns=cfg.env.max_turns)
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
    from gradus.models import load_model
    from gradus.rollout.registry import engine_class
    from gradus.runtime import plain_source
    from gradus.train import bootstrap
    from gradus.train.evaluate import evaluate
    from gradus.train.rollouts import env_spec, make_rollout

    cfg = _config_from(args, rl=False)
    if not cfg.model.path:
        raise ConfigError("gradus eval needs --model PATH (a HF model directory, a run folder or a checkpoint)")
    device = bootstrap.resolve_device(cfg.run.device)
    engine_type = engine_class(cfg.rollout.engine)
    engine_type.check_machine(cfg, device)  # e.g. vLLM installed and importable here
    task = bootstrap.build_task(cfg)
    n = args.n or cfg.task.heldout_size
    bootstrap.check_positions(cfg, task, task.heldout(n))
    bootstrap.heldout_set(task, n)  # before loading the model: the check above may have dropped every row
    model, tokenizer = load_model(Path(cfg.model.path), cfg.model.dtype, device)
    bootstrap.check_prompt_lengths(task, tokenizer, model, cfg)  # may drop rows of a file
    heldout = bootstrap.heldout_set(task, n)
    governor_for(cfg.run.threads, device).pick()
    source = plain_source(model, Path(cfg.model.path))  # a LoRA run's policy: merged, on its base's folder
    episodes = make_rollout(cfg, task) if env_spec(cfg, task) else None  # a multi-turn task: its environment
    engine = None
    try:
        engine = engine_type.build(cfg, source, tokenizer, device)
        engine.follow(source.export)  # an engine with weights of its own takes the model's (merged, for LoRA)
        if episodes is not None:
            episodes.bind(tokenizer, model)
            result = episodes.evaluate(engine, task, heldout, cfg.rollout.max_new_tokens)
        else:
            result = evaluate(engine, tokenizer, task, heldout, max_new_tokens=cfg.rollout.max_new_tokens, k=args.k,
                              temperature=cfg.rollout.temperature, seed=cfg.run.seed,
                              reward_timeout_s=cfg.task.reward_timeout_s)
    finally:
        if engine is not None:
            engine.close()
        if episodes is not None:
            episodes.close()
    if args.json:
        print(json.dumps(result))
    elif episodes is not None:
        print(f"held-out: n={result['n']}  greedy success={result['accuracy']:.3f}  turns={result['turns']:.2f}")
    else:
        print(f"held-out: n={result['n']}  greedy accuracy={result['accuracy']:.3f}"
              + (f"  pass@{args.k}={result['pass_at_k']:.3f}" if args.k else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gradus.train.export import export_policy

    try:
        _, done = export_policy(Path(args.source), Path(args.out))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"gradus: {err}", file=sys.stderr)
        return 1
    print(f"gradus: {done}", file=sys.stderr)
    print(f"saved to {args.out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gradus.compare import ComparePlan, load_plan, run_compare, write_report
    from gradus.compare.jobs import echo_err

    if args.redraw:
        print(f"report: {write_report(Path(args.redraw))}")
        return 0
    if args.resume:
        if (args.algos is not None or args.seeds is not None or args.target is not None or args.overrides
                or args.config):
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
        if args.algos is not None:  # given empty or blank, it is an error, not the default selection
            plan.algos = _algo_list(args.algos, f"the default, {','.join(plan.algos)}")
        if args.seeds is not None:
            plan.seeds = args.seeds
        out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    statuses = run_compare(plan, out, resume=bool(args.resume), echo=echo_err, jobs=args.jobs)
    failed = [s.name for s in statuses if s.state == "failed"]
    print((out / "report.md").read_text())
    if failed:
        print(f"gradus: {len(failed)} run(s) failed: {', '.join(failed)} (see {out / 'metrics'})", file=sys.stderr)
        return 1
    return 0


def _algo_list(text: str, default: str) -> list[str]:
    """An --algos value as its entries; a ConfigError when it names none (`""`, blanks, commas): a selection
    given empty is never taken to mean the default, which may be hours of training."""
    algos = [a.strip() for a in text.split(",") if a.strip()]
    if not algos:
        raise ConfigError(f"--algos {text!r} names no algorithm; give one or more, comma-separated (e.g. "
                          f"--algos grpo,dapo), or leave --algos out for {default}")
    return algos


# What each command would do under torchrun (it runs whole on every rank), and what to run instead.
_UNDER_TORCHRUN = {
    "compare": ("each rank would run the whole comparison into the same folder", "run it without torchrun; "
                "--jobs N trains N of its runs at once, each in its own process"),
    "sft": ("each rank would train and save the same model", "run it without torchrun, then train from its "
            "output under torchrun: torchrun ... -m gradus train --model OUTPUT"),
    "eval": ("each rank would evaluate the same held-out set", "run it without torchrun"),
    "export": ("each rank would write the same folder", "run it without torchrun"),
}


def _torchrun_refusal(command: str) -> str | None:
    """Why `command` must not run under torchrun, or None: only `train` splits its work over the ranks."""
    from gradus.parallel import launched_by_torchrun

    if command == "train" or not launched_by_torchrun():
        return None
    why, instead = _UNDER_TORCHRUN.get(command, ("each rank would do the same work", "run it without torchrun"))
    return (f"gradus {command} does not run under torchrun ({why}); {instead}. Only gradus train is a "
            "torchrun job (torchrun ... -m gradus train)")


def _unrecognized(parser: argparse.ArgumentParser, stray: list[str]) -> NoReturn:
    """Exit with `parser`'s usage (the subcommand's, not gradus'), suggesting the nearest flag to each typo."""
    flags = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    named = []
    for item in stray:
        near = difflib.get_close_matches(item.split("=", 1)[0], flags, n=1) if item.startswith("--") else []
        named.append(f"{item} (did you mean {near[0]}?)" if near else item)
    parser.error(f"unrecognized arguments: {' '.join(named)}")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `gradus` parser and each subcommand's parser, by name; help texts quote the live defaults."""
    from gradus.compare import DEFAULT_ALGOS, ComparePlan
    from gradus.demo import STEPS as DEMO_STEPS

    parser = argparse.ArgumentParser(prog="gradus", description="RL post-training of language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = f"the built-in {_default('model.tiny_size')} model, SFT warm-started"
    p_train = sub.add_parser("train", help=f"RL training (no arguments: {tiny}, on {_default('task.name')})")
    _add_config_args(p_train)
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p_sft = sub.add_parser("sft", help="supervised warm start on a task's answers")
    _add_config_args(p_sft)
    p_sft.add_argument("--output", required=True, help="where to save the fine-tuned model (HF format)")
    p_eval = sub.add_parser("eval", help="held-out greedy accuracy and pass@k")
    _add_config_args(p_eval)
    p_eval.add_argument("--k", type=int, default=8,
                        help="samples per problem for pass@k (0: greedy only; default %(default)s)")
    p_eval.add_argument("--n", type=int, default=None,
                        help=f"held-out problems (default task.heldout_size, {_default('task.heldout_size')})")
    p_eval.add_argument("--json", action="store_true", help="print one JSON object")
    p_exp = sub.add_parser("export", help="write a run's policy as one plain HF model folder (a LoRA adapter merged)")
    p_exp.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                       help="a run folder (its newest complete checkpoint), a checkpoint folder or a policy folder")
    p_exp.add_argument("--out", required=True, help="the new model folder (must not exist, or be empty)")
    p_cmp = sub.add_parser("compare", help="train several algorithms on one task, same budget; write a report")
    p_cmp.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    p_cmp.add_argument("--algos", help=f"comma-separated (default: {','.join(DEFAULT_ALGOS)})")
    p_cmp.add_argument("--seeds", type=int, help=f"seeds per algorithm (default {ComparePlan.seeds})")
    p_cmp.add_argument("--steps", type=int,
                       help="RL steps per run (= run.steps; default: each algorithm's, see `gradus algos`)")
    p_cmp.add_argument("--task", help="= task.name")
    p_cmp.add_argument("--device", help="= run.device")
    p_cmp.add_argument("--target", type=float,
                       help="held-out accuracy to time (default: 10 points over each run's start)")
    p_cmp.add_argument("--config", help="YAML config file for every run")
    p_cmp.add_argument("--out", help="report folder (default runs/compare-<time>)")
    p_cmp.add_argument("--jobs", type=int, default=1,
                       help="runs at once, each in its own process (default %(default)s; results are the same, "
                            "wall times are those of runs sharing the machine)")
    p_cmp.add_argument("--resume", metavar="DIR", help="continue an interrupted comparison (--jobs may be given)")
    p_cmp.add_argument("--redraw", metavar="DIR", help="rewrite report.md and the plots from DIR/metrics")
    p_cmp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("algos", help="print every algorithm preset's settings side by side")
    demo = sub.add_parser("demo", help="train a toy policy with each objective (no model needed)")
    demo.add_argument("--algos", default=",".join(ALGORITHMS), help="comma-separated algorithms (default: all)")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help="steps per preset (default %(default)s)")
    return parser, sub.choices


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    # key=value overrides may stand anywhere among the flags; argparse alone only takes them in one run
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        _unrecognized(commands[args.command], stray)
    if extra:
        args.overrides = [*args.overrides, *extra]
    # transformers' own per-file progress bars ("Loading weights") would drown gradus' progress bar
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if getattr(args, "help_config", False):
        print(_help_config())
        return 0
    from gradus.errors import user_error

    if refusal := _torchrun_refusal(args.command):  # before any work, on every rank; rank 0 says why
        kind, code = user_error(ConfigError(refusal)) or ("", 2)
        if os.environ.get("RANK") == "0":
            print(f"gradus: {kind}: {refusal}", file=sys.stderr)
        return code
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "sft":
            return cmd_sft(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "algos":
            print(_algos_table())
            return 0
        from gradus.demo import main as demo_main
        from gradus.objectives import resolve_objective

        algos = _algo_list(args.algos, "every preset")
        for a in algos:
            try:
                resolve_objective(a)  # fail fast on a typo, listing the valid names
            except ValueError as err:
                raise ConfigError(f"--algos: {err}") from err
        demo_main(algos, args.steps)
        return 0
    except Exception as err:
        found = user_error(err)
        if found is None:  # not one of gradus' own errors: a bug, whose traceback is wanted
            raise
        kind, code = found
        print(f"gradus: {kind}: {err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("gradus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`gradus compare`: train several algorithms on one task under one budget, then report.

Every run of a comparison gets the same config except `algo.name` (and each seed its `run.seed`),
so for one seed all algorithms see the same prompts in the same order (DAPO's dynamic sampling
reads further ahead in the same stream when it drops groups), start from the same warm-started
model and have the same number of steps.

The compare folder:

    compare.json          what was asked (algos, seeds, overrides) and every key of the runs' common
                          config as it was when the comparison started: `--resume` reads it back, so
                          a resumed comparison runs what it began with, whatever gradus' defaults or
                          the --config file have become since
    runs/<algo>-seed<k>/  each run's own folder (checkpoints, TensorBoard, curves)
    metrics/              each run's raw per-step metrics and summary, copied when it ends
    report.md, *.png      the report, redrawn from metrics/ alone (`gradus compare --redraw`)

A run that raises is recorded (metrics/<run>.error.txt) and the others go on. An interrupted
compare resumes where it stopped: finished runs are skipped, a run with a checkpoint continues
from it (the trainer's resume is exact on CPU), the rest start over. Runs go one at a time in this
process, or with `jobs` > 1 several at once in worker processes (gradus.compare.parallel).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradus.compare.jobs import RunJob, RunStatus, run_name, start_message, train_one
from gradus.config import ConfigError, TrainConfig, load_config, split_override, to_dict

# What every compare run sets unless the user overrides it, on top of `gradus train`'s defaults (the same
# task, rollout, optimizer and steps as a training run, so a comparison measures what `gradus train`
# does): the KL to the reference measured for every algorithm, not only those that pay it; one
# checkpoint kept per run (a comparison holds many runs). Give `optim.minibatches=4` to make the later
# updates of each batch off-policy, where the trust regions act (docs/compare.md).
COMPARE_DEFAULTS = {
    "algo.monitor_kl": "true",
    "run.keep_checkpoints": "1",
}
DEFAULT_ALGOS = ("ppo", "grpo", "dapo", "gspo", "sapo")
# Keys compare sets for each run (from --algos, --seeds, --out); never in the plan's overrides or base.
PER_RUN_KEYS = ("algo.name", "run.seed", "run.out_dir", "run.name")


@dataclass
class ComparePlan:
    algos: list[str] = field(default_factory=lambda: list(DEFAULT_ALGOS))
    seeds: int = 2
    overrides: list[str] = field(default_factory=list)  # key=value, for every run
    config_file: str | None = None
    target: float | None = None  # held-out accuracy to time; None: 10 points over the start
    # Every key of the runs' common config (defaults, --config file, COMPARE_DEFAULTS, overrides), frozen by
    # `freeze` when the comparison starts; None in a plan not yet started, or in a compare.json written
    # before compare kept it (resuming such a plan builds it from today's defaults, and says so).
    base: dict[str, Any] | None = None

    def run_names(self) -> list[tuple[str, int, str]]:
        return [(algo, seed, run_name(algo, seed)) for seed in range(self.seeds) for algo in self.algos]

    def common(self) -> dict[str, Any]:
        """Every key the runs share, as `section.key: value`: gradus' defaults, the --config file,
        COMPARE_DEFAULTS and the overrides, in that order (the frozen `base` once started)."""
        if self.base is not None:
            return dict(self.base)
        for item in self.overrides:
            _check_item(item, "an override")
        cfg = load_config(self.config_file, [*(f"{k}={v}" for k, v in COMPARE_DEFAULTS.items()), *self.overrides])
        return {f"{section}.{key}": value for section, values in to_dict(cfg).items() for key, value in values.items()
                if f"{section}.{key}" not in PER_RUN_KEYS}

    def freeze(self) -> None:
        """Fix the common config now, so that resuming later runs what was started."""
        self.base = self.common()

    def config(self, out: Path, algo: str, seed: int, name: str) -> TrainConfig:
        """The config of one run; `algo` is an --algos entry: ALGO, or ALGO:key=value[:key=value...] for a
        variant (e.g. grpo:algo.routing_replay=r3), whose settings apply to its runs only."""
        algo_name, *variant = algo.split(":")
        for item in variant:
            _check_item(item, f"--algos: {algo!r}: a variant's setting")
        fixed = [f"algo.name={algo_name}", f"run.seed={seed}", f"run.out_dir={out / 'runs'}", f"run.name={name}"]
        given = dict(split_override(item) for item in [*variant, *fixed])
        return load_config(None, {**self.common(), **given})


def _check_item(item: str, what: str) -> None:
    if "=" not in item:
        raise ConfigError(f"{what} is key=value, got {item!r}")
    key = split_override(item)[0]
    if key in PER_RUN_KEYS:
        raise ConfigError(f"{key} is set by gradus compare for each run (use --algos, "
                          "--seeds, --out)")


def save_plan(plan: ComparePlan, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(asdict(plan), indent=2))


def load_plan(out: Path) -> ComparePlan:
    path = Path(out) / "compare.json"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} does not exist (is {out} a gradus compare folder?)")
    return ComparePlan(**json.loads(path.read_text()))


def validate_plan(plan: ComparePlan, out: Path) -> None:
    """Every run's config is checked before any training, so a typo fails at once; so are the device, the
    model folder and the task's data, which every run shares."""
    from gradus.config_checks import validate
    from gradus.train.bootstrap import preflight

    if not plan.algos:
        raise ConfigError("--algos: give at least one algorithm")
    if len(set(plan.algos)) != len(plan.algos):
        raise ConfigError(f"--algos: an algorithm is listed twice: {','.join(plan.algos)}")
    if plan.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {plan.seeds}")
    if plan.target is not None and not 0 < plan.target <= 1:
        raise ConfigError(f"--target is a held-out accuracy in (0, 1], got {plan.target}")
    names: dict[str, str] = {}
    for algo, _, name in plan.run_names():
        if names.setdefault(name, algo) != algo:
            raise ConfigError(f"--algos: {names[name]!r} and {algo!r} would both be named {name!r}; make the "
                              "variants differ by more than a key's section")
    configs = [plan.config(out, algo, seed, name) for algo, seed, name in plan.run_names()]
    for cfg in configs:
        validate(cfg)
    for cfg in configs[: len(plan.algos)]:  # one per entry: a variant may change the model or the task
        preflight(cfg)


def run_compare(plan: ComparePlan, out: Path, *, resume: bool = False, echo: Callable[[str], None] = print,
                jobs: int = 1) -> list[RunStatus]:
    """Train every (algo, seed) run not yet finished, `jobs` at a time, then write the report. Returns each run's
    status, in the plan's order."""
    from gradus.compare.report import write_report
    from gradus.train.checkpoint import latest_checkpoint

    out = Path(out)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if not resume and (out / "compare.json").exists():
        raise ConfigError(f"--out: {out} already holds a comparison; continue it with `gradus compare --resume {out}`"
                          " or pick another folder")
    if plan.base is None and resume:
        echo(f"{out / 'compare.json'} was saved by an older gradus and holds only the overrides: runs not yet "
             "finished get today's defaults, which may differ from those of the runs already done")
    validate_plan(plan, out)
    if plan.base is None and not resume:
        plan.freeze()
    save_plan(plan, out)
    (out / "metrics").mkdir(exist_ok=True)
    statuses: dict[str, RunStatus] = {}
    todo: list[RunJob] = []
    runs = plan.run_names()
    for i, (algo, seed, name) in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {name}"
        if (out / "metrics" / f"{name}.summary.json").is_file():
            echo(f"{label}: already done, skipped")
            statuses[name] = RunStatus(name, algo, seed, "skipped")
            continue
        run_dir = out / "runs" / name
        again = run_dir.is_dir() and latest_checkpoint(run_dir) is not None
        todo.append(RunJob(name, algo, seed, label, plan.config(out, algo, seed, name), run_dir, again))
    if jobs > 1 and len(todo) > 1:
        from gradus.compare.parallel import run_parallel

        statuses.update((s.name, s) for s in run_parallel(todo, out, jobs, echo))
    else:
        for job in todo:
            echo(start_message(job))
            try:
                statuses[job.name] = train_one(job, out, echo)
            except KeyboardInterrupt:
                echo(f"{job.label}: interrupted; continue with `gradus compare --resume {out}`")
                raise
    report = write_report(out)
    echo(f"report: {report}")
    return [statuses[name] for _, _, name in runs]



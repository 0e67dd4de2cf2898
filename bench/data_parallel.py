"""Data-parallel scaling on this machine: 1 process x 2 threads against 2 processes x 1 thread (DDP, FSDP2).

Every case is a real `gradus train` launch of the same config and the same global batch (default: the
built-in micro model, SFT-warm-started and cached in ~/.cache/gradus; GRPO; 64 prompts x G=8 = 512
completions of at most 16 tokens per step), each in a fresh run folder:

- `1 process x 2 threads`: `python -m gradus train ... run.threads=2` (OMP_NUM_THREADS=2);
- `2 processes x 1 thread, ddp|fsdp2`: `torchrun --standalone --nproc-per-node 2 -m gradus train ...
  run.threads=1 run.parallel=ddp|fsdp2` (OMP_NUM_THREADS=1, gloo); each rank samples and trains on
  32 of the 64 prompts. One process runs the same code for ddp and fsdp2 (nothing is wrapped), so
  it is measured once.

What is measured, from each run's metrics.jsonl (written by rank 0; a 2-rank run's `time/step_seconds`
is the mean of the two ranks', which wait for each other at every collective): step time = the median
of `time/step_seconds` over the steps after the first (the first step warms up lazy initialisation);
steps/s = 1 / that; completions/s = prompts_per_step x group_size / that; tokens/s = the median of
`rollout/tokens` / `time/step_seconds`; generation and "rest" (scoring, log-prob passes, update,
collectives) = the medians of `rollout/gen_seconds` and of step - gen. Each number is then the median
over `--repeats` launches; the cases run interleaved (A B C, B C A, C A B, ...), never two at once.
Process start, model load and the evaluations before and after training are not in the step times (the
run's wall time is shown separately). The held-out set is cut to `--heldout` problems so the
evaluations are short.

Load: the machine is shared, and other work beside a 2-thread process slows it far more than its share
(see bench/contention.py). So: before each launch the bench waits (at most `--max-wait` s) until other
work keeps fewer than 0.3 cores busy over 2 s; while a launch runs, a thread samples every 0.25 s the
machine's busy CPU time (/proc/stat) and the CPU time of the launch's own process tree, and marks when
each step's metrics line appears, which gives the cores other work took during each step. The medians
above are over the quiet steps (others < 0.3 cores), or over all timed steps of a launch that had none;
the table says how many were quiet. /proc/loadavg before and after each launch is recorded too (it
counts the bench's own processes, and tasks waiting on I/O).

`--busy`: every launch runs beside a process that spins on one core (started after the quiet wait,
killed after the launch; its CPU counts as the bench's own, not as others'), as on a shared laptop or
CI runner; the numbers go to data_parallel_busy.json.

Sanity line: sampling is batch-invariant (each completion's randomness is keyed by seed, step, prompt
and sample index), so the 2-process runs must log the same step-1 rollout (`rollout/tokens`,
`rollout/length_mean`, `reward/mean`) as the 1-process run; later steps are compared too (they match
as long as the float rounding of the sharded update does not flip a sample).

    python bench/data_parallel.py [--steps 10] [--repeats 3] [--heldout 32] [--max-wait 120] [--busy] \\
        [--json bench/results/data_parallel.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from machine import cpu_model  # noqa: E402  (a sibling module: bench/ is on sys.path as a script)

TICK = os.sysconf("SC_CLK_TCK")
QUIET_CORES = 0.3  # a step during which other work kept fewer cores busy than this is "quiet"
SANITY_KEYS = ("rollout/tokens", "rollout/length_mean", "reward/mean")


@dataclass(frozen=True)
class Case:
    name: str
    nproc: int  # 1: plain `python -m gradus train`; >1: torchrun
    threads: int
    parallel: str


CASES = (
    Case("1 process x 2 threads", 1, 2, "ddp"),
    Case("2 processes x 1 thread, ddp", 2, 1, "ddp"),
    Case("2 processes x 1 thread, fsdp2", 2, 1, "fsdp2"),
)


def command(case: Case, overrides: list[str]) -> list[str]:
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(case.nproc)]
              if case.nproc > 1 else [sys.executable])
    return [*runner, "-m", "gradus", "train", *overrides, f"run.threads={case.threads}",
            f"run.parallel={case.parallel}"]


def cpu_busy_seconds() -> float:
    """Seconds of CPU time the whole machine has spent not idle (all cores; /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of `root` and every live process below it, by pid (found through each thread's
    /proc/PID/task/TID/children, so only the tree is read, not every process of the machine)."""
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            below = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        found[pid] = (int(after_name[11]) + int(after_name[12])) / TICK  # utime + stime (fields 14, 15)
        todo += below
    return found


class LoadMonitor(threading.Thread):
    """While a launch runs, every `tick` s: the wall time, the machine's busy CPU seconds, the CPU seconds of
    the launch's process tree (each process counted by its own increase, so one that ends takes nothing
    away; a process's last tick before it ends is lost, which makes others' share a little larger), and
    the number of lines in its metrics.jsonl. `per_step()` turns that into each step's others' cores."""

    def __init__(self, roots: list[int], metrics_file: Path, tick: float = 0.25):
        super().__init__(daemon=True)
        self.roots, self.metrics_file, self.tick = roots, metrics_file, tick
        self.samples: list[tuple[float, float, float, int]] = []  # (wall, machine busy, ours, metrics lines)
        self.done = threading.Event()

    def run(self) -> None:
        ours, last = 0.0, {}
        while True:
            now = {pid: cpu for root in self.roots for pid, cpu in tree_cpu(root).items()}
            ours += sum(max(0.0, cpu - last.get(pid, 0.0)) for pid, cpu in now.items())
            last.update(now)
            try:
                lines = len(self.metrics_file.read_text().splitlines())
            except OSError:
                lines = 0
            self.samples.append((time.perf_counter(), cpu_busy_seconds(), ours, lines))
            if self.done.wait(self.tick):
                return

    def per_step(self) -> list[float]:
        """Cores other work kept busy during each training step (step k ends at the first sample that sees
        its metrics line; metrics.jsonl's first line is the evaluation before step 1)."""
        ends = []
        for k in range(1, 1 + max((n for *_, n in self.samples), default=0)):
            ends.append(next(s for s in self.samples if s[3] >= k))
        out = []
        for a, b in zip(ends, ends[1:], strict=False):  # ends[0]: the evaluation's line = step 1's start
            wall = max(b[0] - a[0], 1e-6)
            out.append(max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / wall)
        return out


def read_steps(metrics_file: Path) -> list[dict[str, float]]:
    """The training-step lines of a metrics.jsonl (the evaluation lines have no step time)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return [r for r in rows if "time/step_seconds" in r]


def summarize(steps: list[dict[str, float]], completions_per_step: int,
              others: list[float] | None = None) -> dict[str, float]:
    """Medians over the steps after the first (the first warms up), over the quiet ones only (`others[i]`:
    cores other work kept busy during step i+1, < QUIET_CORES) when there is one, else over all."""
    if len(steps) < 2:
        raise ValueError("need at least 2 steps: the first is not timed")
    others = others if others is not None else [0.0] * len(steps)
    quiet = [r for r, o in zip(steps[1:], others[1:], strict=False) if o < QUIET_CORES]
    timed = quiet or steps[1:]
    step_s = statistics.median(r["time/step_seconds"] for r in timed)
    gen_s = statistics.median(r["rollout/gen_seconds"] for r in timed)
    return {
        "step_s": step_s,
        "steps_per_s": 1.0 / step_s,
        "completions_per_s": completions_per_step / step_s,
        "tokens_per_s": statistics.median(r["rollout/tokens"] / r["time/step_seconds"] for r in timed),
        "gen_s": gen_s,
        "rest_s": statistics.median(r["time/step_seconds"] - r["rollout/gen_seconds"] for r in timed),
        "threads": statistics.median(r["time/threads"] for r in timed),
        "quiet_steps": len(quiet), "timed_steps": len(steps) - 1,
    }


def same_rollouts(a: list[dict[str, float]], b: list[dict[str, float]]) -> list[bool]:
    """Per step: whether two runs logged the same rollout (SANITY_KEYS; reward/mean to 1e-6 relative)."""
    def same(x: dict[str, float], y: dict[str, float]) -> bool:
        return all(abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(y[k])) for k in SANITY_KEYS)

    return [same(x, y) for x, y in zip(a, b, strict=False)]


def wait_for_quiet(limit_cores: float, max_wait_s: float, window_s: float = 2.0) -> tuple[float, float]:
    """Wait (at most max_wait_s) until other work keeps fewer than limit_cores busy over a window; returns
    (seconds waited, busy cores in the last window). Called between launches, when none of ours runs."""
    start = time.perf_counter()
    while True:
        before = cpu_busy_seconds()
        time.sleep(window_s)
        cores = (cpu_busy_seconds() - before) / window_s
        waited = time.perf_counter() - start
        if cores < limit_cores or waited >= max_wait_s:
            return waited, cores


def run_case(case: Case, overrides: list[str], out_dir: Path, name: str, max_wait_s: float, spin: bool) -> dict:
    """One launch; with `spin`, beside a process that spins on one core (counted as the bench's own work)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(case.threads))
    waited, quiet_cores = wait_for_quiet(QUIET_CORES, max_wait_s)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if spin else None
    load0, busy0, own0, t0 = loadavg(), cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.Popen(command(case, [*overrides, f"run.out_dir={out_dir}", f"run.name={name}"]), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monitor = LoadMonitor([proc.pid] + ([hog.pid] if hog else []), out_dir / name / "metrics.jsonl")
    monitor.start()
    try:
        log, _ = proc.communicate()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    wall = time.perf_counter() - t0
    monitor.done.set()
    monitor.join()
    busy, own, load1 = cpu_busy_seconds() - busy0, children_cpu_seconds() - own0, loadavg()
    if proc.returncode != 0:
        sys.exit(f"{case.name} failed (exit {proc.returncode}):\n{log[-4000:]}")
    steps = read_steps(out_dir / name / "metrics.jsonl")
    return {"waited_s": waited, "busy_cores_before": quiet_cores, "wall_s": wall, "own_cpu_s": own,
            "others_cores": max(0.0, busy - own) / wall,
            "loadavg_before": load0, "loadavg_after": load1,
            "fast_decoder_refused": "fast decoder cannot run" in log,
            "steps": steps, "others_per_step": monitor.per_step()[:len(steps)]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="training steps per launch (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=3, help="launches of each case (the median is shown)")
    ap.add_argument("--heldout", type=int, default=32, help="held-out problems evaluated before and after")
    ap.add_argument("--max-wait", type=float, default=120.0,
                    help="before each launch, wait up to this many seconds for other work to use < 0.3 cores")
    ap.add_argument("--busy", action="store_true",
                    help="run every launch beside one process spinning on a core (a shared laptop or CI runner)")
    ap.add_argument("--json", default=None,
                    help="where the numbers go (default: bench/results/data_parallel[_busy].json; '': nowhere)")
    ap.add_argument("overrides", nargs="*", help="more `key=value` config overrides for every launch")
    args = ap.parse_args(argv)
    if args.json is None:
        args.json = str(Path(__file__).parent / "results" / f"data_parallel{'_busy' if args.busy else ''}.json")
    overrides = [f"run.steps={args.steps}", "run.eval_every=0", "run.save_every=0", "run.progress=false",
                 f"task.heldout_size={args.heldout}", "algo.name=grpo", "rollout.prompts_per_step=64", *args.overrides]
    from gradus.config import load_config

    cfg = load_config(overrides=overrides)
    completions = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; loadavg {Path('/proc/loadavg').read_text().strip()}")
    print(f"workload: {cfg.model.tiny_size if not cfg.model.path else cfg.model.path}, {cfg.algo.name}, "
          f"{cfg.rollout.prompts_per_step} prompts x G={cfg.rollout.group_size} = {completions} completions "
          f"(<= {cfg.rollout.max_new_tokens} tokens) per step, {args.steps} steps"
          f"{'; every launch beside one process spinning on a core' if args.busy else ''}")
    with tempfile.TemporaryDirectory(prefix="gradus-dp-") as tmp:
        # one unmeasured launch first: the warm start of the built-in model is made (or found) in the cache
        warm = subprocess.run([sys.executable, "-m", "gradus", "train", *overrides, "run.steps=1",
                               f"run.out_dir={tmp}", "run.name=warm-up"], capture_output=True, text=True)
        if warm.returncode != 0:
            sys.exit(f"warm-up launch failed:\n{(warm.stdout + warm.stderr)[-4000:]}")
        raw: dict[str, list[dict]] = {c.name: [] for c in CASES}
        for rep in range(args.repeats):
            order = [CASES[(rep + i) % len(CASES)] for i in range(len(CASES))]  # no case always follows another
            for i, case in enumerate(order):
                raw[case.name].append(run_case(case, overrides, Path(tmp), f"r{rep}-c{i}", args.max_wait,
                                               args.busy))
                r = raw[case.name][-1]
                print(f"  done: {case.name}, repeat {rep + 1}: {r['wall_s']:.0f} s (waited {r['waited_s']:.0f} s for "
                      f"quiet, {r['busy_cores_before']:.2f} cores busy), loadavg "
                      f"{r['loadavg_before']:.2f} -> {r['loadavg_after']:.2f}, others {r['others_cores']:.2f} cores",
                      file=sys.stderr, flush=True)

    summaries = {}
    for case in CASES:
        per = [summarize(r["steps"], completions, r["others_per_step"]) for r in raw[case.name]]
        summaries[case.name] = {k: statistics.median(p[k] for p in per) for k in per[0]}
        summaries[case.name]["quiet_steps"] = sum(p["quiet_steps"] for p in per)
        summaries[case.name]["timed_steps"] = sum(p["timed_steps"] for p in per)
        summaries[case.name]["wall_s"] = statistics.median(r["wall_s"] for r in raw[case.name])
        summaries[case.name]["others_cores"] = statistics.median(r["others_cores"] for r in raw[case.name])
    base = summaries[CASES[0].name]["step_s"]
    print(f"\n{completions} completions per step; median of the quiet steps among 2..{args.steps} of each launch "
          f"(all of them if none was quiet), then median of {args.repeats} launches. others, cores: CPU other work "
          f"took during a launch; quiet steps: steps during which it took < {QUIET_CORES} cores\n")
    print("| case | step s | steps/s | completions/s | tokens/s | gen s | rest s | speed-up | run wall s "
          "| others, cores | quiet steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summaries.items():
        print(f"| {name} | {s['step_s']:.2f} | {s['steps_per_s']:.3f} | {s['completions_per_s']:.0f} | "
              f"{s['tokens_per_s']:.0f} | {s['gen_s']:.2f} | {s['rest_s']:.2f} | {base / s['step_s']:.2f}x | "
              f"{s['wall_s']:.0f} | {s['others_cores']:.2f} | {s['quiet_steps']}/{s['timed_steps']} |")

    single = raw[CASES[0].name][0]["steps"]
    sanity = {}
    for case in CASES[1:]:
        match = same_rollouts(raw[case.name][0]["steps"], single)
        sanity[case.name] = match
        first = {k: raw[case.name][0]["steps"][0][k] for k in SANITY_KEYS}
        print(f"\nbatch invariance, {case.name} vs 1 process: step 1 {'SAME' if match[0] else 'DIFFERENT'} "
              f"({', '.join(f'{k}={v:g}' for k, v in first.items())}); same rollout at {sum(match)} of "
              f"{len(match)} steps (a later step may differ: the ranks' gradients are summed in another order, and the "
              f"rounding can flip a sample that lies at a boundary)")
    threads = {name: s["threads"] for name, s in summaries.items()}
    refused = sorted({name for name, rs in raw.items() if any(r["fast_decoder_refused"] for r in rs)})
    loads = [x for rs in raw.values() for r in rs for x in (r["loadavg_before"], r["loadavg_after"])]
    print(f"\nthreads per process (time/threads): {threads}; fast decoder refused in: {refused or 'none'}")
    print(f"loadavg (1 min) around the launches: {min(loads):.2f} .. {max(loads):.2f} (this bench's own "
          f"processes included); other work took a median of "
          f"{statistics.median(r['others_cores'] for rs in raw.values() for r in rs):.2f} cores")
    print(f"\n(python bench/data_parallel.py --steps {args.steps} --repeats {args.repeats} --heldout {args.heldout}"
          f"{' --busy' if args.busy else ''}"
          f"{' ' + ' '.join(args.overrides) if args.overrides else ''})")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "cpu": cpu_model(), "cpus": os.cpu_count(), "command": " ".join(["python", "bench/data_parallel.py",
                                                                             *(argv or sys.argv[1:])]),
            "overrides": overrides, "completions_per_step": completions, "summaries": summaries,
            "batch_invariant_steps": sanity, "raw": raw}, indent=1))
        print(f"numbers written to {path}")


if __name__ == "__main__":
    main()

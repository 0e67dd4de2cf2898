"""GRPO training step: gradus `Trainer.train_step` against TRL's `GRPOTrainer`, same workload, same script.

What is measured: the wall time of one full RL step (sample G completions per prompt, score them,
advantages, the log-prob passes the step needs, the policy update(s)) for each library, as
completions/s (rows per step / step time), tokens/s (completion tokens actually generated, EOS included,
per step time) and peak memory, plus the share of each step spent outside generation and in the update.

The workload, identical for both:
1. One model directory, written once in a temp folder and loaded by both: a gradus tiny Qwen2
   (`--size`, default micro: 822k parameters, tied embeddings), its byte-level character tokenizer
   (pad 0, bos 1, eos 2, no chat template), fp32 weights from one seed.
2. Plain-text prompts of one fixed length (`--prompt-len` characters = tokens), so the two libraries'
   different data orders give the same shapes every step; G = 8 completions for each of 8 prompts
   (64 rows), at most 32 new tokens, temperature 1, top-p 1, top-k off.
3. Both stop a completion at the tokenizer's EOS (id 2). The random model draws it with probability
   about 1/260 per token, so some rows stop early; tokens/s counts the tokens each library really
   generated, and the mean completion length of each is printed so the workloads can be compared.
4. The same reward for both (`digit_reward`: the fraction of digit characters in the completion text).
5. GRPO with group-normalised advantages (gradus `algo.name=grpo`, `adv_scale=group`; TRL
   `scale_rewards="group"`), clip epsilon 0.2, per-sequence mean of the token mean (gradus
   `seq-mean-token-mean`, the grpo preset's default = TRL `loss_type="grpo"`), AdamW with
   betas (0.9, 0.99), no weight decay, a constant learning rate `--lr`, gradient-norm clip 1.0, fp32.
6. Settings (one table row each): `plain` = one update per batch, no reference model (gradus
   `algo.kl_coef=0`, `optim.epochs=1`; TRL `beta=0`, `num_iterations=1`); `ref` = a reference model with
   k3 KL at beta 0.04 and two updates per batch (gradus `algo.kl_coef=0.04`, `optim.epochs=2`; TRL
   `beta=0.04`, `num_iterations=2`). The batch is one minibatch, so an update is one optimizer step
   (TRL: `per_device_train_batch_size=64`, `gradient_accumulation_steps=1`, `steps_per_generation=1`).
7. TRL's `gradient_checkpointing` defaults to True in `GRPOConfig`; it is turned off here (the
   `--trl-gradient-checkpointing` flag turns it back on), since gradus does not recompute activations and
   the comparison is meant to be of equal computation. With checkpointing TRL uses less memory and more
   time.

How: the driver starts two worker processes (spawn), one per library, each with the same torch
thread count (`--threads`, default all cores), and tells them by pipe, in turns, to run one step; so
they never run at once and each measures its own memory. gradus is driven by calling
`Trainer.train_step(step)`. TRL is driven by its own `trainer.train()` loop with a `TrainerCallback` that,
at the end of every RL step (every `num_iterations` optimizer steps), reports and then blocks on the pipe
until the driver's next command: TRL's loop runs unmodified, and whatever it does between steps
(logging bookkeeping, the next batch from its dataloader) lands inside the next timed step, as it would
in a real run. Reported per setting: the median over `--steps` steps after `--warmup` unmeasured steps.

Peak memory: `ru_maxrss` of each worker process (it includes the interpreter and the imported
libraries, about 500 MiB of each worker's peak with the tiny model), and the growth of the resident set
from the end of setup to the last step (`step MiB`: what the steps themselves added); on CUDA also
`torch.cuda.max_memory_allocated`.

Run it on a quiet machine: with another process busy on one of two cores, the many small ops of a tiny
model's step slow down by up to 10x (threads wait on each other), far more than a large matmul does;
the `min step s` column next to the median shows how much the steps varied.

Time split: gradus' update time is the wall time of `run_updates` (policy forward + backward + clip +
AdamW, all epochs); TRL's is the step time minus the time in `_prepare_inputs` (generation, rewards,
old and reference log-probs). The update's token counts are written out for bench/efficiency.py.

    python bench/grpo_vs_trl.py [--steps 5] [--warmup 2] [--settings plain ref] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from machine import cpu_model  # noqa: E402  (a sibling module: bench/ is on sys.path as a script)

SETTINGS: dict[str, dict[str, float]] = {
    "plain": {"beta": 0.0, "updates": 1},
    "ref": {"beta": 0.04, "updates": 2},
}


@dataclass
class Workload:
    """Everything both workers need to build the same run."""

    model_dir: str
    data_file: str
    work_dir: str
    beta: float
    updates: int
    group_size: int
    prompts_per_step: int
    max_new_tokens: int
    lr: float
    threads: int
    seed: int
    device: str
    trl_gradient_checkpointing: bool


def digit_reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
    """Fraction of the completion's characters that are digits (0 for an empty completion).

    The signature suits both libraries: gradus passes `answer=...`, TRL passes `completion_ids`,
    `trainer_state` and the dataset columns; both go to **fields and are ignored.
    """
    return [sum(ch.isdigit() for ch in text) / len(text) if text else 0.0 for text in completions]


# ---- the shared model and data ------------------------------------------------------------------
def make_model_dir(root: Path, size: str, seed: int) -> Path:
    """A gradus tiny model + char tokenizer saved in HF format: the one model both libraries load."""
    from gradus.models import build_char_tokenizer, build_tiny_model, save_pretrained

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(size, tokenizer=tokenizer, seed=seed)
    return save_pretrained(model, tokenizer, root / "model")


def make_data_file(root: Path, n: int, prompt_len: int) -> Path:
    """n distinct ASCII prompts of exactly prompt_len characters (one token each), as JSONL prompt/answer."""
    path = root / "prompts.jsonl"
    rows = []
    for i in range(n):
        head = f"Problem {i:05d}: write digits"
        text = (head + " " + "abcdefghij" * (prompt_len // 10 + 1))[:prompt_len].strip()
        text = text + "x" * (prompt_len - len(text))  # strip() must not shorten it: gradus strips prompts
        rows.append(json.dumps({"prompt": text, "answer": "0"}))
    path.write_text("\n".join(rows) + "\n")
    return path


# ---- gradus worker --------------------------------------------------------------------------------
class GradusRunner:
    def __init__(self, wl: Workload):
        from gradus.config import load_config
        from gradus.train.trainer import Trainer

        overrides = {
            "model.path": wl.model_dir, "task.name": "file", "task.data_file": wl.data_file,
            "task.prompt_field": "prompt", "task.answer_field": "answer", "task.heldout_size": 1,
            "task.rewards": "grpo_vs_trl:digit_reward", "rollout.group_size": wl.group_size,
            "rollout.prompts_per_step": wl.prompts_per_step, "rollout.max_new_tokens": wl.max_new_tokens,
            "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.top_k": 0, "algo.name": "grpo",
            "algo.kl_coef": wl.beta, "optim.epochs": wl.updates, "optim.minibatches": 1, "optim.lr": wl.lr,
            "optim.warmup_steps": 0, "optim.schedule": "constant", "optim.weight_decay": 0.0,
            "optim.grad_clip": 1.0, "run.device": wl.device, "run.progress": False, "run.seed": wl.seed,
            "run.threads": wl.threads, "run.steps": 10**6, "model.dtype": "float32",
        }
        self.cfg = load_config(overrides=overrides)
        self.trainer = Trainer(self.cfg, run_dir=Path(wl.work_dir) / "gradus-run")
        self.params = sum(p.numel() for p in self.trainer.policy.parameters())
        self.step_index = 0
        self.epochs = wl.updates
        self.batch: Any = None
        prepare = self.trainer.prepare

        def keep_batch(*args: Any, **kwargs: Any) -> Any:  # the batch the update trains on, for the token counts
            inputs = prepare(*args, **kwargs)
            self.batch = inputs.batch
            return inputs

        self.trainer.prepare = keep_batch

    def tokens(self) -> dict[str, float]:
        """Tokens the update's forwards process: padded (the micro-batches run_updates makes, each trimmed to its
        own longest prompt and completion) and real; the body sees prompt and completion, the head completions."""
        import torch

        from gradus.train.passes import micro_batches

        batch = self.batch
        body = head = 0
        for micro in micro_batches(torch.arange(batch.batch_size), batch, self.cfg.optim.token_budget):
            sub = batch.select(micro.to(batch.device)).trim()
            body += sub.input_ids.numel()
            head += sub.completion_ids.numel()
        prompt_tokens, completion_tokens = int(batch.prompt_mask.sum()), int(batch.completion_mask.sum())
        return {"body_tokens": body * self.epochs, "head_tokens": head * self.epochs,
                "body_real": (prompt_tokens + completion_tokens) * self.epochs,
                "head_real": completion_tokens * self.epochs}

    def step(self) -> dict[str, float]:
        self.step_index += 1
        start = time.perf_counter()
        metrics = self.trainer.train_step(self.step_index)
        seconds = time.perf_counter() - start
        # the stage times the trainer logs (gradus.train.stages): the update's own, as a run logs it
        return {"seconds": seconds, "completion_tokens": metrics["rollout/tokens"],
                "gen_s": metrics["rollout/gen_seconds"], "update_s": metrics["time/update_s"], **self.tokens()}


def _gradus_worker(wl: Workload, conn: Any) -> None:
    runner = GradusRunner(wl)
    _serve(conn, runner.step, runner.params, wl)


# ---- TRL worker ---------------------------------------------------------------------------------
def _trl_worker(wl: Workload, conn: Any) -> None:
    import datasets
    import torch
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(wl.threads)
    torch.manual_seed(wl.seed)
    tokenizer = AutoTokenizer.from_pretrained(wl.model_dir, local_files_only=True)
    rows = [json.loads(line) for line in Path(wl.data_file).read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    rows_per_step = wl.group_size * wl.prompts_per_step
    args = GRPOConfig(
        output_dir=str(Path(wl.work_dir) / "trl-run"), per_device_train_batch_size=rows_per_step,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=wl.group_size,
        max_completion_length=wl.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=wl.beta,
        num_iterations=wl.updates, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=wl.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, bf16=False, fp16=False,
        use_cpu=wl.device == "cpu", gradient_checkpointing=wl.trl_gradient_checkpointing,
        model_init_kwargs={"dtype": torch.float32}, max_steps=10**6, report_to="none",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        seed=wl.seed, dataloader_num_workers=0, log_completions=False,
    )
    record: dict[str, float] = {}

    class Stepper(TrainerCallback):
        """Hands control to the driver at the end of each RL step (every `updates` optimizer steps)."""

        def __init__(self) -> None:
            self.start = 0.0
            self.optimizer_steps = 0

        def wait(self, control: Any) -> Any:
            if not _next_command(conn):
                control.should_training_stop = True
                return control
            record.clear()
            record["prepare_s"] = 0.0
            self.start = time.perf_counter()
            return control

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            conn.send({"ready": True, "params": sum(p.numel() for p in trainer.model.parameters()),
                       "rss_mib": _rss_mib(), "threads": torch.get_num_threads()})
            return self.wait(control)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            self.optimizer_steps += 1
            if self.optimizer_steps % wl.updates:
                return control
            seconds = time.perf_counter() - self.start
            conn.send({"seconds": seconds, "update_s": seconds - record["prepare_s"], **record, **_memory()})
            return self.wait(control)

    trainer = GRPOTrainer(model=wl.model_dir, reward_funcs=digit_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Stepper()])
    trainer.remove_callback(PrinterCallback)  # it prints the run's summary dict at the end
    torch.set_num_threads(wl.threads)  # in case accelerate or the Trainer changed it
    prepare, generate = trainer._prepare_inputs, trainer._generate

    def timed_prepare(batch: Any) -> Any:
        start = time.perf_counter()
        out = prepare(batch)
        record["prepare_s"] += time.perf_counter() - start
        prompt_mask, completion_mask = out["prompt_mask"], out["completion_mask"]
        body, head = prompt_mask.shape[1] + completion_mask.shape[1], completion_mask.shape[1]
        rows = prompt_mask.shape[0]
        record["body_tokens"] = record.get("body_tokens", 0) + rows * body
        record["head_tokens"] = record.get("head_tokens", 0) + rows * head
        record["body_real"] = record.get("body_real", 0) + int(prompt_mask.sum() + completion_mask.sum())
        record["head_real"] = record.get("head_real", 0) + int(completion_mask.sum())
        return out

    def timed_generate(prompts: Any) -> Any:
        start = time.perf_counter()
        out = generate(prompts)
        record["gen_s"] = time.perf_counter() - start
        # out[1] is the list of completion id lists (see GRPOTrainer._generate in trl 1.16)
        record["completion_tokens"] = sum(len(ids) for ids in out[1])
        return out

    trainer._prepare_inputs, trainer._generate = timed_prepare, timed_generate
    trainer.train()
    conn.send({"done": True})


# ---- worker plumbing ----------------------------------------------------------------------------
def _rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux /proc; ru_maxrss elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory() -> dict[str, float]:
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _next_command(conn: Any) -> bool:
    """Block until the driver says "step" (True) or "stop" (False)."""
    return conn.recv() == "step"


def _serve(conn: Any, step: Any, params: int, wl: Workload) -> None:
    import torch

    conn.send({"ready": True, "params": params, "rss_mib": _rss_mib(), "threads": torch.get_num_threads()})
    while _next_command(conn):
        conn.send({**step(), **_memory()})
    conn.send({"done": True})


def quiet() -> None:
    """No progress bars, advisory warnings or deprecation notices from the HF libraries: only the tables."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _worker_main(kind: str, wl: Workload, conn: Any) -> None:
    quiet()
    try:
        (_gradus_worker if kind == "gradus" else _trl_worker)(wl, conn)
    except BaseException as err:  # report, so the driver does not wait forever
        import traceback

        conn.send({"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"})
        raise


# ---- driver -------------------------------------------------------------------------------------
class Worker:
    def __init__(self, kind: str, wl: Workload):
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(kind, wl, child), daemon=True)
        self.proc.start()
        self.info = self._receive()

    def _receive(self) -> dict[str, Any]:
        msg = self.conn.recv()
        if "error" in msg:
            raise RuntimeError(f"{self.kind} worker failed:\n{msg['error']}")
        return msg

    def step(self) -> dict[str, Any]:
        self.conn.send("step")
        return self._receive()

    def close(self) -> None:
        self.conn.send("stop")
        self._receive()
        self.proc.join(timeout=60)


def run_setting(wl: Workload, warmup: int, steps: int,
                kinds: tuple[str, ...] = ("gradus", "trl")) -> dict[str, dict[str, Any]]:
    """Alternate the workers, warm-up steps first; per library: the step records and setup info."""
    workers = {kind: Worker(kind, wl) for kind in kinds}
    records: dict[str, list[dict[str, Any]]] = {kind: [] for kind in workers}
    try:
        for i in range(warmup + steps):
            order = kinds if i % 2 == 0 else kinds[::-1]  # neither always goes first
            for kind in order:
                rec = workers[kind].step()
                if i >= warmup:
                    records[kind].append(rec)
    finally:
        for w in workers.values():
            if w.proc.is_alive():
                w.close()
    return {kind: {"info": workers[kind].info, "steps": records[kind]} for kind in workers}


def summarize(result: dict[str, Any], rows: int) -> dict[str, float]:
    """Medians over the measured steps of one library in one setting."""
    steps = result["steps"]

    def med(key: str) -> float:
        return statistics.median(float(s[key]) for s in steps)

    seconds = med("seconds")
    peak = max(s["peak_rss_mib"] for s in steps)
    out = {
        "step_s": seconds,
        "min_step_s": min(float(s["seconds"]) for s in steps),
        "completions_per_s": rows / seconds,
        "tokens_per_s": statistics.median(s["completion_tokens"] / s["seconds"] for s in steps),
        "mean_length": statistics.mean(s["completion_tokens"] / rows for s in steps),
        "gen_s": med("gen_s"),
        "update_s": med("update_s"),
        "peak_rss_mib": peak,
        "step_mib": peak - result["info"]["rss_mib"],
        "params": result["info"]["params"],
        "threads": result["info"]["threads"],
    }
    for key in ("body_tokens", "head_tokens", "body_real", "head_real"):
        out[key] = med(key)
    if "cuda_peak_mib" in steps[0]:
        out["cuda_peak_mib"] = max(s["cuda_peak_mib"] for s in steps)
    return out


def prepare_workloads(args: argparse.Namespace, root: Path) -> dict[str, Workload]:
    model_dir = make_model_dir(root, args.size, args.seed)
    data_file = make_data_file(root, args.num_prompts, args.prompt_len)
    return {
        name: Workload(
            model_dir=str(model_dir), data_file=str(data_file), work_dir=str(root / name),
            beta=SETTINGS[name]["beta"], updates=int(SETTINGS[name]["updates"]), group_size=args.group_size,
            prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens, lr=args.lr,
            threads=args.threads, seed=args.seed, device=args.device,
            trl_gradient_checkpointing=args.trl_gradient_checkpointing,
        )
        for name in args.settings
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    import torch

    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=5, help="measured steps per setting (median)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in each worker")
    ap.add_argument("--size", default="micro", help="gradus tiny model size (nano, micro, small)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=24, help="characters (= tokens) in every prompt")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both workers)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="leave TRL's GRPOConfig default (gradient checkpointing on)")
    ap.add_argument("--json", help="also write every record to this JSON file")


def machine_line(threads: int) -> str:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()}; torch {torch.__version__}, "
            f"{threads} threads; transformers {transformers.__version__}; trl {trl_version}")


def threads_line(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    """The torch thread count each worker reported (they should all be equal)."""
    seen = {f"{kind} {int(s['threads'])}" for by in summaries.values() for kind, s in by.items()}
    return "worker threads: " + ", ".join(sorted(seen))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    quiet()
    rows = args.group_size * args.prompts_per_step
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gradus-vs-trl-") as tmp:
        for name, wl in prepare_workloads(args, Path(tmp)).items():
            result = run_setting(wl, args.warmup, args.steps)
            raw[name] = {"workload": asdict(wl), **result}
            summaries[name] = {kind: summarize(r, rows) for kind, r in result.items()}
    print_tables(summaries, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"summaries": summaries, "raw": raw}, indent=1))


def print_tables(summaries: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    print(f"\nGRPO step, {args.prompts_per_step} prompts x G={args.group_size}, <= {args.max_new_tokens} new "
          f"tokens, {args.size} model, median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| setting | library | step s | min step s | completions/s | tokens/s | mean len | gen s | update s "
          "| peak RSS MiB | step MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, by in summaries.items():
        for kind in ("gradus", "trl"):
            s = by[kind]
            print(f"| {name} | {kind} | {s['step_s']:.3f} | {s['min_step_s']:.3f} | {s['completions_per_s']:,.1f} | "
                  f"{s['tokens_per_s']:,.0f} | {s['mean_length']:.1f} | {s['gen_s']:.3f} | {s['update_s']:.3f} | "
                  f"{s['peak_rss_mib']:,.0f} | {s['step_mib']:,.0f} |")
    print("\n| setting | completions/s gradus/TRL | tokens/s gradus/TRL | update time TRL/gradus "
          "| peak RSS gradus/TRL | step MiB gradus/TRL |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, by in summaries.items():
        g, t = by["gradus"], by["trl"]
        step_ratio = g["step_mib"] / t["step_mib"] if t["step_mib"] > 0 else float("nan")
        print(f"| {name} | {g['completions_per_s'] / t['completions_per_s']:.2f}x | "
              f"{g['tokens_per_s'] / t['tokens_per_s']:.2f}x | {t['update_s'] / g['update_s']:.2f}x | "
              f"{g['peak_rss_mib'] / t['peak_rss_mib']:.2f} | {step_ratio:.2f} |")
    print(f"\n{machine_line(args.threads)}; {threads_line(summaries)}")
    print(f"command: PYTHONPATH=src python bench/grpo_vs_trl.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()

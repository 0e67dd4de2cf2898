"""The settings of bench/learning_vs_trl.py: both libraries' from gradus' resolved preset for the row.

`trl_kwargs` turns gradus' resolved config into TRL 1.16 `GRPOConfig` arguments (and refuses what TRL
cannot mirror), `settings_table` puts every setting side by side, and `differences` says what could not be
made equal, with the numbers that bound each difference computed here (the learning-rate gap from both
libraries' own schedulers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROWS = ("dapo", "grpo")
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}  # gradus algo.agg -> TRL loss_type
# gradus' cosine (warm-up (s+1)/W, then cosine to a floor) is transformers' cosine_warmup_with_min_lr
SCHEDULES = {"cosine": "cosine_warmup_with_min_lr"}
# ---- the settings, from gradus' resolved preset ---------------------------------------------------
def row_overrides(row: str, seed: int, steps: int | None, threads: int, device: str,
                  heldout_n: int | None) -> list[str]:
    """The `gradus train` overrides that make the row's run (the rest are gradus' defaults)."""
    out = [f"algo.name={row}", f"run.seed={seed}", f"run.threads={threads}", f"run.device={device}"]
    if steps:
        out.append(f"run.steps={steps}")
    if heldout_n:  # which held-out problems are scored only: the training stream does not depend on it
        out.append(f"task.heldout_size={heldout_n}")
    return out


def row_config(overrides: list[str]) -> Any:
    """gradus' config for the overrides with every preset value filled in, as the run saves it."""
    from gradus.algorithm import resolved_config
    from gradus.config import load_config

    return resolved_config(load_config(overrides=overrides))


def gradus_adamw() -> dict[str, Any]:
    """gradus' AdamW settings, read off the optimizer it builds (`gradus.runtime.trained.build_optim`)."""
    import inspect

    import torch

    from gradus.runtime.trained import build_optim, lr_factor

    opt = build_optim(torch.nn.Linear(1, 1), 1e-3, weight_decay=0.0, grad_clip=1.0, warmup=1, total=2,
                      schedule="constant").optimizer
    return {"betas": tuple(opt.defaults["betas"]), "eps": opt.defaults["eps"],
            "lr_floor": inspect.signature(lr_factor).parameters["floor"].default}


def trl_kwargs(cfg: Any) -> dict[str, Any]:
    """TRL GRPOConfig arguments that mirror gradus' resolved config `cfg` (ValueError for what TRL cannot)."""
    from gradus.config import get_key

    a, r, o = cfg.algo, cfg.rollout, cfg.optim
    needed = {"algo.advantage": "group", "algo.kl_estimator": "k3", "optim.minibatches": 1, "rollout.dtype": None,
              "model.lora_r": 0, "algo.rollout_correction": "none", "task.rewards": None}
    problems = [f"{k}={get_key(cfg, k)}" for k, v in needed.items() if get_key(cfg, k) != v]
    problems += [f"algo.agg={a.agg}"] if a.agg not in LOSS_TYPES else []
    problems += [f"optim.schedule={o.schedule}"] if o.schedule not in SCHEDULES else []
    if problems:
        raise ValueError(f"no TRL equivalent here for {', '.join(problems)}")
    adam = gradus_adamw()
    return {
        "num_generations": r.group_size, "per_device_train_batch_size": r.group_size * r.prompts_per_step,
        "gradient_accumulation_steps": 1, "steps_per_generation": 1, "num_iterations": o.epochs,
        "max_completion_length": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
        "loss_type": LOSS_TYPES[a.agg], "epsilon": a.clip_low, "epsilon_high": a.clip_high, "beta": a.kl_coef,
        "scale_rewards": a.adv_scale, "mask_truncated_completions": a.overlong_filter,
        "learning_rate": o.lr, "warmup_steps": o.warmup_steps, "lr_scheduler_type": SCHEDULES[o.schedule],
        "lr_scheduler_kwargs": {"min_lr_rate": adam["lr_floor"]}, "weight_decay": o.weight_decay,
        "max_grad_norm": o.grad_clip, "optim": "adamw_torch", "adam_beta1": adam["betas"][0],
        "adam_beta2": adam["betas"][1], "adam_epsilon": adam["eps"], "max_steps": cfg.run.steps, "seed": cfg.run.seed,
        "shuffle_dataset": False, "gradient_checkpointing": False, "bf16": False, "fp16": False,
        "model_init_kwargs": {"dtype": cfg.model.dtype},
    }


def trl_run_kwargs(cfg: Any, out: Path, eval_every: int) -> dict[str, Any]:
    """The whole GRPOConfig: the mirrored settings and the bookkeeping (logging, no saving of its own)."""
    return {**trl_kwargs(cfg), "output_dir": str(out / "trainer"), "use_cpu": cfg.run.device == "cpu",
            "report_to": "none", "logging_strategy": "steps", "logging_steps": eval_every, "save_strategy": "no",
            "eval_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0, "log_completions": False}


# (what, gradus keys, TRL fields): the side-by-side table
PAIRS = [
    ("model", ["model.dtype"], ["model_init_kwargs", "bf16", "gradient_checkpointing"]),
    ("completions per prompt", ["rollout.group_size"], ["num_generations"]),
    ("rows per step (prompts x G)", ["rollout.prompts_per_step"], ["per_device_train_batch_size"]),
    ("new tokens at most", ["rollout.max_new_tokens"], ["max_completion_length"]),
    ("sampling", ["rollout.temperature", "rollout.top_p", "rollout.top_k"], ["temperature", "top_p", "top_k"]),
    ("loss aggregation", ["algo.agg"], ["loss_type"]),
    ("clip range", ["algo.clip_low", "algo.clip_high"], ["epsilon", "epsilon_high"]),
    ("KL to the warm start (k3, in the loss)", ["algo.kl_coef", "algo.kl_estimator"], ["beta"]),
    ("advantage", ["algo.advantage", "algo.adv_scale"], ["scale_rewards"]),
    ("truncated completions left out of the loss", ["algo.overlong_filter"], ["mask_truncated_completions"]),
    ("updates per batch", ["optim.epochs", "optim.minibatches"],
     ["num_iterations", "steps_per_generation", "gradient_accumulation_steps"]),
    ("learning rate", ["optim.lr", "optim.warmup_steps", "optim.schedule"],
     ["learning_rate", "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs"]),
    ("AdamW", ["optim.weight_decay"], ["optim", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay"]),
    ("gradient-norm clip", ["optim.grad_clip"], ["max_grad_norm"]),
    ("steps", ["run.steps"], ["max_steps"]),
    ("seed", ["run.seed"], ["seed"]),
    ("prompt order", [], ["shuffle_dataset"]),
]


def settings_table(cfg: Any, trl: dict[str, Any], threads: int) -> list[str]:
    """Every setting of the row, gradus' and TRL's side by side."""
    from gradus.config import get_key

    adam = gradus_adamw()
    extra = {"AdamW": f"betas {adam['betas']}, eps {adam['eps']:g} (torch.optim.AdamW)",
             "prompt order": "the task's stream, in order", "model": "warm-start folder, fp32, no recomputation"}
    lines = ["| setting | gradus | TRL |", "|---|---|---|"]
    for what, keys, fields in PAIRS:
        mine = ", ".join([f"{k}={get_key(cfg, k)}" for k in keys] + ([extra[what]] if what in extra else []))
        lines.append(f"| {what} | {mine} | {', '.join(f'{f}={trl[f]}' for f in fields)} |")
    shaping = (f"DAPO's, L_cache={cfg.algo.overlong_cache} (algo.overlong_shaping)" if cfg.algo.overlong_shaping
               else "none")
    trl_shaping = (f"get_soft_overlong_punishment({cfg.rollout.max_new_tokens}, {cfg.algo.overlong_cache}), "
                   "a second reward of weight 1" if cfg.algo.overlong_shaping else "none")
    lines.append(f"| reward | the {cfg.task.name} task's own (gradus.rewards), in reward worker processes "
                 "| the same function, in TRL's process |")
    lines.append(f"| overlong shaping | {shaping} | {trl_shaping} |")
    sampling = (f"dynamic sampling, up to {cfg.algo.max_gen_rounds} rounds of {cfg.rollout.prompts_per_step} prompts"
                if cfg.algo.dynamic_sampling else "kept (no dynamic sampling)")
    lines.append(f"| groups with all-equal rewards | {sampling} | kept (TRL has no dynamic sampling) |")
    lines.append(f"| threads | run.threads={threads} | torch.set_num_threads({threads}) |")
    lines.append("| rollout engine | gradus' LocalEngine | transformers' generate |")
    return lines


def lr_gap(cfg: Any) -> float:
    """Largest difference, as a share of the peak, between gradus' and TRL's learning rate at any step."""
    import warnings

    import torch
    from transformers import get_scheduler

    from gradus.runtime.trained import build_optim

    steps, warmup, floor = cfg.run.steps * cfg.optim.epochs, cfg.optim.warmup_steps, gradus_adamw()["lr_floor"]
    ours = build_optim(torch.nn.Linear(1, 1), 1.0, weight_decay=0.0, grad_clip=1.0, warmup=warmup, total=steps,
                       schedule=cfg.optim.schedule).scheduler
    opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_scheduler(SCHEDULES[cfg.optim.schedule], opt, num_warmup_steps=warmup, num_training_steps=steps,
                               scheduler_specific_kwargs={"min_lr_rate": floor})
    return max(abs(ours.lr_lambdas[0](s) - theirs.lr_lambdas[0](s)) for s in range(steps))


def differences(cfg: Any) -> list[str]:
    """What could not be made equal, and why."""
    out = []
    if cfg.algo.dynamic_sampling:
        out.append(f"Dynamic sampling (gradus' DAPO only): gradus draws up to {cfg.algo.max_gen_rounds} rounds of "
                   f"{cfg.rollout.prompts_per_step} prompts until {cfg.rollout.prompts_per_step} groups have rewards "
                   "that differ, and so reads its prompt stream faster; TRL trains on the groups it drew, and those "
                   "whose rewards are all equal give no gradient while their tokens still count in DAPO's token "
                   "mean. TRL has no such option.")
    out.append("Random draws: each library samples with its own generator (gradus: a stream per step and example; "
               "TRL: torch's global generator seeded with the seed), so the completions differ from step 1; the "
               "seeds' spread is the measure of that.")
    out.append("Engines: gradus samples with its LocalEngine, TRL with transformers' `generate`; the same "
               "distribution, not the same speed. This is part of what is compared.")
    out.append("Advantage: both divide by the group's sample standard deviation, plus 1e-6 in gradus and 1e-4 in TRL "
               "(fixed in both); with 0/1 rewards in groups of 8 the std is at least 0.35, so advantages differ by "
               "under 0.03%.")
    out.append(f"Learning rate: the same warm-up ((s+1)/{cfg.optim.warmup_steps}) and cosine to "
               f"{gradus_adamw()['lr_floor']:.0%} of the peak, but transformers' decay runs one step ahead of "
               f"gradus' (progress (s-W+1)/(N-W) against (s-W)/(N-W)): at most {lr_gap(cfg):.2%} of the peak apart.")
    out.append("Rewards: gradus scores in reward worker processes (with a time limit), TRL in its own process; the "
               "same function and the same scores.")
    out.append("Clocks: gradus' is its own `time/elapsed`, the sum of its steps (`Trainer.train_step`): its per-step "
               "metrics line and TensorBoard write (a few ms) fall outside it. TRL's counts everything between the "
               "callback's calls, so its own bookkeeping (token entropies and metrics every step, a log line every "
               "evaluation interval) falls inside.")
    return out

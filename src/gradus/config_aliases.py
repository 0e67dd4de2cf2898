"""The names other RL trainers give gradus' config keys, so that an unknown key is answered with the one meant."""

from __future__ import annotations

import difflib

# Names other trainers use for our keys (TRL's GRPOConfig and TrainingArguments, verl's
# ppo_trainer.yaml, common PPO code); a leaf in the user's own section wins (sft.learning_rate
# -> sft.lr). Keys whose meaning differs a little carry a note in _ALIAS_NOTES.
ALIASES: dict[str, str] = {
    # optimizer
    "learning_rate": "optim.lr", "actor_lr": "optim.lr", "max_grad_norm": "optim.grad_clip",
    "clip_grad_norm": "optim.grad_clip", "gradient_clipping": "optim.grad_clip",
    "warmup": "optim.warmup_steps", "num_warmup_steps": "optim.warmup_steps", "lr_warmup_steps": "optim.warmup_steps",
    "warmup_ratio": "optim.warmup_steps", "lr_scheduler_type": "optim.schedule", "lr_scheduler": "optim.schedule",
    "scheduler": "optim.schedule", "warmup_style": "optim.schedule",
    "ppo_epochs": "optim.epochs", "num_ppo_epochs": "optim.epochs", "num_iterations": "optim.epochs",
    "mu": "optim.epochs", "num_mini_batches": "optim.minibatches", "num_minibatches": "optim.minibatches",
    "steps_per_generation": "optim.minibatches", "ppo_mini_batch_size": "optim.minibatches",
    "gradient_accumulation_steps": "optim.token_budget", "gradient_accumulation": "optim.token_budget",
    "ppo_micro_batch_size": "optim.token_budget", "micro_batch_size": "optim.token_budget",
    "ppo_max_token_len_per_gpu": "optim.token_budget",
    # algorithm
    "algorithm": "algo.name", "adv_estimator": "algo.name", "loss": "algo.name",
    "beta": "algo.kl_coef", "kl_beta": "algo.kl_coef", "kl_loss_coef": "algo.kl_coef", "init_kl_coef": "algo.kl_coef",
    "kl_penalty_coef": "algo.kl_coef", "kl": "algo.kl_coef", "kl_loss_type": "algo.kl_estimator",
    "kl_penalty": "algo.kl_estimator", "epsilon": "algo.clip_low", "epsilon_low": "algo.clip_low",
    "clip_ratio_low": "algo.clip_low", "cliprange_low": "algo.clip_low", "epsilon_high": "algo.clip_high",
    "clip_ratio_high": "algo.clip_high", "cliprange_high": "algo.clip_high", "clip_ratio": "algo.clip_low",
    "cliprange": "algo.clip_low", "clip_range": "algo.clip_low", "clip_eps": "algo.clip_low",
    "clip_ratio_c": "algo.dual_clip", "dual_clip_c": "algo.dual_clip", "loss_agg_mode": "algo.agg",
    "loss_type": "algo.agg", "scale_rewards": "algo.adv_scale", "norm_adv_by_std_in_grpo": "algo.adv_scale",
    "filter_groups": "algo.dynamic_sampling", "max_num_gen_batches": "algo.max_gen_rounds",
    "overlong_buffer": "algo.overlong_shaping", "mask_truncated_completions": "algo.overlong_filter",
    "lambda": "algo.lam", "lmbda": "algo.lam", "gae_lambda": "algo.lam", "discount": "algo.gamma",
    "cliprange_value": "algo.value_clip", "clip_range_vf": "algo.value_clip", "vf_clip": "algo.value_clip",
    "critic_learning_rate": "algo.critic_lr", "vf_lr": "algo.critic_lr",
    # sampling
    "num_generations": "rollout.group_size", "n": "rollout.group_size", "n_samples": "rollout.group_size",
    "num_samples": "rollout.group_size", "num_return_sequences": "rollout.group_size",
    "batch_size": "rollout.prompts_per_step", "train_batch_size": "rollout.prompts_per_step",
    "per_device_train_batch_size": "rollout.prompts_per_step", "rollout_batch_size": "rollout.prompts_per_step",
    "max_completion_length": "rollout.max_new_tokens", "max_response_length": "rollout.max_new_tokens",
    "response_length": "rollout.max_new_tokens", "max_tokens": "rollout.max_new_tokens",
    "max_length": "rollout.max_new_tokens", "use_vllm": "rollout.engine", "vllm_mode": "rollout.engine",
    "vllm_gpu_memory_utilization": "vllm.memory_fraction", "gpu_memory_utilization": "vllm.memory_fraction",
    "vllm_max_model_length": "vllm.max_model_len", "vllm_enable_sleep_mode": "vllm.sleep",
    "enable_sleep_mode": "vllm.sleep", "enforce_eager": "vllm.eager", "free_cache_engine": "vllm.sleep",
    "vllm_importance_sampling_correction": "algo.rollout_correction", "rollout_is": "algo.rollout_correction",
    "vllm_importance_sampling_cap": "algo.correction_high", "tis_imp_ratio_cap": "algo.correction_high",
    "rollout_is_threshold": "algo.correction_high", "rollout_rs": "algo.rollout_rejection",
    "rollout_rs_threshold": "algo.rejection_thresholds", "clip_cov_ratio": "algo.cov_frac",
    "kl_cov_ratio": "algo.cov_frac", "clip_cov_lb": "algo.cov_low", "clip_cov_ub": "algo.cov_high",
    "ppo_kl_coef": "algo.cov_coef",
    # run, task, model
    "steps": "run.steps", "max_steps": "run.steps", "total_steps": "run.steps", "num_steps": "run.steps",
    "total_training_steps": "run.steps", "num_train_epochs": "run.steps", "total_epochs": "run.steps",
    "output_dir": "run.out_dir", "default_local_dir": "run.out_dir", "run_name": "run.name",
    "experiment_name": "run.name", "save_steps": "run.save_every", "save_freq": "run.save_every",
    "eval_steps": "run.eval_every", "test_freq": "run.eval_every", "save_total_limit": "run.keep_checkpoints",
    "max_ckpt_to_keep": "run.keep_checkpoints", "disable_tqdm": "run.progress", "num_threads": "run.threads",
    "random_seed": "run.seed", "reward_funcs": "task.rewards", "reward_weights": "task.rewards",
    "reward_fn": "task.rewards", "reward": "task.rewards", "dataset": "task.data_file",
    "dataset_name": "task.data_file", "train_files": "task.data_file", "data_path": "task.data_file",
    "prompt_key": "task.prompt_field", "answer_key": "task.answer_field", "model_name_or_path": "model.path",
    "model_path": "model.path", "torch_dtype": "model.dtype", "bf16": "model.dtype", "precision": "model.dtype",
    "lora_rank": "model.lora_r", "target_modules": "model.lora_targets", "lora_target_modules": "model.lora_targets",
}
_ALIAS_NOTES = {
    "clip_ratio": "a symmetric clip is algo.clip_low and algo.clip_high",
    "cliprange": "a symmetric clip is algo.clip_low and algo.clip_high",
    "clip_range": "a symmetric clip is algo.clip_low and algo.clip_high",
    "clip_eps": "a symmetric clip is algo.clip_low and algo.clip_high",
    "warmup_ratio": "gradus counts warm-up in optimizer steps",
    "ppo_mini_batch_size": "gradus sets the number of minibatches, not their size",
    "num_train_epochs": "gradus counts RL steps, not passes over the data",
    "total_epochs": "gradus counts RL steps, not passes over the data",
    "disable_tqdm": "note the opposite sense: run.progress=false",
    "batch_size": "prompts per step; each gets rollout.group_size completions",
    "train_batch_size": "prompts per step; each gets rollout.group_size completions",
    "per_device_train_batch_size": "prompts per step; each gets rollout.group_size completions",
    "bf16": "model.dtype=bfloat16",
    "use_vllm": "rollout.engine=vllm (colocated in the training process)",
    "vllm_mode": "rollout.engine=vllm, always colocated (no separate server)",
}
for _alias in ("gradient_accumulation_steps", "gradient_accumulation", "ppo_micro_batch_size", "micro_batch_size"):
    _ALIAS_NOTES[_alias] = "gradus accumulates by itself: a minibatch is cut into pieces of at most this many tokens"


def suggest(key: str, keys: list[str]) -> tuple[str | None, str]:
    """The key of `keys` (every dotted config key) that `key` most likely meant, and a note when it means it only
    roughly: by ALIASES, then by the same name in another section, then by spelling; (None, "") when nothing is
    close."""
    section, _, leaf = key.rpartition(".")
    leaf = leaf.lower().replace("-", "_")

    def prefer_section(name: str, fallback: str) -> str:
        return f"{section}.{name}" if f"{section}.{name}" in keys else fallback

    if leaf in ALIASES:
        target = ALIASES[leaf]
        return prefer_section(target.split(".")[-1], target), _ALIAS_NOTES.get(leaf, "")
    same_leaf = [k for k in keys if k.split(".")[-1] == leaf]
    if same_leaf:
        return prefer_section(leaf, same_leaf[0]), ""
    names = sorted({k.split(".")[-1] for k in keys} | set(ALIASES))
    close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.75)
    return suggest(f"{section}.{close[0]}" if section else close[0], keys) if close else (None, "")

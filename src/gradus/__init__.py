"""gradus: RL post-training of language models, PPO -> GRPO -> DAPO -> GSPO -> SAPO."""

__version__ = "0.1.0"

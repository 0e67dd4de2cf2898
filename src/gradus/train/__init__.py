"""Training: the RL loop, supervised warm start, evaluation."""

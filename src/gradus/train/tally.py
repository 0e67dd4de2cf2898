"""What a run learned from, counted step by step, so that it never ends as a success having learned nothing.

A step learns from the loss tokens that can move the policy in an optimizer step that was applied: counted in
the loss, with a nonzero advantage, not weighted to 0 by a mismatch correction (`actor/tokens_trained`, summed
over ranks). A step learns nothing when every one of its optimizer steps was skipped for a NaN or inf loss or
gradient, when every token's advantage was 0 (each group's completions equally right or wrong) or weight was
0, or when dynamic sampling found no group whose rewards differ. `optim.max_bad_steps` broken steps in a row
(skipped or masked) stop the run with the cause; a run that reaches its end without one token learned from
fails there, after its final evaluation, checkpoint and summary are written, with the counts by cause.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gradus.train.update import NonFiniteUpdate


class NothingLearned(RuntimeError):
    """A run learned from no token (every update skipped, masked or without a batch), or too many steps in a row
    trained no token."""


@dataclass
class Tally:
    steps: int = 0
    updates: int = 0  # optimizer steps applied
    skipped: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient
    empty_steps: int = 0  # steps with nothing to train on (dynamic sampling: no group with signal)
    masked_steps: int = 0  # steps whose applied updates had every token at weight 0
    tokens: float = 0.0  # loss tokens that carried a gradient in an applied update
    streak: int = 0  # broken steps (all skipped, or all masked) in a row, up to the last one
    last_cause: str = ""  # of the last broken step: "skipped" or "masked"
    since_start: bool = True  # False: resumed from a checkpoint written before the tally (its steps uncounted)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Tally:
        if "tally" in state or "step" not in state:  # a checkpoint's tally, or a fresh run
            return cls(**state.get("tally", {}))
        # a checkpoint written before the tally: its streak of skipped steps; nothing else is known, so the
        # end-of-run check cannot fail for what came before it
        return cls(streak=state.get("bad_streak", 0), last_cause="skipped", since_start=False)

    @property
    def learned(self) -> bool:
        """Whether the run learned from a token (or, resumed from a checkpoint that did not count, may have)."""
        return self.tokens > 0 or not self.since_start

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def add(self, metrics: dict[str, float]) -> None:
        """Count one step's metrics (combined over ranks)."""
        self.steps += 1
        updates, skipped = int(metrics.get("actor/updates", 0)), int(metrics.get("actor/skipped_updates", 0))
        self.updates += updates
        self.skipped += skipped
        if updates + skipped == 0:
            self.empty_steps += 1  # not broken: the sampler found nothing to learn from this time
            return
        if metrics.get("critic/warmup_step") and updates:
            return  # not broken: only the critic learns in its warm-up (algo.critic_warmup)
        tokens = float(metrics.get("actor/tokens_trained", 0.0)) if updates else 0.0
        self.tokens += tokens
        cause = "skipped" if updates == 0 else "masked" if tokens == 0 else ""
        self.masked_steps += cause == "masked"
        self.streak = self.streak + 1 if cause else 0
        self.last_cause = cause

    def check_streak(self, limit: int) -> None:
        """Stop once `limit` broken steps came in a row (NonFiniteUpdate or NothingLearned, with the cause)."""
        if self.streak < limit:
            return
        if self.last_cause == "skipped":
            raise NonFiniteUpdate(f"{self.streak} steps in a row had only NaN/inf losses or gradients; stopping. Try "
                                  "a lower optim.lr, optim.grad_clip, or model.dtype=float32 (an MoE model: a smaller "
                                  "model.router_aux_coef)")
        raise NothingLearned(f"{self.streak} steps in a row trained no token: every token was masked "
                             "(algo.overlong_filter with every completion cut at rollout.max_new_tokens) or weighted 0 "
                             "by the mismatch "
                             "correction or rejection (algo.rollout_correction, algo.rollout_rejection); stopping. "
                             "Allow longer completions, widen the band or thresholds, or sample closer to the trainer "
                             "(vllm.dtype=float32)")

    def check_end(self) -> None:
        """NothingLearned when the run learned from no token at all."""
        if self.learned:
            return
        causes = []
        if self.skipped:
            causes.append(f"{self.skipped} optimizer step(s) skipped for NaN/inf losses or gradients")
        if self.masked_steps:
            causes.append(f"{self.masked_steps} step(s) with every token at weight 0 (masked by algo.overlong_filter, "
                          "or weighted away by a mismatch correction or rejection)")
        if self.empty_steps:
            causes.append(f"{self.empty_steps} step(s) with no group whose rewards differ (every completion of a "
                          "prompt equally right or wrong: nothing to compare)")
        raise NothingLearned(f"the run learned from no token in its {self.steps} step(s): " + "; ".join(causes)
                             + ". Its final checkpoint and summary.json are written")

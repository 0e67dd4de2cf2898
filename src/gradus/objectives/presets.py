"""The policy-objective presets: one named setting of knobs per algorithm of the ladder.

A preset fixes three structural choices (which importance ratio, which trust region, which
aggregation) and the defaults of its knobs, taken from the papers (see ../shared/seed/NOTES.md):

| algo       | ratio             | trust region         | default agg             | defaults                  |
| ---------- | ----------------- | -------------------- | ----------------------- | ------------------------- |
| ppo        | token             | clip (+ dual clip)   | token-mean              | eps 0.2                   |
| grpo       | token             | clip                 | seq-mean-token-mean     | eps 0.2                   |
| dapo       | token             | clip-higher          | token-mean              | eps_low 0.2, eps_high 0.28|
| gspo       | sequence s_i      | clip on s_i          | seq-mean-token-mean     | 3e-4, 4e-4                |
| gspo_token | sg[s_i]*pi/sg[pi] | clip                 | seq-mean-token-mean     | 3e-4, 4e-4                |
| sapo       | token             | soft gate            | seq-mean-token-mean     | tau_pos 1.0, tau_neg 1.05 |
| dr_grpo    | token             | clip                 | seq-mean-token-sum-norm | eps 0.2, constant norm    |
| cispo      | token             | sg[clip(r)] A log pi | token-mean              | no lower bound, r <= 5    |

Only the knobs that mean something for a preset are accepted for it: an override of any other
knob is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gradus.objectives.aggregation import check_agg_mode


@dataclass(frozen=True)
class PolicyObjective:
    """A resolved policy objective: the preset's structure plus every knob's value."""

    algo: str
    ratio: str  # "token" | "sequence" | "sequence_token"
    trust: str  # "clip" | "gate" | "cispo"
    agg: str
    agg_norm: float | None = None
    clip_low: float | None = None  # None: no lower bound (CISPO)
    clip_high: float | None = None
    dual_clip: float | None = None
    tau_pos: float | None = None
    tau_neg: float | None = None

    def knobs(self) -> dict[str, float | str | None]:
        """The knob values this objective uses, by name."""
        return {k: getattr(self, k) for k in KNOBS_BY_TRUST[self.trust] if self._uses(k)}

    def _uses(self, knob: str) -> bool:
        return knob != "dual_clip" or self.ratio == "token"


# Which knobs each trust region reads. `agg` and `agg_norm` apply to all.
KNOBS_BY_TRUST: dict[str, tuple[str, ...]] = {
    "clip": ("clip_low", "clip_high", "dual_clip", "agg", "agg_norm"),
    "gate": ("tau_pos", "tau_neg", "agg", "agg_norm"),
    "cispo": ("clip_low", "clip_high", "agg", "agg_norm"),
}

PRESETS: dict[str, PolicyObjective] = {
    "ppo": PolicyObjective("ppo", "token", "clip", "token-mean", clip_low=0.2, clip_high=0.2),
    "grpo": PolicyObjective("grpo", "token", "clip", "seq-mean-token-mean", clip_low=0.2, clip_high=0.2),
    "dapo": PolicyObjective("dapo", "token", "clip", "token-mean", clip_low=0.2, clip_high=0.28),
    "gspo": PolicyObjective("gspo", "sequence", "clip", "seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4),
    "gspo_token": PolicyObjective(
        "gspo_token", "sequence_token", "clip", "seq-mean-token-mean", clip_low=3e-4, clip_high=4e-4
    ),
    "sapo": PolicyObjective("sapo", "token", "gate", "seq-mean-token-mean", tau_pos=1.0, tau_neg=1.05),
    "dr_grpo": PolicyObjective(
        "dr_grpo", "token", "clip", "seq-mean-token-sum-norm", clip_low=0.2, clip_high=0.2
    ),
    # MiniMax-M1 (CISPO): the weight is clipped above only; 1 + 4.0 caps r at 5.
    "cispo": PolicyObjective("cispo", "token", "cispo", "token-mean", clip_low=None, clip_high=4.0),
}


def valid_knobs(algo: str) -> tuple[str, ...]:
    """The knob names that may be overridden for `algo`."""
    preset = _preset(algo)
    return tuple(k for k in KNOBS_BY_TRUST[preset.trust] if preset._uses(k))


def resolve_objective(algo: str, **overrides: float | str | None) -> PolicyObjective:
    """The preset for `algo` with `overrides` applied and checked.

    Raises ValueError for an unknown algo, a knob the algo does not use, or an out-of-range value.
    """
    preset = _preset(algo)
    allowed = valid_knobs(algo)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"knob(s) {', '.join(unknown)} not used by algo {algo!r}; valid knobs: {', '.join(allowed)}"
        )
    obj = dataclasses.replace(preset, **overrides)
    _validate(obj)
    return obj


def _preset(algo: str) -> PolicyObjective:
    if algo not in PRESETS:
        raise ValueError(f"unknown algo {algo!r}; valid algos: {', '.join(PRESETS)}")
    return PRESETS[algo]


def _validate(obj: PolicyObjective) -> None:
    check_agg_mode(obj.agg)
    if obj.agg_norm is not None and obj.agg != "seq-mean-token-sum-norm":
        raise ValueError(f"agg_norm is only used with agg='seq-mean-token-sum-norm', not {obj.agg!r}")
    if obj.agg_norm is not None and obj.agg_norm <= 0:
        raise ValueError(f"agg_norm must be positive, got {obj.agg_norm}")
    if obj.trust in ("clip", "cispo"):
        if obj.clip_high is None or obj.clip_high <= 0:
            raise ValueError(f"clip_high must be positive, got {obj.clip_high}")
        if obj.clip_low is not None and not 0 < obj.clip_low <= 1:
            raise ValueError(f"clip_low must be in (0, 1], got {obj.clip_low}")
        if obj.trust == "clip" and obj.clip_low is None:
            raise ValueError("clip_low is required for a clipped objective")
    if obj.dual_clip is not None and obj.dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (the loss is bounded at dual_clip * |A|), got {obj.dual_clip}")
    if obj.trust == "gate":
        for name in ("tau_pos", "tau_neg"):
            value = getattr(obj, name)
            if value is None or value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

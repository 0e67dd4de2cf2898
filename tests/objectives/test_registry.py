"""The algorithm registry: each entry is one algorithm's loss preset and trainer defaults, every
entry is valid, and the module docstring's tables say what the entries hold."""

import re

import pytest

import gradus.objectives.presets as presets
from gradus.objectives import (
    ADV_SCALES,
    ALGORITHMS,
    ESTIMATORS,
    KL_ESTIMATORS,
    PRESETS,
    resolve_objective,
    valid_knobs,
)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_entry_is_a_valid_algorithm(name):
    algo = ALGORITHMS[name]
    assert algo.name == name == algo.objective.algo
    assert resolve_objective(name) == algo.objective  # the preset passes its own checks
    assert set(algo.objective.knobs()) == set(valid_knobs(name))
    t = algo.trainer
    assert t.kl_coef >= 0 and t.kl_estimator in KL_ESTIMATORS
    assert t.adv_scale is None or t.adv_scale in ADV_SCALES
    assert t.epochs >= 1 and t.minibatches >= 1
    est = ESTIMATORS[t.advantage]
    assert (t.adv_scale is not None) == ("adv_scale" in est.knobs)  # a scale exactly where the estimator reads one
    assert algo.uses_critic == est.uses_critic


def test_presets_is_a_view_of_the_registry():
    assert list(PRESETS) == list(ALGORITHMS)
    assert all(PRESETS[name] is a.objective for name, a in ALGORITHMS.items())


def _table(header: str) -> dict[str, list[str]]:
    """The docstring table whose header starts with `header`: {algo: its other cells}."""
    lines = presets.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_loss_table_is_the_registry():
    rows = _table("| algo                  | ratio ")
    assert list(rows) == list(ALGORITHMS)
    ratio_words = {"token": "token", "sequence s_i": "sequence", "sg[s_i]*pi/sg[pi]": "sequence_token",
                   "geometric mean": "geometric"}
    trust_words = {"clip": "clip", "gate": "soft gate", "cispo": "sg[clip(r)]", "tv": "binary TV",
                   "binary_kl": "binary KL", "clip_cov": "clip + cov", "kl_cov": "cov KL"}
    for name, (ratio, trust, agg, defaults) in rows.items():
        obj = ALGORITHMS[name].objective
        assert ratio_words[ratio] == obj.ratio, name
        assert agg == obj.agg, name
        assert trust.startswith(trust_words[obj.trust]), name
        assert ("no cap" in defaults) == (obj.trust in ("tv", "binary_kl") and obj.ratio_cap is None), name
        numbers = {float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", defaults)}
        knobs = {obj.clip_low, obj.clip_high, obj.tau_pos, obj.tau_neg, obj.ratio_cap, obj.cov_frac, obj.cov_low,
                 obj.cov_high, obj.cov_coef} - {None}
        if obj.trust == "cispo":  # the table gives the cap on r, 1 + clip_high
            knobs = {1 + obj.clip_high}
        assert numbers == knobs, name


def test_the_trainer_table_is_the_registry():
    rows = _table("| algo                  | kl ")
    assert list(rows) == list(ALGORITHMS)
    for name, (kl, advantages, passes, data, steps) in rows.items():
        t = ALGORITHMS[name].trainer
        kl_coef, estimator = kl.split()
        assert float(kl_coef) == t.kl_coef, name
        assert estimator == t.kl_estimator, name
        if t.advantage == "gae":
            assert advantages == "GAE from a critic", name
        elif t.advantage == "group":
            assert advantages == t.adv_scale, name
        else:
            assert advantages == ", ".join(x for x in (t.advantage, t.adv_scale) if x is not None), name
        assert [int(n) for n in re.findall(r"\d+", passes)] == [t.epochs, t.minibatches], name
        assert ("dynamic sampling" in data) == t.dynamic_sampling, name
        assert ("overlong shaping" in data) == t.overlong_shaping, name
        assert int(steps) == t.steps, name

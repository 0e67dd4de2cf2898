"""A run's curves.png: smoothed reward over the raw points, axes that fit the data."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from gradus.train.plots import SMOOTH, draw_run, fit_limits, plot_run, smooth


def _records():
    """250 noisy reward steps around 0.2-0.35; accuracy 0.19 -> 0.32 every 50 steps."""
    rng = np.random.default_rng(0)
    records = [{"step": s, "reward/mean": 0.2 + 0.15 * s / 250 + rng.normal(0, 0.05)} for s in range(1, 251)]
    for i, acc in enumerate([0.19, 0.22, 0.25, 0.28, 0.30, 0.32]):
        records.append({"step": 50 * i, "eval/accuracy": acc})
    return records


def test_fit_limits_by_hand():
    # span 0.13, 8 % of it = 0.0104 on each side
    assert fit_limits([0.19, 0.25, 0.32]) == pytest.approx((0.1796, 0.3304))
    assert fit_limits([0.3, 0.3]) == pytest.approx((0.25, 0.35))  # flat: +-0.05, not a zero-height axis
    assert fit_limits([0.0]) == pytest.approx((-0.05, 0.05))


def test_accuracy_axis_fits_the_gain_and_reward_is_smoothed(tmp_path):
    records = _records()
    fig = draw_run(records, "grpo on countdown")
    ax_r, ax_a = fig.axes
    lo, hi = ax_a.get_ylim()
    assert 0.17 < lo < 0.19 and 0.32 < hi < 0.34  # not 0..1: the 0.13 gain fills the panel
    rewards = [r["reward/mean"] for r in records if "reward/mean" in r]
    lo, hi = ax_r.get_ylim()
    assert lo < min(rewards) and max(rewards) < hi and hi - lo < 1.2 * (max(rewards) - min(rewards))
    (line,) = ax_r.get_lines()  # the smoothed reward; the raw points are a faint scatter under it
    assert np.allclose(line.get_ydata(), smooth(rewards))
    assert len(ax_r.collections) == 1 and ax_r.collections[0].get_alpha() < 0.5
    labels = [t.get_text() for t in ax_r.get_legend().get_texts()]
    assert f"{SMOOTH}-step trailing mean" in labels
    plt.close(fig)
    assert plot_run(records, tmp_path / "curves.png").stat().st_size > 10_000


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 2.0, 3.0, 4.0], window=3).tolist() == [1.0, 1.5, 2.0, 3.0]

"""The vectorised policy losses against the slow element-by-element oracle: values and gradients."""

import pytest
import torch

from gradus.objectives import PRESETS, policy_loss, resolve_objective

from .oracle import policy_loop

CASES = [(algo, {}) for algo in PRESETS] + [
    ("ppo", {"dual_clip": 3.0}),
    ("grpo", {"agg": "token-mean"}),
    ("dapo", {"agg": "seq-mean-token-sum"}),
    ("dr_grpo", {"agg_norm": 16.0}),
    ("gspo", {"clip_low": 0.05, "clip_high": 0.1}),  # wide enough that some sequences are unclipped
    ("gspo_token", {"clip_low": 0.05, "clip_high": 0.1}),
    ("sapo", {"tau_pos": 2.0, "tau_neg": 0.5}),
    ("cispo", {"clip_low": 0.5, "clip_high": 0.3}),
]


@pytest.mark.parametrize(("algo", "overrides"), CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_against_loop(algo, overrides, per_token_adv, batch):
    logp, old, adv, mask = batch
    if per_token_adv:
        if algo == "gspo":
            pytest.skip("GSPO takes one advantage per sequence")
        adv = adv[:, None] + 0.5 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(3),
                                                dtype=logp.dtype)
    x = logp.clone().requires_grad_(True)
    fast, _ = policy_loss(x, old, adv, mask, algo=algo, **overrides)
    (g_fast,) = torch.autograd.grad(fast, x)
    y = logp.clone().requires_grad_(True)
    slow = policy_loop(resolve_objective(algo, **overrides), y, old, adv, mask)
    (g_slow,) = torch.autograd.grad(slow, y)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12)
    assert torch.all(g_fast[mask == 0] == 0)


def test_oracle_can_tell_presets_apart(batch):
    """The comparison above is not vacuous: different presets give different losses (gspo_token
    equals gspo in value by design, see test_policy_identities), and the fixture clips on both sides."""
    logp, old, adv, mask = batch
    values = {algo: policy_loss(logp, old, adv, mask, algo=algo)[0].item() for algo in PRESETS if algo != "gspo_token"}
    _, m = policy_loss(logp, old, adv, mask, algo="ppo")
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0
    assert len({round(v, 9) for v in values.values()}) == len(values)

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
    # narrower than the presets, so that (checked in test_the_overrides_act) every mechanism acts on the fixture
    ("gmpo", {"clip_low": 0.05, "clip_high": 0.1}),
    ("dppo_tv", {"clip_low": 0.05, "clip_high": 0.02, "ratio_cap": 1.3}),
    ("dppo_kl", {"clip_low": 0.01, "clip_high": 0.005, "agg": "token-mean"}),
    ("clip_cov", {"clip_low": 0.2, "clip_high": 0.2, "cov_frac": 0.2, "cov_low": 0.05, "cov_high": 2.0}),
    ("kl_cov", {"cov_frac": 0.2, "cov_coef": 0.5, "agg": "seq-mean-token-mean"}),
]
SEED = 7  # of Clip-Cov's draw, given to both sides


def _loss(algo, overrides, logp, old, adv, mask):
    generator = torch.Generator().manual_seed(SEED) if algo == "clip_cov" else None
    return policy_loss(logp, old, adv, mask, algo=algo, generator=generator, **overrides)


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
    fast, _ = _loss(algo, overrides, x, old, adv, mask)
    (g_fast,) = torch.autograd.grad(fast, x)
    y = logp.clone().requires_grad_(True)
    slow = policy_loop(resolve_objective(algo, **overrides), y, old, adv, mask, seed=SEED)
    (g_slow,) = torch.autograd.grad(slow, y)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12)
    assert torch.all(g_fast[mask == 0] == 0)


@pytest.mark.parametrize(("algo", "overrides", "acting"), [
    ("gmpo", CASES[-5][1], ("clip_frac_high", "clip_frac_low")),
    ("dppo_tv", CASES[-4][1], ("clip_frac_high", "clip_frac_low", "cap_frac")),
    ("dppo_kl", CASES[-3][1], ("clip_frac_high", "clip_frac_low")),
    ("clip_cov", CASES[-2][1], ("clip_frac_high", "clip_frac_low", "cov_detached_frac")),
    ("kl_cov", CASES[-1][1], ("cov_penalised_frac",)),
])
def test_the_overrides_act(algo, overrides, acting, batch):
    """The comparisons above are not vacuous: on the fixture each new member's masks, caps and selections
    touch some tokens but not all."""
    logp, old, adv, mask = batch
    _, m = _loss(algo, overrides, logp, old, adv, mask)
    for name in acting:
        assert 0 < m[name] < 1, (name, m)


def test_oracle_can_tell_presets_apart(batch):
    """The comparison above is not vacuous: different presets give different losses (gspo_token
    equals gspo in value by design, see test_policy_identities; gdpo and grpo_passk share GRPO's loss and
    rloo and the REINFORCE++ pair DAPO's clip with eps 0.2, as only their advantages differ), and the fixture
    clips on both sides."""
    logp, old, adv, mask = batch
    same_loss = {"gspo_token", "gdpo", "grpo_passk", "rloo", "reinforce_pp", "reinforce_pp_baseline"}
    values = {algo: _loss(algo, {}, logp, old, adv, mask)[0].item() for algo in PRESETS if algo not in same_loss}
    _, m = policy_loss(logp, old, adv, mask, algo="ppo")
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0
    assert len({round(v, 9) for v in values.values()}) == len(values), values
    for algo, twin in (("gdpo", "grpo"), ("grpo_passk", "grpo"), ("rloo", "ppo"), ("reinforce_pp", "ppo")):
        assert resolve_objective(algo).knobs() == resolve_objective(twin).knobs()

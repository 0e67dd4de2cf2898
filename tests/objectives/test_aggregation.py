import pytest
import torch

from gradus.objectives import AGG_MODES, agg_loss

from .oracle import agg_loop

# Hand-worked: row 0 has losses [1, 2, 3] (3 tokens), row 1 has [4] (1 token), row 2 is empty.
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 2.5
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),  # row means 2 and 4 -> 3
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),  # row sums 6 and 4 -> 5
        ("seq-mean-token-sum-norm", (6.0 / 3 + 4.0 / 3) / 2),  # norm defaults to T = 3 -> 5/3
    ],
)
def test_hand_worked(mode, expected):
    assert agg_loss(LOSS, MASK, mode).item() == pytest.approx(expected, abs=1e-6)


def test_sum_norm_constant():
    # Dr. GRPO with a constant norm of 10: (6/10 + 4/10) / 2 = 0.5
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm=10).item() == pytest.approx(0.5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_matches_loop_oracle_values_and_grads(mode, batch):
    logp, _, _, mask = batch
    x = logp.clone().requires_grad_(True)
    fast = agg_loss(x * x, mask, mode)
    (g_fast,) = torch.autograd.grad(fast, x)
    y = logp.clone().requires_grad_(True)
    slow = agg_loop(y * y, mask, mode)
    (g_slow,) = torch.autograd.grad(slow, y)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-12, atol=1e-12)


def test_masked_inf_does_not_leak():
    loss = torch.tensor([[1.0, float("inf")], [float("nan"), 2.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for mode in AGG_MODES:
        assert torch.isfinite(agg_loss(loss, mask, mode))


def test_all_empty_is_zero_not_nan():
    loss = torch.randn(2, 3, requires_grad=True)
    for mode in AGG_MODES:
        out = agg_loss(loss, torch.zeros(2, 3), mode)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, loss)
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_global_counts_make_shards_sum_to_the_whole(mode, batch):
    """Two data-parallel shards given global denominators: their losses (and so their gradients)
    add up to the loss of the whole batch."""
    logp, _, _, mask = batch
    whole = agg_loss(logp, mask, mode)
    a, b = slice(0, 2), slice(2, None)
    if mode == "token-mean":
        kw = {"num_tokens": mask.sum()}
    else:
        kw = {"num_seqs": (mask.sum(-1) > 0).sum()}
    parts = agg_loss(logp[a], mask[a], mode, **kw) + agg_loss(logp[b], mask[b], mode, **kw)
    # With the default (local) denominators the shards would *not* sum to the whole:
    local = agg_loss(logp[a], mask[a], mode) + agg_loss(logp[b], mask[b], mode)
    torch.testing.assert_close(parts, whole)
    assert not torch.allclose(local, whole)


def test_token_mean_equals_seq_mean_only_for_equal_lengths():
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(4, 6, generator=g)
    equal = torch.ones(4, 6)
    equal[:, 4:] = 0  # all rows have 4 tokens
    assert torch.allclose(agg_loss(loss, equal, "token-mean"), agg_loss(loss, equal, "seq-mean-token-mean"))
    ragged = equal.clone()
    ragged[0, 1:] = 0
    assert not torch.allclose(agg_loss(loss, ragged, "token-mean"), agg_loss(loss, ragged, "seq-mean-token-mean"))


def test_errors():
    with pytest.raises(ValueError, match="valid modes: token-mean"):
        agg_loss(LOSS, MASK, "mean")
    with pytest.raises(ValueError, match="norm is only used"):
        agg_loss(LOSS, MASK, "token-mean", norm=3)
    with pytest.raises(ValueError, match="shape"):
        agg_loss(LOSS, MASK[:, :2], "token-mean")
    with pytest.raises(ValueError, match="num_seqs"):
        agg_loss(LOSS, MASK, "token-mean", num_seqs=3)

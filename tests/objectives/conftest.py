import pytest
import torch


@pytest.fixture
def batch():
    """A small random batch in fp64 with rows of different lengths and one empty row."""
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    mask[3] = 0  # empty completion
    mask[4, 6:] = 0
    adv = torch.tensor([1.3, -0.7, 0.4, 0.9, -1.2], dtype=torch.float64)  # both signs: both clip sides
    return logp, old, adv, mask

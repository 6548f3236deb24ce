"""prunenet.policy.SparsityPredictor against the paper's naive O(n^2 d) formula."""

from __future__ import annotations

import pytest
import torch

from prunenet.learner import kl_regulariser
from prunenet.policy import SparsityPredictor

N, D = 37, 24  # odd, non-square: a transposition cannot go unnoticed


def _policy_and_weight(seed=0, n=N, d=D, wdtype=torch.float32):
    torch.manual_seed(seed)
    policy = SparsityPredictor(n, d)
    w = (torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 100)) * 0.2).to(wdtype)
    return policy, w


def _naive_logits(policy: SparsityPredictor, w: torch.Tensor) -> torch.Tensor:
    """(W A^T + 1 b^T) v, squeezed, in float64: the paper's formula with its (n, n) intermediate."""
    a = policy.proj_intermediate.weight.detach().double()  # (n, d)
    b = policy.proj_intermediate.bias.detach().double()  # (n,)
    v = policy.row_sparsities.detach().double()  # (n, 1)
    w = w.double()
    n = w.shape[0]
    m = w @ a.t() + torch.ones(n, 1, dtype=torch.float64) @ b.unsqueeze(0)  # (n, n)
    assert m.shape == (n, n)
    return (m @ v).squeeze(-1)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n,d", [(N, D), (D, N), (1, 5)])
def test_logits_equal_naive_formula(seed, n, d):
    policy, w = _policy_and_weight(seed, n, d)
    z = policy.logits(w)
    assert z.shape == (n,) and z.dtype == torch.float32
    expected = _naive_logits(policy, w)
    scale = float(expected.abs().max()) + 1.0
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(policy.alpha(w).double(), torch.sigmoid(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_logits_of_half_weights_equal_naive_formula_of_upcast(wdtype):
    policy, w = _policy_and_weight(3, wdtype=wdtype)
    expected = _naive_logits(policy, w.double())
    torch.testing.assert_close(policy.logits(w).double(), expected, rtol=1e-5,
                               atol=1e-6 * (float(expected.abs().max()) + 1.0))


def test_forward_probabilities_in_open_interval_and_reproducible():
    policy, w = _policy_and_weight()
    p1, z1 = policy(w, generator=torch.Generator().manual_seed(123))
    p2, z2 = policy(w, generator=torch.Generator().manual_seed(123))
    p3, _ = policy(w, generator=torch.Generator().manual_seed(124))
    assert p1.shape == (N,) and z1.shape == (N,)
    assert bool(((p1 > 0) & (p1 < 1)).all())
    assert torch.equal(p1, p2) and torch.equal(z1, z2)
    assert not torch.equal(p1, p3)  # eps really comes from the generator
    torch.testing.assert_close(z1, policy.logits(w))


def test_forward_equals_relaxed_bernoulli_with_same_eps():
    policy, w = _policy_and_weight(1)
    p, _ = policy(w, generator=torch.Generator().manual_seed(7))
    eps = torch.rand(N, generator=torch.Generator().manual_seed(7), dtype=torch.float32).double()
    alpha = torch.sigmoid(_naive_logits(policy, w))
    expected = torch.sigmoid(torch.logit(eps) + torch.logit(alpha))
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)


def test_forward_is_differentiable_wrt_policy_parameters():
    policy, w = _policy_and_weight()
    p, _ = policy(w, generator=torch.Generator().manual_seed(0))
    torch.log(p[:10]).sum().backward()
    for name, param in policy.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_rejects_wrong_shape_and_sizes():
    policy, w = _policy_and_weight()
    with pytest.raises(ValueError, match=r"\(37, 24\)"):
        policy.logits(w.t())
    with pytest.raises(ValueError, match="shape"):
        policy(w[:-1])
    with pytest.raises(ValueError, match="positive"):
        SparsityPredictor(0, 4)


def test_kl_regulariser_matches_formula():
    z = torch.linspace(-4, 4, 11, dtype=torch.float64)
    a = torch.sigmoid(z)
    expected = (-(1 - a) * torch.log(a) - a * torch.log(1 - a) + torch.log(torch.tensor(0.5))).sum()
    torch.testing.assert_close(kl_regulariser(z), expected.to(z.dtype))

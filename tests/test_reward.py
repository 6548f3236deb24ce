"""prunenet.reward: KS statistic (against scipy), spectra in float32/64, reward, discount."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp

from prunenet.reward import REWARD_CAP, discount, ks_statistic, singular_values, spectral_reward


# ----------------------------------------------------------------------------- KS statistic
@pytest.mark.parametrize("m,k", [(1, 1), (1, 5), (7, 100), (24, 37), (37, 24), (50, 50), (200, 13)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ks_matches_scipy_on_random_samples(m, k, seed):
    g = torch.Generator().manual_seed(seed * 1000 + m * 7 + k)
    x = torch.randn(m, generator=g, dtype=torch.float64)
    y = torch.randn(k, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ours = ks_statistic(x, y)
    expected = ks_2samp(x.numpy(), y.numpy()).statistic
    assert ours.dtype == torch.float64 and ours.dim() == 0
    assert float(ours) == pytest.approx(expected, abs=1e-12)
    # symmetric
    assert float(ks_statistic(y, x)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_ks_matches_scipy_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5, (30,), generator=g)
    y = torch.randint(0, 7, (17,), generator=g)
    assert len(x.unique()) < x.numel() and len(y.unique()) < y.numel()  # really tied
    expected = ks_2samp(x.numpy(), y.numpy()).statistic
    assert float(ks_statistic(x.float(), y.float())) == pytest.approx(expected, abs=1e-12)


def test_ks_float32_input_matches_scipy():
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(41, generator=g), torch.rand(19, generator=g) ** 2
    expected = ks_2samp(x.double().numpy(), y.double().numpy()).statistic
    assert float(ks_statistic(x, y)) == pytest.approx(expected, abs=1e-12)


def test_ks_identical_samples_is_zero():
    x = torch.randn(33, generator=torch.Generator().manual_seed(0))
    assert float(ks_statistic(x, x)) == 0.0
    assert float(ks_statistic(x, x[torch.randperm(33)])) == 0.0
    tied = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    assert float(ks_statistic(tied, tied.flip(0))) == 0.0
    # the same distribution of values at a different sample size is also KS 0
    assert float(ks_statistic(tied, torch.cat([tied, tied]))) == 0.0


def test_ks_disjoint_samples_is_one():
    assert float(ks_statistic(torch.arange(5.0), torch.arange(10.0, 13.0))) == 1.0


@pytest.mark.parametrize("x,y", [(torch.tensor([]), torch.ones(3)), (torch.ones(3), torch.tensor([])),
                                 (torch.ones(2, 2), torch.ones(3))])
def test_ks_rejects_empty_or_not_1d(x, y):
    with pytest.raises(ValueError, match="ks_statistic"):
        ks_statistic(x, y)


# ----------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 24), (24, 37)])
def test_singular_values_upcast_and_match_float64(wdtype, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(wdtype)
    sv = singular_values(w)
    assert sv.dtype == torch.float32
    assert sv.shape == (min(shape),)
    reference = torch.linalg.svdvals(w.to(torch.float64))
    torch.testing.assert_close(sv.double(), reference, rtol=1e-5, atol=1e-5 * float(reference[0]))
    assert bool((sv[:-1] >= sv[1:]).all())  # descending

    sv64 = singular_values(w, torch.float64)
    assert sv64.dtype == torch.float64
    torch.testing.assert_close(sv64, reference, rtol=1e-12, atol=1e-12 * float(reference[0]))


def test_singular_values_rejects_bad_dtype_and_shape():
    with pytest.raises(ValueError, match="float32"):
        singular_values(torch.ones(3, 3), dtype=torch.float16)
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.ones(3))


# ----------------------------------------------------------------------------- reward, discount
def test_spectral_reward_cap_and_inverse():
    assert spectral_reward(0.0) == REWARD_CAP
    assert spectral_reward(torch.tensor(0.0, dtype=torch.float64)) == REWARD_CAP
    assert spectral_reward(0.0, cap=123.0) == 123.0
    for ks in (1.0, 0.5, 0.25, 0.137, 1e-3):
        assert spectral_reward(ks) == pytest.approx(1.0 / ks, rel=1e-15)
        assert spectral_reward(torch.tensor(ks, dtype=torch.float64)) == pytest.approx(1.0 / ks, rel=1e-15)
    assert isinstance(spectral_reward(torch.tensor(0.5)), float)
    # never above the cap, even for a KS tinier than 1 / cap
    assert spectral_reward(1e-9) == REWARD_CAP


@pytest.mark.parametrize("gamma", [0.99, 0.5, 1.0])
@pytest.mark.parametrize("i", [0, 1, 7, 29])
def test_discount_is_gamma_power_times_reward(gamma, i):
    r = 3.7
    assert discount(r, i, gamma) == pytest.approx(gamma**i * r, rel=1e-15)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.01, 2.0, float("nan")])
def test_discount_rejects_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        discount(1.0, 0, gamma)


def test_discount_rejects_negative_layer():
    with pytest.raises(ValueError, match="layer_index"):
        discount(1.0, -1, 0.99)


# ----------------------------------------------------------------------------- degenerate matrices
def _rank_one(n, d, dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 1, generator=g) @ torch.randn(1, d, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda n, d, dt: torch.zeros(n, d, dtype=dt), _rank_one], ids=["zeros", "rank1"])
@pytest.mark.parametrize("spectra_dtype", [torch.float32, torch.float64])
def test_degenerate_matrices_give_finite_reward(make, dtype, spectra_dtype):
    n, d = 37, 24
    w = make(n, d, dtype)
    kept = torch.arange(0, n, 2)  # 19 rows
    dense = singular_values(w, spectra_dtype)
    pruned = singular_values(w.index_select(0, kept), spectra_dtype)
    assert torch.isfinite(dense).all() and torch.isfinite(pruned).all()
    ks = ks_statistic(dense, pruned)
    assert 0.0 <= float(ks) <= 1.0
    r = spectral_reward(ks)
    assert math.isfinite(r) and 1.0 <= r <= REWARD_CAP
    assert math.isfinite(discount(r, 5, 0.99))
    if float(w.float().abs().max()) == 0.0:
        assert float(ks) == 0.0 and r == REWARD_CAP

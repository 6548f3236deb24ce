"""Rewards: singular values, the two-sample KS statistic, the paper's reward and discount, and the
reward plug point (``--model.reward``).

Source: PruneNet paper, Section 3 (reward r_i = 1 / KS(sv(W_i), sv(W_i[kept])),
discounted by gamma^i over the layer index i).
"""

from __future__ import annotations

import torch

from prunenet.errors import ConfigurationError

#: Reward used when the KS statistic is exactly 0 (identical spectra); the
#: authors' code returns 99999 in that case.
REWARD_CAP = 99999.0


def singular_values(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Singular values of a matrix, computed in float32 (or float64) whatever its dtype.

    Half-precision SVD does not exist on CPU and is imprecise elsewhere, so the
    matrix is upcast first.

    Args:
        weight: shape (rows, cols), any float dtype.
        dtype: ``torch.float32`` or ``torch.float64``.
    Returns:
        Tensor of shape (min(rows, cols),), descending, in ``dtype``.
    Raises:
        ValueError: if ``dtype`` is not float32/float64 or ``weight`` is not 2-D.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"spectra dtype must be torch.float32 or torch.float64, got {dtype}")
    if weight.dim() != 2:
        raise ValueError(f"singular_values expects a 2-D matrix, got shape {tuple(weight.shape)}")
    return torch.linalg.svdvals(weight.to(dtype))


def ks_statistic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two-sample Kolmogorov-Smirnov statistic ``sup_t |F_x(t) - F_y(t)|``.

    Same value as ``scipy.stats.ks_2samp(x, y).statistic`` (ties included): the
    empirical CDFs are evaluated at every observed value with right-continuous steps.

    Args:
        x: 1-D sample, shape (m,).
        y: 1-D sample, shape (k,).
    Returns:
        0-dim tensor in [0, 1], float64.
    Raises:
        ValueError: if either sample is empty or not 1-D.
    """
    if x.dim() != 1 or y.dim() != 1 or x.numel() == 0 or y.numel() == 0:
        raise ValueError(
            f"ks_statistic needs two non-empty 1-D samples, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    xs = torch.sort(x.detach().to(torch.float64)).values
    ys = torch.sort(y.detach().to(torch.float64).to(xs.device)).values
    grid = torch.cat([xs, ys])
    cdf_x = torch.searchsorted(xs, grid, right=True).to(torch.float64) / xs.numel()
    cdf_y = torch.searchsorted(ys, grid, right=True).to(torch.float64) / ys.numel()
    return (cdf_x - cdf_y).abs().max()


def spectral_reward(ks: torch.Tensor | float, cap: float = REWARD_CAP) -> float:
    """Reward ``1 / KS``, capped at ``cap`` (reached when KS = 0, i.e. identical spectra).

    Args:
        ks: KS statistic in [0, 1].
        cap: the largest reward returned.
    Returns:
        Python float in (1, cap].
    """
    ks = float(ks)
    if ks <= 0.0:
        return float(cap)
    return min(1.0 / ks, float(cap))


def discount(reward: float, layer_index: int, gamma: float) -> float:
    """Discounted reward ``R_i = gamma^i * r_i`` (i = layer index; not a return).

    Raises:
        ValueError: if ``gamma`` is not in (0, 1] or ``layer_index`` < 0.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if layer_index < 0:
        raise ValueError(f"layer_index must be >= 0, got {layer_index}")
    return (gamma**layer_index) * reward


class KSGateReward:
    """The paper's reward on the policy state (the first FFN input matrix, "gate"):
    ``r_i = 1 / KS(sv(W_i), sv(W_i[kept]))``. Source: PruneNet Section 3.

    The plug point ``--model.reward`` (ours): a reward has ``name``, :meth:`reference` (computed
    once per layer and cached by the caller) and ``__call__``.

    Args:
        dtype: ``torch.float32`` or ``torch.float64`` for the singular values.
    """

    name = "ks_gate"

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    def reference(self, weight: torch.Tensor) -> torch.Tensor:
        """Singular values of the dense W_i, shape (min(n, d),)."""
        return singular_values(weight, self.dtype)

    def __call__(self, weight: torch.Tensor, kept: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(KS statistic, reward)`` of keeping rows ``kept`` (shape (k,)) of ``weight`` (n, d)."""
        ks = ks_statistic(reference, singular_values(weight.index_select(0, kept), self.dtype))
        return ks, spectral_reward(ks)


#: Rewards by name (``--model.reward``).
REWARDS = {cls.name: cls for cls in (KSGateReward,)}


def build_reward(name: str, dtype: torch.dtype) -> KSGateReward:
    """The reward of registry name ``name``.

    Raises:
        ConfigurationError: an unknown name (lists the known ones).
    """
    if name not in REWARDS:
        raise ConfigurationError(f"reward must be one of {sorted(REWARDS)}, got {name!r}")
    return REWARDS[name](dtype)

"""Rewards: singular values, the two-sample KS statistic, the paper's reward and discount, and the
reward plug point (``--model.reward``).

Source: PruneNet paper, Section 3 (reward r_i = 1 / KS(sv(W_i), sv(W_i[kept])),
discounted by gamma^i over the layer index i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunenet.errors import ConfigurationError
from prunenet.spectra import (SPECTRA_METHOD, FullGram, check_spectra_args, dense_singular_values, full_gram,
                              kept_singular_values, singular_values)

#: Reward used when the KS statistic is exactly 0 (identical spectra); the
#: authors' code returns 99999 in that case.
REWARD_CAP = 99999.0


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

    The plug point ``--model.reward`` (ours): a reward has ``name``, ``cache_key`` (what its
    references depend on besides the weights), :meth:`reference` (computed once per layer and
    cached by the caller), :meth:`context` (optional per-layer data kept next to the reference),
    :meth:`rewards` (many layers at once) and ``__call__`` (one layer).

    Args:
        dtype: ``torch.float32`` or ``torch.float64`` for the singular values.
        method: how they are computed, one of :data:`SPECTRA_METHODS` (ours; default
            :data:`SPECTRA_METHOD`, the Gram route, same numbers as ``svdvals`` up to rounding).
    Raises:
        ValueError: bad ``dtype`` or ``method``.
    """

    name = "ks_gate"

    def __init__(self, dtype: torch.dtype = torch.float32, method: str = SPECTRA_METHOD) -> None:
        check_spectra_args(dtype, method)
        self.dtype, self.method = dtype, method

    @property
    def cache_key(self) -> str:
        """Names what the reference spectra depend on besides the weights (an on-disk cache key part)."""
        return f"{self.name}-{self.method}-{str(self.dtype).removeprefix('torch.')}"

    def reference(self, weight: torch.Tensor) -> torch.Tensor:
        """Singular values of the dense W_i, shape (min(n, d),)."""
        return singular_values(weight, self.dtype, self.method)

    def reference_and_context(self, weight: torch.Tensor) -> tuple[torch.Tensor, FullGram | None]:
        """:meth:`reference` and :meth:`context` together: the Gram route forms ``WᵀW`` once for both."""
        return dense_singular_values(weight, self.dtype, self.method)

    def context(self, weight: torch.Tensor, reference: torch.Tensor) -> FullGram | None:
        """The full Gram of W_i for the downdate, or None where it does not pay (``svdvals``, or a
        ratio that removes at least half the rows: decided per call in :func:`kept_singular_values`)."""
        if self.method != "gram" or weight.shape[0] < weight.shape[1]:
            return None
        return full_gram(weight, self.dtype, reference)

    def rewards(self, weights: Sequence[torch.Tensor], kept: Sequence[torch.Tensor],
                references: Sequence[torch.Tensor], contexts: Sequence[FullGram | None] | None = None
                ) -> list[tuple[torch.Tensor, float]]:
        """Per layer ``(KS statistic, reward)`` of keeping rows ``kept[i]`` (k,) of ``weights[i]`` (n, d),
        the spectra of all layers computed together (:func:`kept_singular_values`)."""
        spectra = kept_singular_values(weights, kept, self.dtype, self.method, contexts)
        out = []
        for reference, sv in zip(references, spectra):
            ks = ks_statistic(reference, sv)
            out.append((ks, spectral_reward(ks)))
        return out

    def __call__(self, weight: torch.Tensor, kept: torch.Tensor, reference: torch.Tensor,
                 context: FullGram | None = None) -> tuple[torch.Tensor, float]:
        """``(KS statistic, reward)`` of keeping rows ``kept`` (shape (k,)) of ``weight`` (n, d)."""
        return self.rewards([weight], [kept], [reference], [context])[0]


#: Rewards by name (``--model.reward``).
REWARDS = {cls.name: cls for cls in (KSGateReward,)}


def build_reward(name: str, dtype: torch.dtype, method: str = SPECTRA_METHOD) -> KSGateReward:
    """The reward of registry name ``name``, its spectra computed in ``dtype`` by ``method``.

    Raises:
        ConfigurationError: an unknown name (lists the known ones).
    """
    if name not in REWARDS:
        raise ConfigurationError(f"reward must be one of {sorted(REWARDS)}, got {name!r}")
    return REWARDS[name](dtype, method)

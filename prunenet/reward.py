"""Rewards: singular values, the two-sample KS statistic, the paper's reward and discount, and the
reward plug point (``--model.reward``).

Source: PruneNet paper, Section 3 (reward r_i = 1 / KS(sv(W_i), sv(W_i[kept])),
discounted by gamma^i over the layer index i).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from prunenet.errors import ConfigurationError

#: Reward used when the KS statistic is exactly 0 (identical spectra); the
#: authors' code returns 99999 in that case.
REWARD_CAP = 99999.0


#: How singular values are computed (``spectra_method``): ``gram`` (ours, the default) or ``svdvals``.
SPECTRA_METHODS = ("gram", "svdvals")
#: The default, the one place that chooses it: eigenvalues of the Gram matrix (ours).
SPECTRA_METHOD = "gram"
#: The Gram route is used for a matrix only while its bound on the relative error of the smallest
#: singular value is at most this (see :func:`gram_singular_values`); otherwise ``svdvals``.
GRAM_RTOL = 0.05
#: Bytes of stacked rows and Gram matrices one batched ``eigvalsh`` call may hold on the CPU (more
#: layers are split into several calls: 16 SmolLM2 layers per call, a LLaMA-2-7B layer alone). On a
#: CPU, LAPACK runs the batch one matrix at a time anyway, so a small budget costs no time and keeps
#: the fit's peak memory low; on a GPU the budget is a quarter of the free memory (one kernel launch
#: for many layers is what pays there).
SPECTRA_BATCH_BYTES = 64 << 20


def _check_spectra_args(dtype: torch.dtype, method: str) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"spectra dtype must be torch.float32 or torch.float64, got {dtype}")
    if method not in SPECTRA_METHODS:
        raise ValueError(f"spectra method must be one of {list(SPECTRA_METHODS)}, got {method!r}")


def singular_values(weight: torch.Tensor, dtype: torch.dtype = torch.float32,
                    method: str = SPECTRA_METHOD) -> torch.Tensor:
    """Singular values of a matrix, computed in float32 (or float64) whatever its dtype.

    Half-precision SVD does not exist on CPU and is imprecise elsewhere, so the matrix is upcast
    first. ``method="gram"`` (ours) takes them from the eigenvalues of the Gram matrix, falling back
    to ``svdvals`` where that is not accurate enough (:func:`gram_singular_values`).

    Args:
        weight: shape (rows, cols), any float dtype.
        dtype: ``torch.float32`` or ``torch.float64``.
        method: one of :data:`SPECTRA_METHODS`.
    Returns:
        Tensor of shape (min(rows, cols),), descending, in ``dtype``.
    Raises:
        ValueError: if ``dtype`` is not float32/float64, ``method`` unknown or ``weight`` not 2-D.
    """
    _check_spectra_args(dtype, method)
    if weight.dim() != 2:
        raise ValueError(f"singular_values expects a 2-D matrix, got shape {tuple(weight.shape)}")
    if method == "svdvals":
        return torch.linalg.svdvals(weight.to(dtype))
    return gram_singular_values(weight.to(dtype)[None])[0]


def gram(rows: torch.Tensor) -> torch.Tensor:
    """Gram matrix of the smaller side: ``AᵀA`` (c, c) if rows >= cols, else ``AAᵀ`` (r, r).

    Args:
        rows: (..., r, c) float32/float64. Returns (..., s, s), s = min(r, c), same dtype.
    """
    return rows.mT @ rows if rows.shape[-2] >= rows.shape[-1] else rows @ rows.mT


def gram_error(size: int, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """Bound on the absolute error of each eigenvalue of a Gram matrix computed in ``dtype``:
    ``size * u * scale``, u the unit roundoff (eps / 2), ``scale`` the largest eigenvalue of the Gram
    whose rounding errors it carries (ours).

    Forming ``AᵀA`` and ``eigvalsh`` are backward stable: the computed eigenvalues are exact for a
    matrix within ``p(size) * u * ||G||`` of G, hence (Weyl) each eigenvalue is off by at most that.
    ``p(size) = size`` is the usual first-order factor of the tridiagonal reduction; measured on the
    30 SmolLM2 layers in float32 the largest error is about 1/12 of this bound (``sqrt(size)`` would
    be exceeded by 2x, so it is not used).
    """
    return size * (torch.finfo(dtype).eps / 2) * scale


def gram_singular_values(rows: torch.Tensor, gram_matrix: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of a batch of matrices from ``eigvalsh`` of their Gram matrices (ours).

    ``σ_i = sqrt(λ_i(AᵀA))``: the same numbers as ``svdvals(A)`` in exact arithmetic, at the cost of
    one (s, s) symmetric eigenproblem, s = min(r, c) (LAPACK ``syevd`` without vectors), instead of a
    bidiagonal SVD of the (r, c) matrix. Negative eigenvalues (rounding) are clamped to 0.

    Squaring the matrix squares its condition number: an eigenvalue error δλ (:func:`gram_error`)
    moves ``σ_i`` by about ``δλ / (2 σ_i)``, relatively ``δλ / (2 λ_i)``. The rule: a matrix whose
    bound for its *smallest* singular value, ``δλ / (2 λ_min)``, exceeds :data:`GRAM_RTOL` (5%; in
    float32 this is a condition number above about 54 for s = 576, 20 for s = 4096; in float64 above
    about 1e6) is ill-conditioned for this route and gets ``torch.linalg.svdvals`` instead, as does a
    zero matrix (λ_max = 0): a rank-deficient matrix always goes to ``svdvals``, so degenerate layers
    get exactly the numbers of the ``svdvals`` path. SmolLM2-135M's gate matrices (condition numbers
    19-30) all take the Gram route in float32; their KS statistics equal those of float64
    ``svdvals`` (``tests/test_spectra.py``).

    Args:
        rows: (B, r, c) float32 or float64, the matrices (used by the fallback even when
            ``gram_matrix`` is given).
        gram_matrix: their Gram matrices (B, s, s) if already formed (e.g. by a downdate); else
            formed here with :func:`gram`.
        scale: (B,) the largest eigenvalue of the Gram whose rounding errors ``gram_matrix`` carries
            (for a downdate ``G_full - RᵀR``, that of ``G_full``); default: its own largest eigenvalue.
    Returns:
        (B, s) singular values, each row descending, in ``rows.dtype``.
    Raises:
        ValueError: ``rows`` is not 3-D float32/float64.
    """
    if rows.dim() != 3 or rows.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram_singular_values expects (B, r, c) float32/float64, got {tuple(rows.shape)} "
                         f"{rows.dtype}")
    return _from_gram(gram(rows) if gram_matrix is None else gram_matrix, scale, lambda b: rows[b])


def _from_gram(g: torch.Tensor, scale: torch.Tensor | None, matrix: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """:func:`gram_singular_values` given the Gram matrices (B, s, s); ``matrix(b)`` builds the b-th
    matrix itself, only for the ``svdvals`` fallback (so the kept rows of a downdate are never stacked)."""
    lam = torch.linalg.eigvalsh(g)  # ascending
    top = lam[:, -1] if scale is None else torch.maximum(scale.to(lam), lam[:, -1])
    err = gram_error(g.shape[-1], g.dtype, top)
    # Clamp before sqrt: eigenvalues of a PSD matrix computed as slightly negative are rounding.
    sv = lam.clamp_min(0).sqrt().flip(-1)
    bad = ~(err <= 2 * GRAM_RTOL * lam[:, 0]) | (top <= 0)  # NaN-safe: a NaN bound counts as bad
    for b in bad.nonzero().flatten().tolist():
        sv[b] = torch.linalg.svdvals(matrix(b))
    return sv


def kept_singular_values(states: Sequence[torch.Tensor], kept: Sequence[torch.Tensor],
                         dtype: torch.dtype = torch.float32, method: str = SPECTRA_METHOD,
                         full_grams: Sequence[FullGram | None] | None = None,
                         batch_bytes: int | None = None) -> list[torch.Tensor]:
    """Singular values of each layer's kept rows ``states[i][kept[i]]``, batched over layers (ours).

    ``method="gram"``: the layers of equal shape go through :func:`gram_singular_values` together, as
    many per ``eigvalsh`` call as ``batch_bytes`` allows. A layer with a full Gram ``WᵀW`` in
    ``full_grams`` and fewer removed rows than kept ones gets the downdate ``WᵀW - RᵀR`` (R the
    removed rows: (n - k) d² instead of k d² multiply-adds); its error bound then scales with the
    full Gram's largest eigenvalue. ``method="svdvals"``: ``torch.linalg.svdvals`` of each.

    Args:
        states: per layer W_i, (n, d), any float dtype, all on one device.
        kept: per layer the kept row indices, (k,) LongTensor.
        dtype: ``torch.float32`` or ``torch.float64`` for the computation and the result.
        method: one of :data:`SPECTRA_METHODS`.
        full_grams: per layer the :class:`FullGram` of W_i in ``dtype`` (:func:`full_gram`) or None.
        batch_bytes: memory budget of one batched call (stacked rows + Gram matrices); None:
            :data:`SPECTRA_BATCH_BYTES` on a CPU, a quarter of the free memory on a GPU.
    Returns:
        Per layer a (min(k, d),) descending tensor in ``dtype``.
    Raises:
        ValueError: bad ``dtype`` / ``method``, or ``states`` and ``kept`` of different lengths.
    """
    _check_spectra_args(dtype, method)
    if len(states) != len(kept):
        raise ValueError(f"kept_singular_values got {len(states)} states and {len(kept)} index sets")
    full_grams = full_grams if full_grams is not None else [None] * len(states)
    if method == "svdvals":
        return [torch.linalg.svdvals(w.index_select(0, idx).to(dtype)) for w, idx in zip(states, kept)]
    if batch_bytes is None:
        batch_bytes = SPECTRA_BATCH_BYTES
        if states and states[0].is_cuda:
            batch_bytes = torch.cuda.mem_get_info(states[0].device)[0] // 4
    out: list[torch.Tensor | None] = [None] * len(states)
    groups: dict[tuple, list[int]] = {}
    for i, (w, idx) in enumerate(zip(states, kept)):
        # Downdate only for a tall kept block (its Gram is the (d, d) one) and when it is less work.
        downdate = full_grams[i] is not None and w.shape[1] <= idx.numel() and w.shape[0] - idx.numel() < idx.numel()
        groups.setdefault((tuple(w.shape), idx.numel(), downdate), []).append(i)
    for (shape, k, downdate), members in groups.items():
        n, d = shape
        s = min(k, d)
        itemsize = torch.finfo(dtype).bits // 8
        per_layer = itemsize * ((n - k if downdate else k) * d + 2 * s * s)
        step = max(1, batch_bytes // per_layer)
        for start in range(0, len(members), step):
            chunk = members[start:start + step]

            def kept_rows(j: int, chunk=chunk) -> torch.Tensor:
                return states[chunk[j]].index_select(0, kept[chunk[j]]).to(dtype)

            if downdate:
                removed = torch.stack([states[i].index_select(0, _complement(kept[i], n)).to(dtype) for i in chunk])
                g = torch.stack([full_grams[i].matrix for i in chunk]).baddbmm_(removed.mT, removed, alpha=-1)
                del removed
                # The subtraction's rounding is relative to the full Gram: bound with its largest eigenvalue.
                sv = _from_gram(g, torch.stack([full_grams[i].top for i in chunk]), kept_rows)
            else:
                rows = torch.stack([kept_rows(j) for j in range(len(chunk))])
                sv = _from_gram(gram(rows), None, lambda j, rows=rows: rows[j])
                del rows
            for j, i in enumerate(chunk):
                out[i] = sv[j]
    return out  # type: ignore[return-value]


class FullGram(NamedTuple):
    """``WᵀW`` of a dense state, the base of the downdate in :func:`kept_singular_values` (ours)."""

    #: (d, d) in the spectra dtype.
    matrix: torch.Tensor
    #: 0-dim, its largest eigenvalue ``σ_max(W)²`` (scales the downdate's error bound).
    top: torch.Tensor


def full_gram(weight: torch.Tensor, dtype: torch.dtype, spectrum: torch.Tensor) -> FullGram:
    """The :class:`FullGram` of an (n, d) state whose singular values ``spectrum`` are known."""
    w = weight.to(dtype)
    return FullGram(w.mT @ w, spectrum[0].to(dtype) ** 2)


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of 0..n-1 not in ``kept``, ascending."""
    mask = torch.ones(n, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()


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
        _check_spectra_args(dtype, method)
        self.dtype, self.method = dtype, method

    @property
    def cache_key(self) -> str:
        """Names what the reference spectra depend on besides the weights (an on-disk cache key part)."""
        return f"{self.name}-{self.method}-{str(self.dtype).removeprefix('torch.')}"

    def reference(self, weight: torch.Tensor) -> torch.Tensor:
        """Singular values of the dense W_i, shape (min(n, d),)."""
        return singular_values(weight, self.dtype, self.method)

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

"""Spectra: the singular values of the policy states and of their kept rows, the reward's costly part
(ours: a Gram-matrix back end, batched over layers, with ``svdvals`` as the fallback and the option).

``σ_i(A) = sqrt(λ_i(AᵀA))``: one symmetric eigenproblem of the smaller side instead of an SVD, the
Gram of the kept rows downdated from the dense one when fewer rows are removed than kept, and many
layers per ``eigvalsh`` call. The numbers are ``svdvals``' up to rounding; where the Gram's rounding
would matter (ill-conditioned matrices) ``svdvals`` is used (:func:`gram_singular_values` states the
rule). ``tests/test_spectra.py`` proves the KS statistics equal those of float64 ``svdvals``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

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


def check_spectra_args(dtype: torch.dtype, method: str) -> None:
    """Raises ValueError (one line) unless ``dtype`` is float32/float64 and ``method`` is known."""
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
    check_spectra_args(dtype, method)
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
    check_spectra_args(dtype, method)
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


def dense_singular_values(weight: torch.Tensor, dtype: torch.dtype = torch.float32,
                          method: str = SPECTRA_METHOD) -> tuple[torch.Tensor, FullGram | None]:
    """Singular values of a dense (n, d) state, as :func:`singular_values`, and on the Gram route
    (n >= d) its :class:`FullGram`: the ``WᵀW`` just formed for them, kept for the downdate rather than
    formed a second time (ours). ``(spectrum, None)`` for ``svdvals`` or a wide matrix.

    Raises:
        ValueError: as :func:`singular_values`.
    """
    check_spectra_args(dtype, method)
    if method == "svdvals" or weight.dim() != 2 or weight.shape[0] < weight.shape[1]:
        return singular_values(weight, dtype, method), None
    w = weight.to(dtype)
    g = w.mT @ w
    sv = _from_gram(g[None], None, lambda b: w)[0]
    return sv, FullGram(g, sv[0] ** 2)


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of 0..n-1 not in ``kept``, ascending."""
    mask = torch.ones(n, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()

"""Least-squares refit of the FFN output projection on the kept neurons (ours; the structured, closed-form
counterpart of the layer-wise reconstruction of SparseGPT, Frantar and Alistarh 2023, and ZipLM, Kurtic et al.
2023, on the self-generated calibration text of ``calibration.py``).

Slicing keeps the columns W[:, S] of the output projection W (d, n) and drops the rest. With the activations H (T, n)
of the calibration text and their Gram G = H^T H (``calibration.NeuronStats.gram``), the kept columns are replaced by
the W'_S (d, k) that reproduce the dense FFN output best on that text, held near the columns they replace:

    W'_S = argmin_X sum_t ||W h(t) - X h_S(t)||^2 + lambda ||X - W[:, S]||^2
         = W (G + lambda I)[:, S] (G[S, S] + lambda I)^-1,

with the ridge lambda = ``ridge`` x the mean of diag G[S, S]: SparseGPT's dampening of the Hessian G, which keeps the
solve well posed for dead or collinear neurons, limits the fit to the text, and leaves a neuron the text never
activates with its own column. The checkpoint keeps its shapes: only the values of the output projection's kept
columns change. W'_S = W[:, S] where G[R, S] = 0 (the removed neurons never co-fire with the kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prunenet.errors import ConfigurationError

#: The default ridge, as a fraction of the mean kept activation energy (SparseGPT's default dampening, 1%).
RIDGE = 0.01


def check_ridge(ridge: float) -> float:
    """``ridge`` as a float.

    Raises:
        ConfigurationError: not a finite number > 0.
    """
    try:
        value = float(ridge)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigurationError(f"refit ridge must be a finite number > 0 (a fraction of the mean activation "
                                 f"energy, default {RIDGE}), got {ridge!r}")
    return value


def _check_finite(gram: torch.Tensor) -> None:
    if not bool(torch.isfinite(gram).all()):
        raise ConfigurationError("the activation Gram holds NaN or Inf (activations overflowed on the calibration "
                                 "text: run the calibration pass in float32, --dtype float32)")


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float = RIDGE,
                  conv1d: bool = False) -> torch.Tensor:
    """The refit output weight of one layer, already sliced: W (G + lambda I)[:, S] (G[S, S] + lambda I)^-1 in
    float64 (the module docstring).

    Args:
        weight: the stored dense output weight, (d, n) for nn.Linear, (n, d) for Conv1D (``conv1d``).
        gram: (n, n), G = H^T H over the calibration tokens (any float dtype; used in float64).
        kept: LongTensor (k,), the kept neurons S.
        ridge: lambda as a fraction of mean(diag G[S, S]), > 0.
    Returns:
        float64 (d, k) for nn.Linear, (k, d) for Conv1D: the sliced weight's shape.
    Raises:
        ConfigurationError: a bad ``ridge``, a Gram of another size than the weight's n, kept indices outside
            [0, n), or a Gram with NaN or Inf.
    """
    ridge = check_ridge(ridge)
    w = weight.detach().double().cpu()
    w = w.t() if conv1d else w  # (d, n)
    g = gram.double().cpu()
    n = w.shape[1]
    if g.shape != (n, n):
        raise ConfigurationError(f"refit needs an ({n}, {n}) activation Gram, got {tuple(g.shape)}")
    s = kept.long().cpu()
    if s.numel() and (int(s.min()) < 0 or int(s.max()) >= n):
        raise ConfigurationError(f"refit: kept indices must lie in [0, {n}), got {int(s.min())}..{int(s.max())}")
    _check_finite(g)
    a = g[s][:, s]
    lam = ridge * (float(a.diagonal().mean()) or 1.0)  # all kept neurons dead: W'_S = W[:, S] for any ridge
    a = a + lam * torch.eye(len(s), dtype=torch.float64)
    # W'_S^T = A^-1 (G[S, :] W^T + lambda W[:, S]^T); A is symmetric positive definite (a Gram plus a positive ridge)
    chol = torch.linalg.cholesky(a)
    x = torch.cholesky_solve(g[s] @ w.t() + lam * w[:, s].t(), chol)  # (k, d)
    return x if conv1d else x.t().contiguous()


def refit_weights(inputs: Any, kept: Sequence[torch.Tensor], ridge: float = RIDGE) -> list[torch.Tensor]:
    """Per layer, :func:`refit_columns` from the stored output weight and the Gram of ``inputs``' calibration text.

    Args:
        inputs: the source's ``inputs.SelectionInputs`` with calibration settings (the activation statistics and
            their Gram are computed here if the selection did not need them: one forward pass of the dense model).
        kept: per layer the sorted LongTensor (k,) of kept rows.
        ridge: see :func:`refit_columns`.
    Returns:
        One tensor per layer, in the sliced output weight's shape, rounded once to the stored weight's dtype
        (what is written; one layer's float64 solve at a time).
    Raises:
        ConfigurationError: ``inputs`` without calibration settings, a bad ``ridge``, or see
            :func:`refit_columns`.
    """
    from prunenet.states import per_layer

    ridge = check_ridge(ridge)
    inputs.gram = True  # the statistics are computed again if they lack it
    pending = iter(zip(kept, [a.gram for a in inputs.activations]))  # per_layer reduces the layers in order

    def reduce(adapter: Any, weights: list[torch.Tensor]) -> torch.Tensor:
        rows, gram = next(pending)
        return refit_columns(weights[0], gram, rows, ridge, adapter.conv1d).to(weights[0].dtype)

    return per_layer(inputs.source, inputs.trust_remote_code, lambda a, layer: [a.output_module(layer)], reduce)


def obs_kept(gram: torch.Tensor, output_gram: torch.Tensor, k: int, protected: torch.Tensor | None = None,
             ridge: float = RIDGE) -> torch.Tensor:
    """The kept set of a structured OBS backward elimination (ours, after ZipLM, Kurtic et al. 2023, and Optimal
    Brain Surgeon): the neurons are removed one at a time, each time the one whose removal raises the refit
    output error least when the remaining columns are refit, so the selection sees what :func:`refit_columns`
    will do.

    With the dampened Gram H = G + lambda I (lambda = ``ridge`` x mean diag G), the refit X of the current set
    (initially W) and Hinv = (H restricted to the set)^-1, removing neuron j costs ||X[:, j]||^2 / Hinv_jj and
    moves X by -X[:, j] Hinv[j, :] / Hinv_jj; Hinv is downdated by rank one. Only X^T X is tracked (from
    W^T W), so the output weight itself is not needed. Cost: three passes over (n, n) float64 per removed
    neuron: 1.8 s a layer at n = 1536, r = 0.3 on one CPU thread; at n = 11008 (LLaMA-2-7B) about 1 GB a pass,
    minutes a layer on a GPU and hours a model on a CPU. The dampening is normalised by the whole layer's mean
    diag G (the kept set is not known yet); the refit written (:func:`refit_columns`) by the kept set's.

    Args:
        gram: (n, n), G = H^T H over the calibration tokens (``calibration.NeuronStats.gram``).
        output_gram: (n, n), W^T W of the output weight (``ArchAdapter.output_gram``).
        k: kept width, 1 <= k <= n.
        protected: rows never removed, LongTensor (m,), or None; more than k: the first k of them are kept (as
            ``recon`` does).
        ridge: the dampening, a fraction of the mean of diag G (> 0).
    Returns:
        Sorted LongTensor (k,) on the CPU.
    Raises:
        ConfigurationError: k outside [1, n], a bad ``ridge`` or a Gram with NaN or Inf.
    """
    g = gram.double().cpu()
    n = g.shape[0]
    if not 1 <= k <= n:
        raise ConfigurationError(f"obs: the kept width must lie in [1, {n}], got {k}")
    if protected is not None and protected.numel() >= k:
        return protected.long().cpu()[:k].sort().values
    _check_finite(g)
    lam = check_ridge(ridge) * (float(g.diagonal().mean()) or 1.0)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(g + lam * torch.eye(n, dtype=torch.float64)))
    q = output_gram.double().cpu().clone()  # X^T X of the current refit X
    removable = torch.ones(n, dtype=torch.bool)  # not protected and not removed yet
    if protected is not None:
        removable[protected.long().cpu()] = False
    kept = torch.ones(n, dtype=torch.bool)
    for _ in range(n - k):
        d = hinv.diagonal()
        j = int(torch.where(removable, q.diagonal() / d.clamp_min(torch.finfo(torch.float64).tiny),
                            torch.inf).argmin())
        h = hinv[j] / d[j]  # X' = X - x_j h^T, so Q' = Q - q_j h^T - h q_j^T + q_jj h h^T
        qj = q[:, j].clone()
        q.addr_(qj, h, alpha=-1.0).addr_(h, qj - qj[j] * h, alpha=-1.0)  # in place: one pass over (n, n) each
        hinv.addr_(hinv[:, j].clone(), h, alpha=-1.0)
        removable[j], kept[j] = False, False
        q[j], q[:, j], hinv[j], hinv[:, j] = 0.0, 0.0, 0.0, 0.0  # exactly out, not rounding-small
    return kept.nonzero().squeeze(1)

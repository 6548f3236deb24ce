"""Per-neuron features from the activation statistics on calibration text: what ``policy.FeaturePolicy`` reads
instead of the weights (ours, issue 28), and the greedy output-reconstruction order the ``recon`` selection
keeps the head of.

Each feature is a column of an (n, F) matrix, z-scored over the layer's n neurons, so one policy serves
every layer and model whatever the scale of its weights and activations. With h_j neuron j's activation
over the T calibration tokens, w_j its FFN output column and M = G o (W^T W) (``calibration.reconstruction_matrix``):

    act_rms     log ||h_j||_2 / sqrt(T)            act_std   log std(h_j)
    out_l1      log ||w_j||_1                      out_l2    log ||w_j||_2
    peak        log max |w_j|                      wanda_sp  log ||h_j||_2 ||w_j||_1   (An et al. 2024)
    flap        log Var(h_j) ||w_j||_2^2 (FLAP)    alignment (M 1)_j / sqrt(M_jj 1^T M 1)
    recon_rank  1 - (position of j in :func:`greedy_order`) / n

``alignment`` is the cosine, over tokens, between what neuron j writes and the layer's whole FFN output;
``recon_rank`` is set-level (a neuron that another already covers comes late). Both see redundancy, which
the per-neuron scores cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: The feature names, in column order.
FEATURES = ("act_rms", "act_std", "out_l1", "out_l2", "peak", "wanda_sp", "flap", "alignment", "recon_rank")


def greedy_order(m: torch.Tensor, steps: int | None = None, first: Sequence[int] = ()) -> torch.Tensor:
    """The neurons in the order a greedy forward selection adds them to the kept set S, each step the one
    that lowers the output error 1_R^T M 1_R (R: the rest) most: gain_j = 2 (M 1)_j - M_jj - 2 sum_{s in S} M_js
    (ours; ``selectors.ReconstructionSelector`` keeps the first k).

    Args:
        m: M, (n, n) float64 (``calibration.reconstruction_matrix``).
        steps: how many to order (default n).
        first: rows placed first, in this order (protected rows), then the greedy ones.
    Returns:
        LongTensor (steps,) of distinct row indices.
    """
    n = m.shape[0]
    steps = n if steps is None else steps
    whole = m.sum(dim=1)                                     # (M 1)_j
    added = torch.zeros(n, dtype=m.dtype, device=m.device)   # sum_{s in S} M_js
    kept = torch.zeros(n, dtype=torch.bool, device=m.device)
    base = 2 * whole - m.diagonal()
    order = []
    forced = [int(j) for j in first]
    for step in range(steps):
        j = forced[step] if step < len(forced) else int(torch.where(kept, -torch.inf, base - 2 * added).argmax())
        kept[j] = True
        added += m[j]  # M is symmetric: the row, contiguous
        order.append(j)
    return torch.tensor(order, dtype=torch.long)


def _log(x: torch.Tensor) -> torch.Tensor:
    return x.double().clamp_min(torch.finfo(torch.float64).tiny).log()


def neuron_features(stats, output_norms: torch.Tensor, peaks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The :data:`FEATURES` of one layer's n neurons, each column z-scored over the neurons.

    Args:
        stats: the layer's ``calibration.NeuronStats`` (count T; moments (n,)).
        output_norms: (2, n): L1 and L2 norms of the output columns (``ArchAdapter.output_norms``).
        peaks: (n,) max |w| of the output columns.
        m: (n, n) M = G o (W^T W).
    Returns:
        (n, len(FEATURES)) float32, each column z-scored and clipped to [-5, 5]; a constant column (e.g. n = 1)
        is all zeros.
    """
    n = m.shape[0]
    diag = m.diagonal().clamp_min(0.0)
    alignment = m.sum(dim=1) / (diag * m.sum().clamp_min(0.0)).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    rank = torch.empty(n, dtype=torch.float64)
    rank[greedy_order(m)] = torch.arange(n, dtype=torch.float64)
    columns = [_log(stats.norm) - 0.5 * torch.log(torch.tensor(float(stats.count))), 0.5 * _log(stats.variance),
               _log(output_norms[0]), _log(output_norms[1]), _log(peaks),
               _log(stats.norm) + _log(output_norms[0]), _log(stats.variance) + 2 * _log(output_norms[1]),
               alignment.cpu(), 1.0 - rank / n]
    x = torch.stack([c.double().cpu() for c in columns], dim=1)
    std = x.std(dim=0, unbiased=False)
    # clipped at 5 standard deviations: a dead neuron's log(0) floor (-708) would otherwise squeeze every other
    # neuron of its column into a narrow band
    return ((x - x.mean(dim=0)) / torch.where(std > 0, std, 1.0)).clamp(-5.0, 5.0).float()

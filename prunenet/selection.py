"""Selection primitives: the kept width, protected rows, seeded sampling (in training and in the final
draw), and the closed-form rankings the selectors of ``selectors.py`` use.

Source: PruneNet Section 3 (action: k = floor((1 - r) n) rows drawn without replacement from the
keep probabilities); protected rows, ``peak`` and the uniform draw are ours.
"""

from __future__ import annotations

import math
import torch

from prunenet.checks import check_float
from prunenet.errors import ConfigurationError, InvalidProbabilitiesError

def validate_ratio(compression_ratio: float) -> float:
    """Check ``0 <= r < 1`` (the fraction of FFN intermediate neurons removed per layer).

    Raises:
        ConfigurationError: naming the bad value.
    """
    return check_float(compression_ratio, "compression_ratio", 0.0, 1.0, high_open=True)


def kept_width(intermediate_size: int, compression_ratio: float, round_to: int = 1) -> int:
    """Number of kept FFN neurons ``k = floor((1 - r) n)`` (paper; authors' code), optionally
    rounded down to a multiple of ``round_to`` (8, 64, 128: GEMM / tensor-parallel friendly).

    A 1e-9 slack absorbs float error, so (1 - 0.9) * 10 gives 1, not 0.

    Raises:
        ConfigurationError: if r is outside [0, 1), ``round_to`` < 1, or no row would be kept.
    """
    r = validate_ratio(compression_ratio)
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigurationError(f"round_to must be an integer >= 1, got {round_to!r}")
    exact = int(math.floor((1.0 - r) * intermediate_size + 1e-9))
    k = (exact // round_to) * round_to
    if k < 1:
        hint = f" after rounding {exact} down to a multiple of {round_to}" if round_to > 1 else ""
        raise ConfigurationError(
            f"compression_ratio {compression_ratio} keeps no row{hint} of an FFN of intermediate size "
            f"{intermediate_size}; use a smaller ratio" + (" or round_to" if round_to > 1 else ""))
    return k


def protected_rows(peaks: torch.Tensor, fraction: float) -> torch.Tensor:
    """The outlier neurons a selection always keeps (ours, not in the paper): the
    ``round(fraction * n)`` neurons whose FFN output column has the largest max-|w|.

    Why: on SmolLM2 a few such neurons decide whether the pruned model works (dropping them turns
    perplexity ~500 into ~50,000), and no spectral reward sees them (benchmarks/results/).

    Args:
        peaks: max |w| of each neuron's output column, shape (n,) (``ArchAdapter.output_peaks``).
        fraction: share of the layer's neurons to protect, 0 <= fraction < 1 (0: none, the paper).
    Returns:
        Sorted LongTensor of shape (round(fraction * n),).
    Raises:
        ConfigurationError: fraction outside [0, 1).
    """
    check_protect_fraction(fraction)
    return peak_kept(peaks, int(round(float(fraction) * peaks.numel())))


def peak_kept(peaks: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` neurons whose FFN output column has the largest max-|w| (ours): the ``peak`` selection,
    and the rows :func:`protected_rows` keeps. It drops the neurons with the smallest peaks, so it is
    the selection with the lowest ``peak_dropped`` score (``benchmarks/reward_correlation.py``), the
    one data-free score that correlated with perplexity in the right direction.

    Args:
        peaks: max |w| of each neuron's output column, shape (n,) (``ArchAdapter.output_peaks``).
        k: kept width, 0 <= k <= n.
    Returns:
        Sorted LongTensor of shape (k,). Equal peaks are common (bf16 weights); which of them is kept
        is ``torch.topk``'s choice, fixed for a given torch build, and the rows every measured result
        in ``benchmarks/results/`` used (a stable sort would keep other, equally peaked rows).
    """
    return torch.topk(peaks.float(), k).indices.sort().values


def check_protect_fraction(fraction: float) -> float:
    """Return ``fraction`` if it is a number in [0, 1) (``protect_outliers``).

    Raises:
        ConfigurationError: naming the bad value.
    """
    return check_float(fraction, "protect_outliers", 0.0, 1.0, high_open=True)


def free_probabilities(probs: torch.Tensor, protected: torch.Tensor | None) -> torch.Tensor:
    """``probs`` with the protected rows' entries set to zero (they are kept without a draw);
    differentiable, shape (n,)."""
    if protected is None or protected.numel() == 0:
        return probs
    mask = torch.ones_like(probs)
    mask[protected.to(probs.device)] = 0.0
    return probs * mask


def sample_rows(probs: torch.Tensor, k: int, generator: torch.Generator | None = None,
                layer: int | str = "?", ordered: bool = False) -> torch.Tensor:
    """Draw ``k`` distinct rows with probability proportional to ``probs`` (no replacement).

    torch's CPU ``multinomial`` without replacement silently returns zero-probability
    rows when fewer than k entries are positive, so that case is refused here.

    Args:
        probs: keep probabilities, shape (n,).
        k: rows to keep, 1 <= k <= n.
        generator: seeded generator for reproducibility.
        layer: layer index, only used in error messages.
        ordered: return the rows in draw order (for the exact likelihood of the draw) instead of sorted.
    Returns:
        LongTensor of shape (k,), sorted (or in draw order).
    Raises:
        InvalidProbabilitiesError: NaN/Inf entries, or fewer than k positive entries (names the layer).
    """
    if not torch.isfinite(probs).all():
        raise InvalidProbabilitiesError(f"layer {layer}: keep probabilities contain NaN or Inf")
    positive = int((probs > 0).sum())
    if positive < k:
        raise InvalidProbabilitiesError(
            f"layer {layer}: only {positive} keep probabilities are positive, cannot sample k={k} rows")
    rows = torch.multinomial(probs.float(), k, replacement=False, generator=generator)
    return rows if ordered else rows.sort().values


def layer_generator(seed: int, episode: int, layer: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, episode, layer): the randomness of each layer of each
    episode is fixed by these three numbers alone, so runs resume and shard reproducibly."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(episode) * 10_007 + int(layer)) % (2**63 - 1))
    return g


#: Episode number used for the final selection's generators (distinct from training episodes).
FINAL_EPISODE = 1_000_000
#: Episode number of the uniformly random draws a learner may compare with (distinct from the above).
RANDOM_REFERENCE_EPISODE = 1_000_001


def uniform_kept(n: int, k: int, generator: torch.Generator, protected: torch.Tensor | None = None) -> torch.Tensor:
    """The protected rows plus uniformly random others, ``k`` in all: sorted LongTensor (k,). With no
    protected rows, the first k of a seeded permutation of range(n)."""
    position = torch.randperm(n, generator=generator, device=generator.device).argsort()
    score = -position.float()
    if protected is not None:
        score[protected.to(score.device)] = float("inf")
    return torch.topk(score, k).indices.sort().values


def draw_kept(probs: torch.Tensor, k: int, protected: torch.Tensor | None = None,
              generator: torch.Generator | None = None, layer: int | str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """The protected rows plus ``k - len(protected)`` rows drawn from ``probs`` among the others.

    Returns:
        ``(kept, drawn)``: kept, sorted LongTensor (k,); drawn, the drawn rows in draw order
        (k - len(protected),), what a learner's likelihood is about.
    Raises:
        InvalidProbabilitiesError: see ``sample_rows``.
    """
    fixed = protected if protected is not None else torch.zeros(0, dtype=torch.long, device=probs.device)
    drawn = sample_rows(free_probabilities(probs, fixed), k - fixed.numel(), generator=generator, layer=layer,
                        ordered=True)
    return torch.cat([fixed.to(drawn.device), drawn]).sort().values, drawn

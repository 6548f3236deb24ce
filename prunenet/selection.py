"""Selection: which FFN rows (intermediate neurons) each layer keeps: the kept width, seeded sampling
during training, and the final selection by the trained policy or a baseline (random, magnitude).

Source: PruneNet Section 3 (action: k = floor((1 - r) n) rows drawn without replacement from the
keep probabilities); ``topk``, ``random`` and ``magnitude`` are ours (baselines and a deterministic mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prunenet.errors import ConfigurationError, InvalidProbabilitiesError
from prunenet.policy import RowPolicy

SELECTION_MODES = ("sample", "topk")

#: How kept rows are chosen: the trained policy, or the baselines it is compared with.
METHODS = ("prunenet", "random", "magnitude")


def validate_ratio(compression_ratio: float) -> float:
    """Check ``0 <= r < 1`` (the fraction of FFN intermediate neurons removed per layer).

    Raises:
        ConfigurationError: naming the bad value.
    """
    try:
        r = float(compression_ratio)
    except (TypeError, ValueError):
        raise ConfigurationError(f"compression_ratio must be a number in [0, 1), got {compression_ratio!r}") from None
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise ConfigurationError(f"compression_ratio must be in [0, 1), got {compression_ratio!r}")
    return r


def validate_selection(selection: str, name: str = "selection") -> str:
    """Return ``selection`` if it is a final selection mode (``sample`` or ``topk``).

    Raises:
        ConfigurationError: anything else, named by ``name`` (the option the user set).
    """
    if selection not in SELECTION_MODES:
        raise ConfigurationError(f"{name} must be one of {SELECTION_MODES}, got {selection!r}")
    return selection


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


@torch.no_grad()
def select_kept_rows(policy: RowPolicy, states: Sequence[torch.Tensor], k: int,
                     selection: str = "sample", seed: int = 0) -> list[torch.Tensor]:
    """Pick the kept rows of every layer with a trained policy.

    Args:
        policy: trained SparsityPredictor of shape (n, d).
        states: per-layer FFN input matrices, each (n, d).
        k: kept width.
        selection: ``"sample"`` (paper: multinomial over the relaxed-Bernoulli keep
            probabilities, seeded) or ``"topk"`` (the k largest alpha).
        seed: seed of the ``sample`` draw.
    Returns:
        List of sorted LongTensors of shape (k,), one per layer.
    Raises:
        ConfigurationError: unknown selection mode.
    """
    validate_selection(selection)
    kept = []
    for i, w in enumerate(states):
        device = next(policy.parameters()).device
        w = w.to(device)
        if selection == "topk":
            kept.append(torch.topk(policy.logits(w), k).indices.sort().values.cpu())
        else:
            gen = layer_generator(seed, FINAL_EPISODE, i, device)  # one stream for eps and the draw, as in training
            p, _ = policy(w, generator=gen)
            kept.append(sample_rows(p, k, generator=gen, layer=i).cpu())
    return kept


def select_rows(method: str, *, k: int, states: Sequence[torch.Tensor], policy: RowPolicy | None = None,
                selection: str = "sample", seed: int = 0,
                row_norms: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Kept rows per layer for any method, so comparisons differ only in which rows are kept.

    Args:
        method: ``prunenet`` (``policy`` + ``selection``), ``random`` (uniform, seeded by
            (seed, layer)) or ``magnitude`` (the k largest ``row_norms[i]``, shape (n,)).
    Returns:
        One sorted LongTensor of shape (k,) per layer.
    Raises:
        ConfigurationError: unknown method or a missing input it needs.
    """
    if method == "prunenet":
        if policy is None:
            raise ConfigurationError("method 'prunenet' needs a policy")
        return select_kept_rows(policy, states, k, selection, seed)
    if method == "random":
        return [torch.randperm(w.shape[0], generator=layer_generator(seed, FINAL_EPISODE, i))[:k].sort().values
                for i, w in enumerate(states)]
    if method == "magnitude":
        if row_norms is None:
            raise ConfigurationError("method 'magnitude' needs the row norms of the FFN input matrices")
        return [torch.topk(norms.float(), k).indices.sort().values for norms in row_norms]
    raise ConfigurationError(f"method must be one of {METHODS}, got {method!r}")

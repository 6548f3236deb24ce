"""Selectors: the one plug point of the final selection, "given a layer's inputs and k, return the kept
rows", and its one vocabulary (:data:`SELECTIONS`): the trained policy (``sample``, ``topk``), a closed-form
rule (``peak``), a baseline (``random``, ``magnitude``) or a calibration-based selection on activation statistics
(``wanda_sp``, ``flap``, ``recon``, ``obs``; self-generated text by default, ``calibration.py``). Used by the one
pruning pipeline (``pipeline.py``) for fit, compress and the benchmarks.

Source: PruneNet Section 3 for ``sample`` (the policy's seeded draw); the protocol and the other
selectors are ours (the baselines and data-free rules the policy is measured against).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prunenet.errors import ConfigurationError
from prunenet.policy import RowPolicy
from prunenet.selection import FINAL_EPISODE, draw_kept, layer_generator, peak_kept, uniform_kept


@dataclass
class LayerInputs:
    """What a selector may look at for one decoder layer (ours). Fields a selector does not name in
    :attr:`Selector.needs` may be None.

    Attributes:
        index: the layer index i.
        size: n, the FFN intermediate size (rows of the state).
        state: the FFN input matrix W_i, (n, d), the policy's input.
        peaks: max |w| of each neuron's FFN output column, (n,) float32 (``ArchAdapter.output_peaks``).
        row_norms: L2 norm of each neuron's input weights, (n,) float32 (``ArchAdapter.row_norms``).
        output_norms: L1 (row 0) and L2 (row 1) norms of each neuron's output column, (2, n) float32
            (``ArchAdapter.output_norms``).
        activations: moments of each neuron's activation on the calibration text
            (``calibration.NeuronStats``, (n,) float64 each; with ``gram`` (n, n) when ``output_gram`` is needed).
        output_gram: W_out^T W_out, (n, n) float32 (``ArchAdapter.output_gram``).
        features: the neurons' activation features (``features.neuron_features``), (n, F) float32.
    """

    index: int
    size: int
    state: torch.Tensor | None = None
    peaks: torch.Tensor | None = None
    row_norms: torch.Tensor | None = None
    output_norms: torch.Tensor | None = None
    activations: Any = None
    output_gram: torch.Tensor | None = None
    features: torch.Tensor | None = None


class Selector:
    """The plug point of the final selection (ours): given one layer's inputs and the kept width k,
    return the kept rows. One subclass per method, registered by its :attr:`name` in :data:`SELECTIONS`,
    the one vocabulary of selections (fit configs, ``compress --selection``, plans, benchmarks).

    Protected rows (``protect_outliers``) are an option of every selector: they are kept, and the
    selector chooses the other ``k - len(protected)``.

    Subclasses set ``name``, ``needs`` (the :class:`LayerInputs` fields they read: ``state``,
    ``peaks``, ``row_norms``, ``output_norms``, ``activations``), ``uses_policy`` and implement :meth:`select`.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    uses_policy: ClassVar[bool] = False
    seed: int = 0

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)  # a draw's seed, or the self-generated text's sampling seed (recorded)

    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        """The kept rows of one layer.

        Args:
            layer: the layer's inputs (the fields in :attr:`needs` are set).
            k: kept width, 1 <= k <= n.
            protected: rows that must be kept, sorted LongTensor (m,), m <= k, or None.
        Returns:
            Sorted LongTensor of shape (k,) on the CPU.
        """
        raise NotImplementedError


def _scored(score: torch.Tensor, k: int, protected: torch.Tensor | None) -> torch.Tensor:
    """The protected rows plus the highest-``score`` others, ``k`` in all: sorted LongTensor (k,)."""
    score = score.float().clone()
    if protected is not None and protected.numel():
        score[protected.to(score.device)] = float("inf")
    return torch.topk(score, k).indices.sort().values.cpu()


class PolicySelector(Selector):
    """A selection by a trained policy: reads each layer's state and holds the policy.

    Args:
        policy: the trained policy, shape (n, d).
        seed: the run's seed.
    """

    needs = frozenset({"state"})
    uses_policy = True

    def __init__(self, policy: RowPolicy, seed: int = 0) -> None:
        self.policy, self.seed = policy, int(seed)
        self.needs = frozenset({policy.input})  # the states, or the activation features (a FeaturePolicy)

    def policy_input(self, layer: LayerInputs) -> torch.Tensor:
        """What the policy scores: ``layer.state`` or ``layer.features``, on the policy's device."""
        return getattr(layer, self.policy.input).to(next(self.policy.parameters()).device)


class SampleSelector(PolicySelector):
    """The trained policy's seeded draw (paper, Section 3): k rows drawn without replacement from the
    relaxed-Bernoulli keep probabilities, the generator seeded by (seed, ``FINAL_EPISODE``, layer)."""

    name = "sample"

    @torch.no_grad()
    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        device = next(self.policy.parameters()).device
        gen = layer_generator(self.seed, FINAL_EPISODE, layer.index, device)  # one stream for eps and the draw
        p, _ = self.policy(self.policy_input(layer), generator=gen)
        fixed = protected.to(device) if protected is not None else None
        return draw_kept(p, k, fixed, generator=gen, layer=layer.index)[0].cpu()


class TopKSelector(PolicySelector):
    """The k rows with the largest policy logits (ours: the policy's deterministic choice; the seed is
    recorded only)."""

    name = "topk"

    @torch.no_grad()
    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        return _scored(self.policy.logits(self.policy_input(layer)), k, protected)


class RandomSelector(Selector):
    """Uniformly random rows (ours: the baseline every method must beat), seeded by (seed, layer): the
    first k of a seeded permutation of range(n), protected rows first."""

    name = "random"


    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        return uniform_kept(layer.size, k, layer_generator(self.seed, FINAL_EPISODE, layer.index), protected)


class MagnitudeSelector(Selector):
    """The k neurons with the largest input-weight L2 norm (gated FFNs: gate and up rows together;
    ours, the usual magnitude baseline). Deterministic."""

    name = "magnitude"
    needs = frozenset({"row_norms"})

    def __init__(self, seed: int = 0) -> None:
        self.seed = 0  # draws nothing: recorded as 0 whatever is asked

    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        return _scored(layer.row_norms, k, protected)


class PeakSelector(Selector):
    """The k neurons whose FFN output column has the largest max-|w| (ours, :func:`peak_kept`).
    Deterministic. The protected rows are the top of the same ranking, so they are among these."""

    name = "peak"
    needs = frozenset({"peaks"})

    def __init__(self, seed: int = 0) -> None:
        self.seed = 0

    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        kept = peak_kept(layer.peaks, k)
        if protected is not None and not bool(torch.isin(protected.cpu(), kept).all()):
            return _scored(layer.peaks, k, protected)  # protected rows ranked by other peaks: keep them anyway
        return kept


class WandaSPSelector(Selector):
    """Wanda-sp (An et al., AAAI 2024, FLAP's structured Wanda baseline; after Sun et al. 2023's Wanda): the
    k neurons with the largest ||h_j||_2 x ||W_out[:, j]||_1, the activation norm over the calibration tokens
    times the output column's L1 norm (the mean over output rows of |W_ij| ||X_j||, as its reference code
    scores a column). Statistics from one pass of the dense model (the reference propagates through the
    layers already pruned). Deterministic given the calibration text."""

    name = "wanda_sp"
    needs = frozenset({"activations", "output_norms"})


    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        return _scored(layer.activations.norm.float() * layer.output_norms[0], k, protected)


class FlapSelector(Selector):
    """FLAP's fluctuation metric (An et al., AAAI 2024, "WIFV"): the k neurons with the largest
    Var(h_j) x ||W_out[:, j]||_2^2, the activation's variance over the calibration tokens times the squared
    output column norm, with the same k in every layer (FLAP's uniform "UL-UM" structure; its adaptive
    per-layer widths and bias compensation are not applied: the export keeps one intermediate size and
    no added bias). Deterministic given the calibration text."""

    name = "flap"
    needs = frozenset({"activations", "output_norms"})


    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        return _scored(layer.activations.variance.float() * layer.output_norms[1] ** 2, k, protected)


class ReconstructionSelector(Selector):
    """The kept set whose FFN output on the calibration text is closest to the dense layer's (ours).

    With M = G o (W^T W) (G = H^T H the activations' Gram, W the output weight), dropping the set R costs
    E(R) = sum over tokens ||sum_{j in R} h_j w_j||^2 = 1_R^T M 1_R. The kept set S is built greedily
    forwards: add, one at a time, the neuron that lowers E most, 2 (M 1)_j - M_jj - 2 sum_{s in S} M_js
    (protected rows first). A set-level score: two neurons that cancel each other have a small (M 1)_j and
    are dropped together, which per-neuron scores (wanda_sp, flap) cannot see. Deterministic given the
    calibration text."""

    name = "recon"
    needs = frozenset({"activations", "output_gram"})


    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        from prunenet.calibration import reconstruction_matrix
        from prunenet.features import greedy_order

        m = reconstruction_matrix(layer.activations.gram, layer.output_gram)
        first = [] if protected is None else protected.tolist()
        return greedy_order(m, k, first).sort().values


class ObsSelector(Selector):
    """Structured OBS (ours, after ZipLM, Kurtic et al. 2023): backward elimination of the neuron whose removal
    raises the FFN output error on the calibration text least when the kept output columns are refit by least
    squares (``refit.obs_kept``): the selection for ``--refit``. Deterministic given the calibration text."""

    name = "obs"
    needs = frozenset({"activations", "output_gram"})

    def select(self, layer: LayerInputs, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
        from prunenet.refit import obs_kept

        return obs_kept(layer.activations.gram, layer.output_gram, k, protected)


#: Every selection by name: the one vocabulary (``slicing.selection`` of a fit, ``compress --selection``,
#: the plan's ``selection``, the benchmarks).
SELECTIONS: dict[str, type[Selector]] = {cls.name: cls for cls in (
    SampleSelector, TopKSelector, RandomSelector, MagnitudeSelector, PeakSelector, WandaSPSelector, FlapSelector,
    ReconstructionSelector, ObsSelector)}
#: The selections that read activation statistics on calibration text (``calibration.py``).
CALIBRATED_SELECTIONS = tuple(name for name, cls in SELECTIONS.items() if "activations" in cls.needs)
#: The selections that need a trained policy (what a fit's ``slicing.selection`` may be).
POLICY_SELECTIONS = tuple(name for name, cls in SELECTIONS.items() if cls.uses_policy)


def validate_selection(selection: str, name: str = "selection", allowed: Sequence[str] | None = None) -> str:
    """Return ``selection`` if it is one of ``allowed`` (default: every name in :data:`SELECTIONS`).

    Raises:
        ConfigurationError: anything else, named by ``name`` (the option the user set).
    """
    allowed = tuple(allowed or SELECTIONS)
    if selection not in allowed:
        raise ConfigurationError(f"{name} must be one of {', '.join(allowed)}, got {selection!r}")
    return selection


def build_selector(selection: str, *, policy: RowPolicy | None = None, seed: int = 0,
                   name: str = "selection") -> Selector:
    """The selector of registry name ``selection``.

    Raises:
        ConfigurationError: an unknown name, or a policy selection without a policy.
    """
    cls = SELECTIONS[validate_selection(selection, name)]
    if cls.uses_policy:
        if policy is None:
            raise ConfigurationError(f"{name} {selection!r} needs a trained policy")
        return cls(policy, seed)
    return cls(seed)


def select_layers(selector: Selector, layers: Iterable[LayerInputs], k: int,
                  protected: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Kept rows of every layer by ``selector``: one sorted LongTensor (k,) per layer, on the CPU.

    Args:
        layers: each layer's inputs, in layer order.
        k: kept width.
        protected: per layer, rows always kept (``protected_rows``), or None.
    """
    if selector.uses_policy:
        selector.policy.eval()
    return [selector.select(layer, k, None if protected is None else protected[layer.index]) for layer in layers]

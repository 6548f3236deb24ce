"""Rewards: singular values, the two-sample KS statistic, the paper's reward and discount, and the
reward plug point (``--model.reward``).

Source: PruneNet paper, Section 3 (reward r_i = 1 / KS(sv(W_i), sv(W_i[kept])),
discounted by gamma^i over the layer index i).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prunenet import reference_cache
from prunenet.errors import ConfigurationError
from prunenet.spectra import (SPECTRA_METHOD, SPECTRA_METHODS, FullGram, dense_singular_values, full_gram,
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


class Reward:
    """The plug point ``--model.reward`` (ours): scores one layer's kept rows.

    Protocol: ``name`` (short name), :meth:`hparams` (init arguments), :meth:`prepare` (per layer, what
    scoring needs besides the kept rows, computed once per layer: the reward owns its precomputation and
    its caches), :meth:`rewards` (many layers at once: ``(KS statistic or another diagnostic, reward)``
    per layer), :meth:`release` (drop what only the episodes use, move the rest to the CPU).
    """

    name = ""

    def hparams(self) -> dict:
        """The reward's init arguments (what ``plugins.describe`` records)."""
        return {}

    def setup(self, source: str, dtype: str = "auto", trust_remote_code: bool = False) -> None:
        """Before the first episode: the source model (asset, folder or hub id), for a reward that reads more
        than the states (:class:`ReconstructionReward`). Default: nothing."""

    def prepare(self, layers: Sequence[int], weights: Sequence[torch.Tensor], fingerprint: str,
                keep: bool = True) -> list[Any]:
        """Per layer of ``layers`` (states ``weights``, each (n, d)), what :meth:`rewards` needs.

        Args:
            fingerprint: the source model's FFN fingerprint (a key for on-disk caches).
            keep: hold per-layer data across episodes (False when the states are streamed one layer at a time).
        """
        return [None] * len(layers)

    def rewards(self, weights: Sequence[torch.Tensor], kept: Sequence[torch.Tensor],
                prepared: Sequence[Any]) -> list[tuple[torch.Tensor, float]]:
        """Per layer ``(diagnostic, reward)`` of keeping rows ``kept[i]`` (k,) of ``weights[i]`` (n, d)."""
        raise NotImplementedError

    def release(self) -> None:
        """After training: drop what only the episodes use; keep the rest on the CPU."""


class KSGateReward(Reward):
    """The paper's reward on the policy state (the first FFN input matrix, "gate"):
    ``r_i = 1 / KS(sv(W_i), sv(W_i[kept]))``. Source: PruneNet Section 3.

    :meth:`prepare` gives each layer its reference spectrum (the dense W_i's singular values, computed
    once per model and then read from the on-disk ``reference_cache``) and, with the states in memory,
    the full Gram of W_i for the downdate (ours; ``spectra.py``).

    Args:
        spectra_dtype: ``float32`` or ``float64`` for the singular values.
        spectra_method: how they are computed, one of :data:`SPECTRA_METHODS` (ours; default
            :data:`SPECTRA_METHOD`, the Gram route, same numbers as ``svdvals`` up to rounding).
    Raises:
        ConfigurationError: bad ``spectra_dtype`` or ``spectra_method``.
    """

    name = "ks_gate"

    def __init__(self, spectra_dtype: str = "float32", spectra_method: str = SPECTRA_METHOD) -> None:
        if spectra_dtype not in _SPECTRA_DTYPES:
            raise ConfigurationError(f"model.reward.init_args.spectra_dtype must be one of "
                                     f"{', '.join(_SPECTRA_DTYPES)}, got {spectra_dtype!r}")
        if spectra_method not in SPECTRA_METHODS:
            raise ConfigurationError(f"model.reward.init_args.spectra_method must be one of "
                                     f"{', '.join(SPECTRA_METHODS)}, got {spectra_method!r}")
        self.spectra_dtype, self.method = spectra_dtype, spectra_method
        self.dtype = _SPECTRA_DTYPES[spectra_dtype]
        #: Per layer, the dense reference spectrum (min(n, d),), once prepared.
        self.references: dict[int, torch.Tensor] = {}
        self._context: dict[int, FullGram | None] = {}

    def hparams(self) -> dict:
        return {"spectra_dtype": self.spectra_dtype, "spectra_method": self.method}

    @property
    def cache_key(self) -> str:
        """Names what the reference spectra depend on besides the weights (an on-disk cache key part)."""
        return f"{self.name}-{self.method}-{self.spectra_dtype}"

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

    def prepare(self, layers: Sequence[int], weights: Sequence[torch.Tensor], fingerprint: str,
                keep: bool = True) -> list[tuple[torch.Tensor, FullGram | None]]:
        """Per layer ``(reference spectrum, context)``; the context (a d x d Gram per layer) is held across
        episodes only with ``keep`` (streamed, it would be d² per layer for all layers)."""
        out = []
        for i, w in zip(layers, weights):
            context = self._context.get(i)
            if i not in self.references:
                cached = reference_cache.load(fingerprint, self.cache_key, i, n=min(w.shape[-2:]))
                if cached is None:
                    cached, context = self.reference_and_context(w)
                    reference_cache.save(fingerprint, self.cache_key, i, cached)
                self.references[i] = cached.to(w.device)
            if context is None and keep:
                context = self.context(w, self.references[i])
            if keep:
                self._context[i] = context
            out.append((self.references[i], context))
        return out

    def rewards(self, weights: Sequence[torch.Tensor], kept: Sequence[torch.Tensor],
                prepared: Sequence[tuple[torch.Tensor, FullGram | None]]) -> list[tuple[torch.Tensor, float]]:
        """Per layer ``(KS statistic, reward)``, the spectra of all layers computed together
        (:func:`kept_singular_values`); ``prepared`` from :meth:`prepare`."""
        spectra = kept_singular_values(weights, kept, self.dtype, self.method, [c for _, c in prepared])
        out = []
        for (reference, _), sv in zip(prepared, spectra):
            ks = ks_statistic(reference, sv)
            out.append((ks, spectral_reward(ks)))
        return out

    def __call__(self, weight: torch.Tensor, kept: torch.Tensor, reference: torch.Tensor,
                 context: FullGram | None = None) -> tuple[torch.Tensor, float]:
        """``(KS statistic, reward)`` of keeping rows ``kept`` (shape (k,)) of ``weight`` (n, d)."""
        return self.rewards([weight], [kept], [(reference, context)])[0]

    def release(self) -> None:
        self.references = {i: sv.cpu() for i, sv in self.references.items()}
        self._context = {}


_SPECTRA_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ReconstructionReward(Reward):
    """How well the kept neurons reproduce the layer's FFN output on calibration text (ours, issue 28; after
    Williams et al. 2025 for the text, which is the model's own by default, so no data is needed).

    With G = H^T H the Gram of the FFN activations over the text and W the FFN output weight, dropping the
    set R leaves the output error E(R) = sum over tokens ||sum_{j in R} h_j w_j||^2 = 1_R^T M 1_R, M =
    G o (W^T W) (``selectors.ReconstructionSelector`` minimises the same). The diagnostic is the relative
    error E(R) / 1^T M 1 (the output's energy) and the reward ``-log`` of it: a set-level score that sees
    neurons that write the same direction, and one that predicts what the layer computes, unlike the
    spectra of its weights.

    Args:
        source, samples, length, temperature, top_p, seed, batch: the calibration text
            (``calibration.CalibrationSettings``; ``self``: the model's own samples from BOS).
    Raises:
        ConfigurationError: a bad calibration setting; :meth:`prepare` before :meth:`setup`.
    """

    name = "reconstruction"

    def __init__(self, source: str = "self", samples: int = 64, length: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, batch: int = 64) -> None:
        from prunenet.calibration import CalibrationSettings

        self.settings = CalibrationSettings(source, samples, length, temperature, top_p, seed, batch)
        self.inputs: Any = None
        self.matrices: dict[int, torch.Tensor] = {}

    def hparams(self) -> dict:
        from dataclasses import asdict

        return asdict(self.settings)  # the init arguments are the settings' fields

    def setup(self, source: str, dtype: str = "auto", trust_remote_code: bool = False) -> None:
        from prunenet.inputs import SelectionInputs

        self.inputs = SelectionInputs(source, dtype, trust_remote_code, calibration=self.settings)
        self.inputs.gram = True

    def prepare(self, layers: Sequence[int], weights: Sequence[torch.Tensor], fingerprint: str,
                keep: bool = True) -> list[torch.Tensor]:
        """Per layer M = G o (W^T W), (n, n) float32 on the states' device (the text generated and run once)."""
        from prunenet.calibration import reconstruction_matrix

        if self.inputs is None:
            raise ConfigurationError("the reconstruction reward needs its source model first (Reward.setup)")
        if weights and not self.matrices:  # the text and pass where the states are: the fit's device, where a
            self.inputs.device = weights[0].device  # feature policy's statistics were computed (one text, one pass)
        out = []
        for i, w in zip(layers, weights):
            m = self.matrices.get(i)
            if m is None:
                m = reconstruction_matrix(self.inputs.activations[i].gram, self.inputs.output_grams[i])
                m = m.float().to(w.device)
                if keep:
                    self.matrices[i] = m
            out.append(m)
        return out

    def rewards(self, weights: Sequence[torch.Tensor], kept: Sequence[torch.Tensor],
                prepared: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, float]]:
        """Per layer ``(relative output error, -log of it)``."""
        from prunenet.calibration import relative_output_error

        out = []
        for rows, m in zip(kept, prepared):
            error = relative_output_error(m, rows).double().clamp_min(1e-12)
            out.append((error, float(-torch.log(error))))
        return out

    def release(self) -> None:
        from prunenet.inputs import release_shared

        self.matrices = {}
        release_shared()  # the statistics the matrices came from (a fit's features are already computed)

#: Rewards by short name (``--model.reward``; any class_path of a Reward subclass works too: ``plugins.py``).
REWARDS = {cls.name: cls for cls in (KSGateReward, ReconstructionReward)}

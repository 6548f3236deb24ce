"""The per-layer inputs of a selection of one source model (ours): what ``selectors.LayerInputs`` carries,
each kind read once, on first use: the states, output peaks, row norms and output-column norms from the
stored weights (streamed from safetensors where they can be, ``states.py``), and the activation statistics
on calibration text (``calibration.py``: the dense model is loaded for them, and only for them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import json

import torch

from prunenet.states import load_ffn_states, load_output_grams, load_output_norms, load_output_peaks, load_row_norms

#: The per-layer statistics of the stored weights, by name: ``(source, trust_remote_code) -> one tensor per layer``.
_WEIGHT_STATS = {"peaks": load_output_peaks, "row_norms": load_row_norms, "output_norms": load_output_norms,
                 "output_grams": load_output_grams}


#: The activation statistics last computed in this process, by (model identity, dtype, trust_remote_code, settings,
#: device): a fit's policy features and its reward read the same text once. ``release_shared`` empties it.
_SHARED: dict[tuple, Any] = {}


def release_shared() -> None:
    """Forget the shared activation statistics (their Grams are n^2 doubles a layer)."""
    _SHARED.clear()


class SelectionInputs:
    """The per-layer inputs of a selection (``selection.LayerInputs``) of one source model, each kind
    read once, on first use, by the loaders above (streamed from safetensors where they can be): the
    states, the output peaks, the row norms. The fit hands over what it already holds.

    Args:
        source: asset name, folder or hub id.
        dtype, trust_remote_code, low_memory: see ``states.load_ffn_states``.
        states, peaks: already loaded per-layer states (n, d) / peaks (n,), if any.
        fingerprint: the states' ``plan.ffn_fingerprint``, if known.
        calibration: the text the activation statistics are computed on (``calibration.CalibrationSettings``);
            None: a selector that needs them fails with a ConfigurationError.
        features: already computed ``features`` (a fit's), if any.
        activations: already computed :attr:`activations` of ``calibration`` (:meth:`shared_activations`), if any.
        device: where the dense model writes the text and runs the pass (a GPU's text differs from a CPU's:
            the text cache keys it).
    """

    def __init__(self, source: str, dtype: str = "auto", trust_remote_code: bool = False,
                 low_memory: bool | None = None, *, states: Sequence[torch.Tensor] | None = None,
                 peaks: Sequence[torch.Tensor] | None = None, fingerprint: str | None = None,
                 calibration: Any = None, features: Sequence[torch.Tensor] | None = None,
                 activations: Sequence[Any] | None = None, device: torch.device | str = "cpu") -> None:
        self.source, self.dtype, self.trust_remote_code, self.low_memory = source, dtype, trust_remote_code, low_memory
        self._states, self._fingerprint = states, fingerprint
        self._weight_stats: dict[str, Sequence[torch.Tensor]] = {} if peaks is None else {"peaks": peaks}
        self._activations, self._features, self.calibration, self.device = activations, features, calibration, device
        self.gram = False  # whether the activation statistics carry their Gram (set by a selector that needs it)

    @property
    def states(self) -> Sequence[torch.Tensor]:
        """Per layer, the FFN input matrix (n, d) in the checkpoint dtype (or ``dtype``)."""
        if self._states is None:
            self._states = load_ffn_states(self.source, self.dtype, self.trust_remote_code, self.low_memory)[0]
        return self._states

    def _weight_stat(self, kind: str) -> Sequence[torch.Tensor]:
        """One of :data:`_WEIGHT_STATS`, read from the stored weights on first use (a ``dtype`` to load the
        model in does not change them)."""
        if kind not in self._weight_stats:
            self._weight_stats[kind] = _WEIGHT_STATS[kind](self.source, self.trust_remote_code)
        return self._weight_stats[kind]

    @property
    def peaks(self) -> Sequence[torch.Tensor]:
        """Per layer, max |w| of each neuron's output column, (n,) float32."""
        return self._weight_stat("peaks")

    @property
    def row_norms(self) -> Sequence[torch.Tensor]:
        """Per layer, the L2 norm of each neuron's input weights, (n,) float32."""
        return self._weight_stat("row_norms")

    @property
    def output_norms(self) -> Sequence[torch.Tensor]:
        """Per layer, the L1 (row 0) and L2 (row 1) norms of each neuron's output column, (2, n) float32."""
        return self._weight_stat("output_norms")

    @property
    def output_grams(self) -> Sequence[torch.Tensor]:
        """Per layer, W_out^T W_out, (n, n) float32."""
        return self._weight_stat("output_grams")

    @property
    def activations(self) -> Sequence[Any]:
        """Per layer, ``calibration.NeuronStats`` of the FFN activations on the calibration text (the dense
        model is loaded, run once and released; the text is cached).

        Raises:
            ConfigurationError: no calibration settings were given.
        """
        if self._activations is None or (self.gram and self._activations[0].gram is None):
            from prunenet import calibration, loading
            from prunenet.errors import ConfigurationError

            if self.calibration is None:
                raise ConfigurationError("this selection needs calibration text (calibration settings), none given")
            key = self._shared_key()
            shared = _SHARED.get(key)
            if shared is None or (self.gram and shared[0].gram is None):
                model = loading.load_model(self.source, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
                model.to(self.device)  # a fit's device (a 7B's text and pass on a CPU take hours)
                tokenizer = loading.load_tokenizer(self.source, self.trust_remote_code)
                tokens = calibration.calibration_tokens(self.source, model, tokenizer, self.calibration,
                                                        device=str(self.device))
                shared = calibration.activation_stats(model, tokens, gram=self.gram)
                _SHARED.clear()  # one model's statistics at a time (a Gram is n^2 doubles a layer)
                _SHARED[key] = shared
                del model
            self._activations = shared
        return self._activations

    def _shared_key(self) -> tuple:
        from prunenet.evaluation.cache import model_identity

        # the weights' identity (a folder rewritten in place is another model), the dtype, the text and the device
        return (json.dumps(model_identity(self.source), sort_keys=True, default=str), self.dtype,
                self.trust_remote_code, self.calibration, str(self.device))

    def shared_activations(self) -> Sequence[Any] | None:
        """The activation statistics with their Gram that another reader of the same text (model, dtype,
        settings, device) already computed in this process, or None; never runs the pass. Hold them and pass
        them as ``activations`` so that a later ``release_shared`` does not cost a second pass."""
        shared = None if self.calibration is None else _SHARED.get(self._shared_key())
        return None if shared is None or shared[0].gram is None else shared

    @property
    def calibration_record(self) -> dict[str, Any] | None:
        """The calibration settings as a plan records them, with the token count (N x L) and, where the pass ran
        on another device than the CPU, the device (self-generated text differs between devices), or None."""
        c = self.calibration
        device = {} if str(self.device) == "cpu" else {"device": str(self.device)}
        return None if c is None else {**c.record(), "tokens": c.samples * c.length, **device}

    @property
    def features(self) -> Sequence[torch.Tensor]:
        """Per layer, ``features.neuron_features`` of the neurons, (n, F) float32 (computes the activations'
        Gram if they lack it)."""
        if self._features is None:
            from prunenet.calibration import reconstruction_matrix
            from prunenet.features import neuron_features

            self.gram = True  # the activations are computed again if they lack it
            self._features = [neuron_features(a, o, p, reconstruction_matrix(a.gram, g)) for a, o, p, g in
                              zip(self.activations, self.output_norms, self.peaks, self.output_grams)]
        return self._features

    def fingerprint(self) -> str:
        """``plan.ffn_fingerprint`` of the states (the plan's ``source_ffn_sha256``)."""
        if self._fingerprint is None:
            from prunenet.plan import ffn_fingerprint

            self._fingerprint = ffn_fingerprint(self.states)
        return self._fingerprint

    def layers(self, needs: frozenset[str] | set[str]):
        """Yield one ``selection.LayerInputs`` per layer with the fields in ``needs`` set (``output_gram``
        also makes the activation statistics carry their Gram)."""
        from prunenet.selectors import LayerInputs

        if "output_gram" in needs:
            self.gram = True  # the activations are computed again if they lack it
        states = self.states  # the layer count and n come from the states, which every plan fingerprints
        for i in range(len(states)):
            state = states[i]
            yield LayerInputs(index=i, size=int(state.shape[0]), state=state if "state" in needs else None,
                              peaks=self.peaks[i] if "peaks" in needs else None,
                              row_norms=self.row_norms[i] if "row_norms" in needs else None,
                              output_norms=self.output_norms[i] if "output_norms" in needs else None,
                              output_gram=self.output_grams[i] if "output_gram" in needs else None,
                              activations=self.activations[i] if "activations" in needs else None,
                              features=self.features[i] if "features" in needs else None)

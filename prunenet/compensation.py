"""FLAP bias compensation, the data side (FLAP, An et al. 2024, bias compensation: "Fluctuation-based Adaptive
Structured Pruning for Large Language Models", AAAI 2024): per layer the bias b = W_out[:, R] @ mean(h)[R] of the
kept rows and the activation means on the calibration text, and its record in the plan, which
``compress --from_plan`` replays as stored (no calibration pass, byte-identical weights).

Removing the neurons R drops e(t) = sum_{j in R} h_j(t) w_j from token t's FFN output; with b the error becomes
e(t) - mean_t e(t): its mean over the calibration tokens is 0. Where the bias goes and how a family holds it is
``arch/bias.py``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prunenet.errors import ConfigurationError

#: How the plan stores the compensation (``compensation_biases.layers``): each layer's (d,) vector, rounded once to
#: float32, as the base64 text of its little-endian bytes.
ENCODING = "base64 of float32 little-endian bytes, one (d,) vector per layer"


def compensation_biases(inputs: Any, kept: Sequence[torch.Tensor],
                        refit: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per layer, FLAP's compensation of the neurons not in ``kept`` (``arch.bias.compensation``, in float64 from
    the stored output weight and ``calibration.NeuronStats.mean``), rounded to float32: what is written (added to
    an existing bias, ``arch.bias.bias_value``) and what the plan records.

    Args:
        inputs: the source's ``inputs.SelectionInputs`` with calibration settings (the activation statistics are
            computed here if the selection did not need them; one forward pass of the dense model).
        kept: per layer the sorted LongTensor (k,) of kept rows.
        refit: per layer the refit output weight of the kept neurons (``refit.refit_weights``), or None: the bias
            then is the mean of what the refit still misses, W mean(h) - W'_S mean(h)[S].
    Returns:
        One (d,) float32 tensor per layer.
    """
    from prunenet.arch.bias import compensation
    from prunenet.states import per_layer

    refit = refit if refit is not None else [None] * len(kept)
    pending = iter(zip(kept, [a.mean for a in inputs.activations], refit))  # per_layer reduces layers in order
    biases = per_layer(inputs.source, inputs.trust_remote_code, lambda a, layer: [a.output_module(layer)],
                       lambda a, weights: compensation(a, weights[0], *next(pending)))
    return [b.float() for b in biases]


def record(biases: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The plan's ``compensation_biases``: ``{"encoding": ENCODING, "layers": {"0": base64, ...}}``."""
    return {"encoding": ENCODING,
            "layers": {str(i): base64.b64encode(b.float().numpy().astype("<f4").tobytes()).decode("ascii")
                       for i, b in enumerate(biases)}}


def read_record(entry: Any, layers: int, d: int, where: str) -> list[torch.Tensor]:
    """The biases of a plan's ``compensation_biases`` (:func:`record`), one (d,) float32 tensor per layer.

    Raises:
        ConfigurationError: a missing or malformed record, or one of another shape (names ``where``, the plan).
    """
    try:
        if entry["encoding"] != ENCODING:
            raise ValueError(f"unknown encoding {entry['encoding']!r}")
        out = [torch.from_numpy(np.frombuffer(base64.b64decode(entry["layers"][str(i)], validate=True), dtype="<f4")
                                .astype(np.float32)) for i in range(layers)]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(f"plan {where} has bias_compensation but no readable compensation_biases "
                                 f"({type(exc).__name__}: {exc})") from None
    if any(b.shape != (d,) for b in out) or len(entry["layers"]) != layers:
        raise ConfigurationError(f"plan {where}: compensation_biases must hold {layers} vectors of {d} values")
    return out


def planned_biases(plan: dict[str, Any], adapter: Any, config: Any, layers: int, d: int,
                   where: str) -> list[torch.Tensor] | None:
    """For a replay: the plan's stored compensation when it has ``bias_compensation: true`` (None otherwise),
    after checking that this model's family can hold it (``arch.bias.bias_mode``): cheap, before any work.

    Raises:
        ConfigurationError: see :func:`read_record` and ``arch.bias.bias_mode``.
    """
    from prunenet.arch.bias import bias_mode

    if not plan.get("bias_compensation"):
        return None
    bias_mode(adapter, config)
    return read_record(plan.get("compensation_biases"), layers, d, where)

"""The one pruning pipeline (ours): source model -> per-layer inputs -> :class:`~prunenet.selection.Selector`
-> kept rows -> sliced checkpoint + plan. ``StructuralSlicing`` (after a fit), ``prunenet.compress`` and
``--from_plan`` replay all go through it.

    prune(source, selector, compression_ratio, output_dir) -> Exported

1. read the per-layer inputs the selector needs, tensor by tensor (``inputs.SelectionInputs``: streamed
   from safetensors where the source is a local checkpoint; no dense model is built);
2. protected rows (``protect_outliers``) and the kept width ``k = floor((1 - r) n)`` rounded to ``round_to``;
3. ``selector.select`` per layer (``selection.py``);
4. with ``refit``, the output projection's kept columns refit by least squares on the calibration text
   (``refit.py``); with ``bias_compensation``, FLAP's output bias of what is still missing (``compensation.py``);
5. slice and save (``export.export``: shard by shard from the safetensors files where it can, else the
   model is loaded and sliced in memory) with ``prunenet.json`` (``plan.make_plan``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from prunenet import loading
from prunenet.arch import get_adapter
from prunenet.arch.bias import bias_mode
from prunenet.compensation import compensation_biases
from prunenet.compensation import record as compensation_record
from prunenet.errors import ConfigurationError
from prunenet.export import Exported, export
from prunenet.policy import RowPolicy
from prunenet.refit import RIDGE, check_ridge, refit_weights
from prunenet.selection import check_protect_fraction, kept_width, protected_rows
from prunenet.selectors import Selector, select_layers
from prunenet.inputs import SelectionInputs


def select(selector: Selector, inputs: SelectionInputs, k: int, protect_outliers: float = 0.0) -> list[torch.Tensor]:
    """Steps 1-3: the kept rows of every layer, one sorted LongTensor (k,) each.

    Args:
        selector: how rows are chosen.
        inputs: the source model's per-layer inputs (read as the selector needs them).
        k: kept width.
        protect_outliers: share of each layer's neurons always kept (``selection.protected_rows``), in [0, 1).
    Raises:
        ConfigurationError: a bad ``protect_outliers``.
    """
    check_protect_fraction(protect_outliers)
    protected = [protected_rows(p, protect_outliers) for p in inputs.peaks] if protect_outliers > 0 else None
    return select_layers(selector, inputs.layers(selector.needs), k, protected)


def prune(source: str, selector: Selector, compression_ratio: float, output_dir: str | os.PathLike, *,
          round_to: int = 1, protect_outliers: float = 0.0, inputs: SelectionInputs | None = None,
          provenance: dict[str, Any] | None = None, policy: RowPolicy | None = None,
          policy_meta: dict[str, Any] | None = None, overwrite: bool = False, shardwise: bool | None = None,
          dtype: str = "auto", trust_remote_code: bool = False, bias_compensation: bool = False,
          refit: bool = False, refit_ridge: float = RIDGE) -> Exported:
    """Select the kept rows of ``source`` with ``selector`` and save the sliced checkpoint.

    Args:
        source: the dense model: asset name, local folder or hub id.
        selector: a :class:`~prunenet.selection.Selector`.
        compression_ratio: r in [0, 1), the share of each layer's FFN neurons removed.
        output_dir: where to write (absent or empty unless ``overwrite``).
        round_to: kept width rounded down to a multiple of this.
        protect_outliers: share of each layer's neurons always kept, in [0, 1).
        inputs: the source's per-layer inputs when already read (the fit's states); default: read here.
        provenance: more plan fields (the policy's training record, say).
        policy, policy_meta: written as ``policy.pt`` (only for a selection by a trained policy).
        shardwise: see ``export.use_shardwise`` (None: whenever the source is a local safetensors checkpoint).
        dtype: ``auto`` (the checkpoint's) or a dtype to load the model in.
        bias_compensation: add FLAP's compensation of the removed neurons to each FFN output bias (FLAP, An et al.
            2024; ``compensation.py``), from the activation means on ``inputs``' calibration text.
        refit: replace the kept columns of each FFN output projection by their least-squares refit on ``inputs``'
            calibration text (ours, ``refit.py``); the plan records ``refit: {"ridge": refit_ridge}``.
        refit_ridge: the refit's ridge, a fraction of the mean kept activation energy (> 0).
    Returns:
        :class:`~prunenet.export.Exported`.
    Raises:
        ConfigurationError: bad ratio, round_to, protect_outliers or refit_ridge, or bias compensation for a family
            that cannot hold it (``arch.bias.bias_mode``), before any weight is read.
        OutputExistsError, ModelLoadError, UnsupportedModelError: see ``export`` and ``loading``.
    """
    config = loading.load_config(source, trust_remote_code)
    adapter = get_adapter(config)
    k = kept_width(adapter.intermediate_size(config), compression_ratio, round_to)
    check_protect_fraction(protect_outliers)
    if bias_compensation:
        bias_mode(adapter, config)
    ridge = check_ridge(refit_ridge) if refit else None
    inputs = inputs or SelectionInputs(source, dtype, trust_remote_code)
    if (refit or bias_compensation) and inputs.calibration is None:
        raise ConfigurationError("refit and bias compensation need calibration text: give SelectionInputs calibration "
                                 "settings (calibration.CalibrationSettings)")
    if refit:  # one activation pass for the selection and the refit: with the Gram from the start
        inputs.gram = True
    kept = select(selector, inputs, k, protect_outliers)
    extra = {**(provenance or {}), "protect_outliers": float(protect_outliers),
             "source_ffn_sha256": inputs.fingerprint()}
    weights = refit_weights(inputs, kept, ridge) if refit else None
    biases = compensation_biases(inputs, kept, weights) if bias_compensation else None
    if selector.needs & {"activations", "features"} or bias_compensation or refit:  # the statistics' text
        extra["calibration"] = inputs.calibration_record
    if refit:
        extra["refit"] = {"ridge": ridge}
    if biases is not None:  # the biases themselves too: a replay writes them as they are
        extra.update(bias_compensation=True, compensation_biases=compensation_record(biases))
    return export(source, kept, output_dir, selection=selector.name, seed=selector.seed,
                  compression_ratio=compression_ratio, round_to=round_to, extra=extra, policy=policy if selector.uses_policy else None,
                  policy_meta=policy_meta, overwrite=overwrite, shardwise=shardwise, dtype=dtype,
                  trust_remote_code=trust_remote_code, biases=biases, output_weights=weights)


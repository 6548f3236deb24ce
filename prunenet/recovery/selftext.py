"""The recovery's data-free text (``--data.source=self``): blocks the dense source model wrote itself.

Source: ours, after Williams, Chrysostomou and Aletras (NAACL 2025, "Self-calibration for Language Model
Quantization and Pruning"): N sequences of ``block_size`` tokens sampled from the dense model's BOS token
(``calibration.generate_tokens``: transformers' ``generate``, temperature 1, top-p 1, seeded), each one a
block. They go through ``calibration.calibration_tokens``, cached by the dense model's identity and the
settings, so the text a ``prunenet.compress --calibration self`` run generated with the same settings (by
default 64 x 256, seed 0) is read back, and the dense model is loaded only when it is not cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from prunenet.calibration import SELF, CalibrationSettings, calibration_tokens
from prunenet.recovery.corpus import DataError


class _LoadOnUse:
    """Stands for the dense model: loads it (``load()``) at the first attribute read, so a cached text
    loads nothing."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load, self._model = load, None

    def __getattr__(self, name: str) -> Any:
        if self._model is None:
            self._model = self._load()
        return getattr(self._model, name)


def self_tokens(dense_source: str | None, load_dense: Callable[[], Any] | None, tokenizer: Any, samples: int,
                length: int, seed: int, progress: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """The dense model's own text: ``samples`` sequences of ``length`` tokens sampled from its BOS token.

    Args:
        dense_source: the dense model (asset name, folder or hub id; the pruned input's plan names it):
            the cache key's model identity.
        load_dense: returns the dense model (a causal LM in eval mode); called only when the text is not
            cached, and released afterwards.
        tokenizer: the dense model's tokenizer (a pruned folder carries a copy): its BOS id.
        samples, length, seed: ``calibration.CalibrationSettings`` (temperature and top-p 1).
    Returns:
        ``(tokens, record)``: LongTensor (samples, length) on the CPU, BOS first; the provenance record
        (``CalibrationSettings.record()`` with ``kind: self-generated``, the dense source, the sha256 of
        the tokens' bytes, the token count).
    Raises:
        DataError: no dense source or no way to load it.
        ConfigurationError: a setting out of range, a model without BOS or EOS id.
    """
    if dense_source is None or load_dense is None:
        raise DataError(f"data.source={SELF} needs the dense model that writes the text (prunenet.recover gives "
                        "the input's dense source; programmatic use: pass dense_source and load_dense to prepare)")
    settings = CalibrationSettings(source=SELF, samples=samples, length=length, seed=seed)
    tokens = calibration_tokens(dense_source, _LoadOnUse(load_dense), tokenizer, settings, progress=progress)
    tokens = tokens.to(torch.long).contiguous()
    if tuple(tokens.shape) != (samples, length):  # a cache entry of other settings would be a bug: say so
        raise DataError(f"self-generated text of {dense_source!r} has shape {tuple(tokens.shape)}, expected "
                        f"({samples}, {length})")
    record = {**settings.record(), "source_model": str(dense_source),
              "description": f"{samples} sequences of {length} tokens sampled by {dense_source!r} from its BOS token",
              "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(), "tokens": int(tokens.numel())}
    return tokens, record

"""The LoRA targets of a recovery (ours): the full module names of the projections peft wraps in every decoder
layer, from the architecture adapter's groups (``all``, ``ffn``, ``attention``) or explicit paths."""

from __future__ import annotations

from typing import Any

import torch

from prunenet.arch import get_adapter
from prunenet.errors import ConfigurationError


def lora_target_names(config: Any, targets: str | list[str], trust_remote_code: bool = False) -> list[str]:
    """Full module names of the LoRA targets in every decoder layer (peft matches them exactly).

    Args:
        config: the model's config (a model is built on the meta device from it: names, no memory).
        targets: a group (``all``, ``ffn``, ``attention``: :meth:`ArchAdapter.projections`), or a list
            (or comma string) of groups and paths relative to a decoder layer.
    Raises:
        ConfigurationError: a target the model's decoder layers do not have (names the ones they have).
    """
    from transformers.pytorch_utils import Conv1D

    from prunenet.streaming import meta_model

    adapter = get_adapter(config)
    model = meta_model(config)
    names = {id(m): n for n, m in model.named_modules()}
    layers = adapter.layers(model)
    paths: list[str] = []
    for item in ([targets] if isinstance(targets, str) else list(targets)):
        for part in str(item).split(","):
            part = part.strip()
            if part:
                paths.extend(adapter.projections(part) if part in ("all", "ffn", "attention") else [part])
    if not paths:
        raise ConfigurationError("model.lora_targets is empty; use all, ffn, attention or module paths")
    linear = [n for n, m in layers[0].named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    out = []
    for path in dict.fromkeys(paths):
        found = [names[id(mod)] for layer in layers for n, mod in layer.named_modules() if n == path]
        if not found or not all(isinstance(m, (torch.nn.Linear, Conv1D)) for m in
                                (model.get_submodule(f) for f in found)):
            raise ConfigurationError(f"LoRA target {path!r} is not a linear module of this model's decoder layers "
                                     f"({config.model_type}); they have: {', '.join(linear)}")
        out.extend(found)
    return out

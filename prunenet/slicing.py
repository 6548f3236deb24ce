"""Surgery: slice the FFNs of a model in memory (rows of the input matrices, columns of the output
matrix, biases, the config's FFN width), and count parameters.

Source: PruneNet Section 3. Every FFN input matrix keeps the rows ``kept`` of its layer (gate AND up
for gated FFNs, with biases) and the FFN output matrix keeps the same columns, so the model gets
really smaller; the config's FFN width is rewritten so plain ``AutoModelForCausalLM.from_pretrained``
rebuilds it. Shard-wise slicing of safetensors files without a model is ``streaming.slice_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunenet.arch import ArchAdapter, check_finite, get_adapter
from prunenet.errors import ConfigurationError


def check_kept(kept: Sequence[torch.Tensor], intermediate_size: int, num_layers: int) -> int:
    """Check kept indices against a model: one tensor per layer, the same width in every layer,
    distinct indices in ``[0, intermediate_size)``. Cheap: run it before loading any weights.

    Returns:
        The kept width k.
    Raises:
        ConfigurationError: naming the layers at fault (for unequal widths, which layers have which).
    """
    if len(kept) != num_layers:
        raise ConfigurationError(f"got kept indices for {len(kept)} layers, the model has {num_layers}")
    by_width: dict[int, list[int]] = {}
    for i, idx in enumerate(kept):
        by_width.setdefault(int(idx.numel()), []).append(i)
    if len(by_width) != 1:
        parts = [f"{w} in {_layer_list(layers)}" for w, layers in sorted(by_width.items())]
        raise ConfigurationError("all layers must keep the same number of rows (the config holds one FFN width), "
                                 f"got {' and '.join(parts)}")
    for i, idx in enumerate(kept):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= intermediate_size
                            or idx.unique().numel() != idx.numel()):
            raise ConfigurationError(f"layer {i}: kept indices must be distinct and in [0, {intermediate_size})")
    return next(iter(by_width))


def _layer_list(layers: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> 'layers 0-3, 5'; [4] -> 'layer 4'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
    return ("layers " if len(layers) > 1 else "layer ") + text


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    # parameters() yields each Parameter object once, so tied weights count once (also on meta).
    return sum(p.numel() for p in model.parameters())


def slice_model(model: torch.nn.Module, kept: Sequence[torch.Tensor],
                adapter: ArchAdapter | None = None) -> torch.nn.Module:
    """Slice every FFN of ``model`` in place to the rows ``kept[i]`` of layer i.

    All layers must keep the same number of rows (the config holds one FFN width).

    Args:
        model: a ``PreTrainedModel`` of a supported family.
        kept: one sorted LongTensor per decoder layer, all of shape (k,).
    Returns:
        The same model object, smaller, with ``config`` FFN width = k.
    Raises:
        ConfigurationError: wrong number of layers, unequal widths, out-of-range indices,
            or a family whose config cannot express the new width.
        InvalidWeightsError: NaN/Inf in any FFN tensor (named by parameter path); nothing is changed.
    """
    adapter = adapter or get_adapter(model.config)
    layers = adapter.layers(model)
    n = adapter.intermediate_size(model.config)
    width = check_kept(kept, n, len(layers))
    ffn_names = set(adapter.tensor_roles(model))
    adapter.check_sliceable(model.config, width)
    # Every FFN tensor, not only the policy state: a NaN in up/down would otherwise ship silently.
    for name, param in model.named_parameters():
        if name in ffn_names:
            check_finite(param.detach(), name)
    adapter.set_intermediate_size(model.config, width)  # raises before touching weights
    for layer, idx in zip(layers, kept):
        adapter.slice_layer(layer, idx.long())
    return model

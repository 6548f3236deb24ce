"""Architecture adapters, dispatched on ``config.model_type`` (never on the checkpoint name).

Usage::

    adapter = get_adapter(model.config)
    for layer in adapter.layers(model):
        W = adapter.state(layer)       # (n, d)
"""

from __future__ import annotations

from prunenet.arch.base import ArchAdapter, check_finite
from prunenet.errors import UnsupportedModelError

_GATED = dict(ffn_inputs=("mlp.gate_proj", "mlp.up_proj"), ffn_output="mlp.down_proj")
_DECODER = ("model.layers",)

#: One adapter per family. Adding a family that fits these shapes is one entry.
ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "granite", "olmo", "olmo2", "stablelm", "smollm3"),
        layers_paths=_DECODER, **_GATED,
    ),
    # Gemma-3 multimodal wrapper: the text decoder sits inside, sizes in text_config.
    ArchAdapter(model_types=("gemma3",), layers_paths=("model.language_model.layers",
                                                       "language_model.model.layers"), **_GATED),
    ArchAdapter(model_types=("phi3",), layers_paths=_DECODER, ffn_inputs=("mlp.gate_up_proj",),
                ffn_output="mlp.down_proj", fused_gate_up=True),
    ArchAdapter(model_types=("phi",), layers_paths=_DECODER, ffn_inputs=("mlp.fc1",), ffn_output="mlp.fc2"),
    ArchAdapter(model_types=("opt",), layers_paths=("model.decoder.layers",), ffn_inputs=("fc1",),
                ffn_output="fc2", width_key="ffn_dim"),
    ArchAdapter(model_types=("falcon",), layers_paths=("transformer.h",), ffn_inputs=("mlp.dense_h_to_4h",),
                ffn_output="mlp.dense_4h_to_h", width_key="ffn_hidden_size",
                width_default=lambda c: 4 * c.hidden_size),
    ArchAdapter(model_types=("gpt2",), layers_paths=("transformer.h",), ffn_inputs=("mlp.c_fc",),
                ffn_output="mlp.c_proj", width_key="n_inner", hidden_key="n_embd", conv1d=True,
                width_default=lambda c: 4 * c.n_embd),
    ArchAdapter(model_types=("gpt_neox",), layers_paths=("gpt_neox.layers",),
                ffn_inputs=("mlp.dense_h_to_4h",), ffn_output="mlp.dense_4h_to_h"),
    ArchAdapter(model_types=("gptj",), layers_paths=("transformer.h",), ffn_inputs=("mlp.fc_in",),
                ffn_output="mlp.fc_out", width_key="n_inner", hidden_key="n_embd",
                width_default=lambda c: 4 * c.n_embd),
)

_REGISTRY: dict[str, ArchAdapter] = {t: a for a in ADAPTERS for t in a.model_types}


def supported_model_types() -> list[str]:
    """Sorted list of the ``model_type`` values PruneNet can prune."""
    return sorted(_REGISTRY)


def get_adapter(config: object) -> ArchAdapter:
    """The adapter for ``config.model_type``.

    Raises:
        UnsupportedModelError: naming the model_type and listing the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        ) from None


__all__ = ["ArchAdapter", "ADAPTERS", "check_finite", "get_adapter", "supported_model_types"]

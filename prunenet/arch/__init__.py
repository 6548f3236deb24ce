"""Architecture adapters, dispatched on ``config.model_type`` (never on the checkpoint name).

Usage::

    adapter = get_adapter(model.config)
    for layer in adapter.layers(model):
        W = adapter.state(layer)       # (n, d)

Every entry below was checked against the module paths and config keys of
transformers 5.x (``modeling_<family>.py``), and each family has a contract test
(``tests/test_arch_contract.py``): exact slicing, save + plain ``from_pretrained``
round trip, one fit episode through the CLI, and a policy state of shape (n, d).
``docs/architectures.md`` is generated from this table (:func:`markdown_table`).
"""

from __future__ import annotations

from prunenet.arch.base import ArchAdapter, check_finite
from prunenet.errors import UnsupportedModelError

# LLaMA-style gated FFN: down(act(gate(x)) * up(x)), all nn.Linear (out, in).
_GATED = {"ffn_inputs": ("mlp.gate_proj", "mlp.up_proj"), "ffn_output": "mlp.down_proj"}
_DECODER = ("model.layers",)
_GPT_BLOCKS = ("transformer.h",)
# Attention projections (LoRA targets of recovery); the LLaMA layout is the adapter's default.
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_FUSED_QKV = ("self_attention.query_key_value", "self_attention.dense")
_GPT_ATTN = ("attn.c_attn", "attn.c_proj")


def _four_d(config: object) -> int:
    """The FFN width families use when their width key is None: 4 * hidden size."""
    return 4 * int(config.hidden_size)


#: One adapter per family. Adding a family that fits these shapes is one entry (and one test subclass).
ADAPTERS: tuple[ArchAdapter, ...] = (
    # LlamaForCausalLM and the decoders that copy its layout (gate/up/down under model.layers[i].mlp);
    # config.mlp_bias gives gate, up and down a bias (and nothing else one).
    ArchAdapter(model_types=("llama", "granite", "smollm3"), layers_paths=_DECODER, **_GATED,
                output_bias="mlp_bias", output_bias_settable=True),
    # The same layout, with every FFN projection built bias=False.
    ArchAdapter(
        model_types=("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "stablelm",
                     "cohere"),
        layers_paths=_DECODER, **_GATED,
    ),
    # Gemma-3 multimodal (Gemma3ForConditionalGeneration, what AutoModelForCausalLM builds for a
    # Gemma3Config): the text decoder sits at model.language_model, its sizes in config.text_config.
    ArchAdapter(model_types=("gemma3",), layers_paths=("model.language_model.layers",), **_GATED),
    # Phi-3: one fused gate_up_proj (2n, d) = [gate; up]; both halves keep the same rows.
    ArchAdapter(model_types=("phi3",), layers_paths=_DECODER, ffn_inputs=("mlp.gate_up_proj",),
                ffn_output="mlp.down_proj", fused_gate_up=True, attention=("self_attn.qkv_proj", "self_attn.o_proj")),
    # Non-gated FFNs: out(act(in(x))), nn.Linear with biases.
    ArchAdapter(model_types=("phi",), layers_paths=_DECODER, ffn_inputs=("mlp.fc1",), ffn_output="mlp.fc2",
                attention=(*_QKV, "self_attn.dense"), output_bias="always"),
    ArchAdapter(model_types=("starcoder2",), layers_paths=_DECODER, ffn_inputs=("mlp.c_fc",),
                ffn_output="mlp.c_proj", output_bias="use_bias"),  # use_bias: attention biases too
    ArchAdapter(model_types=("persimmon",), layers_paths=_DECODER, ffn_inputs=("mlp.dense_h_to_4h",),
                ffn_output="mlp.dense_4h_to_h", attention=("self_attn.query_key_value", "self_attn.dense"),
                output_bias="always"),
    ArchAdapter(model_types=("nemotron",), layers_paths=_DECODER, ffn_inputs=("mlp.up_proj",),
                ffn_output="mlp.down_proj", output_bias="mlp_bias", output_bias_settable=True),
    ArchAdapter(model_types=("opt",), layers_paths=("model.decoder.layers",), ffn_inputs=("fc1",),
                ffn_output="fc2", width_key="ffn_dim", attention=(*_QKV, "self_attn.out_proj"),
                output_bias="enable_bias"),  # enable_bias: attention biases too
    ArchAdapter(model_types=("gpt_neox",), layers_paths=("gpt_neox.layers",),
                ffn_inputs=("mlp.dense_h_to_4h",), ffn_output="mlp.dense_4h_to_h",
                attention=("attention.query_key_value", "attention.dense"), output_bias="always"),
    # Falcon: FalconLinear is an nn.Linear; ffn_hidden_size None means 4 * hidden_size.
    ArchAdapter(model_types=("falcon",), layers_paths=_GPT_BLOCKS, ffn_inputs=("mlp.dense_h_to_4h",),
                ffn_output="mlp.dense_4h_to_h", width_key="ffn_hidden_size", width_default=_four_d,
                attention=_FUSED_QKV, output_bias="bias"),  # bias: attention biases too
    # GPT-2: Conv1D stores (in, out) = (d, n); the policy state is its transpose (n, d).
    ArchAdapter(model_types=("gpt2",), layers_paths=_GPT_BLOCKS, ffn_inputs=("mlp.c_fc",),
                ffn_output="mlp.c_proj", width_key="n_inner", hidden_key="n_embd", conv1d=True,
                width_default=_four_d, attention=_GPT_ATTN, output_bias="always"),
    ArchAdapter(model_types=("gpt_bigcode",), layers_paths=_GPT_BLOCKS, ffn_inputs=("mlp.c_fc",),
                ffn_output="mlp.c_proj", width_key="n_inner", hidden_key="n_embd", width_default=_four_d,
                attention=_GPT_ATTN, output_bias="always"),
    ArchAdapter(model_types=("gpt_neo",), layers_paths=_GPT_BLOCKS, ffn_inputs=("mlp.c_fc",),
                ffn_output="mlp.c_proj", width_default=_four_d, output_bias="always",
                attention=tuple(f"attn.attention.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))),
    ArchAdapter(model_types=("gptj",), layers_paths=_GPT_BLOCKS, ffn_inputs=("mlp.fc_in",),
                ffn_output="mlp.fc_out", width_key="n_inner", hidden_key="n_embd", width_default=_four_d,
                attention=("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"), output_bias="always"),
    ArchAdapter(model_types=("codegen",), layers_paths=_GPT_BLOCKS, ffn_inputs=("mlp.fc_in",),
                ffn_output="mlp.fc_out", width_key="n_inner", hidden_key="n_embd", width_default=_four_d,
                attention=("attn.qkv_proj", "attn.out_proj"), output_bias="always"),
    # BLOOM builds its FFN as Linear(h, 4 * h) in code: no config key can hold a pruned width.
    # The policy can still be trained on it (states are read), but slicing refuses.
    ArchAdapter(model_types=("bloom",), layers_paths=_GPT_BLOCKS, ffn_inputs=("mlp.dense_h_to_4h",),
                ffn_output="mlp.dense_4h_to_h", width_key=None, width_default=_four_d, width_settable=False,
                note="BloomMLP is Linear(hidden_size, 4 * hidden_size)", attention=_FUSED_QKV, output_bias="always"),
)

_REGISTRY: dict[str, ArchAdapter] = {t: a for a in ADAPTERS for t in a.model_types}


def supported_model_types() -> list[str]:
    """Sorted list of the ``model_type`` values PruneNet can read (``bloom`` cannot be sliced)."""
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


def markdown_table() -> str:
    """The table of supported families (``docs/architectures.md`` holds this text)."""
    header = ("| model_type | decoder layers | FFN input (rows kept; first = policy state) | FFN output "
              "(columns kept) | width key | orientation | attention (LoRA targets with the FFN) | output bias "
              "(`--bias_compensation`) |")
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for a in ADAPTERS:
        inputs = ", ".join(f"`{p}`" for p in a.ffn_inputs)
        if a.fused_gate_up:
            inputs += " (fused [gate; up], both halves)"
        if a.width_key is None:
            key = "none: fixed at 4 × hidden in code"
        else:
            key = f"`{a.width_key}`" + (" (unset: 4 × hidden)" if a.width_default is not None else "")
        if not a.width_settable:
            key += " — **cannot be sliced**"
        orient = "Conv1D (in, out), state = weightᵀ" if a.conv1d else "Linear (out, in)"
        bias = {None: "none", "always": "always"}.get(a.output_bias, f"when `{a.output_bias}`"
                                                      + (" (set by PruneNet)" if a.output_bias_settable else ""))
        rows.append(f"| {', '.join(f'`{t}`' for t in a.model_types)} | "
                    f"{' or '.join(f'`{p}`' for p in a.layers_paths)} | {inputs} | `{a.ffn_output}` | {key} | "
                    f"{orient} | {', '.join(f'`{p}`' for p in a.attention)} | {bias} |")
    return "\n".join(rows) + "\n"


__all__ = ["ADAPTERS", "ArchAdapter", "check_finite", "get_adapter", "markdown_table", "supported_model_types"]

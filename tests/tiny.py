"""Tiny random models built offline from transformers configs (odd sizes catch transpositions).

``tiny_llama`` / ``TINY_LLAMA`` / ``save_tiny`` are the historical helpers; ``TINY_FAMILIES`` and
:func:`tiny_model` cover every architecture family PruneNet supports (FFN width 37 wherever the
config can express it, GQA where the family has it, tied and untied output heads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Keyword arguments of a tiny LLaMA: intermediate 37, GQA 4/2 heads, tied embeddings.
TINY_LLAMA = {"vocab_size": 101, "hidden_size": 24, "intermediate_size": 37, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": True}

# Shared pieces: d = 24, 4 heads of 6, GQA 4/2, 2 layers, FFN width n = 37.
_V = {"vocab_size": 101, "max_position_embeddings": 64}
_ATTN = {"hidden_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
# Partial rotary embeddings need an even rotary dim: heads of 8, half of them rotated.
_ATTN_PARTIAL = dict(_ATTN, hidden_size=32)
_TOK = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_GPT = {"vocab_size": 101, "n_positions": 64, "n_embd": 24, "n_inner": 37, "n_layer": 2, "n_head": 4,
        "bos_token_id": 1, "eos_token_id": 2}
_GEMMA = dict(_V, **_ATTN, **_TOK, intermediate_size=37, head_dim=6, query_pre_attn_scalar=6)

#: model_type -> (transformers config class name, kwargs). Each builds a model of that family
#: with ``AutoModelForCausalLM.from_config``; no network, no files.
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(TINY_LLAMA)),
    "mistral": ("MistralConfig", dict(_V, **_ATTN, intermediate_size=37, sliding_window=None,
                                      tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(_V, **_ATTN, intermediate_size=37, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_V, **_ATTN, intermediate_size=37, head_dim=6, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(_GEMMA)),  # Gemma always ties
    "gemma2": ("Gemma2Config", dict(_GEMMA, sliding_window=8)),
    "gemma3_text": ("Gemma3TextConfig", dict(_GEMMA, sliding_window=8, sliding_window_pattern=2)),
    # Multimodal Gemma-3: the text decoder sits inside Gemma3ForConditionalGeneration.
    "gemma3": ("Gemma3Config", {
        "text_config": dict(_GEMMA, sliding_window=8, sliding_window_pattern=2),
        "vision_config": {"hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        "mm_tokens_per_image": 4, "image_token_id": 100, "boi_token_id": 98, "eoi_token_id": 99}),
    "phi3": ("Phi3Config", dict(_V, **_ATTN, **_TOK, intermediate_size=37, tie_word_embeddings=False)),
    "opt": ("OPTConfig", dict(_V, hidden_size=24, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=24, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    "phi": ("PhiConfig", dict(_V, **_ATTN_PARTIAL, intermediate_size=37, partial_rotary_factor=0.5,
                              tie_word_embeddings=False)),
    "falcon": ("FalconConfig", {"vocab_size": 101, "hidden_size": 24, "ffn_hidden_size": 37,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "new_decoder_architecture": True,
                                "num_kv_heads": 2, "bias": True, "tie_word_embeddings": True}),
    "gpt2": ("GPT2Config", dict(_GPT)),
    "gpt_neox": ("GPTNeoXConfig", dict(_V, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, rotary_pct=0.5, tie_word_embeddings=False)),
    "gptj": ("GPTJConfig", dict(_GPT, rotary_dim=4)),
    "codegen": ("CodeGenConfig", dict(_GPT, n_ctx=64, rotary_dim=4)),
    "gpt_neo": ("GPTNeoConfig", {"vocab_size": 101, "max_position_embeddings": 64, "hidden_size": 24,
                                 "intermediate_size": 37, "num_layers": 2, "num_heads": 4, "window_size": 8,
                                 "attention_types": [[["global", "local"], 1]], "bos_token_id": 1,
                                 "eos_token_id": 2}),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(_GPT, multi_query=True)),
    "starcoder2": ("Starcoder2Config", dict(_V, **_ATTN, **_TOK, intermediate_size=37, use_bias=True,
                                            sliding_window=None, tie_word_embeddings=False)),
    "bloom": ("BloomConfig", dict(vocab_size=101, hidden_size=24, n_layer=2, n_head=4, **_TOK)),
    "stablelm": ("StableLmConfig", dict(_V, **_ATTN_PARTIAL, intermediate_size=37, partial_rotary_factor=0.5,
                                        tie_word_embeddings=False)),
    "olmo": ("OlmoConfig", dict(_V, **_ATTN, **_TOK, intermediate_size=37, tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", dict(_V, **_ATTN, **_TOK, intermediate_size=37, tie_word_embeddings=False)),
    "granite": ("GraniteConfig", dict(_V, **_ATTN, intermediate_size=37, mlp_bias=True, tie_word_embeddings=True)),
    "smollm3": ("SmolLM3Config", dict(_V, **_ATTN, **_TOK, intermediate_size=37, tie_word_embeddings=True)),
    "cohere": ("CohereConfig", dict(_V, **_ATTN, **_TOK, intermediate_size=37)),
    "persimmon": ("PersimmonConfig", dict(_V, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                          num_attention_heads=4, tie_word_embeddings=False)),
    "nemotron": ("NemotronConfig", dict(_V, **_ATTN, **_TOK, intermediate_size=37, head_dim=6,
                                        tie_word_embeddings=False)),
}


def build_tiny(config_cls, seed: int = 0, **kwargs):
    """Random model of ``config_cls(**kwargs)`` (eval mode, float32), built without network."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**kwargs))
    return model.eval()


def tiny_llama(seed: int = 0, **overrides):
    """A tiny random ``LlamaForCausalLM`` (see TINY_LLAMA)."""
    from transformers import LlamaConfig

    return build_tiny(LlamaConfig, seed=seed, **{**TINY_LLAMA, **overrides})


def tiny_config(model_type: str, **overrides):
    """The config of the tiny model of family ``model_type`` (see TINY_FAMILIES)."""
    import transformers

    cls_name, kwargs = TINY_FAMILIES[model_type]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random ``*ForCausalLM`` of family ``model_type`` (eval mode, float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def save_tiny(model, folder: Path, tokenizer: bool = False) -> Path:
    """Save ``model`` as a safetensors HF folder (optionally with a tiny word-level tokenizer)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        # One token per id: a second token on id 0 ("w0" and "<unk>") makes the saved vocab keep either
        # one at random, so the tokenizer sometimes lost "<unk>" (and got an out-of-range id for it).
        vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, model.config.get_text_config().vocab_size)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w1").save_pretrained(folder)
    return folder

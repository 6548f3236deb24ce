"""Tiny random models built offline from transformers configs (odd sizes catch transpositions)."""

from __future__ import annotations

from pathlib import Path

import torch

#: Keyword arguments of a tiny LLaMA: intermediate 37, GQA 4/2 heads, tied embeddings.
TINY_LLAMA = dict(vocab_size=101, hidden_size=24, intermediate_size=37, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True)


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


def save_tiny(model, folder: Path, tokenizer: bool = False) -> Path:
    """Save ``model`` as a safetensors HF folder (optionally with a tiny word-level tokenizer)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
        vocab["<unk>"] = 0
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w1").save_pretrained(folder)
    return folder

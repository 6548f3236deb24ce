"""Fixtures shared by the core suite: a tiny saved model, a plain reload that records every
load warning, and the "dense with removed neurons zeroed" reference of a pruned model."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import pytest
import torch

from tests.tiny import save_tiny, tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny LLaMA (n=37, d=24, GQA, tied embeddings) saved with a tokenizer; do not modify."""
    return save_tiny(tiny_llama(seed=0), tmp_path_factory.mktemp("tiny") / "llama", tokenizer=True)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _plain_load(path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` with no PruneNet code involved.

    Returns ``(model, loading_info, messages)``; messages are every transformers log record
    (its logger does not propagate, so it is hooked directly) and Python warning emitted.
    """
    from transformers import AutoModelForCausalLM

    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, handler.messages + [str(w.message) for w in caught]


@pytest.fixture
def plain_load():
    return _plain_load


def _zero_removed(model, kept: Sequence[torch.Tensor], where: str = "down"):
    """Zero the removed FFN neurons of a dense LLaMA-style model in place.

    ``where="down"``: columns of ``down_proj``; ``where="inputs"``: rows of ``gate_proj`` AND ``up_proj``.
    Either makes the dense model compute exactly what the sliced one computes.
    """
    n = model.config.intermediate_size
    with torch.no_grad():
        for layer, idx in zip(model.model.layers, kept):
            removed = torch.ones(n, dtype=torch.bool)
            removed[torch.as_tensor(idx, dtype=torch.long)] = False
            if where == "down":
                layer.mlp.down_proj.weight[:, removed] = 0
            else:
                layer.mlp.gate_proj.weight[removed, :] = 0
                layer.mlp.up_proj.weight[removed, :] = 0
    return model


@pytest.fixture
def zero_removed():
    return _zero_removed


#: Tiny models of families PruneNet may not support; the first one it does not is used.
_UNSUPPORTED_CANDIDATES = {
    "bloom": ("BloomConfig", {"vocab_size": 101, "hidden_size": 24, "n_layer": 2, "n_head": 4}),
    "mpt": ("MptConfig", {"vocab_size": 101, "d_model": 24, "n_heads": 4, "n_layers": 2, "max_seq_len": 64}),
    "xglm": ("XGLMConfig", {"vocab_size": 101, "d_model": 24, "ffn_dim": 37, "num_layers": 2, "attention_heads": 4,
                                "max_position_embeddings": 64}),
    "biogpt": ("BioGptConfig", {"vocab_size": 101, "hidden_size": 24, "intermediate_size": 37, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "max_position_embeddings": 64}),
}


@pytest.fixture(scope="session")
def unsupported_dir(tmp_path_factory):
    """``(model_type, folder)`` of a saved tiny model whose family has no PruneNet adapter."""
    import transformers

    from prunenet.arch import supported_model_types
    from tests.tiny import build_tiny

    supported = set(supported_model_types())
    for model_type, (cls_name, kwargs) in _UNSUPPORTED_CANDIDATES.items():
        if model_type not in supported:
            model = build_tiny(getattr(transformers, cls_name), **kwargs)
            assert model.config.model_type == model_type
            return model_type, save_tiny(model, tmp_path_factory.mktemp("unsupported") / model_type)
    pytest.fail(f"every candidate family is supported now; add one to _UNSUPPORTED_CANDIDATES: {sorted(supported)}")

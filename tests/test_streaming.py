"""Streaming fit (FFN tensors read from safetensors) and shard-wise slicing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, Phi3Config

from prunenet.arch import get_adapter
from prunenet.errors import ModelLoadError
from prunenet.slicing import slice_model
from prunenet.states import load_ffn_states, stream_states
from prunenet.streaming import safetensors_files, slice_checkpoint
from tests.conftest import assert_logits_match, assert_same_weights
from tests.tiny import build_tiny, save_tiny, tiny_llama


def _models():
    yield "llama", tiny_llama(tie_word_embeddings=False)
    yield "gpt2", build_tiny(GPT2Config, vocab_size=101, n_embd=24, n_layer=3, n_head=4, n_inner=37, n_positions=64)
    yield "phi3", build_tiny(Phi3Config, vocab_size=101, hidden_size=24, intermediate_size=37, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0)


@pytest.mark.parametrize("family,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("low_memory", [False, True])
def test_streamed_states_equal_loaded_states(tmp_path, family, model, low_memory):
    folder = tmp_path / family
    model.save_pretrained(folder, max_shard_size="20KB")  # several shards + an index
    assert (folder / "model.safetensors.index.json").exists()
    adapter = get_adapter(model.config)
    expected = [adapter.state(layer) for layer in adapter.layers(model)]
    streamed, info = stream_states(folder, model.config, low_memory=low_memory)
    assert info["low_memory"] is low_memory and len(streamed) == len(expected)
    for got, want in zip(streamed, expected):
        assert got.shape == (adapter.intermediate_size(model.config), adapter.hidden_size(model.config))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert streamed._cache == {} if low_memory else len(streamed._cache) == len(expected)
    # load_ffn_states takes the streaming path for a local safetensors folder in its own dtype.
    states, info = load_ffn_states(str(folder))
    assert info["streamed"] is True
    assert info["params_dense"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_shardwise_slicing_equals_in_memory_slicing(tmp_path, family, model):
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB")
    adapter = get_adapter(model.config)
    n = adapter.intermediate_size(model.config)
    gen = torch.Generator().manual_seed(0)
    kept = [torch.randperm(n, generator=gen)[:25].sort().values for _ in adapter.layers(model)]

    out = tmp_path / "shardwise"
    out.mkdir()
    params = slice_checkpoint(src, model.config, kept, out)
    reference = slice_model(AutoModelForCausalLM.from_pretrained(src), kept)

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert adapter.intermediate_size(reloaded.config) == 25
    assert params == sum(p.numel() for p in reference.parameters())
    ids = torch.tensor([[1, 5, 9, 3]])
    assert_same_weights(reloaded, reference)
    assert_logits_match(reloaded, reference, ids)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    on_disk = {}
    for shard in out.glob("*.safetensors"):
        on_disk.update(load_file(shard))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())


def test_corrupted_safetensors_is_a_one_line_error(tmp_path):
    folder = save_tiny(tiny_llama(), tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ModelLoadError, match="truncated or corrupted") as err:
        safetensors_files(folder)
    assert "\n" not in str(err.value)


def test_nan_in_streamed_ffn_matrix_is_named(tmp_path):
    from prunenet.errors import InvalidWeightsError

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[3, 4] = float("nan")
    folder = save_tiny(model, tmp_path / "m")
    with pytest.raises(InvalidWeightsError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight"):
        load_ffn_states(str(folder))


def test_nan_in_a_non_state_ffn_tensor_is_refused_before_slicing(tmp_path):
    from prunenet.errors import InvalidWeightsError

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 1] = float("inf")
    kept = [torch.arange(20) for _ in model.model.layers]
    before = model.model.layers[0].mlp.gate_proj.weight.shape
    with pytest.raises(InvalidWeightsError, match=r"model\.layers\.2\.mlp\.down_proj\.weight"):
        slice_model(model, kept)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == before and model.config.intermediate_size == 37
    folder = save_tiny(model, tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidWeightsError, match=r"down_proj"):
        slice_checkpoint(folder, model.config, kept, out)

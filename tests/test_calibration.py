"""Self-calibration text, activation statistics and the calibration-based selectors (wanda_sp, flap)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prunenet import calibration
from prunenet.calibration import CalibrationSettings, NeuronStats
from prunenet.compress import main as compress_main
from prunenet.errors import ConfigurationError
from prunenet.recovery.corpus import DataError
from prunenet.selectors import FlapSelector, LayerInputs, ReconstructionSelector, WandaSPSelector
from tests.conftest import private_cache
from tests.tiny import tiny_model


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNENET_CACHE", str(private_cache(tmp_path / "cache")))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize("bad,message", [
    ({"samples": 0}, "calibration samples must be an integer >= 1, got 0"),
    ({"length": 1}, "calibration length must be an integer >= 2, got 1"),
    ({"samples": True}, "calibration samples must be an integer >= 1, got True"),
    ({"temperature": 0.0}, "calibration temperature must be > 0, got 0.0"),
    ({"top_p": 1.5}, "calibration top_p must be in (0, 1], got 1.5"),
    ({"batch": 0}, "calibration batch must be an integer >= 1, got 0"),
])
def test_bad_settings_are_one_line(bad, message):
    with pytest.raises(ConfigurationError) as err:
        CalibrationSettings(**bad)
    assert str(err.value) == message


def test_self_generated_text_is_seeded_exact_length_and_leaves_the_rng(tokenizer):
    model = tiny_model("llama", seed=0)
    settings = CalibrationSettings(samples=5, length=9, seed=3)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = calibration.generate_tokens(model, tokenizer, settings, progress=False)
    after = torch.rand(3)
    assert torch.equal(before, after)  # the caller's RNG stream is untouched
    b = calibration.generate_tokens(model, tokenizer, settings, progress=False)
    c = calibration.generate_tokens(model, tokenizer, CalibrationSettings(samples=5, length=9, seed=4), progress=False)
    assert a.shape == (5, 9) and a.dtype == torch.long
    assert (a[:, 0] == model.config.bos_token_id).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert settings.record()["kind"] == "self-generated"
    # the generate batch is part of the settings: the sampled text depends on it
    d = calibration.generate_tokens(model, tokenizer, CalibrationSettings(samples=5, length=9, seed=3, batch=2),
                                    progress=False)
    assert d.shape == (5, 9) and not torch.equal(a, d)


def test_a_record_without_the_generate_batch_is_the_old_batch_of_16():
    record = CalibrationSettings(samples=5, length=9).record()
    assert record["batch"] == 64 and CalibrationSettings.from_record(record).batch == 64
    del record["batch"]  # a plan written before the batch was recorded
    assert CalibrationSettings.from_record(record) == CalibrationSettings(samples=5, length=9, batch=16)
    wiki = CalibrationSettings(source="wiki")
    assert CalibrationSettings(source="wiki", batch=16) == wiki  # no sampling: the batch does not tell texts apart
    assert "batch" not in wiki.record() and CalibrationSettings.from_record(wiki.record()) == wiki  # a corpus: no sampling


def test_corpus_text_is_calibration_based_and_checked(tokenizer, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(20)) for i in range(10)))
    settings = CalibrationSettings(source=str(text), samples=3, length=16)
    tokens = calibration.corpus_tokens(tokenizer, settings)
    assert tokens.shape == (3, 16)
    assert settings.record() == {"source": str(text), "samples": 3, "length": 16, "kind": "calibration-based"}
    with pytest.raises(DataError, match=r"has \d+ tokens, fewer than samples x length = 16000"):
        calibration.corpus_tokens(tokenizer, CalibrationSettings(source=str(text), samples=100, length=160))


def test_activation_stats_are_the_moments_of_the_ffn_activation():
    """Oracle: the FFN's input captured at the MLP, its activation recomputed by hand, act(gate x) * up x."""
    model = tiny_model("llama", seed=0).double()
    tokens = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(0))
    stats = calibration.activation_stats(model, tokens, batch_size=2, progress=False)
    inputs = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    assert len(stats) == len(model.model.layers)
    for layer, x, s in zip(model.model.layers, inputs, stats):
        mlp = layer.mlp
        h = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).reshape(-1, mlp.up_proj.out_features)
        assert s.count == 30
        # float64 sums of 30 values: 1e-12 relative is far above their rounding (~30 * 1e-16)
        torch.testing.assert_close(s.mean, h.mean(0).double(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.variance, h.var(0, unbiased=False).double(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s.norm, h.norm(dim=0).double(), rtol=1e-12, atol=1e-12)


def test_output_norms_for_linear_and_conv1d():
    from prunenet.arch import get_adapter

    for family, weight_of in (("llama", lambda m: m.model.layers[0].mlp.down_proj.weight),      # (d, n)
                              ("gpt2", lambda m: m.transformer.h[0].mlp.c_proj.weight.t())):  # stored (n, d)
        model = tiny_model(family, seed=0)
        adapter = get_adapter(model.config)
        stored = adapter.output_module(adapter.layers(model)[0]).weight
        norms = adapter.output_norms(stored)
        w = weight_of(model).detach().numpy().astype(np.float64)  # (d, n): column j is neuron j's output
        np.testing.assert_allclose(norms[0].numpy(), np.abs(w).sum(0), rtol=1e-5)  # float32 sums of <= 24 terms
        np.testing.assert_allclose(norms[1].numpy(), np.linalg.norm(w, axis=0), rtol=1e-5)


def test_wanda_sp_and_flap_rank_by_their_scores():
    # neuron:          0    1    2    3    4
    total = torch.tensor([0.0, 4.0, 0.0, 8.0, 2.0], dtype=torch.float64)
    total_sq = torch.tensor([16.0, 4.0, 1.0, 16.0, 9.0], dtype=torch.float64)
    stats = NeuronStats(4, total, total_sq)  # mean (0, 1, 0, 2, .5); var (4, 0, .25, 0, 2); norm (4, 2, 1, 4, 3)
    norms = torch.tensor([[1.0, 1.0, 10.0, 0.5, 1.0],    # L1
                          [1.0, 3.0, 1.0, 1.0, 1.0]])     # L2
    layer = LayerInputs(index=0, size=5, output_norms=norms, activations=stats)
    # wanda_sp: norm x L1 = (4, 2, 10, 2, 3) -> top 2: neurons 0, 2
    assert WandaSPSelector().select(layer, 2).tolist() == [0, 2]
    # flap: var x L2^2 = (4, 0, .25, 0, 2) -> top 2: neurons 0, 4; protected 3 is kept first
    assert FlapSelector().select(layer, 2).tolist() == [0, 4]
    assert FlapSelector().select(layer, 2, protected=torch.tensor([3])).tolist() == [0, 3]


def test_compress_with_self_and_corpus_calibration(tiny_dir, tmp_path, cache_env):
    out = tmp_path / "ws"
    compress_main(["--model", str(tiny_dir), "--selection", "wanda_sp", "--calibration_samples", "3",
                   "--calibration_length", "8", "--calibration_batch", "2", "--output_dir", str(out),
                   "--compression_ratio", "0.3"])
    plan = json.loads((out / "prunenet.json").read_text())
    assert plan["selection"] == "wanda_sp"
    assert plan["calibration"] == {"source": "self", "samples": 3, "length": 8, "temperature": 1.0, "top_p": 1.0,
                                   "seed": 0, "batch": 2, "kind": "self-generated", "tokens": 24}
    assert list((cache_env / "calibration").glob("*.entry"))  # the text is cached
    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"w{i % 90 + 3}" for i in range(400)))
    compress_main(["--model", str(tiny_dir), "--selection", "flap", "--calibration", str(text),
                   "--calibration_samples", "2", "--calibration_length", "16", "--output_dir", str(tmp_path / "fl")])
    plan = json.loads((tmp_path / "fl" / "prunenet.json").read_text())
    assert plan["selection"] == "flap" and plan["calibration"]["kind"] == "calibration-based"


def _recon_layer(h: torch.Tensor, w: torch.Tensor) -> LayerInputs:
    """LayerInputs of activations h (T, n) and output weight w (d, n), as the pipeline builds them."""
    h = h.double()
    stats = NeuronStats(h.shape[0], h.sum(0), (h * h).sum(0), h.T @ h)
    return LayerInputs(index=0, size=h.shape[1], activations=stats, output_gram=(w.T @ w).float(),
                       output_norms=torch.stack([w.abs().sum(0), w.norm(dim=0)]))


def test_recon_removes_neurons_that_cancel_which_per_neuron_scores_keep():
    """Neurons 0 and 1 fire together and write opposite directions: each is large alone, together they add
    nothing to the layer's output, so dropping both costs 0; per-neuron scores rank them first."""
    g = torch.Generator().manual_seed(0)
    t, d = 50, 6
    base = torch.randn(t, 1, generator=g) * 5
    h = torch.cat([base, base, torch.randn(t, 4, generator=g)], dim=1)          # (T, 6)
    w = torch.randn(d, 6, generator=g)
    w[:, 1] = -w[:, 0]                                                           # cancels neuron 0 exactly
    layer = _recon_layer(h, w)
    kept = ReconstructionSelector().select(layer, 4)
    assert kept.tolist() == [2, 3, 4, 5]
    assert {0, 1} <= set(WandaSPSelector().select(layer, 4).tolist())
    # what the greedy minimises is the real output error: 1_R^T (G o W^T W) 1_R = ||H_R W_R^T||_F^2
    removed = [0, 2]
    m = layer.activations.gram * layer.output_gram.double()
    direct = (h[:, removed].double() @ w[:, removed].double().T).pow(2).sum()
    # float32 W^T W (6 x 6 sums of O(1) values): 1e-5 relative
    torch.testing.assert_close(m[removed][:, removed].sum(), direct, rtol=1e-5, atol=0)


def test_recon_keeps_protected_rows_and_k():
    g = torch.Generator().manual_seed(1)
    layer = _recon_layer(torch.randn(40, 9, generator=g), torch.randn(5, 9, generator=g))
    free = ReconstructionSelector().select(layer, 5)
    protected = torch.tensor([int(i) for i in range(9) if i not in free.tolist()][:2])
    kept = ReconstructionSelector().select(layer, 5, protected=protected)
    assert len(kept) == 5 and set(protected.tolist()) <= set(kept.tolist()) and kept.tolist() == sorted(kept.tolist())


def test_reconstruction_reward_is_the_relative_output_error(tiny_dir, cache_env):
    """Oracle: the FFN outputs on the same calibration text, recomputed with the removed neurons' activations
    captured at the output module, ||H_R W_R^T||^2 / ||H W^T||^2."""
    from prunenet import loading
    from prunenet.reward import ReconstructionReward

    reward = ReconstructionReward(samples=3, length=8, seed=1)
    reward.setup(str(tiny_dir))
    model = loading.load_model(str(tiny_dir))
    layers = model.model.layers
    states = [layer.mlp.gate_proj.weight.detach() for layer in layers]
    prepared = reward.prepare(list(range(len(layers))), states, "unused")
    kept = [torch.arange(0, 37, 2), torch.arange(10, 37), torch.tensor([0, 5, 36])]
    results = reward.rewards(states, kept, prepared)
    tokens = calibration.calibration_tokens(str(tiny_dir), model, loading.load_tokenizer(str(tiny_dir)),
                                            reward.settings)  # the cached text the reward used
    captured = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: captured.append(a[0].reshape(-1, 37)))
             for layer in layers]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    for layer, h, rows, (error, value) in zip(layers, captured, kept, results):
        w = layer.mlp.down_proj.weight.detach().double()
        removed = torch.ones(37, dtype=torch.bool)
        removed[rows] = False
        h = h.double()
        expected = (h[:, removed] @ w[:, removed].T).pow(2).sum() / (h @ w.T).pow(2).sum()
        # M in float32 (37 x 37 products of float64 sums): 1e-5 relative covers its rounding
        assert float(error) == pytest.approx(float(expected), rel=1e-5)
        assert value == pytest.approx(-float(np.log(float(expected))), abs=1e-4)


def test_a_fit_trains_with_the_reconstruction_reward(tiny_dir, tmp_path, cache_env, extra_args, monkeypatch):
    from tests.conftest import fit_in_process

    passes, real = [], calibration.activation_stats
    monkeypatch.setattr(calibration, "activation_stats", lambda *a, **kw: passes.append(kw.get("gram")) or real(*a, **kw))
    cli = fit_in_process([f"--model.model_name_or_path={tiny_dir}", "--trainer.max_epochs=2",
                          f"--trainer.default_root_dir={tmp_path / 'logs'}", f"--slicing.output_dir={tmp_path / 'o'}",
                          "--model.reward=ReconstructionReward", "--model.reward.init_args.samples=2",
                          "--model.reward.init_args.length=8", "--model.learner=baseline", "--slicing.refit=true"],
                         extra_args, monkeypatch)
    plan = json.loads((tmp_path / "o" / "prunenet.json").read_text())
    assert plan["selection"] == "sample" and plan["reward"] == "reconstruction" and plan["episodes"] == 2
    # the refit reuses the reward's statistics, released after training: one pass of the dense model, not two
    assert passes == [True] and plan["refit"] == {"ridge": 0.01} and plan["calibration"]["samples"] == 2
    assert plan["plug_points"]["reward"]["init_args"]["samples"] == 2
    # -log of a relative error in (0, 1]: finite and >= 0
    assert np.isfinite(plan["final_reward_mean"]) and plan["final_reward_mean"] >= 0
    assert cli.model.reward.matrices == {}  # released after training

"""The activation features a FeaturePolicy reads, the greedy reconstruction order, and a fit that trains on them."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from prunenet.calibration import CalibrationSettings, NeuronStats, reconstruction_matrix
from prunenet.errors import ConfigurationError
from prunenet.features import FEATURES, greedy_order, neuron_features
from prunenet.policy import FeaturePolicy
from prunenet.selectors import LayerInputs, ReconstructionSelector, TopKSelector, WandaSPSelector
from tests.conftest import private_cache


def _layer(seed: int, t: int = 60, n: int = 7, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(t, n, generator=g) * torch.rand(n, generator=g) * 3).double()
    w = torch.randn(d, n, generator=g)
    stats = NeuronStats(t, h.sum(0), (h * h).sum(0), h.T @ h)
    norms = torch.stack([w.abs().sum(0), w.norm(dim=0)])
    return h, w, stats, norms, w.abs().amax(0), reconstruction_matrix(stats.gram, w.T @ w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_order_adds_the_neuron_that_lowers_the_output_error_most(seed):
    """Oracle: at each step, every candidate's error 1_R^T M 1_R evaluated directly."""
    _, _, _, _, _, m = _layer(seed)
    order = greedy_order(m).tolist()
    assert sorted(order) == list(range(7))
    kept: list[int] = []
    for j in order:
        def error(candidate):
            removed = torch.ones(7, dtype=torch.float64)
            removed[kept + [candidate]] = 0
            return float(removed @ m @ removed)
        best = min((c for c in range(7) if c not in kept), key=error)
        # float64 sums of 7 x 7 O(10^3) terms: a tie within 1e-9 relative may go either way
        assert error(j) <= error(best) * (1 + 1e-9)
        kept.append(j)
    assert greedy_order(m, 3, first=[5]).tolist()[0] == 5


def test_features_are_z_scored_and_rank_as_their_definitions():
    h, w, stats, norms, peaks, m = _layer(3)
    x = neuron_features(stats, norms, peaks, m)
    assert x.shape == (7, len(FEATURES)) and x.dtype == torch.float32
    # z-scored columns: mean 0, std 1 (float32 of 7 values: 1e-5)
    torch.testing.assert_close(x.mean(0), torch.zeros(len(FEATURES)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(len(FEATURES)), atol=1e-5, rtol=0)
    col = dict(zip(FEATURES, x.T))
    wanda = h.norm(dim=0) * w.abs().sum(0).double()
    assert torch.equal(col["wanda_sp"].argsort(), wanda.argsort())
    assert torch.equal(col["flap"].argsort(), (h.var(0, unbiased=False) * w.norm(dim=0).double() ** 2).argsort())
    # alignment: the cosine over tokens between neuron j's contribution and the whole output
    out = h @ w.double().T
    cos = torch.stack([(h[:, j:j + 1] @ w[:, j:j + 1].double().T * out).sum()
                       / ((h[:, j:j + 1] @ w[:, j:j + 1].double().T).norm() * out.norm()) for j in range(7)])
    assert torch.equal(col["alignment"].argsort(), cos.argsort())
    assert int(col["recon_rank"].argmax()) == int(greedy_order(m)[0])


def test_a_feature_policy_starts_as_its_init_feature_and_refuses_bad_values():
    _, w, stats, norms, peaks, m = _layer(4)
    layer = LayerInputs(index=0, size=7, activations=stats, output_norms=norms, output_gram=w.T @ w,
                        features=neuron_features(stats, norms, peaks, m))
    policy = FeaturePolicy(7, 5, init="wanda_sp")
    assert torch.equal(TopKSelector(policy).select(layer, 4), WandaSPSelector().select(layer, 4))
    assert policy.hparams()["init"] == "wanda_sp" and policy.hparams()["samples"] == 64
    # the default starts as the recon selection: the greedy order's first k
    assert torch.equal(TopKSelector(FeaturePolicy(7, 5)).select(layer, 4), ReconstructionSelector().select(layer, 4))
    assert policy.hparams()["batch"] == 64


def test_a_feature_policy_saved_before_the_generate_batch_was_recorded_loads_with_batch_16(tmp_path):
    from prunenet.artifacts import load_policy, save_policy

    policy = FeaturePolicy(7, 5, samples=8, seed=2)
    save_policy(tmp_path, policy, {"intermediate_size": 7, "hidden_size": 5})
    assert load_policy(tmp_path)[0].settings.batch == 64
    blob = torch.load(tmp_path / "policy.pt", weights_only=True)
    del blob["meta"]["plug_points"]["policy"]["init_args"]["batch"]  # as an older fit wrote it
    torch.save(blob, tmp_path / "policy.pt")
    loaded = load_policy(tmp_path)[0]
    assert loaded.settings == CalibrationSettings(samples=8, seed=2, batch=16)


def test_a_feature_policy_refuses_bad_values():
    policy = FeaturePolicy(7, 5)
    with pytest.raises(ConfigurationError, match="init must be one of act_rms, .*got 'nope'"):
        FeaturePolicy(7, 5, init="nope")
    with pytest.raises(ConfigurationError, match="scale must be a number > 0, got 0"):
        FeaturePolicy(7, 5, scale=0)
    with pytest.raises(ValueError, match=r"expects its input \(features\) of shape \(7, 9\), got \(7, 5\)"):
        policy.logits(torch.zeros(7, 5))


def test_a_fit_trains_a_feature_policy_on_the_reconstruction_reward(tiny_dir, tmp_path, extra_args, monkeypatch):
    from tests.conftest import fit_in_process

    monkeypatch.setenv("PRUNENET_CACHE", str(private_cache(tmp_path / "cache")))
    text = [f"--model.{kind}.init_args.{k}={v}" for kind, (k, v) in itertools.product(
        ("policy", "reward"), (("samples", 2), ("length", 8)))]
    cli = fit_in_process([f"--model.model_name_or_path={tiny_dir}", "--trainer.max_epochs=3",
                          f"--trainer.default_root_dir={tmp_path / 'logs'}", f"--slicing.output_dir={tmp_path / 'o'}",
                          "--model.policy=FeaturePolicy", "--model.reward=ReconstructionReward",
                          "--model.learner=baseline", "--model.learning_rate=0.1", "--slicing.selection=topk",
                          *text], extra_args, monkeypatch)
    plan = json.loads((tmp_path / "o" / "prunenet.json").read_text())
    assert plan["selection"] == "topk" and plan["policy"] == "features" and plan["episodes"] == 3
    theta = cli.model.policy.theta.detach()
    start = torch.zeros(len(FEATURES))
    start[FEATURES.index("recon_rank")] = 2.0
    assert not torch.equal(theta, start)  # three AdamW steps of lr 0.1 moved it
    # the same features through the slicing's selection inputs (the text and statistics read once)
    assert len(cli.model.features) == 3 and cli.model.features[0].shape == (37, len(FEATURES))
    assert plan["calibration"]["samples"] == 2 and plan["calibration"]["kind"] == "self-generated"
    # the saved policy through prunenet.compress: with no calibration flag it reads the text it was trained on
    from prunenet.compress import main as compress_main

    compress_main(["--model", str(tiny_dir), "--policy", str(tmp_path / "o"), "--selection", "topk",
                   "--output_dir", str(tmp_path / "c")])
    again = json.loads((tmp_path / "c" / "prunenet.json").read_text())
    assert again["kept_indices"] == plan["kept_indices"] and again["calibration"] == plan["calibration"]


def test_the_cost_benchmark_times_every_step(tmp_path):
    from benchmarks.calibration_cost import main

    out = tmp_path / "cost.md"
    main(["--n", "40", "--d", "8", "--tokens", "64", "--layers", "2", "--output", str(out)])
    text = out.read_text()
    for step in ("Gram", "greedy order of the first k = 28", "policy features", "one reconstruction reward"):
        assert step in text

"""FLAP's bias compensation (FLAP, An et al. 2024, bias compensation): ``compress --bias_compensation`` adds
b = W_out[:, R] @ mean(h)[R] to each FFN output bias (``prunenet/compensation.py``, ``prunenet/arch/bias.py``).

(a) the oracle on the calibration tokens: the compensated FFN output's error is the uncompensated error minus its
mean, so its mean is the dense mean; (b) the exported folder reloads plainly with the bias and computes what the
in-memory compensated model computes, and what the dense model computes with the removed activations replaced by
their means; (c) a family that cannot hold the bias is refused in one line before anything is written; (d) the plan
records it and a replay writes byte-identical weights from the plan alone; and each family's output-bias fact
(``ArchAdapter.output_bias``) agrees with the modules transformers builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunenet import calibration
from prunenet.arch import get_adapter, supported_model_types
from prunenet.calibration import CalibrationSettings
from prunenet.compensation import read_record
from prunenet.compress import main as compress_main
from tests.conftest import assert_same_weights, private_cache
from tests.tiny import TINY_FAMILIES, save_tiny, tiny_config, tiny_model

SETTINGS = CalibrationSettings(samples=4, length=16, seed=0)  # 4 sequences: one batch of activation_stats
CAL = ["--calibration_samples", "4", "--calibration_length", "16"]
U32 = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNENET_CACHE", str(private_cache(tmp_path / "cache")))
    return tmp_path / "cache"


def _compress(src: Path, out: Path, *extra: str) -> dict:
    compress_main(["--model", str(src), "--output_dir", str(out), "--compression_ratio", "0.3", *CAL, *extra])
    return json.loads((out / "prunenet.json").read_text())


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    return model.eval(), info


def _kept(plan: dict) -> list[torch.Tensor]:
    return [torch.tensor(plan["kept_indices"][str(i)]) for i in range(plan["num_layers"])]


def _activations(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer the FFN activations h (T, n) of ``model`` on ``tokens``: the FFN output module's input, one batch
    (as ``calibration.activation_stats`` saw them)."""
    adapter, seen = get_adapter(model.config), []
    hooks = [adapter.output_module(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
             for layer in adapter.layers(model)]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    return [h.reshape(-1, h.shape[-1]) for h in seen]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # mlp_bias turned on; Conv1D with its own c_proj bias
def test_the_compensated_error_is_the_uncompensated_error_minus_its_mean(family, tmp_path, cache_env):
    src = save_tiny(tiny_model(family, seed=0), tmp_path / family, tokenizer=True)
    plain = _compress(src, tmp_path / "plain", "--selection", "flap")
    comp = _compress(src, tmp_path / "comp", "--selection", "flap", "--bias_compensation")
    assert plain["kept_indices"] == comp["kept_indices"]
    dense, _ = _load(src)
    adapter = get_adapter(dense.config)
    tokens = calibration.calibration_tokens(str(src), dense, None, SETTINGS, progress=False)  # cached by compress
    models = [adapter.layers(_load(tmp_path / name)[0]) for name in ("comp", "plain")]
    n, d = adapter.intermediate_size(dense.config), adapter.hidden_size(dense.config)
    gamma = (n + 1) * U32 / (1 - (n + 1) * U32)  # float32 sum of n products and a bias: |error| <= gamma * sum |terms|
    checked = 0
    for i, (layer, h) in enumerate(zip(adapter.layers(dense), _activations(dense, tokens))):
        kept = _kept(comp)[i]
        out_d, out_c, out_u = (adapter.output_module(m) for m in (layer, models[0][i], models[1][i]))
        with torch.no_grad():
            y_d, y_c, y_u = out_d(h).double(), out_c(h[:, kept]).double(), out_u(h[:, kept]).double()
        e_c, e_u = y_d - y_c, y_d - y_u  # (T, d): what pruning changes in the FFN output, with and without b
        w = out_d.weight.detach().double().abs()
        terms = h.double().abs() @ (w if adapter.conv1d else w.T)  # (T, d): sum_j |h_j w_j|
        b = (out_c.bias.detach().double() - (0 if out_d.bias is None else out_d.bias.detach().double())).abs()
        bias_d = 0 if out_d.bias is None else out_d.bias.detach().double().abs()
        # The tolerance, from float32 rounding alone (unit roundoff u): an output module sums n products and a bias
        # in float32, |error| <= gamma_{n+1} * sum |terms| per token (bound); the dense and the pruned output carry
        # one each (2 bound); b is the float64 compensation rounded once to float32 (u |b|); the float64 means and
        # sums of these few hundred values are exact to far below the 1e-12 floor.
        bound = gamma * (terms + bias_d + b)
        tol_mean = 2 * bound.mean(0) + U32 * b + 1e-12
        assert ((y_c.mean(0) - y_d.mean(0)).abs() <= tol_mean).all(), (i, (y_c.mean(0) - y_d.mean(0)).abs().max())
        centred = e_u - e_u.mean(0)
        assert ((e_c - centred).abs() <= 2 * bound + tol_mean).all(), (i, (e_c - centred).abs().max())
        # the test has power: the uncompensated error's mean is far above the tolerance
        assert e_u.mean(0).abs().max() > 100 * tol_mean.max()
        checked += 1
    assert checked == len(adapter.layers(dense)) and y_d.shape[1] == d


def test_the_export_reloads_plainly_and_computes_the_mean_replacement(tmp_path, cache_env, plain_load):
    from prunenet.export import export

    model = tiny_model("llama", seed=0)
    src = tmp_path / "sharded"  # several shards and an index: new bias keys go into the weight map
    model.save_pretrained(src, max_shard_size="20KB")
    save_tiny(model, tmp_path / "tok", tokenizer=True)
    for f in (tmp_path / "tok").glob("tok*"):
        (src / f.name).write_bytes(f.read_bytes())
    assert (src / "model.safetensors.index.json").is_file()
    plan = _compress(src, tmp_path / "out", "--selection", "recon", "--bias_compensation")
    assert plan["shardwise"] is True
    pruned, info, messages = plain_load(tmp_path / "out")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")) and not messages, info
    assert pruned.config.mlp_bias is True
    biases = read_record(plan["compensation_biases"], 3, 24, "test")
    for layer, b in zip(pruned.model.layers, biases):
        assert torch.equal(layer.mlp.down_proj.bias.detach(), b)
        assert not layer.mlp.gate_proj.bias.any() and not layer.mlp.up_proj.bias.any()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "model.layers.2.mlp.down_proj.bias" in index["weight_map"]
    # the same compensation applied in memory (export's other path) gives the same tensors and logits
    memory = export(str(src), _kept(plan), tmp_path / "memory", selection="recon", compression_ratio=0.3,
                    shardwise=False, biases=biases).model
    assert_same_weights(pruned, memory)
    ids = torch.randint(3, 98, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned(input_ids=ids).logits, memory(input_ids=ids).logits)
    # oracle: the dense model with each removed activation replaced by its calibration mean
    dense, _ = _load(src)
    tokens = calibration.calibration_tokens(str(src), dense, None, SETTINGS, progress=False)
    means = [s.mean for s in calibration.activation_stats(dense, tokens, progress=False)]

    def mean_replaced(dtype: torch.dtype) -> torch.Tensor:
        ref = _load(src)[0].to(dtype)
        for layer, kept, mean in zip(ref.model.layers, _kept(plan), means):
            removed = torch.ones(37, dtype=torch.bool)
            removed[kept] = False

            def replace(_m, args, removed=removed, mean=mean.to(dtype)):
                h = args[0].clone()
                h[..., removed] = mean[removed]
                return (h,)
            layer.mlp.down_proj.register_forward_pre_hook(replace)
        with torch.no_grad():
            return ref(input_ids=ids).logits

    want = mean_replaced(torch.float64)
    # as tests.conftest.assert_logits_match: the float32 rounding of the whole reference forward bounds what the
    # float32-rounded biases and another summation order may change
    noise32 = float((mean_replaced(torch.float32).double() - want).abs().max())
    tol = max(noise32, 64 * 2.0 ** -52 * float(want.abs().max()))
    with torch.no_grad():
        got = pruned.double()(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=2 * tol)
        for layer in pruned.model.layers:  # power: without the biases the logits miss the reference by far more
            layer.mlp.down_proj.bias.zero_()
        assert (pruned(input_ids=ids).logits - want).abs().max() > 100 * tol


@pytest.mark.parametrize("family,overrides,why", [
    ("mistral", {}, "without a bias"), ("qwen2", {}, "without a bias"), ("gemma3", {}, "without a bias"),
    ("opt", {"enable_bias": False}, "enable_bias=false"),
])
def test_a_family_that_cannot_hold_the_bias_is_refused_in_one_line(family, overrides, why, tmp_path, cache_env,
                                                                   monkeypatch, capsys):
    from prunenet.cli import run_main

    src = save_tiny(tiny_model(family, seed=0, **overrides), tmp_path / family)
    model_type = tiny_config(family).model_type
    monkeypatch.setattr(calibration, "activation_stats", lambda *a, **k: pytest.fail("calibration ran"))
    out = tmp_path / "out"
    capsys.readouterr()  # the save's progress bars
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: compress_main(["--model", str(src), "--output_dir", str(out), "--selection", "flap",
                                        "--bias_compensation"]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --bias_compensation needs an FFN output bias")
    assert f"model_type {model_type!r}" in err and why in err
    assert "llama, granite, smollm3 (mlp_bias)" in err and "gpt2" in err
    assert not out.exists() and not (cache_env / "calibration").exists()


def test_the_plan_records_it_and_a_replay_is_byte_identical(tiny_dir, tmp_path, cache_env, monkeypatch):
    plan = _compress(tiny_dir, tmp_path / "out", "--selection", "peak", "--bias_compensation")  # no activations
    assert plan["bias_compensation"] is True
    assert plan["calibration"] == {**SETTINGS.record(), "tokens": 64}
    biases = read_record(plan["compensation_biases"], 3, 24, "test")
    assert all(b.abs().sum() > 0 for b in biases)
    monkeypatch.setattr(calibration, "activation_stats", lambda *a, **k: pytest.fail("a replay needs no calibration"))
    compress_main(["--from_plan", str(tmp_path / "out"), "--model", str(tiny_dir),
                   "--output_dir", str(tmp_path / "re")])
    replayed = json.loads((tmp_path / "re" / "prunenet.json").read_text())
    for key in ("bias_compensation", "calibration", "compensation_biases", "kept_indices"):
        assert replayed[key] == plan[key], key
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "re" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    # without the flag nothing changes: no bias, no record
    plain = _compress(tiny_dir, tmp_path / "plain", "--selection", "peak")
    assert "bias_compensation" not in plain and "compensation_biases" not in plain
    assert _load(tmp_path / "plain")[0].config.mlp_bias is False


@pytest.mark.parametrize("family", sorted(set(TINY_FAMILIES) & set(supported_model_types())))
def test_each_familys_output_bias_fact_matches_transformers(family):
    """``ArchAdapter.output_bias`` against the modules transformers builds: ``add`` where the FFN output module has a
    bias, ``create`` where it has none and the key gives biases to the FFN modules only, refused where it has none."""
    from transformers import AutoModelForCausalLM

    from prunenet.arch.bias import bias_mode, enable_output_bias
    from prunenet.errors import ConfigurationError

    model = tiny_model(family, seed=0)
    adapter = get_adapter(model.config)
    out = adapter.output_module(adapter.layers(model)[0])
    try:
        mode = bias_mode(adapter, model.config)
    except ConfigurationError:
        assert out.bias is None
        return
    assert (out.bias is not None) == (mode == "add")
    if mode == "create":
        config = tiny_config(family)
        assert enable_output_bias(adapter, config)
        before = {n for n, _ in model.named_parameters()}
        with torch.device("meta"):
            biased = AutoModelForCausalLM.from_config(config)
        ffn = {f".{p}.bias" for p in (*adapter.ffn_inputs, adapter.ffn_output)}
        new = {n for n, _ in biased.named_parameters()} - before
        assert new and all(any(n.endswith(f) for f in ffn) for n in new), sorted(new)

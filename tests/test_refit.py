"""The least-squares refit of the FFN output projection on the kept neurons (``prunenet/refit.py``,
``compress --refit``, ``slicing.refit``).

(a) ``refit_columns`` is the ridge least-squares solution (scipy's ``lstsq`` on the augmented system is the oracle),
with the Conv1D layout the transpose of the Linear one; (b) its error on the text is below plain slicing's by at
least the dampening term; (c) ``compress --refit`` writes exactly those columns (shard-wise
and in memory alike), records the ridge and the text, and a replay rewrites the same weights; with
``--bias_compensation`` the bias is the mean of what the refit still misses; (d) a bad ridge or plan is one line
before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from prunenet import calibration
from prunenet.arch import get_adapter
from prunenet.calibration import CalibrationSettings
from prunenet.compensation import read_record
from prunenet.compress import main as compress_main
from prunenet.errors import ConfigurationError
from prunenet.refit import RIDGE, check_ridge, obs_kept, refit_columns
from prunenet.replay import planned_refit
from tests.conftest import assert_same_weights, private_cache
from tests.tiny import save_tiny, tiny_model

SETTINGS = CalibrationSettings(samples=4, length=16, seed=0)
CAL = ["--calibration_samples", "4", "--calibration_length", "16"]
U32 = 2.0 ** -24  # float32 unit roundoff
U64 = 2.0 ** -53  # float64 unit roundoff


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNENET_CACHE", str(private_cache(tmp_path / "cache")))
    return tmp_path / "cache"


def _problem(seed: int = 0, t: int = 200, n: int = 12, d: int = 5, k: int = 7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    w = torch.randn(d, n, generator=g, dtype=torch.float64)
    kept = torch.sort(torch.randperm(n, generator=g)[:k]).values
    return h, w, kept


def _error(h: torch.Tensor, w: torch.Tensor, kept: torch.Tensor, cols: torch.Tensor) -> float:
    """sum over tokens of ||W h - W'_S h_S||^2."""
    return float(((h @ w.t() - h[:, kept] @ cols.t()) ** 2).sum())


@pytest.mark.parametrize("ridge", [RIDGE, 1e-4, 1.0])
def test_refit_is_the_ridge_least_squares_solution(ridge):
    h, w, kept = _problem()
    gram = h.t() @ h
    got = refit_columns(w, gram, kept, ridge)
    # oracle: min ||H_S X^T - H W^T||^2 + lam ||X - W_S||^2 as one least-squares problem,
    # [H_S; sqrt(lam) I] X^T = [H W^T; sqrt(lam) W_S^T]
    lam = ridge * float(gram[kept][:, kept].diagonal().mean())
    a = np.vstack([h[:, kept].numpy(), np.sqrt(lam) * np.eye(len(kept))])
    b = np.vstack([(h @ w.t()).numpy(), np.sqrt(lam) * w[:, kept].t().numpy()])
    want = torch.from_numpy(scipy.linalg.lstsq(a, b)[0].T)
    # float64 solves of a system of condition number kappa agree to about kappa * u64 relative
    tol = 64 * float(np.linalg.cond(a)) * U64 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    # the Conv1D layout (n, d) gives the transpose (the same solve; only the summation order of a matmul differs)
    torch.testing.assert_close(refit_columns(w.t().contiguous(), gram, kept, ridge, conv1d=True), got.t(),
                               rtol=0, atol=tol)


@pytest.mark.parametrize("seed", range(5))
def test_the_refit_error_is_below_plain_slicing_by_at_least_the_ridge_term(seed):
    h, w, kept = _problem(seed)
    gram = h.t() @ h
    plain, cols = w[:, kept], refit_columns(w, gram, kept)
    lam = RIDGE * float(gram[kept][:, kept].diagonal().mean())
    # W'_S minimises error + lam ||X - W_S||^2, whose value at X = W_S is error(W_S): so error(W'_S) <= error(W_S)
    # - lam ||W'_S - W_S||^2
    bound = _error(h, w, kept, plain) - lam * float(((cols - plain) ** 2).sum())
    assert _error(h, w, kept, cols) <= bound * (1 + 1e-9)  # float64 sums of 200 x 5 squares
    assert _error(h, w, kept, cols) < 0.9 * _error(h, w, kept, plain)  # and it does help on correlated neurons


def test_dead_kept_neurons_keep_their_own_columns():
    h, w, kept = _problem()
    h[:, kept[:2]] = 0.0  # two kept neurons never fire on the text: nothing to fit, the dampening keeps W_S
    cols = refit_columns(w, h.t() @ h, kept)
    # (G[S, S] + lam I) is block diagonal for them: lam x / lam, one rounding of a solve away from w
    torch.testing.assert_close(cols[:, :2], w[:, kept[:2]], rtol=0, atol=64 * U64 * float(w.abs().max()))
    assert torch.isfinite(cols).all()
    torch.testing.assert_close(refit_columns(w, torch.zeros(12, 12, dtype=torch.float64), kept), w[:, kept],
                               rtol=0, atol=4 * U64 * float(w.abs().max()))


def _dampened_error(w: torch.Tensor, hd: torch.Tensor, keep: list[int]) -> float:
    """min over X supported on ``keep`` of tr((W - X) H (W - X)^T), H the dampened Gram: by its normal equations."""
    s = torch.tensor(keep)
    x = torch.linalg.solve(hd[s][:, s], (w @ hd[:, s]).t()).t()
    full = torch.zeros_like(w)
    full[:, s] = x
    return float(torch.trace((w - full) @ hd @ (w - full).t()))


@pytest.mark.parametrize("seed", range(4))
def test_obs_removes_the_neuron_that_costs_least_after_the_refit_each_step(seed):
    h, w, _ = _problem(seed, t=60, n=9, d=4)
    gram = h.t() @ h
    hd = gram + RIDGE * float(gram.diagonal().mean()) * torch.eye(9, dtype=torch.float64)
    protected = torch.tensor([seed])  # never removed
    keep = list(range(9))
    for _ in range(9 - 4):  # brute force: every candidate's cost with the rest refit, the cheapest goes
        costs = {j: _dampened_error(w, hd, [i for i in keep if i != j]) for j in keep if j != seed}
        keep.remove(min(costs, key=costs.get))
    got = obs_kept(gram, w.t() @ w, 4, protected)
    assert got.tolist() == keep and seed in keep


def test_obs_keeps_k_rows_when_more_are_protected_and_refuses_a_bad_width():
    h, w, _ = _problem(0, t=60, n=9, d=4)
    gram = h.t() @ h
    assert obs_kept(gram, w.t() @ w, 3, torch.tensor([1, 4, 6, 8])).tolist() == [1, 4, 6]  # the first k, as recon
    for k in (0, 10):
        with pytest.raises(ConfigurationError, match=rf"kept width must lie in \[1, 9\], got {k}"):
            obs_kept(gram, w.t() @ w, k)
    with pytest.raises(ConfigurationError, match="Gram holds NaN or Inf"):
        obs_kept(gram * float("inf"), w.t() @ w, 3)


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), "a", None])
def test_a_bad_ridge_is_one_line(bad):
    with pytest.raises(ConfigurationError, match=r"refit ridge must be a finite number > 0") as err:
        check_ridge(bad)
    assert "\n" not in str(err.value) and repr(bad) in str(err.value)


def _compress(src: Path, out: Path, *extra: str) -> dict:
    compress_main(["--model", str(src), "--output_dir", str(out), "--compression_ratio", "0.3", *CAL, *extra])
    return json.loads((out / "prunenet.json").read_text())


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


# nn.Linear (d, n); Conv1D (n, d) with its own bias; each with one of the selections the refit is made for
@pytest.mark.parametrize("family, selection, dtype", [("llama", "recon", torch.float32), ("gpt2", "obs", torch.float32),
                                                     ("llama", "wanda_sp", torch.bfloat16)])
def test_compress_refit_writes_the_refit_columns_and_a_replay_rewrites_them(family, selection, dtype, tmp_path,
                                                                          cache_env):
    src = save_tiny(tiny_model(family, seed=0).to(dtype), tmp_path / family, tokenizer=True)
    plain = _compress(src, tmp_path / "plain", "--selection", selection)
    plan = _compress(src, tmp_path / "refit", "--selection", selection, "--refit")
    assert plan["kept_indices"] == plain["kept_indices"] and plan["shardwise"]
    assert plan["refit"] == {"ridge": RIDGE} and plan["calibration"]["samples"] == 4 and "refit" not in plain
    dense = _load(src)
    adapter = get_adapter(dense.config)
    tokens = calibration.calibration_tokens(str(src), dense, None, SETTINGS, progress=False)  # cached by compress
    stats = calibration.activation_stats(dense, tokens, progress=False, gram=True)
    models = {name: adapter.layers(_load(tmp_path / name)) for name in ("refit", "plain")}
    activations = _ffn_inputs(dense, tokens)
    for i, layer in enumerate(adapter.layers(dense)):
        kept = torch.tensor(plan["kept_indices"][str(i)])
        w = adapter.output_module(layer).weight.detach()
        want = refit_columns(w, stats[i].gram, kept, conv1d=adapter.conv1d)
        got = adapter.output_module(models["refit"][i]).weight.detach()
        # the same float64 computation rounded once to the stored dtype: at most one rounding (2 units) apart
        unit = 2.0 ** -8 if dtype == torch.bfloat16 else U32
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2 * unit * float(want.abs().max()))
        # and the layer's FFN output on the text is closer to the dense one than plain slicing's
        h = torch.cat(activations[i])  # (T, n)
        dense_out = h @ (w.double() if adapter.conv1d else w.double().t())  # (T, d)
        errors = {name: float(((dense_out - h[:, kept] @ _as_linear(adapter, mods[i]).t()) ** 2).sum())
                  for name, mods in models.items()}
        assert errors["refit"] < errors["plain"], (i, errors)
    # the in-memory path (a dtype given) writes the same tensors as the shard-wise one, and a replay recomputes them
    _compress(src, tmp_path / "memory", "--selection", selection, "--refit", "--dtype", str(dtype).split(".")[1])
    compress_main(["--from_plan", str(tmp_path / "refit" / "prunenet.json"), "--model", str(src),
                   "--output_dir", str(tmp_path / "replay")])
    replayed = json.loads((tmp_path / "replay" / "prunenet.json").read_text())
    assert replayed["refit"] == plan["refit"] and replayed["kept_indices"] == plan["kept_indices"]
    for name in ("memory", "replay"):
        assert_same_weights(_load(tmp_path / "refit"), _load(tmp_path / name))


def _ffn_inputs(model, tokens: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per layer the FFN activations h (T, n) in float64 (the output module's input)."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [adapter.output_module(layer).register_forward_pre_hook(
        lambda _m, args, i=i: out[i].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for hook in hooks:
        hook.remove()
    return out


def _as_linear(adapter, layer) -> torch.Tensor:
    """The output module's weight as nn.Linear holds it, (d, k), float64."""
    w = adapter.output_module(layer).weight.detach().double()
    return w.t() if adapter.conv1d else w


def test_refit_with_bias_compensation_restores_the_mean_output(tmp_path, cache_env):
    src = save_tiny(tiny_model("llama", seed=0), tmp_path / "llama", tokenizer=True)
    plan = _compress(src, tmp_path / "both", "--selection", "recon", "--refit", "--bias_compensation")
    dense, pruned = _load(src), _load(tmp_path / "both")
    adapter = get_adapter(dense.config)
    tokens = calibration.calibration_tokens(str(src), dense, None, SETTINGS, progress=False)
    stats = calibration.activation_stats(dense, tokens, progress=False)
    biases = read_record(plan["compensation_biases"], plan["num_layers"], dense.config.hidden_size, "plan")
    for i, (layer, mine) in enumerate(zip(adapter.layers(dense), adapter.layers(pruned))):
        kept = torch.tensor(plan["kept_indices"][str(i)])
        mean = stats[i].mean
        w = adapter.output_module(layer).weight.detach().double()
        out = adapter.output_module(mine)
        want = w @ mean  # the dense FFN output's mean on the text
        got = out.weight.detach().double() @ mean[kept] + out.bias.detach().double()
        assert torch.equal(out.bias.detach(), biases[i])
        # float32 weights and bias: a sum of k + 1 terms, each rounded once
        tol = (len(kept) + 2) * U32 * float((out.weight.detach().double().abs() @ mean[kept].abs()).max() + 1e-30)
        torch.testing.assert_close(got, want, rtol=0, atol=tol + 4 * U32 * float(out.bias.abs().max()))


def test_a_bad_refit_ridge_writes_nothing(tmp_path, cache_env, capsys):
    from prunenet.cli import run_main

    src = save_tiny(tiny_model("llama", seed=0), tmp_path / "llama", tokenizer=True)
    capsys.readouterr()  # save_tiny's progress bars
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: compress_main(["--model", str(src), "--output_dir", str(tmp_path / "out"), "--refit",
                                        "--refit_ridge", "0", *CAL]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refit ridge must be a finite number > 0") and "got 0.0" in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_plan_with_refit_but_no_text_is_one_line():
    with pytest.raises(ConfigurationError, match="has refit but no readable calibration") as err:
        planned_refit({"refit": {"ridge": 0.01}}, "'p.json'")
    assert "\n" not in str(err.value)
    settings, ridge = planned_refit({"refit": {"ridge": 0.05}, "calibration": {**SETTINGS.record(), "tokens": 64}}, "p")
    assert settings == SETTINGS and ridge == 0.05
    assert planned_refit({}, "p") is None
    with pytest.raises(ConfigurationError, match="no readable calibration settings or ridge"):
        planned_refit({"refit": {}, "calibration": SETTINGS.record()}, "p")
    from prunenet.errors import PruneNetWarning

    with pytest.warns(PruneNetWarning, match="wrote on cuda:0; the replay writes it on the CPU"):
        planned_refit({"refit": {"ridge": 0.01}, "calibration": {**SETTINGS.record(), "device": "cuda:0"}}, "p")


def test_a_per_neuron_selection_with_refit_runs_one_activation_pass(tmp_path, cache_env, monkeypatch):
    """wanda_sp needs no Gram, the refit does: the one pass computes it from the start."""
    src = save_tiny(tiny_model("llama", seed=0), tmp_path / "llama", tokenizer=True)
    calls, real = [], calibration.activation_stats
    monkeypatch.setattr(calibration, "activation_stats", lambda *a, **kw: calls.append(kw.get("gram")) or real(*a, **kw))
    plan = _compress(src, tmp_path / "out", "--selection", "wanda_sp", "--refit")
    assert calls == [True] and plan["refit"] == {"ridge": RIDGE}

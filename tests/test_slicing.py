"""prunenet.slicing: sampler, kept width, exact slicing, save/reload round trip, atomic writes."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from prunenet.artifacts import PLAN_FILE, POLICY_FILE, atomic_write_dir
from prunenet.errors import ConfigurationError, InvalidProbabilitiesError, OutputExistsError
from prunenet.export import save_pruned
from prunenet.policy import SparsityPredictor
from prunenet.selection import kept_width, sample_rows
from prunenet.selectors import SELECTIONS, LayerInputs, build_selector, select_layers
from prunenet.slicing import count_parameters, slice_model
from tests.conftest import assert_logits_match, assert_same_weights
from tests.tiny import tiny_llama

# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sample_rows_refuses_non_finite(bad):
    p = torch.rand(10)
    p[3] = bad
    with pytest.raises(InvalidProbabilitiesError, match="layer 7"):
        sample_rows(p, 4, layer=7)


def test_sample_rows_refuses_fewer_positive_than_k():
    p = torch.zeros(10)
    p[[1, 4, 8]] = 0.5
    with pytest.raises(InvalidProbabilitiesError, match=r"layer 12.*k=4"):
        sample_rows(p, 4, layer=12)
    with pytest.raises(InvalidProbabilitiesError, match="layer blocks.3"):
        sample_rows(torch.zeros(5), 1, layer="blocks.3")


@pytest.mark.parametrize("n,k", [(37, 25), (37, 1), (37, 37), (10, 9)])
def test_sample_rows_returns_k_sorted_distinct(n, k):
    p = torch.rand(n, generator=torch.Generator().manual_seed(n + k)) + 1e-3
    rows = sample_rows(p, k, generator=torch.Generator().manual_seed(0), layer=0)
    assert rows.dtype == torch.long and rows.shape == (k,)
    assert rows.unique().numel() == k
    assert torch.equal(rows, rows.sort().values)
    assert int(rows.min()) >= 0 and int(rows.max()) < n
    again = sample_rows(p, k, generator=torch.Generator().manual_seed(0), layer=0)
    assert torch.equal(rows, again)


def test_sample_rows_with_exactly_k_positive_returns_them():
    p = torch.zeros(37)
    positive = torch.tensor([2, 5, 11, 30])
    p[positive] = torch.tensor([0.1, 0.9, 0.5, 0.3])
    rows = sample_rows(p, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rows, positive)


# ----------------------------------------------------------------------------- kept width


def _exact_kept(n, r):
    return math.floor((1 - Fraction(str(r))) * n)


@pytest.mark.parametrize("n", [10, 37, 1536, 2048, 11008])
@pytest.mark.parametrize("r", [0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9, 0.95])
def test_kept_width_is_floor_of_kept_fraction(n, r):
    expected = _exact_kept(n, r)
    if expected >= 1:
        assert kept_width(n, r) == expected
    else:
        with pytest.raises(ConfigurationError, match="keeps no row"):
            kept_width(n, r)


def test_kept_width_float_error_is_absorbed():
    # (1 - 0.9) * 10 == 0.9999999999999998 in floats; the paper's floor((1 - r) n) is 1.
    assert (1 - 0.9) * 10 < 1
    assert kept_width(10, 0.9) == 1


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5, float("nan"), "abc", None])
def test_kept_width_rejects_bad_ratio(r):
    with pytest.raises(ConfigurationError, match="compression_ratio"):
        kept_width(37, r)


def test_kept_width_rejects_ratio_that_keeps_no_row():
    with pytest.raises(ConfigurationError, match=r"0\.99.*37"):
        kept_width(37, 0.99)


# ----------------------------------------------------------------------------- exact slicing


def _random_kept(n, k, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:k].sort().values for _ in range(layers)]


def _ids(vocab=101, batch=2, length=11):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("where", ["down", "inputs"])
def test_sliced_logits_equal_dense_with_removed_neurons_zeroed(tied, dtype, where, zero_removed):
    n, k = 37, 23
    pruned = tiny_llama(seed=1, tie_word_embeddings=tied).to(dtype)
    dense = tiny_llama(seed=1, tie_word_embeddings=tied).to(dtype)
    cfg = pruned.config
    assert cfg.intermediate_size == n and cfg.num_key_value_heads < cfg.num_attention_heads
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied
    ids = _ids()
    with torch.no_grad():
        full = dense(ids).logits
    kept = _random_kept(n, k, cfg.num_hidden_layers)
    params_before = count_parameters(pruned)

    assert slice_model(pruned, kept) is pruned
    zero_removed(dense, kept, where)
    assert_logits_match(pruned, dense, ids)
    with torch.no_grad():
        assert not torch.allclose(pruned(ids).logits, full, atol=1e-3)  # the removed neurons did matter

    assert pruned.config.intermediate_size == k
    d = cfg.hidden_size
    for layer, idx in zip(pruned.model.layers, kept):
        mlp = layer.mlp
        assert mlp.gate_proj.weight.shape == (k, d) and mlp.up_proj.weight.shape == (k, d)
        assert mlp.down_proj.weight.shape == (d, k)
        assert mlp.gate_proj.out_features == k and mlp.down_proj.in_features == k
    assert count_parameters(pruned) == params_before - 3 * d * (n - k) * cfg.num_hidden_layers
    # a tied model stays tied
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied


def test_slice_model_keeps_exactly_the_chosen_rows():
    model = tiny_llama(seed=2)
    ref = tiny_llama(seed=2)
    kept = _random_kept(37, 20, 3, seed=3)
    slice_model(model, kept)
    for layer, ref_layer, idx in zip(model.model.layers, ref.model.layers, kept):
        assert torch.equal(layer.mlp.gate_proj.weight, ref_layer.mlp.gate_proj.weight[idx])
        assert torch.equal(layer.mlp.up_proj.weight, ref_layer.mlp.up_proj.weight[idx])
        assert torch.equal(layer.mlp.down_proj.weight, ref_layer.mlp.down_proj.weight[:, idx])


@pytest.mark.parametrize("kept,match", [
    ([torch.arange(5)] * 2, "2 layers, the model has 3"),
    ([torch.arange(5), torch.arange(5), torch.arange(6)], "same number"),
    ([torch.arange(5), torch.arange(5), torch.tensor([0, 1, 2, 3, 37])], "layer 2"),
    ([torch.arange(5), torch.tensor([0, 0, 1, 2, 3]), torch.arange(5)], "layer 1"),
])
def test_slice_model_refuses_bad_indices_without_touching_weights(kept, match):
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigurationError, match=match):
        slice_model(model, kept)
    assert model.config.intermediate_size == 37
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _policy_rows(policy, states, k, selection, seed=0):
    layers = [LayerInputs(index=i, size=w.shape[0], state=w) for i, w in enumerate(states)]
    return select_layers(build_selector(selection, policy=policy, seed=seed), layers, k)


def test_policy_selections_sample_and_topk():
    torch.manual_seed(0)
    policy = SparsityPredictor(37, 24)
    states = [torch.randn(37, 24, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    a = _policy_rows(policy, states, 25, "sample", seed=4)
    b = _policy_rows(policy, states, 25, "sample", seed=4)
    c = _policy_rows(policy, states, 25, "sample", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    for idx in a:
        assert idx.shape == (25,) and idx.unique().numel() == 25 and torch.equal(idx, idx.sort().values)
    top = _policy_rows(policy, states, 25, "topk")
    for w, idx in zip(states, top):
        z = policy.logits(w)
        assert float(z[idx].min()) >= float(z[[j for j in range(37) if j not in set(idx.tolist())]].max())
    with pytest.raises(ConfigurationError, match="selection must be one of sample, topk, random, magnitude, peak, wanda_sp, flap, recon, obs, "
                                                 "got 'greedy'"):
        build_selector("greedy", policy=policy)


def test_one_selection_vocabulary():
    """Every selection has one name, used by fit configs, compress, plans and benchmarks; no second list of
    names exists in the code (the registry is built from the classes)."""
    import re
    from pathlib import Path

    assert list(SELECTIONS) == ["sample", "topk", "random", "magnitude", "peak", "wanda_sp", "flap", "recon", "obs"]
    assert all(cls.name == name for name, cls in SELECTIONS.items())
    root = Path(__file__).resolve().parents[1]
    code = "\n".join(p.read_text() for d in ("prunenet", "callbacks", "benchmarks") for p in (root / d).rglob("*.py"))
    assert not re.search(r"SELECTION_MODES|\bMETHODS = \(\"prunenet\"|\"uniform\"\)", code)
    assert re.findall(r'choices=list\(SELECTIONS\)', code)  # compress offers the registry itself


# ----------------------------------------------------------------------------- save + plain reload


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_through_plain_from_pretrained(tmp_path, tied, plain_load, zero_removed):
    n, r = 37, 0.3
    k = kept_width(n, r)
    assert k == math.floor((1 - Fraction("0.3")) * n)
    model = tiny_llama(seed=4, tie_word_embeddings=tied)
    kept = _random_kept(n, k, model.config.num_hidden_layers, seed=9)
    slice_model(model, kept)
    ids = _ids()
    torch.manual_seed(0)
    policy = SparsityPredictor(n, 24)
    plan = {"compression_ratio": r, "kept_indices": {str(i): idx.tolist() for i, idx in enumerate(kept)}}
    out = save_pruned(model, tmp_path / "pruned", plan, policy=policy, policy_meta={"intermediate_size": n})
    assert out == tmp_path / "pruned"

    reloaded, info, messages = plain_load(out)
    assert reloaded.config.intermediate_size == k
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [m for m in messages if "mismatch" in m.lower() or "newly initialized" in m.lower()], messages
    assert_same_weights(reloaded, model)
    assert_logits_match(reloaded, model, ids)
    # and it is still the dense model with the removed neurons zeroed
    assert_logits_match(reloaded, zero_removed(tiny_llama(seed=4, tie_word_embeddings=tied), kept), ids)

    saved_plan = json.loads((out / PLAN_FILE).read_text())
    assert saved_plan["kept_indices"] == {str(i): idx.tolist() for i, idx in enumerate(kept)}
    saved_policy = torch.load(out / POLICY_FILE, weights_only=True)
    assert saved_policy["meta"] == {"policy": "sparsity_predictor", "intermediate_size": n,  # the class, to rebuild it
                                    "plug_points": {"policy": {"class_path": "prunenet.policy.SparsityPredictor",
                                                               "init_args": {}}}}
    for key, value in policy.state_dict().items():
        assert torch.equal(saved_policy["state_dict"][key], value)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_reload_check_does_see_size_mismatches(tmp_path, plain_load):
    """Negative control: the warning capture of the round-trip test is able to fail."""
    model = tiny_llama(seed=4)
    slice_model(model, _random_kept(37, 20, 3))
    out = save_pruned(model, tmp_path / "pruned", {})
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 37
    (out / "config.json").write_text(json.dumps(cfg))
    _, info, messages = plain_load(out, ignore_mismatched_sizes=True)
    assert info["mismatched_keys"]
    assert any("mismatch" in m.lower() for m in messages)


# ----------------------------------------------------------------------------- atomic writes


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_non_empty_dir_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "a.bin").write_bytes(b"\x00\x01")
    before = _snapshot(out)
    model = tiny_llama(seed=0)
    slice_model(model, _random_kept(37, 20, 3))
    with pytest.raises(OutputExistsError, match=str(out)):
        save_pruned(model, out, {"x": 1})
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp sibling left


def test_overwrite_replaces_the_folder(tmp_path, plain_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    model = tiny_llama(seed=0)
    slice_model(model, _random_kept(37, 20, 3))
    save_pruned(model, out, {"x": 1}, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file() and json.loads((out / PLAN_FILE).read_text()) == {"x": 1}
    assert plain_load(out)[0].config.intermediate_size == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_dir_is_accepted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    atomic_write_dir(out, False, lambda tmp: (tmp / "f").write_text("new"))
    assert (out / "f").read_text() == "new"


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        atomic_write_dir(target, True, lambda tmp: None)
    assert target.read_text() == "x"


@pytest.mark.parametrize("existing", [False, True])
def test_crash_during_write_leaves_previous_state(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")
    before = _snapshot(out) if existing else None

    def write(tmp):
        (tmp / "partial").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(out, True, write)
    if existing:
        assert _snapshot(out) == before
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])

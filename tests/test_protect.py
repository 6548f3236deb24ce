"""Protected outlier neurons (``protect_outliers``, ours): the neurons whose FFN output column has the
largest max-|w| are kept by every selection method, in training draws and in the final selection,
and recorded in the plan. Exact integer checks: no tolerance needed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prunenet.arch import get_adapter
from prunenet.artifacts import PLAN_FILE
from prunenet.compress import main as compress_main
from prunenet.errors import ConfigurationError
from benchmarks.common import select_rows
from prunenet.selection import FINAL_EPISODE, draw_kept, kept_width, layer_generator, protected_rows, uniform_kept
from prunenet.selectors import LayerInputs, build_selector, select_layers
from prunenet.states import load_output_peaks
from tests.conftest import fit_in_process, one_line_error, run_fit
from tests.tiny import TINY_FAMILIES, tiny_model

N = 37  # the tiny models' FFN width


def _peaks(weights: dict, layer: int) -> torch.Tensor:
    """Oracle: max |w| of each down_proj column (LLaMA stores it (d, n))."""
    return weights[f"model.layers.{layer}.mlp.down_proj.weight"].abs().amax(dim=0)


def test_protected_rows_are_the_largest_peaks_and_their_count_is_rounded():
    peaks = torch.tensor([0.1, 5.0, 0.3, 9.0, 0.2, 0.4, 7.0, 0.5, 0.6, 0.7])
    assert protected_rows(peaks, 0.3).tolist() == [1, 3, 6]
    assert protected_rows(peaks, 0.26).tolist() == [1, 3, 6]  # round(2.6) = 3
    assert protected_rows(peaks, 0.0).numel() == 0  # the paper: none


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "lots", None])
def test_protect_fraction_outside_0_1_is_refused(bad):
    with pytest.raises(ConfigurationError, match="protect_outliers must be"):
        protected_rows(torch.ones(5), bad)


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
def test_output_peaks_follow_each_familys_orientation(model_type):
    """The oracle slices neuron j's output column with the adapter's own slicing (the one place that
    knows Linear vs Conv1D) and takes its max |w|."""
    model = tiny_model(model_type)
    adapter = get_adapter(model.config)
    for layer in adapter.layers(model):
        weight = adapter.output_module(layer).weight.detach()
        n = adapter.intermediate_size(model.config)
        expected = torch.stack([adapter.slice_tensor(weight, torch.tensor([j]), "output", "weight").abs().max()
                                for j in range(n)]).float()
        assert torch.equal(adapter.output_peaks(weight), expected)


def test_streamed_peaks_equal_the_loaded_models(tiny_dir):
    weights = load_file(tiny_dir / "model.safetensors")
    peaks = load_output_peaks(str(tiny_dir))
    assert len(peaks) == 3
    for i, p in enumerate(peaks):
        assert torch.equal(p, _peaks(weights, i).float())


def test_every_method_keeps_the_protected_rows():
    n, k = 40, 12
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(n, 6, generator=gen) for _ in range(3)]
    norms = [w.norm(dim=1) for w in states]
    protected = [torch.tensor([0, 7, 39]), torch.tensor([5]), torch.tensor([], dtype=torch.long)]
    for method in ("random", "magnitude"):
        kept = select_rows(method, k, 3, states=states, row_norms=norms, protected=protected)
        for rows, fixed in zip(kept, protected):
            assert rows.numel() == k == rows.unique().numel()
            assert set(fixed.tolist()) <= set(rows.tolist()), method
    probs = torch.rand(n, generator=gen)
    kept, drawn = draw_kept(probs, k, protected[0], generator=torch.Generator().manual_seed(1))
    assert kept.numel() == k and drawn.numel() == k - 3
    assert not set(drawn.tolist()) & {0, 7, 39} and set(kept.tolist()) == set(drawn.tolist()) | {0, 7, 39}


def test_random_without_protection_is_the_seeded_permutation_prefix():
    """Seeds of earlier results (benchmarks/results) pick the same rows as before protection existed."""
    states = [torch.zeros(37, 4), torch.zeros(37, 4)]
    kept = select_rows("random", 10, 5, states=states)
    for i, rows in enumerate(kept):
        old = torch.randperm(37, generator=layer_generator(5, FINAL_EPISODE, i))[:10].sort().values
        assert torch.equal(rows, old)
        assert torch.equal(uniform_kept(37, 10, layer_generator(5, FINAL_EPISODE, i)), old)


def test_compress_random_with_protection_keeps_the_top_peaks_and_records_it(tiny_dir, tmp_path):
    out = tmp_path / "r"
    compress_main(["--selection", "random", "--model", str(tiny_dir), "--compression_ratio", "0.5",
                   "--protect_outliers", "0.2", "--output_dir", str(out)])
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["protect_outliers"] == 0.2
    weights = load_file(tiny_dir / "model.safetensors")
    for i, rows in ((int(i), rows) for i, rows in plan["kept_indices"].items()):
        top = torch.topk(_peaks(weights, i), round(0.2 * N)).indices.tolist()
        assert set(top) <= set(rows) and len(rows) == kept_width(N, 0.5)


def test_a_fit_with_protection_keeps_them_in_every_draw_and_in_its_plan(tiny_dir, tmp_path, extra_args,
                                                                        monkeypatch):
    import prunenet.module

    out = tmp_path / "fit"
    training_draws = []

    def recording_draw(*args, **kwargs):
        kept, drawn = draw_kept(*args, **kwargs)
        training_draws.append((kept, drawn))
        return kept, drawn

    monkeypatch.setattr(prunenet.module, "draw_kept", recording_draw)
    cli = fit_in_process(["--model.model_name_or_path", str(tiny_dir), "--model.protect_outliers=0.25",
                          "--model.learner=baseline", "--trainer.max_epochs=2",
                          f"--trainer.default_root_dir={tmp_path}", f"--slicing.output_dir={out}"],
                         extra_args, monkeypatch)
    module = cli.model
    weights = load_file(tiny_dir / "model.safetensors")
    tops = [set(torch.topk(_peaks(weights, i), round(0.25 * N)).indices.tolist()) for i in range(3)]
    assert [set(p.tolist()) for p in module.protected] == tops
    for selection in ("sample", "topk"):
        for rows, top in zip(module.kept_indices(selection), tops):
            assert top <= set(rows.tolist())
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["protect_outliers"] == 0.25 and plan["learner"] == "baseline"
    assert all(top <= set(plan["kept_indices"][str(i)]) for i, top in enumerate(tops))
    # Training draws too (2 episodes x 3 layers), and the learner's draw never includes them.
    assert len(training_draws) == 6
    for j, (kept, drawn) in enumerate(training_draws):
        assert tops[j % 3] <= set(kept.tolist()) and not tops[j % 3] & set(drawn.tolist())


def test_bad_protect_fraction_is_a_one_line_error(tiny_dir, tmp_path):
    # the fit's --model.protect_outliers=1.5 is one of test_fit_cli's BAD_FLAGS (one shared start-up)
    res = run_fit("--model", str(tiny_dir), "--output_dir", str(tmp_path / "o"), "--protect_outliers", "-0.1",
                  "--selection", "random", "--compression_ratio", "0.3", extra=[], module="prunenet.compress")
    assert "protect_outliers must be a finite number in [0, 1)" in one_line_error(res)
    assert not (tmp_path / "o").exists()


def test_random_selection_keeps_the_protected_rows_and_ignores_any_policy():
    """``random`` needs no policy and is the same rows whoever draws them (the fit's former ``uniform``)."""
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(N, 6, generator=gen) for _ in range(2)]
    protected = [torch.tensor([3, 30]), torch.tensor([0])]
    layers = [LayerInputs(index=i, size=N, state=w) for i, w in enumerate(states)]
    rows = select_layers(build_selector("random", seed=4), layers, 20, protected)
    expected = [uniform_kept(N, 20, layer_generator(4, FINAL_EPISODE, i), p) for i, p in enumerate(protected)]
    assert all(torch.equal(x, y) for x, y in zip(rows, expected))
    assert {3, 30} <= set(rows[0].tolist()) and 0 in rows[1].tolist()
    with pytest.raises(ConfigurationError, match="selection 'sample' needs a trained policy"):
        build_selector("sample", seed=4)


def test_peak_selection_keeps_the_largest_output_peaks_and_contains_the_protected_rows():
    from prunenet.selection import peak_kept

    gen = torch.Generator().manual_seed(2)
    peaks = [torch.rand(N, generator=gen) for _ in range(2)]  # continuous: no ties
    for k in (1, 20, N):
        oracle = [sorted(torch.argsort(p, descending=True)[:k].tolist()) for p in peaks]
        assert [rows.tolist() for rows in select_rows("peak", k, peaks=peaks)] == oracle
        assert [peak_kept(p, k).tolist() for p in peaks] == oracle
    # protect_outliers ranks by the same peaks, so its rows are always among the peak selection's.
    assert set(protected_rows(peaks[0], 0.2).tolist()) <= set(peak_kept(peaks[0], 20).tolist())
    # Rows protected for another reason are kept too (the rest by peak).
    rows = select_rows("peak", 20, peaks=peaks, protected=[torch.argsort(peaks[0])[:2], torch.tensor([], dtype=torch.long)])
    assert set(torch.argsort(peaks[0])[:2].tolist()) <= set(rows[0].tolist()) and rows[0].numel() == 20


def test_compress_with_peak_keeps_the_largest_output_peaks_and_a_fit_refuses_peak(tiny_dir, tmp_path, extra_args,
                                                                                  monkeypatch):
    """The data-free ``peak`` rule is a compress run (the same rows as the oracle: the tiny model's float32
    peaks have no ties); a fit, which trains a policy, refuses it and a zero-episode budget, before any work."""
    weights = load_file(tiny_dir / "model.safetensors")
    k = kept_width(N, 0.3)
    oracle = {str(i): sorted(torch.argsort(_peaks(weights, i), descending=True)[:k].tolist()) for i in range(3)}
    compress_main(["--selection", "peak", "--model", str(tiny_dir), "--compression_ratio", "0.3",
                   "--output_dir", str(tmp_path / "c")])
    plan = json.loads((tmp_path / "c" / PLAN_FILE).read_text())
    assert plan["kept_indices"] == oracle and plan["selection"] == "peak" and "method" not in plan
    base = ["--model.model_name_or_path", str(tiny_dir), f"--trainer.default_root_dir={tmp_path / 'logs'}",
            f"--slicing.output_dir={tmp_path / 'f'}"]
    with pytest.raises(ConfigurationError, match="slicing.selection 'peak' does not use the policy.*prunenet.compress"):
        fit_in_process([*base, "--slicing.selection=peak"], extra_args, monkeypatch)
    with pytest.raises(ConfigurationError, match="trainer.max_epochs must be >= 1 episode, got 0.*prunenet.compress"):
        fit_in_process([*base, "--trainer.max_epochs=0"], extra_args, monkeypatch)
    with pytest.raises(ConfigurationError, match="trainer.limit_train_batches must not be 0.*prunenet.compress"):
        fit_in_process([*base, "--trainer.limit_train_batches=0"], extra_args, monkeypatch)
    assert not (tmp_path / "f").exists() and not (tmp_path / "logs").exists()

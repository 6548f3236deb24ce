"""The benchmark scripts' own arithmetic: selection scoring (scipy/numpy oracles) and the quality table."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from benchmarks.quality import write_report
from benchmarks.selection_ks import method_label, score_plan


def _states(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Rows with different norms, so the kept-row norm ratio depends on which rows are kept.
    return [torch.randn(12, 5, generator=g) * torch.linspace(0.5, 2.0, 12).unsqueeze(1) for _ in range(2)]


def test_score_plan_matches_scipy_and_numpy():
    states = _states()
    kept = {"0": [0, 2, 4, 6, 8, 10, 11], "1": [5, 6, 7, 8, 9, 10, 11]}
    score = score_plan({"kept_indices": kept}, states, reference={})
    ks, norm_ratio = [], []
    for i, rows in kept.items():
        w = states[int(i)].numpy().astype(np.float64)
        full, part = np.linalg.svd(w, compute_uv=False), np.linalg.svd(w[rows], compute_uv=False)
        ks.append(ks_2samp(full, part).statistic)
        norms = np.linalg.norm(w, axis=1)
        norm_ratio.append(norms[rows].mean() / norms.mean())
    assert score["ks"] == pytest.approx(np.mean(ks), abs=1e-9)
    assert score["reward"] == pytest.approx(np.mean([1 / k for k in ks]), rel=1e-6)
    assert score["norm_ratio"] == pytest.approx(np.mean(norm_ratio), rel=1e-5)
    assert np.all(np.array(ks) < 1.0)
    # Layer 1 keeps the 7 largest rows: norm ratio above 1 there.
    assert norm_ratio[1] > 1.2


def test_score_plan_reuses_and_fills_the_reference_cache():
    states, reference = _states(1), {}
    plan = {"kept_indices": {"0": list(range(1, 10)), "1": list(range(2, 11))}}
    first = score_plan(plan, states, reference)
    assert first["ks"] < 1.0
    assert set(reference) == {0, 1} and reference[0].shape == (5,)
    reference[0] = reference[0] * 10  # a poisoned cache entry changes the score: it is really used
    assert score_plan(plan, states, reference)["ks"] != first["ks"]


@pytest.mark.parametrize("plan,label", [({"method": "prunenet", "selection": "topk"}, "prunenet-topk"),
                                        ({"method": "prunenet", "selection": "sample"}, "prunenet-sample"),
                                        ({"method": "prunenet", "selection": "topk", "learner": "paper"},
                                         "prunenet-topk"),
                                        ({"method": "prunenet", "selection": "topk", "policy_learner": "baseline"},
                                         "prunenet[baseline]-topk"),
                                        ({"method": "random", "selection": None}, "random")])
def test_method_label(plan, label):
    assert method_label(plan) == label


def _result(scores: list[float], ppl: float, per_doc: list[float] | None = None) -> dict:
    tasks = ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]
    docs = {} if per_doc is None else {"per_doc": {str(i): x for i, x in enumerate(per_doc)}}
    return {"tasks": {t: {"task": t, "metric": "acc", "score": s, "n": 10, **docs} for t, s in zip(tasks, scores)},
            "perplexity": {"perplexity": ppl, "corpus": "squad-wiki", "tokens": 100, "context_length": 32,
                           "stride": 32}}


def test_quality_report_rows_paired_intervals_and_earlier_sample(tmp_path):
    out = tmp_path / "q.md"
    dense = _result([0.75] * 5, 10.0, per_doc=[1, 1, 1, 0])
    common = {"model": "smollm2-135m", "method": "random", "ratio": 0.3, "limit": 4, "sample": "spread",
              "episodes": 20, "ppl_tokens": 100}
    records = {}
    for seed, docs, ppl, ks in ((0, [1, 0, 1, 0], 20.0, 0.1), (1, [0, 1, 0, 0], 40.0, 0.3)):
        records[seed] = {**common, "seed": seed, "result": _result([sum(docs) / 4] * 5, ppl, docs), "ks": ks,
                         "average": sum(docs) / 4}
    # the same run on the first documents: shown beside it; another limit: not in this table
    records[7] = {**common, "sample": "first", "seed": 0, "result": _result([0.3] * 5, 1.0), "ks": 0.1,
                  "average": 0.3}
    records[9] = {**common, "limit": 200, "seed": 0, "result": _result([0.1] * 5, 1.0), "ks": 0.9, "average": 0.1}
    args = argparse.Namespace(model="smollm2-135m", limit=4, sample="spread", episodes=20, ppl_tokens=100)
    write_report(out, records, dense, args, ["--limit", "4"])
    text = out.read_text()
    lines = text.splitlines()
    dense_row = next(line for line in lines if line.startswith("| **dense**"))
    seed0 = next(line for line in lines if line.startswith("| random | 0.3 | 0 |"))
    seed1 = next(line for line in lines if line.startswith("| random | 0.3 | 1 |"))
    assert "| 75.0 | 100 |  |  | 10.00 | 0 |" in dense_row
    # seed 0, per task: d = (0, -1, 0, 0): mean -0.25, sd 0.5, se 0.25; the same in 5 independent tasks:
    # average se = sqrt(5 * 0.25^2) / 5 = 0.1118, 95%: -25 +- 1.96 * 11.18 = [-46.9, -3.1] points.
    # Retention 50 / 75 = 66.7%; Var(R) from the averages' (co)variances: var_a = 0.25, var_b = 1/3,
    # cov = 1/6 per document, / (4 * 5) for the average: se_R = sqrt(1/3 - 2(2/3)(1/6) + (4/9)(1/4)) /
    # sqrt(20) / 0.75 = 0.1405 -> [39.1, 94.2].
    assert "| 50.0 | 66.7 [39.1, 94.2] | -25.0 [-46.9, -3.1] | 30.0 | 20.0 | 0.1000 |" in seed0
    # seed 1: no run on the first documents
    assert "| 25.0 | 33.3 " in seed1 and "| — | 40.0 | 0.3000 |" in seed1
    assert "4 documents a task, spread over each split" in text and "first 4" in text


def test_quality_perplexity_table_medians_geo_means_and_paired_wins(tmp_path):
    import argparse

    from benchmarks.quality_perplexity import write_table

    def rec(method, seed, ppl):
        key = ("m", 0.3, method, seed, 16384, 20, 0.01)
        return key, dict(zip(("model", "ratio", "method", "seed", "tokens", "episodes", "protect"), key),
                         perplexity=ppl, ks=0.1)

    done = dict([rec("random", 0, 100.0), rec("random", 1, 400.0), rec("random", 2, 10000.0),
                 rec("random+protect", 0, 50.0), rec("random+protect", 1, 800.0), rec("random+protect", 2, 200.0)])
    args = argparse.Namespace(model="m", tokens=16384, episodes=20)
    out = tmp_path / "t.md"
    write_table(out, args, ["--model", "m", "--table_only"], done, 0.01)
    text = out.read_text()
    assert "--table_only" not in text
    # random: median 400, geometric mean (100 * 400 * 10000)^(1/3) = 737; protect: median 200, geo 200.
    assert "| 0.3 | random | 400 | 737 | 100 | 10,000 | 3 | 0.1000 |  |" in text
    assert "| 0.3 | random+protect | 200 | 200 | 50 | 800 | 3 | 0.1000 | 2 of 3 |" in text
    # No dense record: the tokens scored follow from the windows (32 of 512, each scoring 511), and the text
    # says the dense perplexity is missing.
    assert "first 16,384 tokens of squad-wiki (context 512, 16,352 tokens scored)" in text
    assert "dense model's perplexity on these tokens is not recorded" in text


def test_quality_perplexity_table_states_the_dense_perplexity_on_the_same_tokens(tmp_path):
    """The dense model's record (method ``dense``, nothing zeroed) is stated in the table's text with the
    tokens it scored, is not a row of the table, and a dense record on other tokens is not used."""
    import argparse

    from benchmarks.quality_perplexity import DENSE, KEY_NAMES, dense_key, write_table

    cell = ("m", 0.3, "random", 0, 4096, 20, 0.01)
    done = {cell: dict(zip(KEY_NAMES, cell), perplexity=300.0, ks=0.1),
            dense_key("m", 4096): dict(zip(KEY_NAMES, dense_key("m", 4096)), perplexity=24.3512, ppl_tokens=4088),
            dense_key("m", 8192): dict(zip(KEY_NAMES, dense_key("m", 8192)), perplexity=23.5552, ppl_tokens=8176)}
    out = tmp_path / "t.md"
    write_table(out, argparse.Namespace(model="m", tokens=4096, episodes=20), ["--model", "m", "--dense_only"],
                done, 0.01)
    text = out.read_text()
    assert "--dense_only" not in text
    assert "first 4,096 tokens of squad-wiki (context 512, 4,088 tokens scored)" in text
    assert "The dense model (nothing zeroed), the same code on the same tokens: perplexity 24.35." in text
    assert "23.56" not in text
    rows = [line for line in text.splitlines() if line.startswith("| 0")]
    assert len(rows) == 1 and rows[0].startswith("| 0.3 | random | 300 |")
    assert DENSE not in {line.split(" | ")[1] for line in text.splitlines() if line.startswith("| ")}


def test_load_records_keys_cells_later_line_wins_and_names_a_bad_line(tmp_path):
    """The resumable benchmarks' record reader: a missing file is no records, a cell recorded twice
    keeps its later line, and a broken line is reported with its file and line number."""
    from benchmarks.common import load_records

    path = tmp_path / "cells.jsonl"
    assert load_records(path, ("seed",)) == {}
    path.write_text('{"seed": 0, "method": "random", "perplexity": 5.0}\n'
                    '{"seed": 1, "method": "random", "perplexity": 7.0}\n'
                    '{"seed": 0, "method": "random", "perplexity": 6.0}\n')
    records = load_records(path, ("method", "seed"))
    assert sorted(records) == [("random", 0), ("random", 1)]
    assert records[("random", 0)]["perplexity"] == 6.0
    with path.open("a") as f:
        f.write('{"method": "random"}\n')
    with pytest.raises(ValueError, match=r"cells\.jsonl:4: .*seed"):
        load_records(path, ("method", "seed"))


def test_a_results_file_never_mixes_two_texts_of_the_model(tmp_path):
    """Cells on the model's own text sampled 64 a call are refused next to cells sampled 16 a call (a record
    without the field), in one line that names the file and the batch that matches."""
    from benchmarks.common import add_text_batch_argument, check_text_batch

    path = tmp_path / "r.jsonl"
    check_text_batch([], 64, path)  # a new file takes any batch
    check_text_batch([{"calibration_batch": 64}], 64, path)
    with pytest.raises(SystemExit) as err:
        check_text_batch([{"method": "recon"}, {"calibration_batch": 16}], 64, path)
    assert str(err.value) == (f"error: {path} holds cells on the model's own text sampled [16] sequences a call, "
                              "not 64: pass --calibration_batch 16, or write another file (--output)")
    parser = argparse.ArgumentParser()
    add_text_batch_argument(parser)
    assert parser.parse_args([]).calibration_batch == 64


def test_config_method_names_what_a_compress_config_keeps():
    """The quality benchmarks mark the shipped default (configs/compress/<model>.yaml) in their tables."""
    from benchmarks.common import CONFIGS, PROTECT, config_method, default_method
    from benchmarks.quality import METHODS

    assert config_method({"selection": "peak", "protect_outliers": 0.05}) == "peak"
    assert config_method({"selection": "random", "protect_outliers": PROTECT}) == "random+protect"
    assert config_method({"selection": "random"}) == "random"
    assert config_method({"selection": "random", "protect_outliers": 0.05}) is None
    assert config_method({"selection": "sample"}) is None
    assert config_method({}) == "peak"  # compress's own default without a policy
    assert config_method({"selection": "recon", "calibration": "self"}) == "recon"
    assert config_method({"selection": "recon", "calibration": "wiki"}) is None
    assert config_method({"selection": "recon", "calibration": "self", "refit": True}) == "recon+refit"
    assert all(default_method(model) in METHODS for model in CONFIGS)


def test_quality_summary_checks_the_issues_conditions_cell_by_cell(tmp_path):
    """Records of two models in, the verdict out: medians against random and magnitude per cell, the
    seed spreads at r = 0.2/0.3, and a geometric mean only for a method measured in all six cells."""
    import json

    from benchmarks.quality_perplexity import KEY_NAMES, dense_key
    from benchmarks.quality_summary import MODELS, main

    # Per (model, ratio): random seeds 0..4 at 100..500, magnitude 10,000; "peak" 50 except 300 (equal to
    # random's median) on Gemma r = 0.1; "random+protect" seeds at 90..130 on SmolLM2 only.
    records = {name: [] for _, _, name in MODELS}
    for model, label, name in MODELS:
        for ratio in (0.3, 0.2, 0.1):
            cell = [("random", s, 100.0 * (s + 1)) for s in range(5)] + [("magnitude", 0, 1e4)]
            cell.append(("peak", 0, 300.0 if (label, ratio) == ("Gemma", 0.1) else 50.0))
            if label == "SmolLM2":
                cell += [("random+protect", s, 90.0 + 10 * s) for s in range(5)]
            for method, seed, ppl in cell:
                key = (model, ratio, method, seed, 16384, 20, 0.01)
                records[name].append(dict(zip(KEY_NAMES, key), perplexity=ppl, ks=0.1))
    # the dense SmolLM2 (none for Gemma): in the text, not a cell
    records["quality-perplexity-smollm2.jsonl"].append(
        dict(zip(KEY_NAMES, dense_key("smollm2-135m", 16384)), perplexity=24.3512, ppl_tokens=16352))
    for name, lines in records.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = main(["--results", str(tmp_path)])
    assert (tmp_path / "quality-summary.md").read_text() == text
    assert "first 16,384 tokens of squad-wiki (context 512, 16,352 tokens scored)" in text
    assert "The dense models on the same tokens: SmolLM2 24.35; Gemma not recorded." in text
    assert "| dense |" not in text
    # random's median 300 (100 – 500); protect wins every paired seed (90 < 100, ..., 130 < 500).
    assert "| random+protect | 110 (90 – 130), 5 of 5 |" in text
    # peak: geo-mean (50^5 * 300)^(1/6) = 67.3; equal to random's median (300) is not below it.
    assert "| peak | 67 | 5 of 6 | 6 of 6 | 4 of 4 |" in text
    # random+protect: only 3 cells measured, so no geo-mean; worst 130 is above random's best 100.
    assert "| random+protect |  | 3 of 3 | 3 of 3 | 0 of 2 |" in text
    assert "| magnitude | 10,000 | 0 of 6 |  | 0 of 4 |" in text


def test_learner_ks_reads_the_ks_curve_back_from_tensorboard_in_step_order(tmp_path):
    """benchmarks.learner_ks's training-curve table reads ``ks/mean`` from the fit's TensorBoard events
    (written here by Lightning's own logger, as a fit does)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from benchmarks.learner_ks import ks_curve

    logger = TensorBoardLogger(str(tmp_path), name="fit")
    values = [0.1670, 0.1650, 0.1640, 0.1630]
    for step in (2, 0, 3, 1):  # out of order: the curve is sorted by step
        logger.log_metrics({"ks/mean": values[step], "loss": 1.0}, step=step)
    logger.finalize("success")
    # float32 in the event file: 0.17 * 2**-24 ~ 1e-8 of rounding
    assert ks_curve(tmp_path) == pytest.approx(values, abs=1e-7)
    with pytest.raises(FileNotFoundError, match="found 0"):
        ks_curve(tmp_path / "empty")
    TensorBoardLogger(str(tmp_path), name="fit").log_metrics({"ks/mean": 0.2}, step=0)  # a second version
    with pytest.raises(FileNotFoundError, match="found 2"):
        ks_curve(tmp_path)


def test_self_text_candidates_match_the_outputs_they_describe():
    """Oracle: the FFN outputs themselves, Y = H W^T and Y_S = H_S W_S^T (numpy SVD, scipy's KS)."""
    from benchmarks.reward_correlation import self_scores

    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(40, 9, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(5, 9, generator=g) for _ in range(2)]
    kept = [torch.tensor([0, 2, 3, 5, 8]), torch.tensor([1, 2, 3, 4, 7, 8])]
    got = self_scores([h.T @ h for h in hs], ws, kept, reference={})
    errors, ks = [], []
    for h, w, rows in zip(hs, ws, kept):
        h, w = h.numpy(), w.double().numpy()
        removed = np.setdiff1d(np.arange(9), rows.numpy())
        y, y_kept = h @ w.T, h[:, rows.numpy()] @ w[:, rows.numpy()].T
        errors.append(np.square(h[:, removed] @ w[:, removed].T).sum() / np.square(y).sum())
        ks.append(ks_2samp(np.linalg.svd(y, compute_uv=False), np.linalg.svd(y_kept, compute_uv=False)).statistic)
    # float64 throughout; the spectra via eigvalsh of 5 x 5 Grams: 1e-9 covers the square roots of small eigenvalues
    assert got["recon_error"] == pytest.approx(np.mean(errors), rel=1e-9)
    assert got["ks_output"] == pytest.approx(np.mean(ks), abs=1e-12)

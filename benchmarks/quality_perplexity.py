"""Which selection keeps the pruned model best? Perplexity over seeds, for every method and ratio
(issue 14's quality table; zero-shot is ``benchmarks.quality``).

    python -m benchmarks.quality_perplexity --model smollm2-135m [--ratios 0.3,0.2,0.1]
        [--seeds 0,1,2,3,4] [--tokens 16384] [--episodes 20] [--methods ...] [--dense_only | --table_only]

Methods (each seed s, each ratio r):
- ``paper``: the paper's algorithm (``configs/paper.yaml``: sparsity predictor, 1/KS of the gate
  spectra, the paper's REINFORCE), trained for ``--episodes`` with seed s; its final seeded draw;
- ``paper+protect``: the same with ``protect_outliers`` = ``--protect`` (ours);
- ``baseline``: the paper's policy and reward trained by the ``baseline`` learner (ours: per-layer
  running-mean baseline, normalised advantage, exact without-replacement log-likelihood);
- ``baseline+protect``: the same with ``protect_outliers`` = ``--protect`` too (ours);
- ``learned``: ``configs/learned.yaml`` (ours: the baseline learner with the ``row_mlp`` policy at
  learning rate 1e-2, the paper's reward), trained and drawn like ``paper``;
- ``random``: uniformly random rows, seed s; ``random+protect``: the protected outlier neurons
  always kept, the rest uniformly random;
- ``magnitude``: the k neurons with the largest input-weight norm (deterministic: one cell);
- ``recon``, ``wanda_sp``, ``flap``, ``obs``: ``prunenet.compress --selection <method>`` on the model's own text of
  seed s (``@wiki``: on the packaged wiki text); ``features``: the FeaturePolicy of ``configs/features.yaml``
  trained on that text, its top k; ``<method>+refit``: then the kept output columns refit on the same text;
- ``peak``: the k neurons with the largest output max-|w| (deterministic): the selection with the
  lowest ``peak_dropped`` score of ``benchmarks.reward_correlation``, i.e. what a policy trained to
  optimum on that candidate reward would keep (ours).

Policies are trained in-process with the product's own module and data module (the same code as
``prunenet.fit``), without writing a checkpoint. The pruned model is scored by perplexity on the
first ``--tokens`` tokens of SQuAD-dev Wikipedia (context 512), with the removed neurons zeroed at
the FFN output (the same function as the sliced model: see tests/test_slicing.py), and each
selection by its mean KS over layers of the gate spectra (the paper's objective).

The dense model (nothing zeroed) is scored once by the same code on the same tokens and recorded as
the cell :func:`dense_key` (method ``dense``); the table states it beside the cells.
``--dense_only`` measures just that cell (when not recorded) and rewrites the table.

Each finished cell is appended to a JSON-lines file next to the table and skipped when the command
runs again, so an interrupted run continues where it stopped. ``--table_only`` rebuilds the table
from the records, running nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import (CONFIGS, DETERMINISTIC, PROTECT, REPO, add_text_batch_argument, check_text_batch,
                               header, load_records, scored_tokens,
                               select_rows, table)

#: The fields that name one cell of the table (its record's key in the JSON-lines file).
KEY_NAMES = ("model", "ratio", "method", "seed", "tokens", "episodes", "protect")
METHODS = ("paper", "paper+protect", "baseline", "baseline+protect", "learned", "random", "random+protect",
           "magnitude", "peak", "wanda_sp", "flap", "recon", "wanda_sp@wiki", "flap@wiki", "recon@wiki", "features",
           "features@wiki", "recon+refit", "wanda_sp+refit", "flap+refit", "features+refit", "recon+refit@wiki",
           "obs", "obs+refit", "obs+refit@wiki", "features+refit@wiki", "wanda_sp+refit@wiki")
#: ``<method>+refit``: the method's kept rows, then each FFN output projection's kept columns refit by least
#: squares on the same calibration text (``prunenet/refit.py``, the default ridge).
REFIT = "+refit"


def selection_of(method: str) -> str:
    """The selection a method name runs: ``recon+refit@wiki`` -> ``recon``."""
    return method.partition("@")[0].removesuffix(REFIT)
#: Calibration text of the calibration-based methods: ``<selection>`` runs on the model's own text (seed s,
#: ``calibration.CalibrationSettings`` defaults: 64 x 256 tokens sampled from BOS), ``<selection>@wiki`` on
#: the packaged ``wiki`` corpus (calibration-based; disjoint from the squad-wiki evaluation text).
CALIBRATION_SOURCES = {"": "self", "wiki": "wiki"}
#: The method name of the dense model's record (nothing removed).
DENSE = "dense"
#: Context (and stride) of every perplexity of this benchmark.
CONTEXT = 512


def dense_key(model: str, tokens: int) -> tuple:
    """The record key of the dense model's perplexity on the first ``tokens`` tokens: ratio 0, seed 0,
    no episodes, nothing protected."""
    return (model, 0.0, DENSE, 0, tokens, 0, 0.0)


def model_section(path: str | Path) -> dict:
    """The ``model:`` keys of a fit config (the module's arguments)."""
    return dict(yaml.safe_load((REPO / path).read_text()).get("model") or {})


def train_policy(settings: dict, ratio: float, seed: int, episodes: int, selection: str = "sample") -> list[torch.Tensor]:
    """Kept rows (one sorted LongTensor per layer) of a policy trained with ``settings`` (a config's
    model section) at ``ratio`` with ``seed``: the fit's final ``selection`` (the seeded draw, or top-k)."""
    import lightning as L

    from prunenet.data import LayerDataModule
    from prunenet.fit import TRAINER_DEFAULTS
    from prunenet.module import PruneNetModule

    L.seed_everything(seed, verbose=False)
    module = PruneNetModule(**{**settings, "compression_ratio": ratio})
    # The fit CLI's own trainer defaults (gradient clipping at 1, as the authors), so the policy is the one
    # `prunenet.fit` would train.
    trainer = L.Trainer(**{**TRAINER_DEFAULTS, "max_epochs": episodes}, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=LayerDataModule())
    return module.kept_indices(selection)


def summarise(cells: list[dict]) -> list[str]:
    """Table row cells: median, geometric mean, min, max of perplexity, seeds, mean KS."""
    ppl = [c["perplexity"] for c in cells]
    geo = math.exp(statistics.fmean(math.log(x) for x in ppl))
    ks = statistics.fmean(c["ks"] for c in cells)
    return [f"{statistics.median(ppl):,.0f}", f"{geo:,.0f}", f"{min(ppl):,.0f}", f"{max(ppl):,.0f}", str(len(ppl)),
            f"{ks:.4f}"]


def main(argv: list[str] | None = None) -> None:
    from prunenet import loading
    from prunenet.arch import get_adapter
    from prunenet.evaluation.perplexity import PerplexitySettings, perplexity
    from prunenet.reward import ks_statistic, singular_values
    from prunenet.selection import kept_width, protected_rows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(CONFIGS))
    parser.add_argument("--ratios", default="0.3,0.2,0.1")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--protect", type=float, default=PROTECT, help="protect_outliers of the +protect methods")
    add_text_batch_argument(parser)
    parser.add_argument("--output", default=None)
    parser.add_argument("--table_only", action="store_true", help="write the table of the finished cells, run none")
    parser.add_argument("--dense_only", action="store_true",
                        help="measure only the dense model's perplexity (when not recorded), then write the table")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    name = args.model.split("-")[0]
    output = Path(args.output or REPO / f"benchmarks/results/quality-perplexity-{name}.md")
    records_path = output.with_suffix(".jsonl")
    done = load_records(records_path, KEY_NAMES)
    check_text_batch(done.values(), args.calibration_batch, records_path)
    paper = {**model_section("configs/paper.yaml"), "model_name_or_path": args.model}
    learned = {**model_section("configs/learned.yaml"), "model_name_or_path": args.model}
    if args.model == "gemma3-270m":  # what the family's config sets beyond the algorithm (none today)
        family = {k: v for k, v in model_section(f"configs/{name}.yaml").items()
                  if k not in ("policy", "reward", "learner", "protect_outliers", "learning_rate", "model_name_or_path",
                               "compression_ratio")}
        paper.update(family)
        learned.update(family)
    protect = args.protect
    if args.table_only:
        return write_table(output, args, argv, done, protect)
    trained = {"paper": paper, "paper+protect": {**paper, "protect_outliers": protect},
               "baseline": {**paper, "learner": "baseline"}, "learned": learned,
               "baseline+protect": {**paper, "learner": "baseline", "protect_outliers": protect}}
    # ``features``: the FeaturePolicy trained on the reconstruction reward, both on the model's own text of the
    # cell's seed (``@wiki``: on the packaged wiki text), selected by top-k
    features = yaml.safe_load((REPO / "configs/features.yaml").read_text())["model"]

    def features_settings(method: str, seed: int) -> dict:
        text = {"source": CALIBRATION_SOURCES[method.partition("@")[2]], "seed": seed, "batch": args.calibration_batch}
        return {**features, "model_name_or_path": args.model,
                **{key: {**features[key], "init_args": {**features[key].get("init_args", {}), **text}}
                   for key in ("policy", "reward")}}

    from prunenet.calibration import CalibrationSettings
    from prunenet.inputs import SelectionInputs
    from prunenet.refit import refit_weights
    from prunenet.selectors import CALIBRATED_SELECTIONS, build_selector, select_layers

    calibrated: dict[tuple[str, int], SelectionInputs] = {}  # (source, seed) -> inputs: the text and statistics once

    def calibrated_inputs(method: str, seed: int) -> SelectionInputs:
        source = CALIBRATION_SOURCES[method.partition("@")[2]]
        key = (source, seed if source == "self" else 0)
        if key not in calibrated:
            calibrated[key] = SelectionInputs(args.model, calibration=CalibrationSettings(
                source=source, seed=key[1], batch=args.calibration_batch))
            calibrated[key].gram = any(REFIT in m for m in methods)  # one pass for selection and refit
        return calibrated[key]

    def calibrated_rows(method: str, seed: int, k: int) -> tuple[list[torch.Tensor], dict]:
        inputs = calibrated_inputs(method, seed)
        selector = build_selector(selection_of(method), seed=inputs.calibration.seed)
        return select_layers(selector, inputs.layers(selector.needs), k), inputs.calibration_record

    model = loading.load_model(args.model)
    tokenizer = loading.load_tokenizer(args.model)
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    gates = [adapter.state(layer).detach().float().clone() for layer in layers]
    row_norms = [adapter.row_norms(layer) for layer in layers]
    peaks = [adapter.output_peaks(adapter.output_module(layer).weight) for layer in layers]
    protected = [protected_rows(p, protect) for p in peaks]
    reference = [singular_values(g) for g in gates]
    n = gates[0].shape[0]
    outputs = [adapter.output_module(layer) for layer in layers]
    if adapter.conv1d and any(REFIT in m for m in methods):
        parser.error("+refit methods write nn.Linear output columns; this model's FFN output is a Conv1D")
    dense_outputs = [o.weight.detach().clone() for o in outputs]
    masks = [torch.ones(n) for _ in layers]
    hooks = [adapter.output_module(layer).register_forward_pre_hook(
        lambda _m, a, mask=mask: (a[0] * mask.to(a[0].dtype),) + tuple(a[1:])) for layer, mask in zip(layers, masks)]
    settings = PerplexitySettings(context_length=CONTEXT, max_tokens=args.tokens)
    start = time.perf_counter()
    try:
        key = dense_key(args.model, args.tokens)
        if key not in done:  # the same hooks with nothing zeroed: the same code on the same tokens
            for mask in masks:
                mask.fill_(1.0)
            result = perplexity(model, tokenizer, settings, progress=False)
            rec = dict(zip(KEY_NAMES, key), perplexity=result["perplexity"], ppl_tokens=result["tokens"],
                       nll_mean=result["nll_mean"], wall_s=result["wall_s"], calibration_batch=args.calibration_batch)
            with records_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            done[key] = rec
            print(f"[{time.perf_counter() - start:6.0f} s] dense: ppl {rec['perplexity']:,.2f} on "
                  f"{rec['ppl_tokens']:,} tokens", flush=True)
        for r in ([] if args.dense_only else ratios):
            k = kept_width(n, r)
            for seed in seeds:
                for method in methods:
                    s = 0 if method in DETERMINISTIC or "@" in method else seed  # a corpus: one text
                    key = (args.model, r, method, s, args.tokens, args.episodes, protect)
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    extra = {}
                    if method in trained:
                        kept = train_policy(trained[method], r, s, args.episodes)
                    elif method.startswith("features"):
                        kept = train_policy(features_settings(method, s), r, s, args.episodes, "topk")
                    elif selection_of(method) in CALIBRATED_SELECTIONS:  # the first cell of a text makes it
                        kept, extra["calibration"] = calibrated_rows(method, s, k)
                    else:
                        kept = select_rows(method.split("+")[0], k, s, states=gates, row_norms=row_norms, peaks=peaks,
                                           protected=protected if method.endswith("+protect") else None)
                    refit = refit_weights(calibrated_inputs(method, s), kept) if REFIT in method else None
                    fit_s = time.perf_counter() - t0
                    for i, (mask, rows) in enumerate(zip(masks, kept)):
                        mask.zero_()
                        mask[rows] = 1.0
                        with torch.no_grad():  # the dense output weight, or the refit columns in the kept places
                            outputs[i].weight.copy_(dense_outputs[i])
                            if refit is not None:
                                outputs[i].weight[:, rows] = refit[i].to(outputs[i].weight.dtype)
                    ks = statistics.fmean(float(ks_statistic(ref, singular_values(g[rows])))
                                          for ref, g, rows in zip(reference, gates, kept))
                    result = perplexity(model, tokenizer, settings, progress=False)
                    ppl = result["perplexity"]
                    rec = dict(zip(KEY_NAMES, key), ks=ks, perplexity=ppl, ppl_tokens=result["tokens"],
                               select_seconds=round(fit_s, 1), calibration_batch=args.calibration_batch, **extra)
                    with records_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    done[key] = rec
                    print(f"[{time.perf_counter() - start:6.0f} s] r={r:g} {method} seed {s}: ppl {ppl:,.1f} "
                          f"KS {ks:.4f} ({fit_s:.0f} s to select)", flush=True)
    finally:
        for h in hooks:
            h.remove()
    write_table(output, args, argv, done, protect)


def write_table(output: Path, args, argv, done: dict, protect: float) -> None:
    """The markdown table of every finished cell of this model, tokens and episodes."""
    rows = []
    for r in sorted({key[1] for key in done if key[0] == args.model and key[2] != DENSE}, reverse=True):
        for method in METHODS:
            cells = [v for key, v in done.items() if key[0] == args.model and key[1] == r and key[2] == method
                     and key[4:] == (args.tokens, args.episodes, protect)]
            if cells:
                random = {v["seed"]: v["perplexity"] for key, v in done.items() if key[0] == args.model
                          and key[1] == r and key[2] == "random" and key[4:] == (args.tokens, args.episodes, protect)}
                paired = [c for c in cells if c["seed"] in random]
                wins = sum(c["perplexity"] < random[c["seed"]] for c in paired)
                rows.append([f"{r:g}", method, *summarise(cells),
                             "" if method == "random" or method in DETERMINISTIC else f"{wins} of {len(paired)}"])
    text = f"# Perplexity of the pruned model by selection method, {args.model}\n\n" + header(
        "python -m benchmarks.quality_perplexity " + " ".join(  # the command that produced the cells
            a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--table_only", "--dense_only"))) + "\n"
    dense = done.get(dense_key(args.model, args.tokens))
    scored = dense["ppl_tokens"] if dense and "ppl_tokens" in dense else scored_tokens(args.tokens, CONTEXT)
    dense_text = (f"The dense model (nothing zeroed), the same code on the same tokens: perplexity "
                  f"{dense['perplexity']:,.2f}." if dense else
                  "The dense model's perplexity on these tokens is not recorded (`--dense_only` measures it).")
    text += (f"Perplexity on the first {args.tokens:,} tokens of squad-wiki (context {CONTEXT}, {scored:,} tokens "
             f"scored), the removed FFN neurons zeroed. {dense_text} Policies trained {args.episodes} episodes. "
             "`paper` = configs/paper.yaml; `+protect`: "
             f"protect_outliers={protect:g}, the neurons with the largest output max-|w| always kept; `baseline`: "
             "the paper's policy trained by the baseline learner; `learned` = configs/learned.yaml; `wanda_sp`, `flap`, "
             "`recon`: those selections on the model's own text (64 x 256 tokens sampled from BOS with the seed), "
             "`@wiki`: on 64 x 256 tokens of the packaged wiki corpus (calibration-based). Over seeds: median, "
             "geometric mean, min and max of perplexity (lower is better), and "
             "the mean KS of the gate spectra (the paper's objective, lower is closer).\n\n")
    text += table(["r", "method", "median ppl", "geo-mean ppl", "min", "max", "seeds", "mean KS",
                   "beats random, same seed"], rows)
    output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Which data-free score predicts the pruned model's perplexity? A correlation study over random
selections (issue 14, item 2), before training anything on a candidate reward.

    python -m benchmarks.reward_correlation --model smollm2-135m --selections 24 [--ratio 0.3]
        [--tokens 16384] [--output benchmarks/results/reward-correlation-smollm2.md]

For each seed, uniformly random kept rows (``--selection random`` of compress, seeded the same way) are
scored by every candidate below, computed from the weights alone, and the model with those rows
removed (removed neurons zeroed at the FFN output: the same function as the sliced model, see the
test suite) is scored by perplexity on the SQuAD-dev Wikipedia text. The table gives, per candidate,
the Spearman rank correlation with perplexity over the selections (a good reward has a strongly
negative correlation if higher is better, positive if lower is better) and its p-value.

Each finished selection is appended to a JSON-lines file next to the table and skipped when the
command runs again, so an interrupted run continues where it stopped. A selection whose perplexity
``benchmarks.quality_perplexity`` already measured (method ``random``, same model, ratio, tokens and
seed: the same rows and the same evaluation) takes that value instead of evaluating it again.

Candidates (mean over layers; ours except ``ks_gate``):
- ``ks_gate``: KS of the gate spectra, the paper's objective (lower is closer);
- ``ks_all``: mean KS of the gate, up and down spectra;
- ``energy_kept``: fraction of the FFN's squared Frobenius norm kept (gate and up rows, down columns);
- ``down_max_kept``: sum over kept neurons of max |down column| / the same over all neurons;
- ``outliers_kept``: fraction of each layer's top-1% neurons by max |down column| that are kept;
- ``peak_dropped``: the largest max |down column| among the dropped neurons of any layer, relative
  to its layer's median (added after the first 24 SmolLM2 selections were scored: exploratory there,
  a test on Gemma);
- ``bos_kl`` (a data-free probe, named as such: one forward pass of the lone BOS token, no dataset):
  KL(dense || pruned) of the next-token distribution after BOS;
- on the model's own text (issue 28: 64 x 256 tokens it samples from BOS, ``prunenet.calibration``; no
  dataset), from the FFN activations' Gram G = H^T H and the output weight W of each layer:
  ``recon_error``: the relative FFN output error of dropping the removed set R, 1_R^T (G o W^T W) 1_R /
  1^T (G o W^T W) 1 (the ``reconstruction`` reward's diagnostic, lower is better);
  ``ks_output``: KS of the singular values of the FFN output on that text, dense (W G W^T) against pruned
  (W_S G_SS W_S^T): the paper's spectral divergence applied to what the layer computes.
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

from benchmarks.common import REPO, add_text_batch_argument, check_text_batch, header, load_records, scored_tokens, table

#: The fields that name one selection's record; and those of a quality_perplexity cell, in the order
#: (model, ratio, tokens, seed, method) that lets its random cells stand for selections here.
KEY_NAMES = ("model", "ratio", "tokens", "seed")
QP_KEY_NAMES = ("model", "ratio", "tokens", "seed", "method", "episodes", "protect")
CANDIDATES = ("ks_gate", "ks_all", "energy_kept", "down_max_kept", "outliers_kept", "peak_dropped", "bos_kl",
              "recon_error", "ks_output")
#: Candidates on the model's own text (added later: scored again for recorded selections, perplexity reused).
SELF_CANDIDATES = ("recon_error", "ks_output")
WEIGHT_CANDIDATES = tuple(c for c in CANDIDATES if c not in ("bos_kl", *SELF_CANDIDATES))


def _ffn(adapter, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (n, d), up (n, d), down (d, n)) of a LLaMA-style layer, float32."""
    gate, up = (m.weight.detach().float() for m in adapter.input_modules(layer))
    return gate, up, adapter.output_module(layer).weight.detach().float()


def weight_scores(ffns, kept, reference) -> dict[str, float]:
    """The weight-only candidates of one selection (kept: one LongTensor per layer)."""
    from prunenet.reward import ks_statistic, singular_values

    out = {k: [] for k in WEIGHT_CANDIDATES}
    for i, ((gate, up, down), rows) in enumerate(zip(ffns, kept)):
        if i not in reference:
            reference[i] = [singular_values(gate), singular_values(up), singular_values(down)]
        ks = [float(ks_statistic(ref, singular_values(m))) for ref, m in
              zip(reference[i], (gate[rows], up[rows], down[:, rows]))]
        out["ks_gate"].append(ks[0])
        out["ks_all"].append(statistics.fmean(ks))
        energy = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)
        out["energy_kept"].append(float(energy[rows].sum() / energy.sum()))
        peak = down.abs().amax(0)
        out["down_max_kept"].append(float(peak[rows].sum() / peak.sum()))
        top = torch.topk(peak, max(1, peak.numel() // 100)).indices
        out["outliers_kept"].append(float(torch.isin(top, rows).float().mean()))
        dropped = torch.ones_like(peak, dtype=torch.bool).index_fill_(0, rows, False)
        out["peak_dropped"].append(float(peak[dropped].max() / peak.median()))
    scores = {k: statistics.fmean(v) for k, v in out.items()}
    scores["peak_dropped"] = max(out["peak_dropped"])  # the worst layer, not the mean
    return scores


def self_scores(grams, downs, kept, reference) -> dict[str, float]:
    """The candidates on the model's own text of one selection: per layer the activations' Gram ``grams[i]``
    (n, n) float64, the output weight ``downs[i]`` (d, n), the kept rows ``kept[i]``; ``reference`` caches per
    layer M and the dense output spectrum."""
    from prunenet.calibration import reconstruction_matrix, relative_output_error
    from prunenet.reward import ks_statistic

    errors, ks = [], []
    for i, (g, w, rows) in enumerate(zip(grams, downs, kept)):
        w = w.double()
        if i not in reference:  # M, and the dense output's singular values: sqrt of eig(Y^T Y = W G W^T)
            reference[i] = (reconstruction_matrix(g, w.T @ w), torch.linalg.eigvalsh(w @ g @ w.T).clamp_min(0).sqrt())
        m, dense_sv = reference[i]
        errors.append(float(relative_output_error(m, rows)))
        ws = w[:, rows]
        kept_sv = torch.linalg.eigvalsh(ws @ g[rows][:, rows] @ ws.T).clamp_min(0).sqrt()
        ks.append(float(ks_statistic(dense_sv, kept_sv)))
    return {"recon_error": statistics.fmean(errors), "ks_output": statistics.fmean(ks)}


def main(argv: list[str] | None = None) -> None:
    from scipy.stats import spearmanr

    from prunenet import loading
    from prunenet.arch import get_adapter
    from prunenet.evaluation.perplexity import PerplexitySettings, perplexity
    from benchmarks.common import select_rows
    from prunenet.selection import kept_width

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--selections", type=int, default=24)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--output", default=None)
    add_text_batch_argument(parser)
    args = parser.parse_args(argv)
    name = args.model.split("-")[0]
    output = Path(args.output or REPO / f"benchmarks/results/reward-correlation-{name}.md")
    records_path = output.with_suffix(".jsonl")
    this_run = (args.model, args.ratio, args.tokens)
    recorded = load_records(records_path, KEY_NAMES)  # every run's selections (the file may hold other ratios)
    done = {key[3]: rec for key, rec in recorded.items() if key[:3] == this_run}
    check_text_batch(done.values(), args.calibration_batch, records_path)  # the self candidates' text
    # The same random selections, already evaluated by the same perplexity in the quality benchmark.
    measured = {key[3]: rec["perplexity"] for key, rec in load_records(
        REPO / f"benchmarks/results/quality-perplexity-{name}.jsonl", QP_KEY_NAMES).items()
        if key[4] == "random" and key[:3] == this_run}
    model = loading.load_model(args.model)
    tokenizer = loading.load_tokenizer(args.model)
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    ffns = [_ffn(adapter, layer) for layer in layers]
    n = ffns[0][0].shape[0]
    k = kept_width(n, args.ratio)
    settings = PerplexitySettings(context_length=512, max_tokens=args.tokens)
    bos = torch.tensor([[tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0]])
    with torch.no_grad():
        dense_logp = torch.log_softmax(model(input_ids=bos).logits[0, -1].double(), -1)
    masks = [torch.ones(n) for _ in layers]
    hooks = [adapter.output_module(layer).register_forward_pre_hook(
        lambda _m, a, mask=mask: (a[0] * mask.to(a[0].dtype),) + tuple(a[1:])) for layer, mask in zip(layers, masks)]
    reference: dict = {}
    from prunenet.calibration import CalibrationSettings
    from prunenet.inputs import SelectionInputs

    own = SelectionInputs(args.model, calibration=CalibrationSettings(batch=args.calibration_batch))  # own text, seed 0
    own.gram = True
    grams = [s.gram for s in own.activations]
    downs = [down for _, _, down in ffns]
    self_reference: dict = {}
    stale = [seed for seed, rec in done.items() if any(c not in rec for c in (*WEIGHT_CANDIDATES, *SELF_CANDIDATES))]
    for seed in stale:  # a candidate added later: no perplexity needed, so score the recorded selections again
        kept = select_rows("random", k, seed, states=[g for g, _, _ in ffns])
        done[seed].update(weight_scores(ffns, kept, reference))
        done[seed].update(self_scores(grams, downs, kept, self_reference))
    if stale:
        others = [json.dumps(rec) for key, rec in recorded.items() if key[:3] != this_run]
        tmp = records_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in others + [json.dumps(done[s]) for s in sorted(done)]))
        tmp.replace(records_path)
    start = time.perf_counter()
    try:
        for seed in range(args.selections):
            if seed in done:
                continue
            kept = select_rows("random", k, seed, states=[g for g, _, _ in ffns])
            for mask, rows in zip(masks, kept):
                mask.zero_()
                mask[rows] = 1.0
            rec = {"model": args.model, "ratio": args.ratio, "tokens": args.tokens, "seed": seed,
                   "calibration_batch": args.calibration_batch,
                   **weight_scores(ffns, kept, reference), **self_scores(grams, downs, kept, self_reference)}
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=bos).logits[0, -1].double(), -1)
            rec["bos_kl"] = float((dense_logp.exp() * (dense_logp - logp)).sum())
            if seed in measured:
                rec["perplexity"] = measured[seed]
            else:
                rec["perplexity"] = perplexity(model, tokenizer, settings, progress=False)["perplexity"]
            with records_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            done[seed] = rec
            print(f"[{time.perf_counter() - start:6.0f} s] seed {seed}: ppl {rec['perplexity']:.1f}", flush=True)
    finally:
        for h in hooks:
            h.remove()
    recs = [done[s] for s in sorted(done)]
    ppl = [r["perplexity"] for r in recs]
    rows = []
    for cand in CANDIDATES:
        values = [r[cand] for r in recs]
        rho, p = spearmanr(values, ppl)
        rows.append([cand, f"{min(values):.4g} .. {max(values):.4g}", f"{rho:+.2f}", f"{p:.2g}"])
    geo = math.exp(statistics.fmean(math.log(x) for x in ppl))
    text = f"# Data-free scores vs perplexity, {args.model}, r = {args.ratio:g}\n\n" + header(
        "python -m benchmarks.reward_correlation " + " ".join(sys.argv[1:] if argv is None else argv)) + "\n"
    text += (f"{len(recs)} uniformly random selections (seeds 0..{len(recs) - 1}); perplexity on the first "
             f"{args.tokens:,} tokens of squad-wiki, context 512 ({scored_tokens(args.tokens):,} tokens scored): "
             f"median {statistics.median(ppl):,.1f}, geometric "
             f"mean {geo:,.1f}, min {min(ppl):,.1f}, max {max(ppl):,.1f}. Spearman rank correlation of each "
             "candidate with perplexity over the selections (a useful reward to maximise correlates negatively, "
             "one to minimise positively):\n\n")
    text += table(["candidate", "range over selections", "Spearman rho vs perplexity", "p-value"], rows)
    output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

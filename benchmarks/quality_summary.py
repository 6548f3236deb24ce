"""Issue 14's verdict across models and ratios, from the cells ``benchmarks.quality_perplexity`` recorded
(it runs nothing):

    python -m benchmarks.quality_summary [--tokens 16384] [--episodes 20]

One table, one row per method, one column per model × ratio: median perplexity (min – max) over
seeds and how many seeds beat random rows drawn with the same seed; then, per method, the geometric
mean over the cells of its median perplexity (the rule that picked the shipped default) and the
issue's conditions, checked cell by cell: median below random rows' and magnitude's, and (at
r = 0.2 and 0.3) the seed spreads apart, i.e. the method's worst seed below random's best. The dense
models' perplexity on the same tokens (their records: ``benchmarks.quality_perplexity --dense_only``)
is stated above the table.
Written to ``benchmarks/results/quality-summary.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from benchmarks.common import DETERMINISTIC, PROTECT, REPO, header, load_records, scored_tokens, table

#: Models of the summary, in column order: (benchmark model name, short label, records file).
MODELS = (("smollm2-135m", "SmolLM2", "quality-perplexity-smollm2.jsonl"),
          ("gemma3-270m", "Gemma", "quality-perplexity-gemma3.jsonl"))
RATIOS = (0.3, 0.2, 0.1)
#: Ratios at which the issue asks for seed spreads that do not overlap random rows'.
SPREAD_RATIOS = (0.3, 0.2)


#: The dense model's records (:func:`benchmarks.quality_perplexity.dense_key`): not a cell of the table.
DENSE = "dense"


def cells(records: dict[tuple, dict], tokens: int, episodes: int) -> dict[tuple[str, float, str], dict[int, float]]:
    """``{(model, ratio, method): {seed: perplexity}}`` of quality_perplexity records (keyed by its
    ``KEY_NAMES``) measured on ``tokens`` tokens, ``episodes`` episodes and protect_outliers
    :data:`PROTECT`."""
    out: dict[tuple[str, float, str], dict[int, float]] = {}
    for (model, ratio, method, seed, tok, ep, protect), rec in records.items():
        if (tok, ep, protect) == (tokens, episodes, PROTECT) and method != DENSE:
            out.setdefault((model, ratio, method), {})[seed] = rec["perplexity"]
    return out


def verdict(found: dict[tuple[str, float, str], dict[int, float]], method: str) -> dict[str, object]:
    """The issue's conditions for ``method`` over every model × ratio cell where it, random rows and
    magnitude were all measured: ``geo_mean`` of its medians over all :data:`MODELS` × :data:`RATIOS`
    (None unless every cell has it), cells ``measured``, cells where its median is below random's
    (``beats_random``) and magnitude's (``beats_magnitude``), and, at :data:`SPREAD_RATIOS`, cells
    where its worst seed (its one value, for a deterministic method) is below random's best
    (``spread_apart`` of ``spread_cells``)."""
    medians, measured, below_random, below_magnitude, apart, spread_cells = [], 0, 0, 0, 0, 0
    for model, _, _ in MODELS:
        for ratio in RATIOS:
            mine = found.get((model, ratio, method))
            if mine:
                medians.append(statistics.median(mine.values()))
            random, magnitude = found.get((model, ratio, "random")), found.get((model, ratio, "magnitude"))
            if not (mine and random and magnitude):
                continue
            measured += 1
            below_random += statistics.median(mine.values()) < statistics.median(random.values())
            below_magnitude += statistics.median(mine.values()) < statistics.median(magnitude.values())
            if ratio in SPREAD_RATIOS:
                spread_cells += 1
                apart += max(mine.values()) < min(random.values())
    complete = len(medians) == len(MODELS) * len(RATIOS)
    geo = math.exp(statistics.fmean(math.log(m) for m in medians)) if complete else None
    return {"geo_mean": geo, "measured": measured, "beats_random": below_random, "beats_magnitude": below_magnitude,
            "spread_apart": apart, "spread_cells": spread_cells}


def cell_text(found: dict, model: str, ratio: float, method: str) -> str:
    """``median (min – max), W of N`` (paired wins against random rows), ``value`` for a deterministic
    method, empty when not measured."""
    mine = found.get((model, ratio, method))
    if not mine:
        return ""
    values = list(mine.values())
    if method in DETERMINISTIC:
        return f"{values[0]:,.0f}"
    text = f"{statistics.median(values):,.0f}"
    if len(values) > 1:
        text += f" ({min(values):,.0f} – {max(values):,.0f})"
    random = found.get((model, ratio, "random"), {})
    paired = [s for s in mine if s in random]
    if method != "random" and paired:
        text += f", {sum(mine[s] < random[s] for s in paired)} of {len(paired)}"
    return text + ("" if len(values) >= 5 else f" [{len(values)} seed{'s' if len(values) > 1 else ''}]")


def report(found: dict, methods: tuple[str, ...]) -> str:
    """The markdown tables (perplexity per cell, then the verdict per method) of ``methods``."""
    columns = [(model, ratio) for model, _, _ in MODELS for ratio in RATIOS]
    labels = {model: label for model, label, _ in MODELS}
    present = [m for m in methods if any((model, r, m) in found for model, r in columns)]
    text = table(["method", *(f"{labels[model]} r = {r:g}" for model, r in columns)],
                 [[m, *(cell_text(found, model, r, m) for model, r in columns)] for m in present])
    rows = []
    for m in present:
        v = verdict(found, m)
        rows.append([m, "" if v["geo_mean"] is None else f"{v['geo_mean']:,.0f}",
                     f"{v['beats_random']} of {v['measured']}" if m != "random" else "",
                     f"{v['beats_magnitude']} of {v['measured']}" if m != "magnitude" else "",
                     f"{v['spread_apart']} of {v['spread_cells']}" if m != "random" else ""])
    text += "\n" + table(["method", "geo-mean of medians (all six cells)", "median below random's",
                          "median below magnitude's", "worst seed below random's best (r = 0.2, 0.3)"], rows)
    return text


def main(argv: list[str] | None = None) -> str:
    from benchmarks.quality_perplexity import CONTEXT, KEY_NAMES, METHODS, dense_key

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="folder of the records")
    parser.add_argument("--output", default=None, help="markdown file (default <results>/quality-summary.md)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    found: dict = {}
    dense: dict[str, dict] = {}
    for model, _, name in MODELS:
        records = load_records(results / name, KEY_NAMES)
        found.update(cells(records, args.tokens, args.episodes))
        if dense_key(model, args.tokens) in records:
            dense[model] = records[dense_key(model, args.tokens)]
    # tokens scored: as the dense records say (the older cells do not record it: the same windows)
    scored = sorted({rec.get("ppl_tokens") or scored_tokens(args.tokens, CONTEXT) for rec in dense.values()}
                    or {scored_tokens(args.tokens, CONTEXT)})
    text = "# Issue 14's quality table: every model and ratio\n\n" + header(
        " ".join(["python -m benchmarks.quality_summary", *(sys.argv[1:] if argv is None else argv)])) + "\n"
    dense_text = "; ".join(f"{label} {dense[model]['perplexity']:,.2f}" if model in dense else f"{label} not recorded"
                           for model, label, _ in MODELS)
    text += (f"Perplexity on the first {args.tokens:,} tokens of squad-wiki (context {CONTEXT}, "
             f"{' / '.join(f'{n:,}' for n in scored)} tokens scored), no fine-tuning, from the records of "
             f"`benchmarks.quality_perplexity`. The dense models on the same tokens: {dense_text}. Each cell: median "
             "(min – max) over seeds, then how many seeds beat random rows drawn with the same seed; `[n seeds]` where "
             "fewer than 5 were measured. "
             f"{', '.join(DETERMINISTIC)} draw nothing: one value.\n\n")
    text += report(found, METHODS)
    output = Path(args.output) if args.output else results / "quality-summary.md"
    output.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

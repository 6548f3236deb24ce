"""Zero-shot accuracy of the pruned model by selection method (issue 14's zero-shot table;
perplexity over more seeds is ``benchmarks.quality_perplexity``).

    python -m benchmarks.quality [--model smollm2-135m] [--limit 200] [--ratios 0.3,0.2]
        [--seeds 0,1,2] [--methods peak,random+protect,paper,random,magnitude] [--episodes 20]

For every ratio r, seed s and method, prunes through the product's own commands, so methods
differ only in which rows are kept, then evaluates the paper's five zero-shot tasks (first
``--limit`` documents of each) and perplexity with ``prunenet.evaluation``:

- ``peak``: ``prunenet.compress --selection peak`` (the neurons with the largest output max-|w|;
  deterministic: one run per ratio);
- ``random+protect``: ``prunenet.compress --selection random --protect_outliers 0.01 --seed s`` (the 1%
  of neurons with the largest output max-|w| kept, the rest uniform: the same rows for the same seed
  whichever command draws them);
- ``paper``: ``prunenet.fit --config configs/paper.yaml`` (the paper's algorithm, ``--episodes``
  episodes) with seed s;
- ``random``: ``prunenet.compress --selection random --seed s`` (uniform rows);
- ``magnitude``: ``prunenet.compress --selection magnitude`` (deterministic: one run per ratio).

The report marks the method the shipped config (configs/<model>.yaml) selects as the default.

Cells are mean ± std over seeds; each selection is also scored by the paper's objective, the mean
KS over layers (``benchmarks.selection_ks``). Each finished run is appended to a JSON-lines file
next to the table and skipped when the command runs again, so an interrupted run continues where it
stopped; the loop goes seed by seed, so a partial table is balanced across methods.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import CONFIGS, DETERMINISTIC, PROTECT, REPO, default_method, header, load_records, \
    mean_std, run_measured, table

METHODS = ("peak", "random+protect", "paper", "random", "magnitude")


def _prune(model: str, method: str, r: float, seed: int, episodes: int, work: Path) -> Path:
    """Prune ``model`` at ratio ``r`` by ``method`` with ``seed`` into a folder under ``work``; return it."""
    out = work / f"{method}-r{r:g}-s{seed}"
    if method == "paper":
        run_measured(["-m", "prunenet.fit", "--config", "configs/paper.yaml", f"--model.model_name_or_path={model}",
                      f"--model.compression_ratio={r}", f"--seed_everything={seed}", f"--trainer.max_epochs={episodes}",
                      f"--trainer.default_root_dir={work / 'runs'}", f"--slicing.output_dir={out}",
                      "--slicing.overwrite=true", "--evaluation.enabled=false", "--spectrum.enabled=false",
                      "--trainer.enable_progress_bar=false"])
    else:
        base, _, protect = method.partition("+")
        run_measured(["-m", "prunenet.compress", "--model", model, "--compression_ratio", str(r), "--output_dir",
                      str(out), "--seed", str(seed), "--overwrite", "--selection", base,
                      *(["--protect_outliers", str(PROTECT)] if protect else [])])
    return out


def main(argv: list[str] | None = None) -> None:
    from prunenet.evaluation import EvalSettings, PerplexitySettings, evaluate_checkpoint
    from prunenet.evaluation.report import average
    from prunenet.evaluation.tasks import ZERO_SHOT_TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(CONFIGS))
    parser.add_argument("--limit", type=int, default=200, help="documents per task (0 = the full sets)")
    parser.add_argument("--ratios", default="0.3,0.2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="peak,random+protect,paper,random")
    parser.add_argument("--episodes", type=int, default=20, help="episodes of the paper's policy")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ppl_tokens", type=int, default=8192, help="perplexity on the first N tokens")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/quality-zeroshot-<family>.md")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    limit = args.limit or None
    output = Path(args.output or REPO / f"benchmarks/results/quality-zeroshot-{args.model.split('-')[0]}.md")
    records_path = output.with_suffix(".jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = EvalSettings(tasks=list(ZERO_SHOT_TASKS), limit=limit, batch_size=args.batch_size,
                            perplexity=PerplexitySettings.parse("squad-wiki", max_tokens=args.ppl_tokens))

    def quiet(_msg: str) -> None:
        return None

    from benchmarks.selection_ks import score_plan
    from prunenet.plan import load_plan
    from prunenet.states import load_ffn_states

    key_names = ("model", "method", "ratio", "seed", "limit", "episodes", "ppl_tokens")
    records = load_records(records_path, key_names)
    states, _ = load_ffn_states(args.model)
    reference: dict = {}
    start = time.perf_counter()
    dense = evaluate_checkpoint(args.model, settings, label="dense", log=quiet)  # cached after the first run
    work = Path(tempfile.mkdtemp(prefix="prunenet-quality-"))
    try:
        for r in ratios:
            for seed in seeds:
                for method in methods:
                    if method in DETERMINISTIC and seed != seeds[0]:
                        continue
                    key = (args.model, method, r, seed if method not in DETERMINISTIC else 0, limit, args.episodes,
                           args.ppl_tokens)
                    if key in records:
                        continue
                    t0 = time.perf_counter()
                    folder = _prune(args.model, method, r, key[3], args.episodes, work)
                    prune_s = time.perf_counter() - t0
                    result = evaluate_checkpoint(str(folder), settings, use_cache=False, label=method, log=quiet)
                    plan = load_plan(folder)
                    rec = {**dict(zip(key_names, key)), "ks": score_plan(plan, states, reference)["ks"],
                           "prune_s": round(prune_s, 1), "eval_s": round(time.perf_counter() - t0 - prune_s, 1),
                           "average": average(result)["score"], "result": result}
                    with records_path.open("a") as f:
                        f.write(json.dumps(rec, default=str) + "\n")
                    records[key] = rec
                    shutil.rmtree(folder, ignore_errors=True)
                    print(f"[{time.perf_counter() - start:6.0f} s] r={r:g} {method:9s} seed {key[3]}: avg "
                          f"{100 * rec['average']:.1f}  ppl {result['perplexity']['perplexity']:.1f}", flush=True)
                    write_report(output, records, dense, args, argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(output, records, dense, args, argv)
    print(output.read_text())


def write_report(output: Path, records: dict, dense: dict, args, argv) -> None:
    """Write the markdown table: per method and ratio, mean ± std over seeds of every task, the
    average, retention (pruned average / dense average), perplexity and mean KS."""
    from prunenet.evaluation.report import average
    from prunenet.evaluation.tasks import ZERO_SHOT_TASKS

    limit = args.limit or None
    mine = [v for v in records.values() if v["model"] == args.model and v["limit"] == limit
            and v["episodes"] == args.episodes and v["ppl_tokens"] == args.ppl_tokens]
    dense_avg = average(dense)["score"]
    default = default_method(args.model)
    rows = [["**dense**", "0", 1, *(f"{100 * dense['tasks'][t]['score']:.1f}" for t in ZERO_SHOT_TASKS),
             f"{100 * dense_avg:.1f}", "100", f"{dense['perplexity']['perplexity']:.2f}", "0"]]
    for r in sorted({v["ratio"] for v in mine}, reverse=True):
        for method in METHODS:
            group = [v for v in mine if v["ratio"] == r and v["method"] == method]
            if not group:
                continue
            res = [g["result"] for g in group]
            avgs = [g["average"] for g in group]
            rows.append([f"{method} (default)" if method == default else method, f"{r:g}", len(group),
                         *(mean_std([x["tasks"][t]["score"] for x in res], 100.0) for t in ZERO_SHOT_TASKS),
                         mean_std(avgs, 100.0), mean_std([a / dense_avg for a in avgs], 100.0),
                         mean_std([x["perplexity"]["perplexity"] for x in res], digits=1),
                         mean_std([g["ks"] for g in group], digits=4)])
    metrics = ", ".join(f"{t}: {dense['tasks'][t]['metric']}" for t in ZERO_SHOT_TASKS)
    ppl = dense["perplexity"]
    text = f"# Zero-shot accuracy of the pruned model by selection method, {args.model}\n\n" + header(
        "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)) + "\n"
    text += (f"Zero-shot accuracy in % (first {limit or 'all'} documents of each task; {metrics}); mean ± std "
             "over seeds (peak and magnitude are deterministic). One task's standard error at 200 documents is about 3.5 "
             "points, the five-task average's about 1.5. Retention = pruned average / dense average. Perplexity: "
             f"{ppl['corpus']} ({ppl['tokens']} tokens, context {ppl['context_length']}). KS: mean over layers of "
             "KS(sv(W_gate), sv(W_gate[kept])), the paper's objective. `(default)`: what configs/compress/"
             f"{Path(CONFIGS[args.model]).name} selects; `+protect`: protect_outliers {PROTECT:g}; `paper` = "
             f"configs/paper.yaml, {args.episodes} episodes. No fine-tuning after pruning.\n\n")
    text += table(["method", "r", "runs", *ZERO_SHOT_TASKS, "avg", "retention %", "perplexity", "KS"], rows)
    output.write_text(text)


if __name__ == "__main__":
    main()

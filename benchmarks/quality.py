"""Zero-shot accuracy of the pruned model by selection method (issue 14's zero-shot table;
perplexity over more seeds is ``benchmarks.quality_perplexity``).

    python -m benchmarks.quality [--model smollm2-135m] [--limit 200] [--ratios 0.3,0.2]
        [--seeds 0,1,2] [--methods peak,random+protect,paper,random,magnitude] [--episodes 20]

For every ratio r, seed s and method, prunes through the product's own commands, so methods
differ only in which rows are kept, then evaluates the paper's five zero-shot tasks (``--limit``
documents of each, spread over the split by default: ``--sample first`` takes the first ones, as the
records made before issue 27 did) and perplexity with ``prunenet.evaluation``:

- ``peak``: ``prunenet.compress --selection peak`` (the neurons with the largest output max-|w|;
  deterministic: one run per ratio);
- ``random+protect``: ``prunenet.compress --selection random --protect_outliers 0.01 --seed s`` (the 1%
  of neurons with the largest output max-|w| kept, the rest uniform: the same rows for the same seed
  whichever command draws them);
- ``paper``: ``prunenet.fit --config configs/paper.yaml`` (the paper's algorithm, ``--episodes``
  episodes) with seed s;
- ``random``: ``prunenet.compress --selection random --seed s`` (uniform rows);
- ``magnitude``: ``prunenet.compress --selection magnitude`` (deterministic: one run per ratio);
- ``recon``, ``wanda_sp``, ``flap``, ``obs``: ``prunenet.compress --selection <method> --seed s`` (on the model's own
  text, 64 x 256 tokens sampled from BOS with seed s);
- ``features``: ``prunenet.fit --config configs/features.yaml`` with seed s, its policy and reward on the
  model's own text of seed s (the learned policy's top k);
- ``<method>+refit``: the same rows, then each FFN output projection's kept columns refit by least squares on
  the same text (``--refit`` / ``--slicing.refit=true``; ``prunenet/refit.py``); without the suffix, no refit.

The report marks the method the shipped config (configs/<model>.yaml) selects as the default.

One row per run; the dense and pruned models answer the same documents, so each row gives the pruned
minus dense average with its paired 95% interval and the retention with its interval
(``prunenet.evaluation.paired``), and, where a run of the same cell was evaluated on the first
documents, that run's average beside it. Each selection is also scored by the paper's objective, the mean
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

from benchmarks.common import CONFIGS, DETERMINISTIC, PROTECT, REPO, add_text_batch_argument, check_text_batch, \
    default_method, header, load_records, \
    run_measured, table
from prunenet.assets import exact_name

METHODS = ("peak", "random+protect", "paper", "random", "magnitude", "recon", "wanda_sp", "flap", "features",
           "recon+refit", "wanda_sp+refit", "flap+refit", "features+refit", "obs+refit")


def _prune(model: str, method: str, r: float, seed: int, episodes: int, work: Path, batch: int) -> Path:
    """Prune ``model`` at ratio ``r`` by ``method`` with ``seed`` into a folder under ``work`` (the model's own text
    sampled ``batch`` sequences a call); return it."""
    out = work / f"{method}-r{r:g}-s{seed}"
    method, refit = method.removesuffix("+refit"), method.endswith("+refit")
    if method in ("paper", "features"):
        text = [f"--model.{kind}.init_args.{k}={v}" for kind in ("policy", "reward") for k, v in
                (("seed", seed), ("batch", batch))] if method == "features" else []
        run_measured(["-m", "prunenet.fit", "--config", f"configs/{method}.yaml", f"--model.model_name_or_path={model}", *text,
                      f"--model.compression_ratio={r}", f"--seed_everything={seed}", f"--trainer.max_epochs={episodes}",
                      f"--trainer.default_root_dir={work / 'runs'}", f"--slicing.output_dir={out}",
                      "--slicing.overwrite=true", f"--slicing.refit={str(refit).lower()}",
                      "--evaluation.enabled=false", "--spectrum.enabled=false",
                      "--trainer.enable_progress_bar=false"])
    else:
        base, _, protect = method.partition("+")
        run_measured(["-m", "prunenet.compress", "--model", model, "--compression_ratio", str(r), "--output_dir",
                      str(out), "--seed", str(seed), "--overwrite", "--selection", base, "--calibration_batch", str(batch),
                      *(["--protect_outliers", str(PROTECT)] if protect else []), *(["--refit"] if refit else [])])
    return out


def main(argv: list[str] | None = None) -> None:
    from prunenet.evaluation import EvalSettings, PerplexitySettings, evaluate_checkpoint
    from prunenet.evaluation.report import average
    from prunenet.evaluation.settings import SAMPLES
    from prunenet.evaluation.tasks import ZERO_SHOT_TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(CONFIGS))
    parser.add_argument("--limit", type=int, default=200, help="documents per task (0 = the full sets)")
    parser.add_argument("--sample", default="spread", choices=SAMPLES,
                        help="which documents --limit takes: spread over the split (seeded, stratified) or the first")
    parser.add_argument("--ratios", default="0.3,0.2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="peak,random+protect,paper,random")
    parser.add_argument("--episodes", type=int, default=20, help="episodes of the paper's policy")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ppl_tokens", type=int, default=8192, help="perplexity on the first N tokens")
    parser.add_argument("--output", default=None, help="default: benchmarks/results/quality-zeroshot-<family>.md")
    add_text_batch_argument(parser)
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
    settings = EvalSettings(tasks=list(ZERO_SHOT_TASKS), limit=limit, sample=args.sample, batch_size=args.batch_size,
                            perplexity=PerplexitySettings.parse("squad-wiki", max_tokens=args.ppl_tokens))

    def quiet(_msg: str) -> None:
        return None

    from benchmarks.selection_ks import score_plan
    from prunenet.plan import load_plan
    from prunenet.states import load_ffn_states

    key_names = ("model", "method", "ratio", "seed", "limit", "sample", "episodes", "ppl_tokens")
    records = load_records(records_path, key_names)
    check_text_batch(records.values(), args.calibration_batch, records_path)
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
                    key = (args.model, method, r, seed if method not in DETERMINISTIC else 0, limit, args.sample,
                           args.episodes, args.ppl_tokens)
                    if key in records:
                        continue
                    t0 = time.perf_counter()
                    folder = _prune(args.model, method, r, key[3], args.episodes, work, args.calibration_batch)
                    prune_s = time.perf_counter() - t0
                    result = evaluate_checkpoint(str(folder), settings, use_cache=False, label=method, log=quiet)
                    plan = load_plan(folder)
                    rec = {**dict(zip(key_names, key)), "ks": score_plan(plan, states, reference)["ks"],
                           "prune_s": round(prune_s, 1), "eval_s": round(time.perf_counter() - t0 - prune_s, 1),
                           "average": average(result)["score"], "result": result,
                           "calibration_batch": args.calibration_batch}
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
    """Write the markdown table: one row per run (method, ratio, seed) with every task, the average,
    retention and the pruned - dense average with their paired 95% intervals, the average of the same
    run on the first documents (records of ``--sample first``, when there are), perplexity and mean KS."""
    from prunenet.evaluation.paired import paired_average, paired_difference
    from prunenet.evaluation.report import average
    from prunenet.evaluation.tasks import ZERO_SHOT_TASKS

    limit = args.limit or None

    def runs(sample: str) -> list[dict]:
        return [v for v in records.values() if v["model"] == args.model and v["limit"] == limit
                and v["sample"] == sample and v["episodes"] == args.episodes and v["ppl_tokens"] == args.ppl_tokens]

    mine = runs(args.sample)
    other = "first" if args.sample == "spread" else "spread"
    earlier = {(v["method"], v["ratio"], v["seed"]): v["average"] for v in runs(other)}
    dense_avg = average(dense)["score"]
    default = default_method(args.model)
    rows = [["**dense**", "0", "", *(f"{100 * dense['tasks'][t]['score']:.1f}" for t in ZERO_SHOT_TASKS),
             f"{100 * dense_avg:.1f}", "100", "", "", f"{dense['perplexity']['perplexity']:.2f}", "0"]]
    for r in sorted({v["ratio"] for v in mine}, reverse=True):
        for method in METHODS:
            for run in sorted((v for v in mine if v["ratio"] == r and v["method"] == method), key=lambda v: v["seed"]):
                res = run["result"]
                pairs = [paired_difference(dense["tasks"][t].get("per_doc") or {}, res["tasks"][t].get("per_doc") or {})
                         for t in ZERO_SHOT_TASKS]
                paired = paired_average(pairs) if all(pairs) else {}
                ci, ret = paired.get("ci95"), paired.get("retention_ci95_pct")
                old = earlier.get((method, r, run["seed"]))
                rows.append([f"{method} (default)" if method == default else method, f"{r:g}",
                             "" if method in DETERMINISTIC else run["seed"],
                             *(f"{100 * res['tasks'][t]['score']:.1f}" for t in ZERO_SHOT_TASKS),
                             f"{100 * run['average']:.1f}",
                             f"{100 * run['average'] / dense_avg:.1f}" + (f" [{ret[0]:.1f}, {ret[1]:.1f}]" if ret else ""),
                             f"{100 * paired['difference']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "—",
                             "—" if old is None else f"{100 * old:.1f}",
                             f"{res['perplexity']['perplexity']:.1f}", f"{run['ks']:.4f}"])
    metrics = ", ".join(f"{t}: {dense['tasks'][t]['metric']}" for t in ZERO_SHOT_TASKS)
    ppl = dense["perplexity"]
    drawn = ("spread over each split (a seeded sample, stratified by source for HellaSwag; the same documents for "
             "every model)" if args.sample == "spread" else "the first of each split")
    text = f"# Zero-shot accuracy of the pruned model by selection method, {exact_name(args.model)}\n\n" + header(
        "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)) + "\n"
    text += (f"Zero-shot accuracy in % on {limit or 'all'} documents a task, {drawn}; {metrics}. One row per run "
             "(peak and magnitude draw nothing). Retention = pruned average / dense average, with its paired 95% "
             "interval; `avg − dense`: the pruned minus dense average in points with its paired 95% interval (both "
             f"models answer the same documents); `{other} {limit}`: the same run's average on the {other} documents "
             f"(an earlier table), where there is one. Perplexity: {ppl['corpus']} ({ppl['tokens']} tokens, context "
             f"{ppl['context_length']}). KS: mean over layers of KS(sv(W_gate), sv(W_gate[kept])), the paper's "
             f"objective. `(default)`: what configs/compress/{Path(CONFIGS[args.model]).name} selects; `+protect`: "
             f"protect_outliers {PROTECT:g}; `paper` = configs/paper.yaml, {args.episodes} episodes. No fine-tuning "
             "after pruning.\n\n")
    text += table(["method", "r", "seed", *ZERO_SHOT_TASKS, "avg", "retention % (95% CI)", "avg − dense (95% CI)",
                   f"{other} {limit}", "perplexity", "KS"], rows)
    output.write_text(text)


if __name__ == "__main__":
    main()

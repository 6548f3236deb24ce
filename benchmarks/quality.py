"""Does the learned policy keep more of the model than random and magnitude pruning?

    python -m benchmarks.quality [--limit 40] [--ratios 0.2,0.25,0.3] [--seeds 0,1,2] [--episodes 20]

For SmolLM2-135M, every ratio r and every method, prunes through the product's own path
(``prunenet.fit`` for the policy, ``prunenet.compress`` for the other selections, so methods
differ only in which rows are kept), then evaluates the five zero-shot tasks (first ``limit``
documents of each) and perplexity with ``prunenet.evaluation``:

- ``prunenet-sample``: the paper's final selection (seeded multinomial over the keep
  probabilities) of a policy trained at r with seed s;
- ``prunenet-topk``: the k largest alpha of the same policy;
- ``random``: uniform rows, seed s;
- ``magnitude``: the k neurons with the largest sqrt(||gate_j||^2 + ||up_j||^2) (deterministic).

Stochastic methods run over every seed; cells are mean +- std over seeds. Each selection is
also scored by the policy's own objective, the mean KS over layers (``benchmarks.selection_ks``).
Writes benchmarks/results/quality-smollm2.md (and a .json with every raw number).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, header, mean_std, run_measured, table

METHODS = ("prunenet-sample", "prunenet-topk", "random", "magnitude")


def _prune(method: str, r: float, seed: int, episodes: int, work: Path) -> Path:
    fit_dir = work / f"fit-r{r:g}-s{seed}"
    if method.startswith("prunenet") and not (fit_dir / "policy.pt").exists():
        run_measured(["-m", "prunenet.fit", "--config", "configs/smollm2.yaml", f"--model.compression_ratio={r}",
                      f"--trainer.max_epochs={episodes}", f"--seed_everything={seed}",
                      f"--trainer.default_root_dir={work / 'runs'}", f"--slicing.output_dir={fit_dir}",
                      "--evaluation.enabled=false", "--spectrum.enabled=false", "--trainer.enable_progress_bar=false"])
    if method == "prunenet-sample":
        return fit_dir
    out = work / f"{method}-r{r:g}-s{seed}"
    args = ["-m", "prunenet.compress", "--model", "smollm2-135m", "--compression_ratio", str(r),
            "--output_dir", str(out), "--seed", str(seed), "--overwrite"]
    if method == "prunenet-topk":
        args += ["--policy", str(fit_dir), "--selection", "topk"]
    else:
        args += ["--method", method]
    run_measured(args)
    return out


def main(argv: list[str] | None = None) -> None:
    from prunenet.evaluation import EvalSettings, PerplexitySettings, evaluate_checkpoint
    from prunenet.evaluation.report import average
    from prunenet.evaluation.tasks import ZERO_SHOT_TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40, help="documents per task (None = full sets: --limit 0)")
    parser.add_argument("--ratios", default="0.2,0.25,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ppl_tokens", type=int, default=8192, help="perplexity on the first N tokens")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/quality-smollm2.md"))
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    limit = args.limit or None
    settings = EvalSettings(tasks=list(ZERO_SHOT_TASKS), limit=limit, batch_size=args.batch_size,
                            perplexity=PerplexitySettings.parse("squad-wiki", max_tokens=args.ppl_tokens))
    def quiet(_msg: str) -> None:
        return None

    from benchmarks.selection_ks import score_plan
    from prunenet.artifacts import PLAN_FILE
    from prunenet.states import load_ffn_states

    states, _ = load_ffn_states("smollm2-135m")
    reference: dict = {}
    start = time.perf_counter()
    dense = evaluate_checkpoint("smollm2-135m", settings, label="dense", log=quiet)
    records = [{"method": "dense", "ratio": 0.0, "seed": None, "result": dense}]
    work = Path(tempfile.mkdtemp(prefix="prunenet-quality-"))
    try:
        for r in ratios:
            for method in methods:
                for seed in (seeds if method != "magnitude" else seeds[:1]):
                    folder = _prune(method, r, seed, args.episodes, work)
                    result = evaluate_checkpoint(str(folder), settings, use_cache=False, label=method, log=quiet)
                    plan = json.loads((folder / PLAN_FILE).read_text())
                    ks = score_plan(plan, states, reference)["ks"]
                    records.append({"method": method, "ratio": r, "seed": seed, "result": result, "ks": ks})
                    avg = average(result)["score"]
                    print(f"[{time.perf_counter() - start:6.0f} s] r={r:g} {method:16s} seed {seed}: "
                          f"avg {100 * avg:.1f}  ppl {result['perplexity']['perplexity']:.2f}", flush=True)
                    # Rewritten after every run, so an interrupted benchmark still leaves its table.
                    write_report(records, args, argv, ratios, seeds, methods, limit, time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(Path(args.output).read_text())


def write_report(records: list[dict], args, argv, ratios, seeds, methods, limit, seconds: float) -> None:
    """Write the markdown table (mean +- std over seeds per method and ratio) and the raw JSON."""
    from prunenet.evaluation.report import average
    from prunenet.evaluation.tasks import ZERO_SHOT_TASKS

    dense = records[0]["result"]
    dense_avg = average(dense)["score"]
    headers = ["method", "r", "runs", *ZERO_SHOT_TASKS, "avg", "retention %", "perplexity", "KS"]
    rows = []
    for method, r in [("dense", 0.0)] + [(m, r) for r in ratios for m in methods]:
        group = [x["result"] for x in records if x["method"] == method and x["ratio"] == r]
        if not group:
            continue
        cells = [mean_std([g["tasks"][t]["score"] for g in group], 100.0) for t in ZERO_SHOT_TASKS]
        avgs = [average(g)["score"] for g in group]
        rows.append([f"**{method}**" if method == "dense" else method, f"{r:g}", len(group), *cells, mean_std(avgs, 100.0),
                     mean_std([a / dense_avg for a in avgs], 100.0),
                     mean_std([g["perplexity"]["perplexity"] for g in group], digits=2),
                     mean_std([x["ks"] for x in records if x["method"] == method and x["ratio"] == r and "ks" in x],
                              digits=4)])
    metrics = ", ".join(f"{t}: {dense['tasks'][t]['metric']}" for t in ZERO_SHOT_TASKS)
    ppl = dense["perplexity"]
    done = len(records) - 1
    planned = len(ratios) * sum(len(seeds) if m != "magnitude" else 1 for m in methods)
    text = "# Quality: PruneNet vs random and magnitude pruning, SmolLM2-135M\n\n" + header(
        "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)) + "\n"
    text += (f"Zero-shot accuracy in % (first {limit or 'all'} documents of each task's split; {metrics}); "
             f"mean ± std over seeds {seeds} for the stochastic methods (magnitude is deterministic). "
             f"Retention = pruned average / dense average. Perplexity: {ppl['corpus']} ({ppl['tokens']} tokens, "
             f"context {ppl['context_length']}, stride {ppl['stride']}). KS: mean over layers of "
             f"KS(sv(W_i), sv(W_i[kept])), the policy's objective (lower = closer spectrum). Policies: {args.episodes} episodes, "
             f"trained at the ratio they are applied at. No fine-tuning after pruning. "
             f"{done} of {planned} pruned runs done, wall time {seconds / 60:.0f} min.\n\n")
    text += table(headers, rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    Path(args.output).with_suffix(".json").write_text(json.dumps(records, indent=1, default=str))


if __name__ == "__main__":
    main()

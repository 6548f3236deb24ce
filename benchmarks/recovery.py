"""Recovery fine-tuning after slicing: perplexity against steps, LoRA vs full fine-tuning (issue 15).

    python -m benchmarks.recovery --model out/smollm2-r0.3 --runs lora:2e-4,full:1e-4 --steps 0,25,50,100
        [--data wiki] [--tokens 8192] [--zero_shot_limit 200] [--output benchmarks/results/recovery-smollm2.md]

Each run is one ``python -m prunenet.recover --config configs/recover.yaml`` process (the product's own
entry point and defaults; ``--trainer.max_steps`` = the largest step) with :class:`PerplexityProbe`
added as a callback: it measures the squad-wiki perplexity (first ``--tokens`` tokens, context 512, as
the demo's evaluation) of the model being trained at each listed step (0 = before any update). The
probe's time is not counted in the training wall time. A run's learning-rate schedule decays over its
own ``max_steps``, so the value at step 50 of a 100-step run is not that of a 50-step run.
Peak memory is the run's whole-process peak RSS. ``--zero_shot_limit N`` also evaluates the
unrecovered input and each run's recovered model on the five zero-shot tasks (first N documents).

Finished runs are appended to a JSON-lines file next to the table and skipped when the command runs again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import lightning as L

from benchmarks.common import header, run_measured, table


class PerplexityProbe(L.Callback):
    """Squad-wiki perplexity of the model in training at the given global steps; written as JSON at fit end.

    Args:
        steps: global steps to measure at (0: before the first update).
        max_tokens: first N tokens of the squad-wiki text (context 512, no overlap).
        output: JSON file for ``{"points": [{"step", "tokens", "perplexity", "train_wall_s"}], ...}``.
    """

    def __init__(self, steps: list[int], max_tokens: int = 8192, output: str = "probe.json",
                 context_length: int = 512) -> None:
        self.steps, self.max_tokens, self.output = sorted(set(steps)), max_tokens, output
        self.context_length = context_length
        self.points: list[dict] = []
        self.probe_s = 0.0
        self.started = time.perf_counter()

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from prunenet.evaluation.perplexity import PerplexitySettings, perplexity

        start = time.perf_counter()
        pl_module.model.eval()
        ppl = perplexity(pl_module.model, pl_module.load_tokenizer(),
                         PerplexitySettings("squad-wiki", self.context_length, None, self.max_tokens), progress=False)
        pl_module.model.train()
        self.points.append({"step": trainer.global_step, "tokens": pl_module.tokens_seen,
                            "perplexity": ppl["perplexity"], "scored_tokens": ppl["tokens"],
                            "train_wall_s": round(start - self.started - self.probe_s, 1)})
        self.probe_s += time.perf_counter() - start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        if 0 in self.steps:
            self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps and trainer.global_step > 0:
            self.measure(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.output).write_text(json.dumps({"points": self.points, "num_trained": pl_module.num_trained}))


def run_one(model: str, method: str, lr: float, steps: list[int], tokens: int, work: Path, extra: list[str],
            context: int = 512, data: str = "wiki") -> dict:
    """One recovery process; returns its record (points, wall time, peak RSS, output folder)."""
    name = f"{method}-lr{lr:g}-{max(steps)}-{Path(data).stem}"
    probe, out = work / f"{name}.probe.json", work / name
    args = ["-m", "prunenet.recover", "--config", "configs/recover.yaml", f"--model.model_name_or_path={model}",
            f"--model.method={method}", f"--model.learning_rate={lr}", f"--trainer.max_steps={max(steps)}",
            f"--export.output_dir={out}", "--export.overwrite=true", "--evaluation.enabled=false",
            f"--trainer.default_root_dir={work / 'logs'}", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=benchmarks.recovery.PerplexityProbe", f"--trainer.callbacks.steps={steps}",
            f"--trainer.callbacks.max_tokens={tokens}", f"--trainer.callbacks.output={probe}",
            f"--trainer.callbacks.context_length={context}", f"--data.source={data}", *extra]
    wall, rss, _ = run_measured(args)
    result = json.loads(probe.read_text())
    return {"run": name, "method": method, "learning_rate": lr, "data": data, "extra": extra, "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2),
            "output": str(out), **result}


def zero_shot(model: str, limit: int) -> dict:
    """Average of the five zero-shot tasks (first ``limit`` documents) and its standard error."""
    from prunenet.evaluation import EvalSettings, evaluate_checkpoint
    from prunenet.evaluation.tasks import ZERO_SHOT_TASKS

    result = evaluate_checkpoint(model, EvalSettings(tasks=list(ZERO_SHOT_TASKS), limit=limit, batch_size=16),
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
    recs = [result["tasks"][t] for t in ZERO_SHOT_TASKS]
    return {"average": sum(r["score"] for r in recs) / len(recs),
            "stderr": math.sqrt(sum((r["stderr"] or 0.0) ** 2 for r in recs)) / len(recs),
            "tasks": {t: r["score"] for t, r in zip(ZERO_SHOT_TASKS, recs)}, "limit": limit}


def write_report(path: Path, command: str, records: list[dict], before: dict | None) -> None:
    rows = []
    for rec in records:
        for p in rec["points"]:
            last = p is rec["points"][-1]
            zs = rec.get("zero_shot") if last else (before if p["step"] == 0 else None)
            rows.append([rec["method"], f"{rec['learning_rate']:g}", rec.get("data", ""), p["step"], f"{p['tokens']:,}", p["train_wall_s"],
                         rec["peak_rss_gib"] if last else "", f"{p['perplexity']:,.1f}",
                         f"{100 * zs['average']:.1f} ± {100 * zs['stderr']:.1f}" if zs else ""])
    scored = sorted({p["scored_tokens"] for rec in records for p in rec["points"] if "scored_tokens" in p})
    text = (f"# Recovery fine-tuning: perplexity against steps\n\n{header(command)}\n"
            "Perplexity: squad-wiki, context `--context` (default 512), the first `--tokens` tokens (the column says "
            "how many were scored); zero-shot: average of the "
            "five tasks in % ± its standard error (first `--zero_shot_limit` documents each). Wall time: training "
            "only (the probes excluded), on a machine shared with other jobs. Peak RSS: the whole run.\n\n")
    text += table(["method", "lr", "data", "steps", "tokens trained", "train wall s", "peak RSS GiB",
                   f"perplexity ({' / '.join(f'{n:,}' for n in scored)} tokens)" if scored else "perplexity",
                   "zero-shot avg"],
                  rows)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the checkpoint to recover (a pruned folder)")
    p.add_argument("--runs", default="lora:2e-4,full:1e-4", help="method:learning_rate, comma-separated")
    p.add_argument("--steps", default="0,25,50,100", help="perplexity probes; the largest is the run length")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512, help="perplexity context length")
    p.add_argument("--zero_shot_limit", type=int, default=0, help="0: no zero-shot evaluation")
    p.add_argument("--data", default="wiki", help="--data.source of the runs")
    p.add_argument("--extra", default="", help="more flags for prunenet.recover, space-separated (--extra='--a=1 --b=2')")
    p.add_argument("--output", default="benchmarks/results/recovery-smollm2.md")
    args = p.parse_args(argv)
    out = Path(args.output)
    work = out.with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    done_file = out.with_suffix(".jsonl")
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    steps = [int(s) for s in args.steps.split(",")]
    records = []
    for run in args.runs.split(","):
        method, lr = run.split(":")
        prior = [r for r in done if r["method"] == method and r["learning_rate"] == float(lr) and
                 [q["step"] for q in r["points"]] == steps and r["model"] == args.model and
                 r.get("data") == args.data and r.get("extra") == args.extra.split()]
        if prior:
            records.append(prior[-1])
            continue
        rec = {"model": args.model, **run_one(args.model, method, float(lr), steps, args.tokens, work, args.extra.split(),
                                                  args.context, args.data)}
        if args.zero_shot_limit:
            rec["zero_shot"] = zero_shot(rec["output"], args.zero_shot_limit)
        print(json.dumps({k: v for k, v in rec.items()}), file=sys.stderr, flush=True)
        with done_file.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
    before = zero_shot(args.model, args.zero_shot_limit) if args.zero_shot_limit else None
    write_report(out, "python -m benchmarks.recovery " + " ".join(argv if argv is not None else sys.argv[1:]), records,
                 before)
    print(out.read_text())


if __name__ == "__main__":
    main()

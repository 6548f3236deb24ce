"""Does each learner optimise its own objective? Fit the policy with every learner and several fit
seeds, score the final selections (``sample``: the fit's seeded draw, and ``topk``) by the mean KS over
layers of the gate spectra, against uniformly random rows over seeds (issue 14, item 1).

    python -m benchmarks.learner_ks [--model smollm2-135m] [--ratio 0.3] [--episodes 20]
        [--random_seeds 5] [--fit_seeds 0,1,2,3,4] [--learners paper,baseline,learned]
        [--output benchmarks/results/learner-ks-smollm2.md]

Learners (:data:`LEARNERS`): ``paper`` = ``configs/paper.yaml`` (the paper's algorithm); ``baseline`` =
the same with ``--model.learner=baseline`` (ours, the paper's policy); ``learned`` =
``configs/learned.yaml`` (ours: baseline learner, ``row_mlp`` policy, learning rate 1e-2). Each fit is
the whole ``python -m prunenet.fit`` process (evaluation off), timed; its TensorBoard ``ks/mean`` curve
is read back for the training-curve table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, header, mean_std, table

#: Benchmark learner name -> (fit config, extra fit flags).
LEARNERS = {"paper": ("configs/paper.yaml", []),
            "baseline": ("configs/paper.yaml", ["--model.learner=baseline"]),
            "learned": ("configs/learned.yaml", [])}
#: Episodes whose mean KS the training-curve table shows (1-based; the last is added).
CURVE_AT = (1, 5, 10, 15)


def _run(*args: str) -> float:
    """Run ``python -m <args>`` from the repository; returns the wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def ks_curve(log_dir: Path) -> list[float]:
    """The logged ``ks/mean`` of each episode of the fit that wrote TensorBoard events under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted({e.parent for e in log_dir.rglob("events.out.tfevents.*")})
    if len(folders) != 1:  # each fit gets its own folder: several would be an ambiguous curve
        raise FileNotFoundError(f"expected the TensorBoard events of one fit under {log_dir}, found {len(folders)}")
    acc = EventAccumulator(str(folders[0]))
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars("ks/mean"), key=lambda e: e.step)]


def main(argv: list[str] | None = None) -> None:
    from benchmarks.selection_ks import score_plan
    from prunenet.plan import load_plan
    from prunenet.states import load_ffn_states

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--random_seeds", type=int, default=5, help="seeds of the random rows")
    parser.add_argument("--fit_seeds", default="0,1,2,3,4", help="seed_everything of each fit")
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/learner-ks-smollm2.md"))
    args = parser.parse_args(argv)
    learners = args.learners.split(",")
    unknown = sorted(set(learners) - set(LEARNERS))
    if unknown:
        parser.error(f"unknown learner(s) {unknown}; choose from {list(LEARNERS)}")
    fit_seeds = [int(s) for s in args.fit_seeds.split(",")]
    if args.random_seeds < 2:
        parser.error(f"--random_seeds must be >= 2 (a standard deviation), got {args.random_seeds}")

    work = Path(tempfile.mkdtemp(prefix="prunenet-learner-ks-"))
    states, _ = load_ffn_states(args.model)
    reference: dict = {}

    def score(folder: Path) -> float:
        return score_plan(load_plan(folder), states, reference)["ks"]

    r = f"{args.ratio:g}"
    random_ks = []
    for seed in range(args.random_seeds):
        folder = work / f"random-{seed}"
        _run("prunenet.compress", "--selection", "random", "--seed", str(seed), "--model", args.model,
             "--compression_ratio", r, "--output_dir", str(folder))
        random_ks.append(score(folder))
    mean, std = statistics.fmean(random_ks), statistics.stdev(random_ks)

    results: dict[str, dict] = {}
    for name in learners:
        config, flags = LEARNERS[name]
        res = results[name] = {"sample": [], "topk": [], "seconds": [], "curves": []}
        for seed in fit_seeds:
            out, logs = work / f"{name}-{seed}-sample", work / f"logs-{name}-{seed}"
            res["seconds"].append(_run(
                "prunenet.fit", "--config", config, *flags, f"--seed_everything={seed}",
                f"--model.model_name_or_path={args.model}", f"--model.compression_ratio={r}",
                f"--trainer.max_epochs={args.episodes}", "--slicing.selection=sample",
                "--evaluation.enabled=false", "--spectrum.enabled=false", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={logs}", f"--slicing.output_dir={out}"))
            topk = work / f"{name}-{seed}-topk"
            _run("prunenet.compress", "--policy", str(out), "--selection", "topk", "--model", args.model,
                 "--compression_ratio", r, "--output_dir", str(topk))
            res["sample"].append(score(out))
            res["topk"].append(score(topk))
            res["curves"].append(ks_curve(logs))
            print(f"{name} seed {seed}: KS sample {res['sample'][-1]:.4f}, topk {res['topk'][-1]:.4f} "
                  f"(random {mean:.4f} ± {std:.4f}), fit {res['seconds'][-1]:.0f} s", flush=True)

    def below(ks: float) -> float:
        return (mean - ks) / std

    command = "python -m benchmarks.learner_ks " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"# Does each learner optimise its objective? KS of its selections, {args.model}\n\n" + header(command)
    text += (f"\nr = {r}, {args.episodes} episodes, fit seeds {args.fit_seeds}. Per selection: mean over layers of "
             "KS(sv(W_gate), sv(W_gate[kept])), the paper's objective (lower is better). Random rows: "
             f"{mean:.4f} ± {std:.4f} (mean ± std over {args.random_seeds} seeds). 'σ below random' = (random mean "
             "- KS) / random std, so positive is better than random rows; the issue asks for > 5 σ.\n\n")
    rows = []
    for name, res in results.items():
        for selection in ("sample", "topk"):
            ks = res[selection]
            rows.append([name, selection, mean_std(ks, digits=4), " / ".join(f"{k:.4f}" for k in ks),
                         " / ".join(f"{below(k):+.1f}" for k in ks),
                         f"{sum(below(k) > 5 for k in ks)} of {len(ks)}"])
    text += table(["learner", "selection", "KS mean ± std over fit seeds", "KS of each seed",
                   "σ below random, each seed", "seeds > 5 σ below"], rows)
    last = args.episodes
    at = [e for e in CURVE_AT if e < last] + [last]
    text += ("\nTraining curve: the logged `ks/mean` of the episode's draws (TensorBoard), median over fit seeds, "
             "at episodes " + ", ".join(map(str, at)) + ":\n\n")
    text += table(["learner", *(f"episode {e}" for e in at)],
                  [[name, *(f"{statistics.median(c[e - 1] for c in res['curves']):.4f}" for e in at)]
                   for name, res in results.items()])
    text += f"\nFit time, {args.episodes} episodes, whole `prunenet.fit` process (evaluation off), this machine:\n\n"
    text += table(["learner", "median s", "min s", "max s"],
                  [[name, f"{statistics.median(res['seconds']):.1f}", f"{min(res['seconds']):.1f}",
                    f"{max(res['seconds']):.1f}"] for name, res in results.items()])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

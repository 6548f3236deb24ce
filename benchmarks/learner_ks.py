"""Does each learner optimise its own objective? Fit the policy with every learner, score the final
selections (``sample`` and ``topk``) by the mean KS over layers, against random rows over seeds.

    python -m benchmarks.learner_ks [--model smollm2-135m] [--ratio 0.3] [--episodes 20] [--seeds 5]
                                    [--learners paper,baseline] [--output benchmarks/results/learner-ks-smollm2.md]

The KS table is ``benchmarks.selection_ks`` on all the folders; below it, the fit time of each
learner (the whole ``python -m prunenet.fit`` process, evaluation off) and how many random-seed
standard deviations each selection's KS lies below the random rows' mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, table


def _run(*args: str) -> float:
    """Run ``python -m <args>`` from the repository; returns the wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    from benchmarks.selection_ks import main as selection_ks
    from benchmarks.selection_ks import method_label, score_plan
    from prunenet.artifacts import PLAN_FILE
    from prunenet.states import load_ffn_states

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5, help="random-row seeds")
    parser.add_argument("--learners", default="paper,baseline")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/learner-ks-smollm2.md"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="prunenet-learner-ks-"))
    r, folders, fit_seconds = f"{args.ratio:g}", [], {}
    for seed in range(args.seeds):
        folders.append(work / f"random-{seed}")
        _run("prunenet.compress", "--method", "random", "--seed", str(seed), "--model", args.model,
             "--compression_ratio", r, "--output_dir", str(folders[-1]))
    for learner in args.learners.split(","):
        out = work / f"{learner}-sample"
        fit_seconds[learner] = _run(
            "prunenet.fit", "--config", "configs/smollm2.yaml", f"--model.model_name_or_path={args.model}",
            f"--model.learner={learner}", f"--model.compression_ratio={r}", f"--trainer.max_epochs={args.episodes}",
            "--evaluation.enabled=false", "--spectrum.enabled=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={work / 'logs'}", f"--slicing.output_dir={out}")
        folders += [out, work / f"{learner}-topk"]
        _run("prunenet.compress", "--policy", str(out), "--selection", "topk", "--model", args.model,
             "--compression_ratio", r, "--output_dir", str(folders[-1]))
    selection_ks([*map(str, folders), "--output", args.output])

    # How far below random rows, in random-seed standard deviations, and the fit times.
    states, _ = load_ffn_states(args.model)
    reference: dict = {}
    scores = {f.name: (method_label(json.loads((f / PLAN_FILE).read_text())),
                       score_plan(json.loads((f / PLAN_FILE).read_text()), states, reference)["ks"]) for f in folders}
    rand = [ks for label, ks in scores.values() if label == "random"]
    mean, std = statistics.fmean(rand), statistics.stdev(rand)
    rows = [[label, f"{ks:.4f}", f"{(mean - ks) / std:+.1f}"] for name, (label, ks) in scores.items()
            if label != "random"]
    text = Path(args.output).read_text()
    text += (f"\nBelow random rows (mean {mean:.4f}, std {std:.4f} over {len(rand)} seeds), in random-seed "
             "standard deviations (positive = lower KS than random):\n\n")
    text += table(["selection", "KS", "std below random"], rows)
    text += f"\nFit time, {args.episodes} episodes, whole process (evaluation off), this machine:\n\n"
    text += table(["learner", "seconds"], [[k, f"{v:.1f}"] for k, v in fit_seconds.items()])
    text = text.replace("python -m benchmarks.selection_ks " + " ".join([*map(str, folders), "--output", args.output]),
                        "python -m benchmarks.learner_ks " + " ".join(sys.argv[1:] if argv is None else argv))
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

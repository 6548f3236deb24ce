"""The policy's own objective, measured on any selection: does the learner optimise it?

    python -m benchmarks.selection_ks PLAN [PLAN ...] [--output benchmarks/results/selection-ks-smollm2.md]

Each PLAN is a pruned folder or its ``prunenet.json`` (written by ``prunenet.fit`` and
``prunenet.compress`` for every method). For every layer i of the plan's source model, the
FFN input matrix W_i is read again and the selection is scored the way the training loop
scores it (paper Section 3): KS(sv(W_i), sv(W_i[kept])) and the reward 1 / KS. Also reported:
the mean L2 norm of the kept rows relative to all rows (1.0 = no preference for large rows;
magnitude pruning maximises it).

Rows are grouped by (method, ratio) with mean +- std over seeds. The table answers a question
the zero-shot table cannot: if a trained policy does not reach a lower KS than random rows, the
learner is not optimising its reward; if it does and still scores worse, the reward is not
aligned with accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import REPO, header, mean_std, table


def method_label(plan: dict) -> str:
    """``prunenet-sample``, ``prunenet-topk`` (the paper's learner), ``prunenet[<learner>]-<selection>``
    (another learner), ``random`` or ``magnitude``."""
    if plan["method"] != "prunenet":
        return plan["method"]
    learner = plan.get("learner") or plan.get("policy_learner") or "paper"  # plans before learners: the paper's
    return f"prunenet-{plan['selection']}" if learner == "paper" else f"prunenet[{learner}]-{plan['selection']}"


def score_plan(plan: dict, states, reference: dict[int, torch.Tensor]) -> dict[str, float]:
    """Mean over layers of KS, reward 1/KS and kept-row norm ratio for one plan.

    Args:
        plan: a ``prunenet.json`` dict (``kept_indices``: layer -> list of row indices).
        states: the source model's FFN input matrices, (n, d) each.
        reference: cache of sv(W_i), filled on first use.
    """
    from prunenet.reward import ks_statistic, singular_values, spectral_reward

    ks, rewards, norm_ratio = [], [], []
    for key, rows in plan["kept_indices"].items():
        i = int(key)
        w = states[i].float()
        if i not in reference:
            reference[i] = singular_values(w)
        kept = torch.tensor(rows, dtype=torch.long)
        value = float(ks_statistic(reference[i], singular_values(w.index_select(0, kept))))
        ks.append(value)
        rewards.append(spectral_reward(value))
        norms = w.norm(dim=1)
        norm_ratio.append(float(norms[kept].mean() / norms.mean()))
    return {"ks": statistics.fmean(ks), "reward": statistics.fmean(rewards), "norm_ratio": statistics.fmean(norm_ratio)}


def main(argv: list[str] | None = None) -> None:
    from prunenet.plan import load_plan, plan_path
    from prunenet.states import load_ffn_states

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", help="pruned folders or prunenet.json files")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/selection-ks-smollm2.md"))
    args = parser.parse_args(argv)
    plans = []
    for item in args.plans:
        if not plan_path(item).is_file():
            sys.exit(f"error: {item} is neither a pruned folder nor a prunenet.json file")
        plans.append(load_plan(item))
    sources = {p["source_model"] for p in plans}
    if len(sources) != 1:
        sys.exit(f"error: the plans come from {len(sources)} source models {sorted(sources)}; give plans of one model")
    source = sources.pop()
    states, _ = load_ffn_states(source)
    reference: dict[int, torch.Tensor] = {}
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for plan in plans:
        groups[(method_label(plan), plan["compression_ratio"])].append(score_plan(plan, states, reference))
    order = ["prunenet-sample", "prunenet-topk", "prunenet[baseline]-sample", "prunenet[baseline]-topk", "random",
             "magnitude"]
    rows = []
    for (method, r), scores in sorted(groups.items(), key=lambda g: (g[0][1], order.index(g[0][0])
                                                                     if g[0][0] in order else len(order))):
        rows.append([method, f"{r:g}", len(scores), mean_std([s["ks"] for s in scores], digits=4),
                     mean_std([s["reward"] for s in scores], digits=2),
                     mean_std([s["norm_ratio"] for s in scores], digits=3)])
    text = f"# Spectral KS of each selection method, {source}\n\n" + header(
        "python -m benchmarks.selection_ks " + " ".join(sys.argv[1:] if argv is None else argv)) + "\n"
    text += ("Per plan: mean over layers of KS(sv(W_i), sv(W_i[kept])) (lower = closer spectrum, the policy's "
             "objective), of the reward 1/KS, and of the mean norm of kept rows / mean norm of all rows. "
             "Mean ± std over seeds.\n\n")
    text += table(["method", "r", "plans", "KS (mean over layers)", "reward 1/KS", "kept-row norm ratio"], rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""The evaluation report's figure (ours; issue 27): ``eval.png`` beside ``eval.md``, and TensorBoard's ``eval``."""

from __future__ import annotations

from typing import Any


def figure(comparison: dict[str, Any], before: dict[str, Any] | None = None):
    """Dense vs pruned (vs the pruned model before recovery) per task, with each score's standard error, and
    the paired difference with its 95% interval; the perplexities in the title. A matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    prior = {r["task"]: r for r in (before or {}).get("comparison", {}).get("rows", [])}
    series = [("dense", "dense", "dense_stderr")] if any(r["dense"] is not None for r in rows) else []
    if prior:
        series.append(("before recovery", None, None))
    series.append(("pruned" if not prior else "recovered", "pruned", "pruned_stderr"))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(series)
    for j, (label, key, err) in enumerate(series):
        if key is None:
            values = [prior.get(r["task"], {}).get("pruned") or 0.0 for r in rows]
            errors = [prior.get(r["task"], {}).get("pruned_stderr") or 0.0 for r in rows]
        else:
            values = [r[key] or 0.0 for r in rows]
            errors = [r[err] or 0.0 for r in rows]
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))], values, width, yerr=errors,
               capsize=3, label=label)
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows], rotation=20)
    ax.set_ylabel("score (± standard error)")
    ax.legend()
    paired = [(r["task"], r["paired"]) for r in rows if r.get("paired")]
    if comparison.get("average") and comparison["average"].get("paired"):
        paired.append(("average", comparison["average"]["paired"]))
    for i, (task, p) in enumerate(paired):
        bx.errorbar([p["difference"]], [i], xerr=[[p["difference"] - p["ci95"][0]], [p["ci95"][1] - p["difference"]]],
                    fmt="o", color="tab:gray" if p["within_noise"] else "tab:red", capsize=3)
    bx.axvline(0.0, color="black", linewidth=0.8)
    bx.set_yticks(range(len(paired)), [t for t, _ in paired])
    bx.set_xlabel("pruned − dense, same documents (95% CI)")
    ppl = comparison.get("perplexity")
    title = "zero-shot scores"
    if ppl:
        title += (f"; perplexity {ppl['corpus']} ({ppl['tokens']} tokens): dense {_fmt(ppl['dense'])}, "
                  f"pruned {_fmt(ppl['pruned'])}")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"

"""The evaluation report: retention, its one JSON schema (``eval.json``) and its table (``eval.md``),
written alike by the PostPruningEvaluation callback and ``prunenet.evaluate``.

Retention of a task = 100 * pruned score / dense score (higher-is-better metrics
only). The average is over the five zero-shot tasks of the paper and SliceGPT
(PIQA, WinoGrande, HellaSwag, ARC-e, ARC-c) that were evaluated, and its
retention is 100 * average pruned / average dense. Perplexities are reported
dense / pruned (lower is better; no retention).
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import Any

from prunenet.evaluation.paired import paired_average, paired_difference, paired_windows
from prunenet.evaluation.tasks import ZERO_SHOT_TASKS


def retention(dense: float | None, pruned: float | None) -> float | None:
    """100 * pruned / dense, or None when undefined (missing value or dense <= 0)."""
    if dense is None or pruned is None or dense <= 0:
        return None
    return 100.0 * pruned / dense


def average(result: dict[str, Any]) -> dict[str, Any] | None:
    """Mean reported score over the zero-shot tasks present: ``{"score", "tasks"}`` or None."""
    names = [t for t in ZERO_SHOT_TASKS if t in result.get("tasks", {})]
    if not names:
        return None
    return {"score": sum(result["tasks"][t]["score"] for t in names) / len(names), "tasks": names}


def compare(dense: dict[str, Any] | None, pruned: dict[str, Any]) -> dict[str, Any]:
    """Rows of dense / pruned / retention per task, the zero-shot average and perplexities.

    ``dense`` may be None (a single model): the dense and retention fields are then None.
    """
    rows = []
    for name, rec in pruned["tasks"].items():
        d = dense["tasks"].get(name) if dense else None
        rows.append({
            "task": name, "metric": rec["metric"], "split": rec["split"], "n": rec["n"],
            "n_total": rec.get("n_total"), "higher_is_better": rec.get("higher_is_better", True),
            "dense": d["score"] if d else None, "dense_stderr": d.get("stderr") if d else None,
            "pruned": rec["score"], "pruned_stderr": rec.get("stderr"),
            "retention_pct": retention(d["score"], rec["score"]) if d and rec.get("higher_is_better", True)
            else None,
            # the same documents scored by both models: their difference with its paired error (paired.py)
            "paired": paired_difference(d["per_doc"], rec["per_doc"]) if d and d.get("per_doc") and rec.get("per_doc")
            else None,
        })
    avg_p = average(pruned)
    avg_d = average(dense) if dense else None
    avg = None
    if avg_p:
        avg = {"tasks": avg_p["tasks"], "pruned": avg_p["score"],
               "dense": avg_d["score"] if avg_d and avg_d["tasks"] == avg_p["tasks"] else None}
        avg["retention_pct"] = retention(avg["dense"], avg["pruned"])
        pairs = [r["paired"] for r in rows if r["task"] in avg_p["tasks"] and r["paired"]]
        avg["paired"] = paired_average(pairs) if len(pairs) == len(avg_p["tasks"]) else None
    ppl = None
    if pruned.get("perplexity"):
        p = pruned["perplexity"]
        d = dense.get("perplexity") if dense else None
        ppl = {"corpus": p["corpus"], "description": p.get("description"), "context_length": p["context_length"],
               "stride": p["stride"], "max_tokens": p.get("max_tokens"), "tokens": p["tokens"],
               "pruned": p["perplexity"], "dense": d["perplexity"] if d else None,
               "paired": paired_windows((d or {}).get("window_nll"), p.get("window_nll"))}
    return {"rows": rows, "average": avg, "perplexity": ppl, "limit": pruned["settings"]["limit"],
            "sample": pruned["settings"].get("sample", "first"),
            "processes": pruned.get("processes", 1)}


#: The schema of ``eval.json``; version 2 is the first shared by the fit and ``prunenet.evaluate``.
REPORT_FORMAT = "prunenet-eval/2"


def report(*, model: str, result: dict[str, Any], baseline: str | None, baseline_result: dict[str, Any] | None,
           settings: dict[str, Any], comparison: dict[str, Any], wall_s: float,
           compression_ratio: float | None = None, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``eval.json`` payload.

    Args:
        model: the evaluated model (a pruned folder after a fit, a recovered one after a recovery).
        result: its results (``evaluate_model`` / ``evaluate_checkpoint``).
        baseline, baseline_result: the model it is compared with (the dense source after a fit),
            or None.
        settings: ``EvalSettings.to_dict()``; ``processes`` (how many processes evaluated, from
            ``result``) is added. Each task computed in the run also records ``requests_per_rank``
            (and the perplexity ``windows_per_rank``) in ``result`` / ``baseline_result``.
        comparison: :func:`compare` of the two.
        wall_s: seconds the evaluation took.
        compression_ratio: of the pruned model, when known.
        before: after a recovery, the pruned model before it, when its results are known:
            ``{"model", "result", "comparison"}`` (the comparison is dense vs that model); written as
            the optional ``before_recovery`` field.
    """
    from prunenet.assets import exact_name

    payload = {"format": REPORT_FORMAT, "model": str(model), "baseline": None if baseline is None else str(baseline),
               "model_exact": exact_name(str(model)),
               "baseline_exact": None if baseline is None else exact_name(str(baseline)),
               "compression_ratio": compression_ratio, "settings": {**settings, "processes": result.get("processes", 1)},
               "comparison": comparison,
               "result": result, "baseline_result": baseline_result, "wall_s": round(float(wall_s), 2)}
    if before is not None:
        payload["before_recovery"] = before
    return payload


def write_report(path: str | Path, payload: dict[str, Any], table: str) -> Path:
    """Write ``eval.json`` (``path``, the :func:`report` payload), its ``.md`` table and its ``.png`` figure
    (:func:`figure`) beside it, atomically: the one writer of the format. Returns the ``.md`` path."""
    from prunenet.artifacts import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=1, default=str) + "\n")
    atomic_write_text(path.with_suffix(".md"), table)
    from prunenet.evaluation.figure import figure

    fig = figure(payload["comparison"], payload.get("before_recovery"))
    tmp = path.with_suffix(".png.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        tmp.replace(path.with_suffix(".png"))
    finally:
        tmp.unlink(missing_ok=True)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path.with_suffix(".md")


def load_report(path: str | Path) -> dict[str, Any] | None:
    """The ``eval.json`` at ``path`` (or in the folder ``path``): the one reader of the format. None when there is
    none, it does not parse, or it is not a :data:`REPORT_FORMAT` report with a ``result``."""
    from prunenet.artifacts import EVAL_JSON

    path = Path(path)
    path = path / EVAL_JSON if path.is_dir() else path
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("format") != REPORT_FORMAT or not isinstance(payload.get("result"), dict):
        return None
    return payload


def prior_result(folder: str | None, settings: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any] | None:
    """``{"model", "result", "comparison"}`` of a recovery's input from the ``eval.json`` in its folder, when that
    evaluation used the same ``settings`` (``EvalSettings.to_dict()``; else None: unknown, not recomputed); the
    comparison is ``dense`` vs that result."""
    stored = None if folder is None else load_report(folder)
    if stored is None:
        return None
    if {k: v for k, v in (stored.get("settings") or {}).items() if k != "processes"} != settings:
        return None
    return {"model": str(folder), "result": stored["result"], "comparison": compare(dense, stored["result"])}


def scalar_metrics(comparison: dict[str, Any]) -> dict[str, float]:
    """The logger's scalars of a :func:`compare` result: ``eval/<task>``, ``eval/dense/<task>``,
    ``eval/retention/<task>``, ``eval/average``, ``eval/retention`` (of the average), perplexities."""
    out: dict[str, float] = {}
    for row in comparison["rows"]:
        out[f"eval/{row['task']}"] = row["pruned"]
        if row["dense"] is not None:
            out[f"eval/dense/{row['task']}"] = row["dense"]
        if row["retention_pct"] is not None:
            out[f"eval/retention/{row['task']}"] = row["retention_pct"]
    avg = comparison.get("average")
    if avg:
        out["eval/average"] = avg["pruned"]
        if avg["dense"] is not None:
            out["eval/dense/average"] = avg["dense"]
        if avg["retention_pct"] is not None:
            out["eval/retention"] = avg["retention_pct"]
    ppl = comparison.get("perplexity")
    if ppl:
        out["eval/perplexity"] = ppl["pruned"]
        if ppl["dense"] is not None:
            out["eval/dense/perplexity"] = ppl["dense"]
    return {k: float(v) for k, v in out.items() if v is not None}


def _paired_cell(p: dict[str, Any] | None) -> str:
    """``-0.060 [-0.11, -0.01]`` (difference and its 95% interval), or ``—`` without per-document scores."""
    if not p:
        return "—"
    return f"{p['difference']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"


def _num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _pm(x: float | None, err: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.4f} ± {err:.4f}" if err is not None else f"{x:.4f}"


def _pct(x: float | None, paired: dict[str, Any] | None = None) -> str:
    """``81.1%``, with the paired 95% retention interval when there is one: ``81.1% [70.2, 92.0]``."""
    if x is None:
        return "—"
    ci = (paired or {}).get("retention_ci95_pct")
    return f"{x:.1f}%" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def markdown(comparison: dict[str, Any], title: str | None = None, dense_label: str = "dense",
             pruned_label: str = "pruned", before: dict[str, Any] | None = None,
             before_label: str = "before recovery") -> str:
    """The report table as Markdown (also readable printed on a terminal). ``before`` (a :func:`compare`
    of the same dense model with another one, e.g. the pruned model before recovery) adds its column."""
    lines = [f"## {title}", ""] if title else []
    single = all(r["dense"] is None for r in comparison["rows"])
    prior = {r["task"]: r for r in before["rows"]} if before else None
    mid = f" {before_label} |" if prior is not None else ""

    def prior_cell(task: str) -> str:
        if prior is None:
            return ""
        r = prior.get(task)
        return f" {_pm(r['pruned'], r['pruned_stderr']) if r else '—'} |"

    if single:
        lines += [f"| task | metric | split | docs | {pruned_label} |", "|---|---|---|---:|---:|"]
        for r in comparison["rows"]:
            lines.append(f"| {r['task']} | {r['metric']} | {r['split']} | {r['n']} | "
                         f"{_pm(r['pruned'], r['pruned_stderr'])} |")
    else:
        lines += [f"| task | metric | split | docs | {dense_label} |{mid} {pruned_label} | retention (95% CI) | "
                  f"{pruned_label} − {dense_label} (paired 95% CI) |",
                  "|---|---|---|---:|---:|" + ("---:|" if mid else "") + "---:|---:|---:|"]
        for r in comparison["rows"]:
            lines.append(f"| {r['task']} | {r['metric']} | {r['split']} | {r['n']} | "
                         f"{_pm(r['dense'], r['dense_stderr'])} |{prior_cell(r['task'])} "
                         f"{_pm(r['pruned'], r['pruned_stderr'])} | {_pct(r['retention_pct'], r.get('paired'))} | "
                         f"{_paired_cell(r.get('paired'))} |")
    avg = comparison.get("average")
    if avg:
        label = ("average (5 zero-shot tasks)" if len(avg["tasks"]) == len(ZERO_SHOT_TASKS)
                 else f"average ({', '.join(avg['tasks'])})")
        if single:
            lines.append(f"| **{label}** | | | | **{_num(avg['pruned'])}** |")
        else:
            prior_avg = (before or {}).get("average") or {}
            cell = f" **{_num(prior_avg.get('pruned'))}** |" if mid else ""
            lines.append(f"| **{label}** | | | | **{_num(avg['dense'])}** |{cell} **{_num(avg['pruned'])}** | "
                         f"**{_pct(avg['retention_pct'], avg.get('paired'))}** | {_paired_cell(avg.get('paired'))} |")
    lines.append("")
    if not single:
        noise = [r["task"] for r in comparison["rows"] if r.get("paired") and r["paired"]["within_noise"]]
        if noise:
            lines += [f"Within noise (the paired 95% interval of {pruned_label} − {dense_label} contains 0): "
                      f"{', '.join(noise)}.", ""]
    ppl = comparison.get("perplexity")
    if ppl:
        where = (f"{ppl['corpus']}, context {ppl['context_length']}, stride {ppl['stride']}, "
                 f"{ppl['tokens']} tokens")
        prior_ppl = (before or {}).get("perplexity") or {}
        middle = f"{before_label} {_num(prior_ppl.get('pruned'), 3)} / " if mid and prior_ppl else ""
        if single:
            lines.append(f"Perplexity ({where}): {pruned_label} {_num(ppl['pruned'], 3)}")
        else:
            lines.append(f"Perplexity ({where}): {dense_label} {_num(ppl['dense'], 3)} / {middle}"
                         f"{pruned_label} {_num(ppl['pruned'], 3)}")
        if ppl.get("paired"):
            w = ppl["paired"]
            lines.append(f"  paired over the same {w['windows']} windows: mean NLL {w['nll_difference']:+.3f} nats/token "
                         f"[{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}], perplexity x{w['ratio']:.2f} "
                         f"[{w['ratio_ci95'][0]:.2f}, {w['ratio_ci95'][1]:.2f}] (95%)")
        if ppl.get("description"):
            lines.append(f"  text: {ppl['description']}")
        lines.append("")
    limit = comparison.get("limit")
    if limit is None:
        text = "none (full sets)"
    else:
        spread = comparison.get("sample", "first") == "spread"
        amount = f"{100 * limit:g}% of the documents" if isinstance(limit, float) else f"{limit} documents"
        text = (f"{amount} of each task spread over its split (seeded sample, stratified by source where a task "
                "has sources; the same documents for every model)" if spread else f"first {amount} of each task")
    if limit is not None and any(r["task"] == "mmlu" for r in comparison["rows"]):
        text += " (MMLU: of each subject)"
    lines.append(f"Limit: {text}")
    if comparison.get("processes", 1) > 1:
        lines.append(f"Processes: {comparison['processes']} (each scored its share of the documents and "
                     f"perplexity windows; rank 0 aggregated)")
    return "\n".join(lines) + "\n"

"""Paired comparison of two models on the same documents (ours; issue 27): the per-document difference of
their scores, its standard error and 95% interval, and a retention interval.

Two models answering the same documents are not independent samples: a hard document is hard for both.
The difference of their accuracies therefore has the standard error of the per-document differences,
``sd(d) / sqrt(n)``, usually far smaller than the two accuracies' own standard errors combined, so a
difference that two overlapping ±-intervals would call noise can be a clear one (and the reverse).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054


def paired_difference(dense: Mapping[str, float], pruned: Mapping[str, float]) -> dict[str, Any] | None:
    """Pruned minus dense on the documents both scored.

    Args:
        dense, pruned: document id -> score (0/1 accuracy, or any per-document metric).
    Returns:
        ``{"n", "dense", "pruned", "difference", "stderr", "ci95", "retention_pct", "retention_ci95_pct",
        "within_noise", "var_dense", "var_pruned", "cov"}``: the means over the common documents, the mean difference with its paired standard
        error ``sd(d) / sqrt(n)`` (sample sd, n - 1) and normal 95% interval, the retention ``100 * pruned /
        dense`` with a delta-method 95% interval (None when the dense mean is 0), and whether the difference's
        interval contains 0. None with fewer than 2 common documents.
    """
    common = sorted(set(dense) & set(pruned))
    n = len(common)
    if n < 2:
        return None
    a = [float(dense[k]) for k in common]
    b = [float(pruned[k]) for k in common]
    d = [y - x for x, y in zip(a, b)]
    ma, mb, md = sum(a) / n, sum(b) / n, sum(d) / n
    var_d = sum((x - md) ** 2 for x in d) / (n - 1)
    se = math.sqrt(var_d / n)
    out: dict[str, Any] = {"n": n, "dense": ma, "pruned": mb, "difference": md, "stderr": se,
                           "ci95": [md - Z95 * se, md + Z95 * se],
                           "var_dense": sum((x - ma) ** 2 for x in a) / (n - 1),
                           "var_pruned": sum((y - mb) ** 2 for y in b) / (n - 1),
                           "cov": sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (n - 1)}
    out["within_noise"] = out["ci95"][0] <= 0.0 <= out["ci95"][1]
    # the means' (co)variances: the per-document ones / n
    out.update(_ratio(ma, mb, out["var_dense"] / n, out["var_pruned"] / n, out["cov"] / n))
    return out


def _ratio(ma: float, mb: float, var_a: float, var_b: float, cov: float) -> dict[str, Any]:
    """Retention ``100 * mb / ma`` and its delta-method 95% interval from the means' (co)variances:
    Var(R) ~ (Var(mb) - 2 R Cov(ma, mb) + R^2 Var(ma)) / ma^2. None for both when ``ma`` is 0."""
    if ma <= 0:
        return {"retention_pct": None, "retention_ci95_pct": None}
    r = mb / ma
    se_r = math.sqrt(max(var_b - 2 * r * cov + r * r * var_a, 0.0)) / ma
    return {"retention_pct": 100 * r, "retention_ci95_pct": [100 * (r - Z95 * se_r), 100 * (r + Z95 * se_r)]}


def paired_average(per_task: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The average over tasks of :func:`paired_difference` results (the tasks' documents are disjoint, so
    their differences are independent): mean difference, ``sqrt(sum se_t^2) / T``, 95% interval, and the
    retention of the average (pruned average / dense average, in %) with its delta-method 95% interval."""
    if not per_task:
        return None
    t = len(per_task)
    md = sum(p["difference"] for p in per_task) / t
    se = math.sqrt(sum(p["stderr"] ** 2 for p in per_task)) / t
    ci = [md - Z95 * se, md + Z95 * se]
    out = {"tasks": t, "difference": md, "stderr": se, "ci95": ci, "within_noise": ci[0] <= 0.0 <= ci[1]}
    # the averages' (co)variances: each task's mean's, / T^2 (independent tasks)
    moments = [sum(p[k] / p["n"] for p in per_task) / t ** 2 for k in ("var_dense", "var_pruned", "cov")]
    out.update(_ratio(sum(p["dense"] for p in per_task) / t, sum(p["pruned"] for p in per_task) / t, *moments))
    return out


def paired_windows(dense: Sequence[float | None] | None, pruned: Sequence[float | None] | None) -> dict[str, Any] | None:
    """Perplexity on the same text: the per-window difference of mean NLL (pruned - dense, nats per token, each
    window's mean NLL in window order) with its paired interval, and the perplexity ratio ``exp(difference)``
    with its interval. None without both models' windows (or of different counts)."""
    if not dense or not pruned or len(dense) != len(pruned):
        return None
    p = paired_difference({str(i): x for i, x in enumerate(dense) if x is not None},
                          {str(i): y for i, y in enumerate(pruned) if y is not None})
    if p is None:
        return None
    return {"windows": p["n"], "nll_difference": p["difference"], "stderr": p["stderr"], "ci95": p["ci95"],
            "ratio": math.exp(p["difference"]), "ratio_ci95": [math.exp(x) for x in p["ci95"]],
            "within_noise": p["within_noise"]}

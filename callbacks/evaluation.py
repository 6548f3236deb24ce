"""PostPruningEvaluation: after slicing (or recovery), evaluate the stage's model and the dense one with lm-eval."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from callbacks.rank_zero import on_rank_zero
from prunenet.artifacts import EVAL_JSON, EVAL_MD
from prunenet.errors import AssetMissingError, EvaluationError
from prunenet.evaluation.settings import EvalSettings, option_defaults
from prunenet.evaluation.subject import EvaluationSubject
from prunenet.export import Exported

if TYPE_CHECKING:
    from prunenet.evaluation.sharding import Shards

#: The schema's defaults (prunenet.evaluation.settings): the arguments below default to them.
_DEFAULTS = option_defaults()


class PostPruningEvaluation(L.Callback):
    """Evaluate the pruned model and the dense one at the end of fit; write ``eval.json``/``eval.md``.

    Rank 0 asks the exporting callback (StructuralSlicing in a fit, RecoveryExport in a recovery)
    for what it exported (``export()``, which writes once whichever callback asks first: the folder,
    the plan, the model). Then every rank evaluates: with one process, it loads the dense model
    from the module's source and runs lm-eval on both; with several (DDP, ``trainer.world_size`` >
    1), each rank loads the exported folder and the dense model on its own device
    (``trainer.strategy.root_device``) and scores its share of every task's documents and of the
    perplexity windows, and rank 0 gathers them (:mod:`prunenet.evaluation.sharding`). After a
    recovery the evaluated model is the recovered one, the baseline is the dense model the input
    was pruned from, and when the input folder holds an ``eval.json`` with the same settings its
    scores are shown as "before recovery". The dense results are cached per model / tasks / limit
    / versions (rank 0 reads and writes the cache), so a second fit does not recompute them. Rank 0
    prints the table, writes ``eval.json`` and ``eval.md`` into the exported folder and logs
    ``eval/<task>`` (the evaluated model's score), ``eval/dense/<task>``, ``eval/retention`` (% of
    the dense zero-shot average kept) and the perplexities to the Lightning loggers, as
    TensorBoard hparams metrics too. A failure on any rank stops every rank with a one-line error,
    before anything is written.

    The module must implement :class:`~prunenet.evaluation.EvaluationSubject` (``PruneNetModule``
    and ``RecoveryModule`` do).

    Args (their defaults are :class:`~prunenet.evaluation.EvalSettings`' own, the same as
    ``prunenet.evaluate``'s; see :func:`~prunenet.evaluation.option_defaults`):
        tasks: task names (``piqa``, ``winogrande``, ``hellaswag``, ``arc_easy``, ``arc_challenge``,
            ``mmlu``, ``boolq``, ``openbookqa``, ``sciq``, ``wikitext``), a list or a comma string;
            null = the five zero-shot tasks of the paper (PIQA, WinoGrande, HellaSwag, ARC-e, ARC-c).
        limit: first N documents of each task (MMLU: of each subject); null = full sets.
        batch_size: lm-eval batch size.
        perplexity: perplexity corpus, ``squad-wiki`` (offline Wikipedia paragraphs) or
            ``wikitext2`` (network); null / ``none`` (the default) for no perplexity.
        perplexity_context_length: tokens per perplexity window.
        perplexity_stride: tokens between window starts (null = context length: no overlap).
        perplexity_max_tokens: only the first N tokens of the text (null = all).
        device: where to evaluate (null: CUDA if available, else CPU).
        dtype: cast the models to this dtype for evaluation (null keeps the loaded dtype).
        cache: reuse cached dense results.
        enabled: switch the evaluation off (nothing is checked or run).

    Raises:
        EvaluationError: at construction, for an unknown task or a bad limit / batch size; at setup,
            for a module that is not an :class:`~prunenet.evaluation.EvaluationSubject`.
        AssetMissingError: at construction (before any training), when the benchmark data
            package is missing; the message names the install command.
    """

    def __init__(self, tasks: list[str] | str | None = None,
                 limit: int | float | None = _DEFAULTS["limit"],  # noqa: PYI041 - int (documents) or float (fraction)
                 sample: str = _DEFAULTS["sample"],
                 batch_size: int = _DEFAULTS["batch_size"], perplexity: str | None = _DEFAULTS["perplexity"],
                 perplexity_context_length: int = _DEFAULTS["perplexity_context_length"],
                 perplexity_stride: int | None = _DEFAULTS["perplexity_stride"],
                 perplexity_max_tokens: int | None = _DEFAULTS["perplexity_max_tokens"],
                 device: str | None = _DEFAULTS["device"], dtype: str | None = _DEFAULTS["dtype"],
                 cache: bool = True, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self.cache = bool(cache)
        self.settings = None
        self.result: dict[str, Any] | None = None
        if not self.enabled:
            return
        from prunenet.evaluation.data import package_root
        from prunenet.evaluation.tasks import TASKS

        self.settings = EvalSettings.from_options(
            tasks=tasks, limit=limit, sample=sample, batch_size=batch_size, perplexity=perplexity,
            perplexity_context_length=perplexity_context_length, perplexity_stride=perplexity_stride,
            perplexity_max_tokens=perplexity_max_tokens, device=device, dtype=dtype)
        ppl = self.settings.perplexity
        needs_data = any(TASKS[t].local for t in self.settings.tasks) or (ppl is not None and
                                                                            ppl.corpus == "squad-wiki")
        if needs_data:
            try:
                package_root()
            except AssetMissingError as exc:
                raise AssetMissingError(f"{exc} (or turn the evaluation off: --evaluation.enabled=false)") from None
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise EvaluationError("lm-eval is not installed; run: pip install 'lm-eval>=0.4.8' "
                                  "(or --evaluation.enabled=false)") from None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail before training, not after, when there is nothing to evaluate (no StructuralSlicing
        exporting callback, StructuralSlicing or RecoveryExport) or the model cannot be evaluated (no tokenizer)."""
        from callbacks.exporter import find_exporter

        if self.enabled:
            find_exporter(trainer)  # every rank: all refuse together
            as_subject(pl_module)
        if self.enabled and trainer.is_global_zero and pl_module.load_tokenizer() is None:
            raise EvaluationError(f"{pl_module.hparams.model_name_or_path} has no tokenizer, which lm-eval needs; "
                                  f"add one or pass --evaluation.enabled=false")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from callbacks.exporter import find_exporter

        if not self.enabled:
            return
        exporter = find_exporter(trainer)
        if trainer.world_size == 1:
            self.result = self.run(pl_module, exporter.export(pl_module), trainer)
            return
        on_rank_zero(trainer, lambda: exporter.export(pl_module))
        exported = exporter.exported  # rank 0's; None on the others
        # The other ranks evaluate the folder rank 0 wrote (it must be on a filesystem they all see).
        path = trainer.strategy.broadcast(str(exported.path) if trainer.is_global_zero else None, src=0)
        if not trainer.is_global_zero:
            exported = Exported(Path(path), {}, [])
        from prunenet.evaluation.sharding import current, rank_device

        device = (rank_device(self.settings.device, trainer.local_rank) if self.settings.device
                  else str(trainer.strategy.root_device))
        self.result = self.run(pl_module, exported, trainer, shards=current(device, trainer.local_rank))

    # ------------------------------------------------------------------ work
    def run(self, pl_module: L.LightningModule, exported: Exported, trainer: L.Trainer | None = None,
            shards: Shards | None = None) -> dict[str, Any]:
        """Evaluate the ``exported`` pruned checkpoint and the module's dense source; write
        ``eval.json``/``eval.md`` into the checkpoint folder; log. Returns eval.json's dict.

        With ``shards`` of several processes every rank calls this (each scores its share), rank 0
        writes and logs, and every rank returns the same dict.

        Raises:
            EvaluationError: an evaluation failed (with several processes, on every rank when any
                rank failed).
        """
        from prunenet import loading
        from prunenet.evaluation import Shards
        from prunenet.evaluation import cache as eval_cache
        from prunenet.evaluation import compare, evaluate_model, markdown
        from prunenet.evaluation.report import prior_result, report, write_report

        shards = shards or Shards()
        start = time.perf_counter()
        folder = exported.path
        module = as_subject(pl_module)
        subject = module.evaluation_subject()
        label, baseline = subject["label"], subject["baseline"]
        tokenizer = shards.guarded(module.load_tokenizer)
        identity = None
        if self.cache:
            identity = eval_cache.model_identity(baseline)
            if subject["baseline_dtype"] != "auto":  # loaded in another dtype than the checkpoint's own
                identity["load_dtype"] = subject["baseline_dtype"]
        rank_zero_info(f"PostPruningEvaluation: {', '.join(self.settings.tasks)} "
                       f"(limit {self.settings.limit}) on the {label} and the dense model"
                       + (f", {shards.world_size} processes" if shards.world_size > 1 else ""))
        pruned = evaluate_model(lambda: exported.model if exported.model is not None else loading.load_model(folder),
                                tokenizer, self.settings, identity=None, label=label,
                                log=rank_zero_info, shards=shards)
        dense = evaluate_model(module.load_dense_model, tokenizer, self.settings, identity=identity,
                               label="dense", log=rank_zero_info, shards=shards)
        comparison = compare(dense, pruned)
        before = prior_result(subject.get("input"), self.settings.to_dict(), dense)
        title = (f"PruneNet evaluation: {baseline}, compression ratio {subject['compression_ratio']} "
                 f"(dense vs {label})")
        table = markdown(comparison, title=title, pruned_label=label,
                         before=before["comparison"] if before else None)
        payload = report(model=str(folder), result=pruned, baseline=str(baseline), baseline_result=dense,
                         settings=self.settings.to_dict(), comparison=comparison,
                         wall_s=time.perf_counter() - start, compression_ratio=subject["compression_ratio"],
                         before=before)

        def write() -> None:
            if shards.is_zero:
                write_report(folder / EVAL_JSON, payload, table)
                rank_zero_info("\n" + table + f"(evaluation wall time {payload['wall_s']:.0f} s; written to "
                               f"{folder / EVAL_JSON}, {folder / EVAL_MD} and eval.png)")
                if trainer is not None:
                    self.log_metrics(trainer, pl_module, comparison, before)

        shards.step(write)  # a failure to write or log on rank 0 stops every rank
        return payload

    def log_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, comparison: dict[str, Any],
                    before: dict[str, Any] | None = None) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        from prunenet.evaluation.figure import figure
        from prunenet.evaluation.report import scalar_metrics

        metrics = scalar_metrics(comparison)
        params = {k: v for k, v in dict(pl_module.hparams).items() if isinstance(v, (int, float, str, bool))}
        params.update({f"evaluation/{k}": str(v) for k, v in self.settings.to_dict().items()})
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Scalars at the last step plus an hparams entry whose metrics are these scores, and eval.png.
                logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)
                logger.experiment.add_figure("eval", figure(comparison, before), global_step=trainer.global_step)
            else:
                logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()


def as_subject(pl_module: L.LightningModule) -> EvaluationSubject:
    """The module, checked to implement :class:`~prunenet.evaluation.EvaluationSubject`.

    Raises:
        EvaluationError: it does not (names what it lacks and what to do).
    """
    if not isinstance(pl_module, EvaluationSubject):
        raise EvaluationError(f"PostPruningEvaluation cannot evaluate a {type(pl_module).__name__}: it does not "
                              "implement prunenet.evaluation.EvaluationSubject (evaluation_subject, load_tokenizer, "
                              "load_dense_model); use PruneNetModule or RecoveryModule, or --evaluation.enabled=false")
    return pl_module

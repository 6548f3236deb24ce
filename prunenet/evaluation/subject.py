"""The module <-> evaluation protocol: what PostPruningEvaluation asks of a LightningModule
(:class:`EvaluationSubject`), and its implementation for a fit's module (:class:`SourceModelSubject`)."""

from __future__ import annotations

from typing import Any, Protocol, TypedDict, runtime_checkable


class Subject(TypedDict):
    """What is evaluated against what (:meth:`EvaluationSubject.evaluation_subject`).

    Keys:
        label: the evaluated model's name in progress lines and tables (``pruned``, ``recovered``).
        baseline: the dense model it is compared with (asset name, folder or hub id).
        baseline_dtype: the dtype the baseline is loaded in (``auto``: the checkpoint's own); part
            of the dense-result cache key.
        compression_ratio: the fraction of FFN neurons removed (0.3 = 30 %), or None when unknown.
        input: a folder whose ``eval.json`` holds the "before" scores (a recovery's input), or None.
    """

    label: str
    baseline: str
    baseline_dtype: str
    compression_ratio: float | None
    input: str | None


@runtime_checkable
class EvaluationSubject(Protocol):
    """A LightningModule whose result PostPruningEvaluation can evaluate (``PruneNetModule`` after a
    fit, ``RecoveryModule`` after a recovery). The callback checks it with ``isinstance``; the
    modules name it among their bases."""

    def evaluation_subject(self) -> Subject:
        """The labels, the baseline and the ratio of this run's evaluation (see :class:`Subject`)."""
        ...

    def load_tokenizer(self) -> Any:
        """The tokenizer lm-eval and the perplexity use (a transformers tokenizer), or None when the
        model has none (the callback then refuses before training)."""
        ...

    def load_dense_model(self) -> Any:
        """A fresh dense baseline model (a transformers ``PreTrainedModel``, loaded from disk, in the
        dtype :class:`Subject`'s ``baseline_dtype`` names); called at most once per process, and
        only when some dense result is not cached."""
        ...


class SourceModelSubject(EvaluationSubject):
    """:class:`EvaluationSubject` of a module that prunes the model it was given (``PruneNetModule``):
    the pruned model against that source, from the module's hyperparameters ``model_name_or_path``,
    ``dtype``, ``trust_remote_code`` and ``compression_ratio``."""

    hparams: Any

    def evaluation_subject(self) -> Subject:
        """The pruned model against its dense source, loaded in the fit's dtype."""
        hp = self.hparams
        return {"label": "pruned", "baseline": str(hp.model_name_or_path), "baseline_dtype": str(hp.dtype),
                "compression_ratio": float(hp.compression_ratio), "input": None}

    def load_dense_model(self) -> Any:
        """A fresh dense copy of the source model (loaded from disk, never deep-copied)."""
        from prunenet import loading

        return loading.load_model(self.hparams.model_name_or_path, dtype=self.hparams.dtype,
                                  trust_remote_code=self.hparams.trust_remote_code)

    def load_tokenizer(self) -> Any:
        """The source model's tokenizer, or None if it has none."""
        from prunenet import loading

        return loading.load_tokenizer(self.hparams.model_name_or_path, self.hparams.trust_remote_code)

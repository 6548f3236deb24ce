"""The one evaluation-settings schema: :class:`EvalSettings`, its defaults, and the flat option names
the ``evaluation:`` section of a config, the PostPruningEvaluation callback's arguments and
``prunenet.evaluate``'s command-line options share.

Every default is a field default here (the perplexity's own in
:class:`~prunenet.evaluation.perplexity.PerplexitySettings`, which is part of this schema); the
callback's arguments and the command line's options take theirs from :func:`option_defaults` and
build their settings with :meth:`EvalSettings.from_options`, so the three cannot drift apart. They do
not differ: the one default each option has is the one below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from prunenet.checks import check_float
from prunenet.errors import ConfigurationError, EvaluationError
from prunenet.evaluation.perplexity import PerplexitySettings
from prunenet.evaluation.tasks import ZERO_SHOT_TASKS, parse_tasks

#: How ``limit`` picks documents (see :attr:`EvalSettings.sample`).
SAMPLES = ("spread", "first")

#: The flat names of the perplexity options: ``perplexity`` is the corpus (None: no perplexity), the
#: rest are ``perplexity_<field>`` of :class:`PerplexitySettings`.
_PERPLEXITY_OPTIONS = tuple(f"perplexity_{f.name}" for f in fields(PerplexitySettings) if f.name != "corpus")


@dataclass
class EvalSettings:
    """What to evaluate and how (defaults: the project's; see the module docstring).

    Attributes:
        tasks: task names (see :data:`prunenet.evaluation.tasks.TASKS`), or a comma string; default:
            the paper's five zero-shot tasks (:data:`~prunenet.evaluation.tasks.ZERO_SHOT_TASKS`).
        limit: N documents of each task (MMLU: of each of its 57 subjects); a float in (0, 1) is a
            fraction; None = the full set.
        sample: which documents ``limit`` takes: ``spread`` (a seeded sample over the whole split,
            stratified by source where a task has sources: HellaSwag's ActivityNet / WikiHow; the same
            documents for every model; ``sampling.py``) or ``first`` (the first N, lm-eval's ``limit``).
        batch_size: lm-eval batch size (also windows per perplexity batch, capped at 8).
        device: ``cpu``, ``cuda``, ``cuda:1``...; None = CUDA if available, else CPU.
        dtype: cast the model to this dtype before evaluating (``float32``, ``bfloat16``...);
            None keeps the model's dtype.
        perplexity: perplexity settings, or None for no perplexity.
    """

    tasks: list[str] = field(default_factory=lambda: list(ZERO_SHOT_TASKS))
    limit: int | float | None = None
    sample: str = "spread"
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    # Off unless asked for: over a whole text (squad-wiki: ~140k tokens) the perplexity costs more than
    # the five tasks at a small limit, and its number compares only at the same corpus and context
    # length (2048 as SliceGPT / PruneNet report it, 512 for small models), so whoever wants it names
    # them; every config in configs/ does (squad-wiki). It was the library's and prunenet.evaluate's
    # default already; only the callback's was squad-wiki.
    perplexity: PerplexitySettings | None = None

    def __post_init__(self) -> None:
        self.tasks = parse_tasks(self.tasks)
        self.limit = check_limit(self.limit)
        if self.sample not in SAMPLES:
            raise EvaluationError(f"sample must be one of {', '.join(SAMPLES)}, got {self.sample!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise EvaluationError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.dtype is not None:
            from prunenet import loading
            from prunenet.errors import ModelLoadError

            try:
                loading.parse_dtype(self.dtype)
            except ModelLoadError as exc:
                raise EvaluationError(str(exc)) from None

    @classmethod
    def from_options(cls, **options: Any) -> EvalSettings:
        """The settings from the flat options (:func:`option_defaults` names: ``tasks``, ``limit``,
        ``batch_size``, ``device``, ``dtype``, ``perplexity`` = the corpus or None / ``none``, and
        ``perplexity_context_length``, ``perplexity_stride``, ``perplexity_max_tokens``); an option
        left out, and ``tasks=None``, takes the schema's default.

        Raises:
            EvaluationError: an unknown option name, or a bad value (see the attributes).
        """
        values = option_defaults()
        unknown = sorted(set(options) - set(values))
        if unknown:
            raise EvaluationError(f"unknown evaluation option(s) {', '.join(unknown)}; known: {', '.join(values)}")
        values.update({k: v for k, v in options.items() if not (k == "tasks" and v is None)})
        ppl = PerplexitySettings.parse(values.pop("perplexity"),
                                       **{name[len("perplexity_"):]: values.pop(name) for name in _PERPLEXITY_OPTIONS})
        tasks = values.pop("tasks")
        return cls(tasks=tasks if isinstance(tasks, str) else list(tasks), perplexity=ppl, **values)

    def resolved_device(self) -> str:
        """The device to evaluate on: the setting, else ``cuda`` when available, else ``cpu``."""
        if self.device:
            return str(self.device)
        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-serialisable values (written into reports)."""
        return {"tasks": list(self.tasks), "limit": self.limit, "sample": self.sample, "batch_size": self.batch_size,
                "device": self.resolved_device(), "dtype": self.dtype,
                "perplexity": self.perplexity.to_dict() if self.perplexity else None}


def option_defaults() -> dict[str, Any]:
    """The schema's defaults under the flat option names (the callback's arguments, ``prunenet.evaluate``'s
    options, a config's ``evaluation:`` keys): :class:`EvalSettings`' fields with ``perplexity`` as its
    corpus (None: off), and the ``perplexity_*`` fields of :class:`PerplexitySettings`. A new dict each call."""
    defaults = EvalSettings()
    out: dict[str, Any] = {f.name: getattr(defaults, f.name) for f in fields(EvalSettings) if f.name != "perplexity"}
    out["perplexity"] = defaults.perplexity.corpus if defaults.perplexity else None
    ppl = {f.name: f.default for f in fields(PerplexitySettings)}
    out.update({name: ppl[name[len("perplexity_"):]] for name in _PERPLEXITY_OPTIONS})
    return out


def check_limit(limit: Any) -> int | float | None:
    """None, a positive int (documents per task) or a fraction in (0, 1)."""
    if limit is None:
        return None
    if isinstance(limit, bool):
        raise EvaluationError(f"limit must be a positive integer, a fraction in (0, 1) or null, got {limit!r}")
    if isinstance(limit, float) and limit.is_integer() and limit >= 1:
        limit = int(limit)
    if isinstance(limit, int) and limit >= 1:
        return limit
    if isinstance(limit, float) and not limit.is_integer():  # a fraction: NaN and infinities end here too
        try:
            return check_float(limit, "limit", 0.0, 1.0, low_open=True, high_open=True)
        except ConfigurationError:
            pass
    raise EvaluationError(f"limit must be a positive integer, a fraction in (0, 1) or null, got {limit!r}")

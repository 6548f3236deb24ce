"""Typed exceptions raised by library code, and :func:`is_user_error`.

Entry points (``prunenet.fit``, ``prunenet.compress``, ``prunenet.evaluate``)
catch :class:`PruneNetError` and print its one-line message without a
traceback (set ``PRUNENET_VERBOSE=1`` to see it).
"""


import sys


class PruneNetError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigurationError(PruneNetError, ValueError):
    """A bad argument value (ratio, seed, selection mode, ...)."""


class ModelLoadError(PruneNetError):
    """The model path, hub id or asset could not be resolved or loaded."""


class UnsupportedModelError(PruneNetError):
    """The model's ``config.model_type`` has no architecture adapter."""


class AssetMissingError(PruneNetError):
    """An offline asset package (embedded model or benchmark data) is not installed."""


class InvalidWeightsError(PruneNetError):
    """An FFN matrix contains NaN/Inf or has an unexpected shape."""


class InvalidProbabilitiesError(PruneNetError):
    """Keep probabilities cannot support sampling the requested number of rows."""


class OutputExistsError(PruneNetError):
    """The output path is a file, is not writable, or is a non-empty folder without overwrite."""


class CacheError(PruneNetError):
    """The cache folder (``$PRUNENET_CACHE`` or ``~/.cache/prunenet``) is a file or cannot be
    written, and the work needs it (converting an embedded model, assembling a GGUF); the message
    names the path and how to choose another folder."""


class DiskFullError(PruneNetError):
    """An output did not fit: a full disk, a file size limit or a quota. The previous output is intact."""


class PolicyError(PruneNetError):
    """A policy file is unreadable, not a policy, or of the wrong shape."""


class EvaluationError(PruneNetError):
    """An evaluation cannot run: unknown task, bad limit/batch size, data or text unavailable."""


class DivergedError(PruneNetError):
    """Training produced non-finite values (a loss, trained weights): nothing more is saved."""


class PruneNetWarning(UserWarning):
    """Something the user should know that does not stop the work; entry points print it as one
    ``warning: <message>`` line."""


def is_user_error(exc: BaseException) -> bool:
    """A :class:`PruneNetError`, or Lightning's MisconfigurationException.

    Only a program that has imported Lightning can raise the latter, so Lightning is not imported
    here: that alone would add seconds to every ``compress`` / ``evaluate`` / ``generate`` start.
    """
    if isinstance(exc, PruneNetError):
        return True
    lightning_exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    return lightning_exceptions is not None and isinstance(exc, lightning_exceptions.MisconfigurationException)

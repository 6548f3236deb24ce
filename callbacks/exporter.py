"""CheckpointExporter: the callback of a stage that writes the stage's checkpoint folder (the pruned model
of a fit, the recovered model of a recovery); evaluation asks it for what it wrote."""

from __future__ import annotations

from typing import TypeVar

import lightning as L

from prunenet.export import Exported

C = TypeVar("C", bound=L.Callback)


class CheckpointExporter(L.Callback):
    """Base class of the callbacks that write a stage's output checkpoint (``StructuralSlicing``,
    ``RecoveryExport``). :meth:`export` writes it once per fit, whoever asks first (call on rank 0),
    and returns what was written, also kept as :attr:`exported` (None until then)."""

    exported: Exported | None = None

    def export(self, pl_module: L.LightningModule) -> Exported:  # pragma: no cover - abstract
        raise NotImplementedError


def find_callback(trainer: L.Trainer, cls: type[C], needed: str) -> C:
    """The trainer's first callback of type ``cls``.

    Raises:
        ConfigurationError: none is configured (``needed`` says which one and why).
    """
    from prunenet.errors import ConfigurationError

    for callback in trainer.callbacks:
        if isinstance(callback, cls):
            return callback
    raise ConfigurationError(f"this callback needs {needed}")


def find_exporter(trainer: L.Trainer) -> CheckpointExporter:
    """The trainer's exporting callback.

    Raises:
        ConfigurationError: none is configured.
    """
    return find_callback(trainer, CheckpointExporter, "the StructuralSlicing callback (fit) or the RecoveryExport "
                                                      "callback (recover), which export the model")

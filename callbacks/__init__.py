"""Lightning callbacks of PruneNet: slicing and the spectrum figure run on rank 0 while the others
wait; the evaluation is sharded over every rank (rank 0 writes the report).
StructuralSlicing exports the pruned checkpoint; PostPruningEvaluation (which requires it) and
SpectrumMonitor ask it for what it exported, which it produces once per fit whoever asks first,
so their order does not matter. RecoveryExport is the exporter of a recovery (``prunenet.recover``).
StopOnSignal turns SIGINT / SIGTERM into a stop after the current training step."""

from callbacks.evaluation import PostPruningEvaluation
from callbacks.interrupt import StopOnSignal
from callbacks.recovery import RecoveryExport
from callbacks.slicing import StructuralSlicing
from callbacks.spectrum import SpectrumMonitor

__all__ = ["PostPruningEvaluation", "RecoveryExport", "StructuralSlicing", "SpectrumMonitor", "StopOnSignal"]

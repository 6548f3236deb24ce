"""Lightning callbacks of PruneNet: each asks the module for what it needs, runs on
rank 0, then waits at a barrier, and none depends on another or on their order."""

from callbacks.evaluation import PostPruningEvaluation
from callbacks.slicing import StructuralSlicing
from callbacks.spectrum import SpectrumMonitor

__all__ = ["PostPruningEvaluation", "StructuralSlicing", "SpectrumMonitor"]

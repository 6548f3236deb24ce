"""Recovery fine-tuning after slicing (``python -m prunenet.recover``): the module, the data, the text sources,
and the check that training text is disjoint from every evaluation text.

* :mod:`~prunenet.recovery.module`: :class:`RecoveryModule` (LoRA through peft, or full fine-tuning).
* :mod:`~prunenet.recovery.data`: :class:`RecoveryDataModule` (packed causal-LM blocks, held-out split).
* :mod:`~prunenet.recovery.corpus`: where the text comes from (packaged, local file, hub).
* :mod:`~prunenet.recovery.overlap`: shared word 13-grams with the evaluation texts.
* :mod:`~prunenet.recovery.provenance`: the merged, saved checkpoint and its ``recovery`` record.
"""

from prunenet.recovery.data import RecoveryDataModule
from prunenet.recovery.module import RECOVERY_HPARAMS, RecoveryModule
from prunenet.recovery.provenance import export_recovered, recovery_record

__all__ = ["RECOVERY_HPARAMS", "RecoveryDataModule", "RecoveryModule", "export_recovered", "recovery_record"]

"""StructuralSlicing: at the end of fit, slice the FFNs with the trained policy and save."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from callbacks.rank_zero import on_rank_zero
from prunenet.slicing import check_output_dir, validate_selection


class StructuralSlicing(L.Callback):
    """Slice every FFN to the policy's kept rows and save a Hugging Face checkpoint.

    The checkpoint (safetensors, config with the new FFN width, tokenizer, generation
    config, ``policy.pt``, ``prunenet.json``) is written atomically to ``output_dir``
    (default ``<log dir>/pruned``) on rank 0; other ranks wait.

    Args:
        output_dir: where to save; must be absent or empty unless ``overwrite``.
        overwrite: replace an existing non-empty ``output_dir`` (only after the new one is complete).
        selection: ``sample`` (paper: seeded multinomial over keep probabilities) or ``topk``.
        shardwise: rewrite the safetensors shards one at a time instead of loading the model
            (None: automatic when the checkpoint exceeds half the available memory).

    Raises:
        OutputExistsError: at construction, before any training, if ``output_dir`` is a file,
            not writable, or non-empty without ``overwrite``.
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False, selection: str = "sample",
                 shardwise: bool | None = None) -> None:
        validate_selection(selection, "slicing.selection")
        if output_dir:
            check_output_dir(output_dir, overwrite)
        self.output_dir, self.overwrite, self.selection = output_dir, overwrite, selection
        self.shardwise = shardwise

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.configure_output(self.output_dir, self.overwrite, self.selection, self.shardwise)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def work() -> None:
            pl_module.pruned_checkpoint()
            rank_zero_info("\n" + pl_module.summary())

        on_rank_zero(trainer, work)

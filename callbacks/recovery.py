"""RecoveryExport: at the end of a recovery, merge the LoRA adapters and save a plain Hugging Face checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from callbacks.exporter import CheckpointExporter
from callbacks.rank_zero import on_rank_zero
from prunenet import loading
from prunenet.artifacts import check_output_dir
from prunenet.export import Exported
from prunenet.recovery.provenance import export_recovered


class RecoveryExport(CheckpointExporter):
    """Merge the adapters (peft ``merge_and_unload``) and write the recovered model as a standard checkpoint.

    The folder (safetensors weights in the input's dtype, config, tokenizer, generation config, the
    input's ``policy.pt`` when it has one, ``prunenet.json``) is written atomically on rank 0; other
    ranks wait. It loads with plain ``AutoModelForCausalLM.from_pretrained``, no peft needed. Its
    ``prunenet.json`` is the input's provenance (the pruning plan, when the input is a PruneNet output)
    plus a ``recovery`` record: input, method, hyperparameters, data, steps, tokens, losses, wall time,
    versions.

    Args:
        output_dir: where to save (default ``<log dir>/recovered``); absent or empty unless ``overwrite``.
        overwrite: replace an existing non-empty ``output_dir`` (only after the new one is complete).

    Raises:
        OutputExistsError: at construction (before any training) for a bad ``output_dir``; at setup for
            the default folder, or an output inside the input folder.
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False) -> None:
        if output_dir:
            check_output_dir(output_dir, overwrite)
        self.output_dir, self.overwrite = output_dir, overwrite
        self.exported: Exported | None = None
        self._default_output = Path("lightning_logs") / "recovered"
        self.started = time.time()

    def output_path(self) -> Path:
        """``output_dir`` or, by default, ``<log dir>/recovered``."""
        return Path(self.output_dir).expanduser() if self.output_dir else self._default_output

    def check(self, model_name_or_path: str) -> None:
        """Refuse the output folder before any work (``prunenet.recover`` calls this before the Trainer
        starts, ``setup`` again for programmatic use): see ``artifacts.check_output_dir``, with the
        input folder as the source (the output may not be inside it).

        Raises:
            OutputExistsError: naming the folder and the reason.
        """
        check_output_dir(self.output_path(), self.overwrite, loading.resolve(model_name_or_path))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_output = Path(trainer.log_dir or "lightning_logs") / "recovered"  # a collective under DDP
        if stage == "fit":
            self.check(pl_module.hparams.model_name_or_path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.exported, self.started = None, time.time()

    def export(self, pl_module: L.LightningModule) -> Exported:
        """Merge and save once per fit (call on rank 0): :func:`prunenet.recovery.export_recovered`;
        returns :attr:`exported`."""
        if self.exported is None:
            self.exported = export_recovered(pl_module, self.output_path(), self.overwrite, self.started)
        return self.exported

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def work() -> None:
            exported = self.export(pl_module)
            rec = exported.plan["recovery"]
            losses = ", ".join(f"{k} {v:.3f}" for k, v in rec["final_metrics"].items() if k.endswith(("loss", "kl")))
            rank_zero_info("\n".join([
                "Recovery summary",
                f"  input            {rec['input']}",
                f"  method           {rec['method']} ({rec['trainable_parameters']:,} trained parameters)",
                f"  steps, tokens    {rec['steps']}, {rec['tokens']:,}",
                f"  last losses      {losses or '-'}",
                f"  wall time        {rec['wall_s']:.1f} s",
                f"  output           {exported.path}"]))

        on_rank_zero(trainer, work)

"""RecoveryExport: at the end of a recovery, merge the LoRA adapters and save a plain Hugging Face checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.exporter import CheckpointExporter
from callbacks.rank_zero import on_rank_zero
from prunenet import loading
from prunenet.artifacts import check_output_dir
from prunenet.export import Exported, save_pruned
from prunenet.recovery.module import check_finite


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
        """Merge and save once per fit (call on rank 0); returns :attr:`exported`."""
        if self.exported is None:
            from prunenet.artifacts import load_policy
            from prunenet.errors import ConfigurationError, PruneNetError
            from prunenet.plan import read_plan

            hp = pl_module.hparams
            if pl_module.trainer.global_step == 0:  # e.g. --trainer.limit_train_batches=0
                raise ConfigurationError("the recovery trained no step (check --trainer.limit_train_batches and the "
                                         "data); nothing was saved: an unchanged copy is not a recovered model")
            source = loading.resolve(hp.model_name_or_path)
            model = pl_module.merged_model()
            check_finite(dict(model.state_dict()), "after merging the LoRA adapters")
            saved = getattr(pl_module.config, "dtype", None)
            saved = loading.parse_dtype(saved) if isinstance(saved, (str, torch.dtype)) else "auto"
            if isinstance(saved, torch.dtype):
                model.to(saved)  # the input's own dtype: the same size on disk
            plan = dict(pl_module.input_plan() or {"format": "prunenet/1", "source_model": str(hp.model_name_or_path),
                                                   "model_type": pl_module.config.model_type})
            previous = plan.get("recovery")
            plan["recovery"] = {**self.record(pl_module), **({"previous": previous} if previous else {})}
            try:
                kept = read_plan(source)[1]
            except PruneNetError:
                kept = []
            policy = meta = None
            if (Path(source) / "policy.pt").is_file():
                policy, meta = load_policy(source)
            path = save_pruned(model, self.output_path(), plan, policy=policy, policy_meta=meta,
                               tokenizer=pl_module.load_tokenizer(), overwrite=self.overwrite, source=source)
            self.exported = Exported(path, plan, kept, model)
        return self.exported

    def record(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """The ``recovery`` record of ``prunenet.json``."""
        from importlib.metadata import version

        from prunenet.plan import package_versions

        hp, trainer = pl_module.hparams, pl_module.trainer
        data = getattr(trainer, "datamodule", None)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        hyper = {k: hp[k] for k in ("method", "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler", "dtype")}
        if hp.method == "lora":
            hyper.update(lora_r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                         lora_targets=hp.lora_targets, lora_target_modules=len(pl_module.target_modules))
        data_hp = dict(data.hparams) if data is not None else {}
        hyper.update(batch_size=data_hp.get("batch_size"), block_size=data_hp.get("block_size"),
                     val_fraction=data_hp.get("val_fraction"), check_overlap=data_hp.get("check_overlap"),
                     devices=trainer.world_size, accumulate_grad_batches=trainer.accumulate_grad_batches,
                     precision=str(trainer.precision), gradient_clip_val=trainer.gradient_clip_val,
                     max_steps=trainer.max_steps, seed=pl_module.run_settings()["seed"])
        return {"input": str(hp.model_name_or_path), "method": hp.method, "steps": int(trainer.global_step),
                "tokens": int(pl_module.tokens_seen),
                "trainable_parameters": pl_module.num_trained,
                "hyperparameters": hyper, "data": dict(getattr(data, "record", {}) or {}),
                "val_loss_before": pl_module.initial_val_loss, "final_metrics": metrics, "wall_s": round(time.time() - self.started, 1),
                "versions": {**package_versions(), "peft": version("peft")}}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def work() -> None:
            exported = self.export(pl_module)
            rec = exported.plan["recovery"]
            losses = ", ".join(f"{k} {v:.3f}" for k, v in rec["final_metrics"].items() if k.endswith("loss"))
            rank_zero_info("\n".join([
                "Recovery summary",
                f"  input            {rec['input']}",
                f"  method           {rec['method']} ({rec['trainable_parameters']:,} trained parameters)",
                f"  steps, tokens    {rec['steps']}, {rec['tokens']:,}",
                f"  last losses      {losses or '-'}",
                f"  wall time        {rec['wall_s']:.1f} s",
                f"  output           {exported.path}"]))

        on_rank_zero(trainer, work)

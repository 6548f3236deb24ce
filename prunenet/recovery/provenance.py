"""A recovered checkpoint and its provenance (ours): the LoRA merge saved as a plain Hugging Face folder,
and the ``recovery`` record of its ``prunenet.json``. ``callbacks.RecoveryExport`` calls
:func:`export_recovered` at the end of a recovery."""

from __future__ import annotations

import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from prunenet import loading
from prunenet.artifacts import POLICY_FILE, load_policy
from prunenet.errors import ConfigurationError
from prunenet.export import Exported, save_pruned
from prunenet.plan import base_plan, package_versions, read_plan
from prunenet.recovery.module import RecoveryModule, check_finite


def export_recovered(module: RecoveryModule, output: Path, overwrite: bool, started: float) -> Exported:
    """Merge the adapters and save the recovered model (rank 0; atomic, see ``export.save_pruned``).

    The folder holds the weights in the input's own dtype, its config, tokenizer and ``policy.pt`` when
    the input has one, and ``prunenet.json``: the input's plan (or :func:`~prunenet.plan.base_plan` for a
    checkpoint PruneNet did not prune) plus the ``recovery`` record (:func:`recovery_record`; an earlier
    recovery's record moves under ``previous``).

    Args:
        module: the trained RecoveryModule (attached to its trainer).
        output: the folder to write; ``overwrite`` replaces a non-empty one.
        started: ``time.time()`` at the start of the fit (the record's wall time).
    Returns:
        :class:`~prunenet.export.Exported` (path, plan, the input's kept indices or [], the merged model).
    Raises:
        ConfigurationError: no training step ran (``--trainer.limit_train_batches=0``): an unchanged copy
            is not a recovered model.
        DivergedError: NaN or infinite weights after the merge.
        OutputExistsError: see ``artifacts.check_output_dir``.
    """
    hp = module.hparams
    if module.trainer.global_step == 0:
        raise ConfigurationError("the recovery trained no step (check --trainer.limit_train_batches and the "
                                 "data); nothing was saved: an unchanged copy is not a recovered model")
    source = loading.resolve(hp.model_name_or_path)
    model = module.merged_model()
    check_finite(dict(model.state_dict()), "after merging the LoRA adapters")
    saved = getattr(module.config, "dtype", None)
    saved = loading.parse_dtype(saved) if isinstance(saved, (str, torch.dtype)) else "auto"
    if isinstance(saved, torch.dtype):
        model.to(saved)  # the input's own dtype: the same size on disk
    input_plan = module.input_plan()
    plan = dict(input_plan or base_plan(hp.model_name_or_path, module.config.model_type))
    previous = plan.get("recovery")
    plan["recovery"] = {**recovery_record(module, started), **({"previous": previous} if previous else {})}
    kept = read_plan(source)[1] if input_plan and "kept_indices" in input_plan else []
    policy = meta = None
    if (Path(source) / POLICY_FILE).is_file():
        policy, meta = load_policy(source)
    path = save_pruned(model, output, plan, policy=policy, policy_meta=meta, tokenizer=module.load_tokenizer(),
                       overwrite=overwrite, source=source)
    return Exported(path, plan, kept, model)


def recovery_record(module: RecoveryModule, started: float) -> dict[str, Any]:
    """The ``recovery`` record of ``prunenet.json``: input, method, hyperparameters (the module's, the
    data's, the trainer's), steps, tokens, trained parameters, data provenance, the held-out loss before
    training, the last logged train/val metrics, wall time (s) since ``started``, package versions."""
    hp, trainer = module.hparams, module.trainer
    data = getattr(trainer, "datamodule", None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    hyper = {k: hp[k] for k in ("method", "loss", "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler",
                                "dtype")}
    if hp.method == "lora":
        hyper.update(lora_r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                     lora_targets=hp.lora_targets, lora_target_modules=len(module.target_modules))
    data_hp = dict(data.hparams) if data is not None else {}
    hyper.update(batch_size=data_hp.get("batch_size"), block_size=data_hp.get("block_size"),
                 val_fraction=data_hp.get("val_fraction"), check_overlap=data_hp.get("check_overlap"),
                 devices=trainer.world_size, accumulate_grad_batches=trainer.accumulate_grad_batches,
                 precision=str(trainer.precision), gradient_clip_val=trainer.gradient_clip_val,
                 max_steps=trainer.max_steps, seed=module.run_settings()["seed"])
    return {"input": str(hp.model_name_or_path), "method": hp.method, "steps": int(trainer.global_step),
            "tokens": int(module.tokens_seen), "trainable_parameters": module.num_trained,
            "hyperparameters": hyper, "data": dict(getattr(data, "record", {}) or {}),
            "val_loss_before": module.initial_val_loss, "final_metrics": metrics,
            "wall_s": round(time.time() - started, 1), "versions": {**package_versions(), "peft": version("peft")}}

"""RecoveryModule: fine-tune a (pruned) checkpoint with LoRA through peft, or fully, as a LightningModule.

Source: the paper's recovery setting (PruneNet Table 3; the authors' code: LoRA rank 8, alpha 32,
dropout 0.1, lr 2e-4). Ours: the Lightning stage, the targets from the architecture adapter, the
checkpoints that hold only what is trained, and the merge into a plain checkpoint.

The base model is frozen; with ``method=lora`` peft wraps the adapter's projections of every decoder
layer (``lora_targets``: ``all`` = attention + FFN, ``ffn``, ``attention``, or explicit paths
relative to a decoder layer such as ``mlp.down_proj``) with trainable low-rank matrices A (r, in)
and B (out, r), scaled by alpha / r; ``method=full`` trains every weight. The loss (``loss``) is the
causal-LM cross entropy (``next_token``: mean over the predicted tokens of a batch of blocks, nats per
token), or the KL divergence from the dense model (``kl``: :mod:`prunenet.recovery.distill`; the default
for ``--data.source=self``). ``train/loss`` and ``val/loss`` are the next-token loss whichever is trained;
``train/kl`` and ``val/kl`` the KL, when it is.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from prunenet import loading
from prunenet.arch import get_adapter
from prunenet.checks import check_float
from prunenet.errors import ConfigurationError, DivergedError
from prunenet.recovery.distill import Teacher, check_loss, distill_losses, resolve_loss
from prunenet.recovery.targets import lora_target_names
from prunenet.resume import canonical_source, load_run_state, save_run_state
from prunenet.evaluation.subject import EvaluationSubject, Subject

METHODS = ("lora", "full")
#: Hyperparameters that change the result of a recovery (a resumed run must have the same ones).
RECOVERY_HPARAMS = ("method", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "learning_rate",
                    "weight_decay", "warmup_steps", "lr_scheduler", "dtype", "loss")


def check_finite(tensors: dict[str, torch.Tensor], when: str) -> None:
    """Refuse to save weights that are not all finite (ours).

    Args:
        tensors: name -> floating tensor of any shape.
        when: for the message (``"after step 40"``, ``"after merging the LoRA adapters"``).
    Raises:
        DivergedError: naming how many tensors are not finite and the first one.
    """
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise DivergedError(f"{len(bad)} of {len(tensors)} tensors are NaN or infinite {when} (first: "
                            f"{bad[0]}); nothing was saved: lower model.learning_rate or check the input model")


class RecoveryModule(L.LightningModule, EvaluationSubject):
    """Recovery fine-tuning of one checkpoint (typically a pruned one).

    Args:
        model_name_or_path: the checkpoint to recover: a folder (a pruned output), an asset name or a hub id.
        method: ``lora`` (peft; the paper's) or ``full`` (every weight; for small models).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator (update = alpha / r * B A) and
            dropout on the LoRA input (authors: 8, 32, 0.1).
        lora_targets: see :func:`lora_target_names` (default ``all``: attention and FFN projections).
        learning_rate: AdamW peak learning rate (authors: 2e-4).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        lr_scheduler: a ``transformers.get_scheduler`` name (``linear``, ``cosine``, ``constant``...) over
            the run's ``trainer.max_steps``.
        dtype: dtype the weights are trained in (float32 on CPU; bf16 weights with LoRA on GPUs).
        gradient_checkpointing: recompute activations in backward (less memory, slower).
        trust_remote_code: passed to transformers; off by default.
        loss: ``next_token``, ``kl`` (distillation from the dense source, loaded as :meth:`teacher`) or ``auto``
            (``kl`` for ``data.source=self``, else ``next_token``; :meth:`resolve_loss` sets the hparam).

    Raises:
        ConfigurationError: an unknown method or loss, a bad rank / alpha / dropout / learning rate, a LoRA
            target the model does not have.
        ModelLoadError: a folder that is not a checkpoint (no config.json), an unreadable one.
        UnsupportedModelError: a family without an architecture adapter.
    """

    def __init__(self, model_name_or_path: str = "smollm2-135m", method: str = "lora", lora_r: int = 8,
                 lora_alpha: float = 32, lora_dropout: float = 0.1, lora_targets: str | list[str] = "all",
                 learning_rate: float = 2e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 lr_scheduler: str = "linear", dtype: str = "float32", gradient_checkpointing: bool = False,
                 trust_remote_code: bool = False, loss: str = "auto") -> None:
        super().__init__()
        check_loss(loss)
        if method not in METHODS:
            raise ConfigurationError(f"model.method must be one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 1:
            raise ConfigurationError(f"model.lora_r must be a positive integer, got {lora_r!r}")
        check_float(lora_alpha, "model.lora_alpha", 0.0, low_open=True)
        check_float(lora_dropout, "model.lora_dropout", 0.0, 1.0, high_open=True)
        check_float(learning_rate, "model.learning_rate", 0.0, low_open=True)
        check_float(weight_decay, "model.weight_decay", 0.0)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigurationError(f"model.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        loading.parse_dtype(dtype)
        self.save_hyperparameters()
        self.config = loading.load_config(model_name_or_path, trust_remote_code)
        self.adapter = get_adapter(self.config)
        self.target_modules = (lora_target_names(self.config, lora_targets, trust_remote_code)
                               if method == "lora" else [])
        self.strict_loading = False  # checkpoints hold the trained parameters only (on_save_checkpoint)
        self.model: torch.nn.Module | None = None
        self._merged: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._teacher: Teacher | None = None  # a plain object, not a submodule: in no state dict or checkpoint
        self.tokens_seen = self.num_trained = 0
        self.initial_val_loss: float | None = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Load the checkpoint (frozen) and add the LoRA adapters, or unfreeze it (``full``); once."""
        if self.model is not None:
            return
        hp = self.hparams
        model = loading.load_model(hp.model_name_or_path, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        if hp.method == "full":
            model.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, bias="none",
                              target_modules=self.target_modules, fan_in_fan_out=self.adapter.conv1d,
                              task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
        self.model = model.train()  # loading.load_model returns it in eval mode; dropout (LoRA's) must be on
        self.num_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def resolve_loss(self, data_source: str | None) -> str:
        """Resolve ``loss=auto`` for the training text ``data_source`` (``distill.resolve_loss``) into the
        hyperparameters (checkpoint, logs, :meth:`run_settings`: a resume compares it); returns it."""
        self.hparams.loss = resolve_loss(self.hparams.loss, data_source)
        if hasattr(self, "_hparams_initial"):  # what the loggers record
            self._hparams_initial.loss = self.hparams.loss
        return self.hparams.loss

    def setup(self, stage: str) -> None:  # programmatic use without prunenet.recover's early resolve_loss()
        self.resolve_loss(getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("source"))

    def teacher(self) -> Teacher:
        """The dense source model in the student's dtype, frozen, eval mode: loaded once per process (each DDP
        rank has its own), never registered as a submodule (:class:`~prunenet.recovery.distill.Teacher`)."""
        if self._teacher is None:
            self._teacher = Teacher(loading.load_model(self.dense_source, dtype=self.hparams.dtype,
                                                       trust_remote_code=self.hparams.trust_remote_code))
        return self._teacher

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Name (as in this module's state dict) -> parameter, of what is trained."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Causal-LM loss of ``input_ids`` (batch, block), mean nats per predicted token (scalar)."""
        return self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    def losses(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss": next-token loss}``, plus ``"kl"`` (mean KL(teacher || student), nats per predicted token,
        from the same forward) when ``loss=kl``; scalars."""
        if self.hparams.loss != "kl":
            return {"loss": self(input_ids)}
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        kl, next_token = distill_losses(logits, self.teacher().logits(input_ids), input_ids)
        return {"loss": next_token, "kl": kl}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        terms = self.losses(ids)
        loss = terms.get("kl", terms["loss"])  # what is minimised
        # Any rank's non-finite loss stops every rank (a collective, so none waits for the others).
        if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss.detach())), all=False):
            value = float(loss.detach()) if not torch.isfinite(loss.detach()) else "non-finite on another rank"
            raise DivergedError(f"the training loss became {value} at step {self.global_step + 1} "
                                f"(model.learning_rate={self.hparams.learning_rate}); nothing was saved: "
                                "lower the learning rate or check the input model")
        self.tokens_seen += ids.numel() * self.trainer.world_size
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def on_train_start(self) -> None:
        """Log the held-out loss (and KL) before the first update (step 0 of the ``val/`` curves)."""
        datamodule = self.trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None and self.global_step == 0 else []
        if not loader:
            return
        self.model.eval()
        totals: dict[str, float] = {"blocks": 0}
        with torch.no_grad():
            for (ids,) in loader:
                for name, value in {"blocks": 1, **self.losses(ids.to(self.device))}.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * len(ids)
        self.model.train()
        metrics = {f"val/{name}": total / totals["blocks"] for name, total in totals.items() if name != "blocks"}
        self.initial_val_loss = metrics["val/loss"]
        for logger in self.loggers if self.trainer.is_global_zero else []:
            logger.log_metrics(metrics, step=0)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        (ids,) = batch
        for name, value in self.losses(ids).items():
            self.log(f"val/{name}", value, prog_bar=True, sync_dist=True, batch_size=ids.shape[0])

    def on_train_end(self) -> None:
        self._teacher = None  # its memory is free for the export and the evaluation (reloaded if used again)

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_scheduler

        hp = self.hparams
        optimizer = torch.optim.AdamW(self.trainable_parameters().values(), lr=hp.learning_rate,
                                      weight_decay=hp.weight_decay)
        scheduler = get_scheduler(hp.lr_scheduler, optimizer, num_warmup_steps=hp.warmup_steps,
                                  num_training_steps=max(1, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def run_settings(self) -> dict[str, Any]:
        """What determines this run's result (a resumed run must match): resolved source, seed, stage,
        the data's :meth:`~RecoveryDataModule.resume_settings` (once attached to a trainer) and
        :data:`RECOVERY_HPARAMS`."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return {"source": canonical_source(self.hparams.model_name_or_path), "stage": "recover",
                "seed": int(os.environ.get("PL_GLOBAL_SEED", 0)),
                **({"data": data.resume_settings()} if hasattr(data, "resume_settings") else {}),
                **{k: self.hparams[k] for k in RECOVERY_HPARAMS}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained parameters (LoRA adapters; every weight for ``full``): never the frozen base;
        add the run state (:func:`~prunenet.resume.save_run_state`): the tokens seen, the held-out loss
        before training and torch's RNG state."""
        trained = self.trainable_parameters()
        check_finite(trained, f"after step {self.global_step}")
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        # LoRA dropout draws from torch's global generator: a resumed run continues its stream exactly.
        save_run_state(checkpoint, self.run_settings(), {"tokens_seen": self.tokens_seen,
                                                         "val_loss_before": self.initial_val_loss,
                                                         "rng_state": torch.get_rng_state()})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint holds every trained parameter; restore the run state."""
        missing = sorted(set(self.trainable_parameters()) - set(checkpoint.get("state_dict", {})))
        if self.model is not None and missing:
            raise ConfigurationError(f"the checkpoint lacks {len(missing)} trained parameters of this run "
                                     f"(e.g. {missing[0]}); was it written with other LoRA targets or method?")
        state = load_run_state(checkpoint, {"tokens_seen": 0, "val_loss_before": None, "rng_state": None})
        self.tokens_seen = int(state["tokens_seen"])
        self.initial_val_loss = state["val_loss_before"]
        if state["rng_state"] is not None:
            torch.set_rng_state(state["rng_state"])

    # ------------------------------------------------------------------ results
    def merged_model(self) -> torch.nn.Module:
        """The recovered model as a plain transformers model (LoRA merged with ``merge_and_unload``, in
        place, once), frozen, eval mode."""
        if self._merged is None:
            model = self.model.merge_and_unload() if self.hparams.method == "lora" else self.model
            model.requires_grad_(False)
            self._merged = model.eval()
        return self._merged

    def load_tokenizer(self):
        """The checkpoint's tokenizer (None when it has none); loaded once."""
        if self._tokenizer is None:
            self._tokenizer = loading.load_tokenizer(self.hparams.model_name_or_path, self.hparams.trust_remote_code)
        return self._tokenizer

    def input_plan(self) -> dict[str, Any] | None:
        """The input's ``prunenet.json`` (its provenance), or None for a checkpoint PruneNet did not write."""
        from prunenet.plan import load_plan

        try:
            return load_plan(loading.resolve(self.hparams.model_name_or_path))
        except ConfigurationError:
            return None

    @property
    def dense_source(self) -> str:
        """The dense model the input was pruned from (its plan's ``source_model``), else the input itself."""
        plan = self.input_plan() or {}
        return str(plan.get("source_model", self.hparams.model_name_or_path))

    def load_dense_model(self):
        """The dense model (for the evaluation's baseline column)."""
        return loading.load_model(self.dense_source, trust_remote_code=self.hparams.trust_remote_code)

    def evaluation_subject(self) -> Subject:
        """For PostPruningEvaluation: the recovered model against the dense source; the input folder's
        ``eval.json`` gives the "before recovery" scores when it has them."""
        plan = self.input_plan()
        return {"label": "recovered", "baseline": self.dense_source, "baseline_dtype": "auto",
                "compression_ratio": (plan or {}).get("compression_ratio"),
                "input": loading.resolve(self.hparams.model_name_or_path) if plan else None}

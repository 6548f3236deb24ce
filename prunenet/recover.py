"""Entry point: ``python -m prunenet.recover --config configs/recover.yaml --model.model_name_or_path=<folder>``.

Recovery fine-tuning after slicing (the paper's Table 3 setting): a LightningCLI over
:class:`RecoveryModule` (LoRA through peft, or full fine-tuning) and :class:`RecoveryDataModule`
(packed causal-LM blocks with a held-out split), with the callback sections ``export``
(:class:`RecoveryExport`: merge, save a plain Hugging Face checkpoint) and ``evaluation``
(:class:`PostPruningEvaluation`: dense vs recovered). ``--trainer.max_steps`` is the budget.

Everything checkable is checked before the Trainer starts, so a bad input is one ``error:`` line, exit
code 2, nothing written: the input folder, the LoRA targets, the output folder, the log folders, the
devices, and the data (read, tokenized, packed and checked against the evaluation texts here).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from callbacks import PostPruningEvaluation, RecoveryExport
from prunenet.cli import run_main
from prunenet.fit import check_devices, check_log_dirs
from prunenet.recovery import RECOVERY_HPARAMS, RecoveryDataModule, RecoveryModule
from prunenet.resume import resolve_ckpt_path

#: Steps between checkpoints and between validations (``--trainer.val_check_interval``).
EVERY_N_STEPS = 25
TRAINER_DEFAULTS = {
    "max_steps": 50,
    "max_epochs": None,
    "gradient_clip_val": 1.0,          # as the fit (and Hugging Face Trainer's default max_grad_norm)
    "log_every_n_steps": 5,
    "val_check_interval": EVERY_N_STEPS,
    "check_val_every_n_epoch": None,   # validate every N steps across epochs
    "num_sanity_val_steps": 0,         # RecoveryModule logs the step-0 validation loss itself
    "enable_model_summary": False,
}


class RecoverCLI(LightningCLI):
    """LightningCLI with the recovery's callback sections and a ``--ckpt_path`` to resume."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RecoveryExport, "export")
        parser.add_lightning_class_args(PostPruningEvaluation, "evaluation")
        parser.add_argument("--ckpt_path", default=None, help="resume from a Lightning checkpoint ('last' for the newest)")


def main(args: list[str] | None = None) -> RecoverCLI:
    """Parse, check, fine-tune, merge and save. Returns the CLI (trainer, model, datamodule)."""
    # The last checkpoint every N steps (adapters and optimizer only for LoRA), so --ckpt_path last resumes.
    checkpoints = ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=EVERY_N_STEPS)
    defaults = dict(TRAINER_DEFAULTS, callbacks=[checkpoints, LearningRateMonitor(logging_interval="step")])
    cli = RecoverCLI(RecoveryModule, RecoveryDataModule, run=False, seed_everything_default=0,
                     trainer_defaults=defaults, save_config_kwargs={"overwrite": True}, args=args,
                     subclass_mode_model=False, subclass_mode_data=False)
    check_devices(cli.trainer, cli.model)
    check_log_dirs(cli.trainer)
    cli.datamodule.prepare(cli.model.load_tokenizer())
    settings = {**cli.model.run_settings(), "data": cli.datamodule.resume_settings()}
    ckpt_path = resolve_ckpt_path(cli.config.get("ckpt_path"), cli.trainer.default_root_dir, settings,
                                  keys=RECOVERY_HPARAMS)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


if __name__ == "__main__":
    run_main(main)

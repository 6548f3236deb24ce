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

from callbacks import PostPruningEvaluation, RecoveryExport, StopOnSignal
from prunenet.cli import PARSER_KWARGS, parse_errors_in_one_line, run_main
from prunenet.errors import ConfigurationError
from prunenet.fit import check_devices, check_log_dirs, check_trainer, no_logs_when_refused
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
    # SIGINT / SIGTERM stop after the step in progress and save it: --ckpt_path last resumes exactly there.
    callbacks = [checkpoints, LearningRateMonitor(logging_interval="step"), StopOnSignal(save_state=True)]
    defaults = dict(TRAINER_DEFAULTS, callbacks=callbacks)
    with parse_errors_in_one_line():
        cli = RecoverCLI(RecoveryModule, RecoveryDataModule, run=False, seed_everything_default=0,
                         trainer_defaults=defaults, save_config_kwargs={"overwrite": True}, args=args,
                         subclass_mode_model=False, subclass_mode_data=False, parser_kwargs=PARSER_KWARGS)
    check_budget(cli.trainer.max_steps, cli.config.trainer.max_epochs)
    check_trainer(cli.trainer)
    check_devices(cli.trainer, cli.model)
    check_log_dirs(cli.trainer)
    for callback in cli.trainer.callbacks:
        if isinstance(callback, RecoveryExport):
            callback.check(cli.model.hparams.model_name_or_path)
    cli.datamodule.prepare(cli.model.load_tokenizer())
    settings = {**cli.model.run_settings(), "data": cli.datamodule.resume_settings()}
    ckpt_path = resolve_ckpt_path(cli.config.get("ckpt_path"), cli.trainer.default_root_dir, settings,
                                  keys=RECOVERY_HPARAMS)
    with no_logs_when_refused(cli.trainer):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def check_budget(max_steps: int, max_epochs: int | None) -> None:
    """A recovery's budget is ``--trainer.max_steps`` optimizer steps, a positive number, or -1 (Lightning's
    "no limit") with an explicit ``--trainer.max_epochs`` >= 1: -1 alone means 1000 epochs of the text
    (1.2 million steps on the packaged one), and 0 would save an unchanged copy as "recovered".

    Raises:
        ConfigurationError: naming the values given.
    """
    epochs_bound = isinstance(max_epochs, int) and not isinstance(max_epochs, bool) and max_epochs >= 1
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not (max_steps >= 1 or
                                                                             (max_steps == -1 and epochs_bound)):
        raise ConfigurationError(f"trainer.max_steps must be a positive number of optimizer steps for a recovery, "
                                 f"got {max_steps!r} with trainer.max_epochs={max_epochs!r} (0 would save an unchanged "
                                 "copy; -1 needs --trainer.max_epochs >= 1 as its bound); e.g. "
                                 f"--trainer.max_steps={TRAINER_DEFAULTS['max_steps']}")


if __name__ == "__main__":
    run_main(main)

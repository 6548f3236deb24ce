"""Entry point: ``python -m prunenet.fit --config configs/smollm2.yaml [--section.key=value ...]``.

A LightningCLI over :class:`PruneNetModule` and :class:`LayerDataModule` with the
always-present callback sections ``slicing`` (StructuralSlicing) and ``spectrum``
(SpectrumMonitor). ``--trainer.max_epochs`` is the number of episodes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from callbacks import PostPruningEvaluation, SpectrumMonitor, StopOnSignal, StructuralSlicing
from prunenet.artifacts import check_writable, missing_folders, remove_empty, resolve_output_path
from prunenet.cli import PARSER_KWARGS, parse_errors_in_one_line, run_main
from prunenet.data import LayerDataModule
from prunenet.checks import check_float
from prunenet.errors import ConfigurationError
from prunenet.module import PruneNetModule
from prunenet.resume import resolve_ckpt_path

TRAINER_DEFAULTS = {
    "max_epochs": 20,              # episodes (authors' default)
    "gradient_clip_val": 1.0,      # authors' code clips the policy gradient norm at 1
    "log_every_n_steps": 1,        # one step per episode
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


class PruneNetCLI(LightningCLI):
    """LightningCLI with PruneNet's callback sections and a ``--ckpt_path`` to resume."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(StructuralSlicing, "slicing")
        parser.add_lightning_class_args(SpectrumMonitor, "spectrum")
        parser.add_lightning_class_args(PostPruningEvaluation, "evaluation")
        parser.add_argument("--ckpt_path", default=None, help="resume from a Lightning checkpoint ('last' for the newest)")


def build_cli(args: list[str] | None = None) -> PruneNetCLI:
    """Parse the config and flags and build what they name (module, policy, reward, learner, data,
    trainer, callbacks); no work, nothing written beyond what the constructors check.

    Raises:
        ConfigurationError: a bad value, a name no plug point has (``selection: peek``, ``policy: foo``), an
            unknown key or class, a value of the wrong type (jsonargparse's refusal, in one line).
    """
    # A policy checkpoint every episode (small: the LLM is not in it), so --ckpt_path last resumes.
    # SIGINT / SIGTERM stop after the episode in progress; that last.ckpt is what resume needs.
    callbacks = [ModelCheckpoint(save_last=True, every_n_epochs=1), StopOnSignal(save_state=False)]
    defaults = dict(TRAINER_DEFAULTS, callbacks=callbacks)
    with parse_errors_in_one_line():
        return PruneNetCLI(PruneNetModule, LayerDataModule, run=False, seed_everything_default=0,
                           trainer_defaults=defaults, save_config_kwargs={"overwrite": True}, args=args,
                           subclass_mode_model=False, subclass_mode_data=False, parser_kwargs=PARSER_KWARGS)


def main(args: list[str] | None = None) -> PruneNetCLI:
    """Parse, build (:func:`build_cli`), check and fit. Returns the CLI (trainer, model) for programmatic use."""
    cli = build_cli(args)
    check_trainer(cli.trainer)
    check_episodes(cli.trainer)
    check_devices(cli.trainer, cli.model)
    check_log_dirs(cli.trainer)
    ckpt_path = resolve_ckpt_path(cli.config.get("ckpt_path"), cli.trainer.default_root_dir, cli.model.run_settings())
    with no_logs_when_refused(cli.trainer):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def check_trainer(trainer) -> None:
    """The trainer's own float settings that Lightning does not check: ``gradient_clip_val`` must be
    None or a finite number >= 0 (NaN turns every gradient into NaN; a negative value switches
    clipping off without a word).

    Raises:
        ConfigurationError: naming the value.
    """
    if trainer.gradient_clip_val is not None:
        check_float(trainer.gradient_clip_val, "trainer.gradient_clip_val", 0.0)


def check_episodes(trainer) -> None:
    """A fit trains the policy: at least one episode (``trainer.max_epochs`` >= 1 or unset, and
    ``trainer.max_steps`` not 0). A selection without training (``peak``, ``random``, ``magnitude``) is
    a ``prunenet.compress`` run; nothing here writes an untrained ``policy.pt``.

    Raises:
        ConfigurationError: naming the value and the compress command.
    """
    hint = ("a fit trains the policy; to prune without training run python -m prunenet.compress "
            "--config configs/compress/smollm2.yaml (or --selection peak|random|magnitude)")
    max_epochs = trainer.fit_loop.max_epochs
    if max_epochs is not None and max_epochs == 0:
        raise ConfigurationError(f"trainer.max_epochs must be >= 1 episode, got 0: {hint}")
    if trainer.fit_loop.max_steps == 0:
        raise ConfigurationError(f"trainer.max_steps must not be 0 (one step is one episode): {hint}")
    if trainer.limit_train_batches == 0:
        raise ConfigurationError(f"trainer.limit_train_batches must not be 0 (it skips every episode): {hint}")


def check_devices(trainer, module) -> None:
    """Refuse more processes than layers (each rank needs at least one layer) or, on CPU,
    than cores, before any process is launched or anything is written. Several CPU processes share
    the cores (``cores // processes`` threads each, unless ``OMP_NUM_THREADS`` says otherwise): each
    taking every core would slow all of them down by an order of magnitude.

    Raises:
        ConfigurationError: naming the requested and the possible numbers.
    """
    from lightning.pytorch.accelerators import CPUAccelerator

    world = trainer.world_size
    if isinstance(trainer.accelerator, CPUAccelerator) and world > (os.cpu_count() or 1):
        raise ConfigurationError(f"trainer.devices={trainer.num_devices} CPU processes requested but this machine "
                                 f"has {os.cpu_count()} cores; use at most {os.cpu_count()}")
    if isinstance(trainer.accelerator, CPUAccelerator) and world > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    layers = getattr(module, "num_layers_config", None)  # a fit shards layers; a recovery shards blocks
    if layers is not None and world > layers:
        raise ConfigurationError(f"{world} processes requested for a model of {layers} layers; "
                                 f"use at most {layers} devices")


@contextlib.contextmanager
def no_logs_when_refused(trainer) -> Iterator[None]:
    """Around ``trainer.fit``: a run refused before its first step (a user error raised in ``setup`` or
    while loading, e.g. a checkpoint that does not load), or one whose training diverged (a non-finite
    loss or weights: :class:`~prunenet.errors.DivergedError`), removes the log folder it created (its
    ``version_N``), and the parents created for it while they are empty, so it writes nothing. Folders
    that existed before, anything another run put beside them, and every other run that trained a
    step, keep their logs.
    """
    from prunenet.cli import is_user_error
    from prunenet.errors import DivergedError

    created = [missing_folders(logger.log_dir) for logger in trainer.loggers
               if getattr(logger, "log_dir", None) and not Path(logger.log_dir).exists()]
    try:
        yield
    except Exception as exc:
        refused = is_user_error(exc) and (trainer.global_step == 0 or isinstance(exc, DivergedError))
        if refused and trainer.is_global_zero:
            for log_dir, *parents in created:
                shutil.rmtree(log_dir, ignore_errors=True)
                remove_empty(parents)  # one that holds another run's files stays
        raise


def check_log_dirs(trainer) -> None:
    """Refuse a log folder (``--trainer.default_root_dir``, the logger's ``save_dir``) where files
    cannot be created, before anything is written: the logs, the policy checkpoints and the default
    output folder go there.

    Raises:
        OutputExistsError: naming the folder and the reason.
    """
    folders = {str(trainer.default_root_dir): "log folder (--trainer.default_root_dir)"}
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir is not None:
            folders.setdefault(str(save_dir), "logger folder (--trainer.logger save_dir)")
    for folder, what in folders.items():
        if "://" in folder:  # a remote store (s3://, gs://): Lightning's fsspec handles it, not a local probe
            continue
        resolve_output_path(folder, what)  # a dangling or looping symlink is refused by name
        check_writable(folder, what)


if __name__ == "__main__":
    run_main(main)

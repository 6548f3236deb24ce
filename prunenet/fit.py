"""Entry point: ``python -m prunenet.fit --config configs/smollm2.yaml [--section.key=value ...]``.

A LightningCLI over :class:`PruneNetModule` and :class:`LayerDataModule` with the
always-present callback sections ``slicing`` (StructuralSlicing) and ``spectrum``
(SpectrumMonitor). ``--trainer.max_epochs`` is the number of episodes.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from callbacks import PostPruningEvaluation, SpectrumMonitor, StructuralSlicing
from prunenet.cli import run_main
from prunenet.data import LayerDataModule
from prunenet.errors import ConfigurationError
from prunenet.module import PruneNetModule

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


def main(args: list[str] | None = None) -> PruneNetCLI:
    """Parse, build and fit. Returns the CLI (trainer, model) for programmatic use."""
    # A policy checkpoint every episode (small: the LLM is not in it), so --ckpt_path last resumes.
    defaults = dict(TRAINER_DEFAULTS, callbacks=[ModelCheckpoint(save_last=True, every_n_epochs=1)])
    cli = PruneNetCLI(PruneNetModule, LayerDataModule, run=False, seed_everything_default=0,
                      trainer_defaults=defaults, save_config_kwargs={"overwrite": True}, args=args,
                      subclass_mode_model=False, subclass_mode_data=False)
    check_devices(cli.trainer, cli.model)
    ckpt_path = resolve_ckpt_path(cli.config.get("ckpt_path"), cli.trainer.default_root_dir,
                                  cli.model.hparams.model_name_or_path)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def check_devices(trainer, module: PruneNetModule) -> None:
    """Refuse more processes than layers (each rank needs at least one layer) or, on CPU,
    than cores, before any process is launched or anything is written.

    Raises:
        ConfigurationError: naming the requested and the possible numbers.
    """
    from lightning.pytorch.accelerators import CPUAccelerator

    world = trainer.world_size
    if isinstance(trainer.accelerator, CPUAccelerator) and world > (os.cpu_count() or 1):
        raise ConfigurationError(f"trainer.devices={trainer.num_devices} CPU processes requested but this machine "
                                 f"has {os.cpu_count()} cores; use at most {os.cpu_count()}")
    if module.num_layers_config is not None and world > module.num_layers_config:
        raise ConfigurationError(f"{world} processes requested for a model of {module.num_layers_config} layers; "
                                 f"use at most {module.num_layers_config} devices")


def resolve_ckpt_path(ckpt_path: str | None, root_dir: str, model_name_or_path: str | None = None) -> str | None:
    """``last`` -> the newest ``last.ckpt`` of an earlier run of the same model under ``root_dir``
    (each run logs to a new ``lightning_logs/version_N``, so Lightning's own "last" would only look
    in the new, empty one). Runs of other models (per their ``hparams.yaml``) are skipped.

    Raises:
        ConfigurationError: ``last`` with no earlier checkpoint of this model, or a path that does not exist.
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        found = [p for p in Path(root_dir).glob("**/checkpoints/last*.ckpt")
                 if model_name_or_path is None or _run_model(p) == str(model_name_or_path)]
        if not found:
            raise ConfigurationError(f"--ckpt_path last: no last.ckpt of {model_name_or_path!r} under "
                                     f"{str(Path(root_dir).resolve())!r}; run without --ckpt_path first")
        return str(max(found, key=lambda p: p.stat().st_mtime))
    if not Path(ckpt_path).is_file():
        raise ConfigurationError(f"--ckpt_path {ckpt_path!r} does not exist (pass a .ckpt file or 'last')")
    return ckpt_path


def _run_model(ckpt: Path) -> str | None:
    """``model_name_or_path`` of the run that wrote ``ckpt`` (its logger's hparams.yaml), or None."""
    import yaml

    hparams = ckpt.parent.parent / "hparams.yaml"
    try:
        return str(yaml.safe_load(hparams.read_text()).get("model_name_or_path"))
    except (OSError, AttributeError, yaml.YAMLError):
        return None


if __name__ == "__main__":
    run_main(main)

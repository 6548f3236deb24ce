"""Entry point: ``python -m prunenet.fit --config configs/smollm2.yaml [--section.key=value ...]``.

A LightningCLI over :class:`PruneNetModule` and :class:`LayerDataModule` with the
always-present callback sections ``slicing`` (StructuralSlicing) and ``spectrum``
(SpectrumMonitor). ``--trainer.max_epochs`` is the number of episodes.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from callbacks import SpectrumMonitor, StructuralSlicing
from prunenet.cli import run_main
from prunenet.data import LayerDataModule
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
        parser.add_argument("--ckpt_path", default=None, help="resume from a Lightning checkpoint ('last' for the newest)")


def main(args: list[str] | None = None) -> PruneNetCLI:
    """Parse, build and fit. Returns the CLI (trainer, model) for programmatic use."""
    # A policy checkpoint every episode (small: the LLM is not in it), so --ckpt_path last resumes.
    defaults = dict(TRAINER_DEFAULTS, callbacks=[ModelCheckpoint(save_last=True, every_n_epochs=1)])
    cli = PruneNetCLI(PruneNetModule, LayerDataModule, run=False, seed_everything_default=0,
                      trainer_defaults=defaults, save_config_kwargs={"overwrite": True}, args=args,
                      subclass_mode_model=False, subclass_mode_data=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return cli


if __name__ == "__main__":
    run_main(main)

"""StructuralSlicing: at the end of fit, the trained policy selects the kept rows, and the one pruning
pipeline (``prunenet.pipeline.prune``) slices and saves."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from callbacks.exporter import CheckpointExporter
from callbacks.rank_zero import on_rank_zero
from prunenet import loading
from prunenet.artifacts import check_output_dir
from prunenet.export import Exported, use_shardwise
from prunenet.pipeline import prune
from prunenet.calibration import CalibrationSettings
from prunenet.errors import ConfigurationError
from prunenet.refit import RIDGE, check_ridge
from prunenet.selectors import POLICY_SELECTIONS, SELECTIONS, build_selector, validate_selection


class StructuralSlicing(CheckpointExporter):
    """Slice every FFN to the policy's kept rows and save a Hugging Face checkpoint.

    The checkpoint (safetensors, config with the new FFN width, tokenizer, generation
    config, ``policy.pt``, ``prunenet.json``) is written atomically to ``output_dir``
    (default ``<log dir>/pruned``) on rank 0; other ranks wait. What was written is
    :attr:`exported` (path, plan, the sliced model), like ``ModelCheckpoint.best_model_path``;
    other callbacks ask :meth:`export`, which does the work once per fit whoever asks first.

    Args:
        output_dir: where to save; must be absent or empty unless ``overwrite``.
        overwrite: replace an existing non-empty ``output_dir`` (only after the new one is complete).
        selection: how the trained policy picks the rows: ``sample`` (paper: seeded multinomial over
            the keep probabilities) or ``topk`` (``selection.POLICY_SELECTIONS``). A selection that needs
            no policy (``peak``, ``random``, ``magnitude``) is a ``prunenet.compress`` run, not a fit.
        shardwise: rewrite the safetensors shards one at a time instead of loading the model
            (None: whenever the source is a local safetensors checkpoint loaded in its own dtype).
        refit: refit each FFN output projection's kept columns by least squares on the calibration text (ours,
            ``refit.py``): the policy's text (a feature policy), else the reward's, else the model's own
            (``CalibrationSettings(seed=<the fit's seed>)``).
        refit_ridge: the refit's ridge, a fraction of the mean kept activation energy (> 0).

    Raises:
        ConfigurationError: a selection that does not use the policy (one line naming the compress command), or a
            bad ``refit_ridge``.
        OutputExistsError: at construction, before any training, if ``output_dir`` is a file,
            not writable, a dangling or looping symlink, or non-empty without ``overwrite``;
            at setup for the default folder.
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False, selection: str = "sample",
                 shardwise: bool | None = None, refit: bool = False, refit_ridge: float = RIDGE) -> None:
        if selection not in POLICY_SELECTIONS and selection in SELECTIONS:
            raise ConfigurationError(
                f"slicing.selection {selection!r} does not use the policy, so a fit has nothing to train for it: "
                f"run python -m prunenet.compress --selection {selection} (or --config configs/compress/<model>.yaml); "
                f"a fit selects with one of {', '.join(POLICY_SELECTIONS)}")
        validate_selection(selection, "slicing.selection", POLICY_SELECTIONS)
        if output_dir:
            check_output_dir(output_dir, overwrite)
        self.output_dir, self.overwrite, self.selection = output_dir, overwrite, selection
        self.shardwise = shardwise
        self.refit, self.refit_ridge = bool(refit), check_ridge(refit_ridge)
        self.exported: Exported | None = None
        self._statistics = None  # the fit's activation statistics, held for the refit (on_train_end)
        self._default_output = Path("lightning_logs") / "pruned"

    def output_path(self) -> Path:
        """``output_dir`` or, by default, ``<log dir>/pruned``."""
        return Path(self.output_dir).expanduser() if self.output_dir else self._default_output

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective under DDP: resolve it here, on every rank.
        self._default_output = Path(trainer.log_dir or "lightning_logs") / "pruned"
        if stage == "fit":  # refuse a bad output folder (also the default one) now, not after all the episodes
            source = pl_module.hparams.model_name_or_path
            check_output_dir(self.output_path(), self.overwrite, loading.resolve(source))
            use_shardwise(source, self.shardwise, pl_module.hparams.dtype)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.exported = None  # a new fit changes the policy: what an earlier fit exported is stale
        self._statistics = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the module's on_train_end releases the reward's statistics: the refit needs their Grams, which
        # otherwise cost a second pass of the dense model over the text (45 s of a 2-minute SmolLM2 fit). Only the
        # statistics are held (host memory), not inputs that would keep the states on the accelerator.
        if self.refit and trainer.is_global_zero:
            self._statistics = pl_module.selection_inputs(self._refit_text(pl_module)).shared_activations()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._statistics = None  # n^2 doubles a layer

    def _refit_text(self, pl_module: L.LightningModule) -> CalibrationSettings | None:
        """The refit's text: the policy's (a feature policy), else the reward's, else the model's own; None
        without a refit (the selection's inputs need no text then)."""
        if not self.refit:
            return None
        return (getattr(pl_module.policy, "settings", None) or getattr(pl_module.reward, "settings", None)
                or CalibrationSettings(seed=pl_module.seed))

    def export(self, pl_module: L.LightningModule) -> Exported:
        """Select, slice and save once per fit (call on rank 0); returns :attr:`exported`."""
        if self.exported is None:
            if not pl_module.history:  # no episode ran (prunenet.fit refuses such budgets; Python callers may not)
                raise ConfigurationError("the fit trained no episode, so there is no policy to select with; nothing "
                                         "was written (train at least one episode, or prune without training: "
                                         "python -m prunenet.compress)")
            hp = pl_module.hparams
            inputs = pl_module.selection_inputs(self._refit_text(pl_module), self._statistics)
            self._statistics = None
            self.exported = prune(
                hp.model_name_or_path, build_selector(self.selection, policy=pl_module.policy, seed=pl_module.seed),
                hp.compression_ratio, self.output_path(), protect_outliers=hp.protect_outliers,
                inputs=inputs, refit=self.refit, refit_ridge=self.refit_ridge,
                provenance={**pl_module.algorithm(), "episodes": len(pl_module.history),
                            "final_reward_mean": pl_module.history[-1]["reward_mean"] if pl_module.history else None},
                policy=pl_module.policy, policy_meta=pl_module.policy_metadata(), overwrite=self.overwrite,
                shardwise=self.shardwise, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code)
        return self.exported

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def work() -> None:
            self.export(pl_module)
            rank_zero_info("\n" + self.summary(pl_module))

        on_rank_zero(trainer, work)

    def summary(self, pl_module: L.LightningModule) -> str:
        """One-screen summary: params dense -> pruned, % removed, rewards, wall time, output path."""
        plan, history = self.exported.plan, pl_module.history
        lines = [
            "PruneNet summary",
            f"  model            {plan['source_model']} ({plan['model_type']}, {plan['num_layers']} layers)",
            (f"  FFN width        {plan['intermediate_size']} -> {plan['kept_width']} "
             f"(compression ratio {plan['compression_ratio']}, selection {plan['selection']}"
             + (f", {100 * plan['protect_outliers']:g}% outlier neurons protected" if plan.get("protect_outliers")
                else "") + ")"),
            (f"  parameters       {plan['params_dense']:,} -> {plan['params_pruned']:,} "
             f"({100 * plan['params_removed_fraction']:.1f}% removed)"),
        ]
        if history:
            lines.append(f"  mean reward      episode 1: {history[0]['reward_mean']:.3f}   "
                         f"episode {len(history)}: {history[-1]['reward_mean']:.3f}")
        lines.append(f"  wall time        {time.time() - pl_module.fit_started:.1f} s")
        lines.append(f"  output           {self.exported.path}")
        return "\n".join(lines)


def find_slicing(trainer: L.Trainer) -> StructuralSlicing:
    """The trainer's StructuralSlicing callback (the one that exports the pruned checkpoint).

    Raises:
        ConfigurationError: none is configured.
    """
    from callbacks.exporter import find_callback

    return find_callback(trainer, StructuralSlicing, "the StructuralSlicing callback, which exports the pruned model")

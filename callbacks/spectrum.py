"""SpectrumMonitor: a figure of dense vs kept singular-value spectra, in TensorBoard."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from callbacks.rank_zero import on_rank_zero
from prunenet.reward import ks_statistic, singular_values


class SpectrumMonitor(L.Callback):
    """At the end of fit, plot the singular values of W_i and W_i[kept] for a few layers.

    The figure goes to TensorBoard (``spectra/dense_vs_kept``) and to ``spectra.png``
    in the log dir. Rank 0 only.

    Args:
        num_layers: how many layers to plot (first, last, and evenly spaced between).
        enabled: switch it off.
    """

    def __init__(self, num_layers: int = 4, enabled: bool = True) -> None:
        self.num_layers, self.enabled = int(num_layers), enabled

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask

        def work() -> None:
            fig = self.figure(pl_module, self.kept_rows(trainer, pl_module))
            logger = trainer.logger
            if logger is not None and hasattr(logger.experiment, "add_figure"):
                logger.experiment.add_figure("spectra/dense_vs_kept", fig, global_step=trainer.global_step)
            if log_dir:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                fig.savefig(Path(log_dir) / "spectra.png", dpi=100)

        if self.enabled:
            on_rank_zero(trainer, work)

    @staticmethod
    def kept_rows(trainer: L.Trainer, pl_module: L.LightningModule) -> list[torch.Tensor]:
        """The rows the exported checkpoint keeps (StructuralSlicing's plan; exported now if it was
        not yet), or, in a trainer without that callback, what the policy selects now."""
        from callbacks.slicing import find_slicing
        from prunenet.errors import ConfigurationError

        try:
            return list(find_slicing(trainer).export(pl_module).kept)
        except ConfigurationError:  # no StructuralSlicing in this trainer
            return pl_module.kept_indices()

    def figure(self, pl_module: L.LightningModule, kept: list[torch.Tensor]):
        """Matplotlib figure: singular value vs rank, dense and kept, one panel per layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        total = pl_module.num_layers
        count = max(1, min(self.num_layers, total))
        layers = sorted({round(j * (total - 1) / max(count - 1, 1)) for j in range(count)})
        fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.2), squeeze=False)
        for ax, i in zip(axes[0], layers):
            w = pl_module.states[i]
            dense = singular_values(w).cpu()
            pruned = singular_values(w.index_select(0, kept[i].to(w.device))).cpu()
            ks = float(ks_statistic(dense, pruned))
            ax.plot(torch.arange(dense.numel()), dense, label="dense")
            ax.plot(torch.arange(pruned.numel()), pruned, label=f"kept {kept[i].numel()} rows")
            ax.set_title(f"layer {i}  KS={ks:.3f}")
            ax.set_xlabel("index")
            ax.set_yscale("log")
        axes[0][0].set_ylabel("singular value")
        axes[0][0].legend()
        fig.tight_layout()
        return fig

"""StopOnSignal: SIGINT / SIGTERM stop a training loop after its current step, with its state saved (ours)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from prunenet.cli import note_interruption, set_graceful_stop


class StopOnSignal(L.Callback):
    """While the training loop runs, SIGINT or SIGTERM (``prunenet.cli.run_main`` catches both) ask it to
    stop after the current step: Lightning's own SIGTERM path, whose loops raise ``SIGTERMException`` at a
    step boundary, on every DDP rank together. Then the entry point prints one ``error: stopped by ...``
    line with what was saved and exits 130 (SIGINT) or 143 (SIGTERM), never 0. Outside the loop
    (loading, slicing, exporting, evaluating) a signal stops the process at once, and what was being
    written is removed unfinished (``artifacts.atomic_write_dir``).

    Args:
        save_state: also write ``last.ckpt`` (into the ``ModelCheckpoint`` folder) at the step where the
            loop stopped: a recovery resumes exactly there with ``--ckpt_path last``. Off for the fit, whose
            ``last.ckpt`` after every episode already holds all that resume needs.
    """

    def __init__(self, save_state: bool = True) -> None:
        self.save_state = save_state

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        connector = trainer._signal_connector  # Lightning has no public way to ask for its SIGTERM stop

        def request() -> None:
            connector.received_sigterm = True

        set_graceful_stop(request)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_graceful_stop(None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        set_graceful_stop(None)
        if not isinstance(exception, SIGTERMException):
            return
        checkpoints = trainer.checkpoint_callback
        if self.save_state and checkpoints is not None and checkpoints.dirpath:
            path = Path(checkpoints.dirpath) / "last.ckpt"
            trainer.save_checkpoint(path)  # a collective under DDP: every rank stopped at this step
            note_interruption(f"the state after step {trainer.global_step} is saved in {str(path)!r}; "
                              "run the same command with --ckpt_path last to resume")
        elif checkpoints is not None and checkpoints.last_model_path:
            note_interruption(f"the state after the last finished episode is in {checkpoints.last_model_path!r}; "
                              "run the same command with --ckpt_path last to resume")
        else:
            note_interruption("no state was saved: stopped before the first checkpoint")

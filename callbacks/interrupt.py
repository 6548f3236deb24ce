"""StopOnSignal: SIGINT / SIGTERM stop a training loop after its current step, on every rank together,
with its state saved (ours)."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L

from prunenet.cli import Interrupted, install_signal_handlers, note_interruption, received_signal, set_signal_hooks


class StopOnSignal(L.Callback):
    """Makes a signalled fit or recovery stop cleanly (``prunenet.cli.run_main`` then prints one
    ``error: stopped by ...`` line with what was saved and exits 130 for SIGINT, 143 for SIGTERM).

    In the training loop a signal only sets a flag; after each step every rank learns whether any rank
    got one (one boolean all-reduce; Lightning's own SIGTERM handler, which makes a collective inside
    the signal handler, is replaced for the loop), and then all stop together at that step boundary,
    the state saved if ``save_state``, by raising :class:`~prunenet.cli.Interrupted`. Outside the loop
    (loading, exporting, evaluating) a signal stops the process at once; what was being written is
    removed unfinished (``artifacts.atomic_write_dir``), and the rank that launched the others passes
    the signal on to them.

    Args:
        save_state: write ``last.ckpt`` (into the ``ModelCheckpoint`` folder) at the step where the loop
            stopped: a recovery resumes exactly there with ``--ckpt_path last``. Off for the fit, whose
            ``last.ckpt`` after every episode already holds what resume needs.
    """

    def __init__(self, save_state: bool = True) -> None:
        self.save_state = save_state
        self.requested = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        set_signal_hooks(forward=self._forwarder(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = False
        install_signal_handlers()  # Lightning's connector restores run_main's handlers at its teardown
        set_signal_hooks(graceful=self._request, forward=self._forwarder(trainer))

    def _request(self) -> None:
        self.requested = True

    @staticmethod
    def _forwarder(trainer: L.Trainer):
        launcher = trainer.strategy.launcher
        return getattr(launcher, "kill", None)  # Lightning's subprocess launcher: signals the ranks it started

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._stop_if_requested(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_signal_hooks(forward=self._forwarder(trainer))  # from here on a signal stops at once
        self._stop_if_requested(trainer)  # one that came after the last step's check

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        set_signal_hooks()

    def _stop_if_requested(self, trainer: L.Trainer) -> None:
        """If any rank got a signal: save (all ranks, a collective), note what was saved, raise on every rank."""
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        checkpoints = trainer.checkpoint_callback
        if self.save_state and checkpoints is not None and checkpoints.dirpath:
            path = Path(checkpoints.dirpath) / "last.ckpt"
            trainer.save_checkpoint(path)
            note_interruption(f"the state after step {trainer.global_step} is saved in {str(path)!r}; "
                              "run the same command with --ckpt_path last to resume")
        elif checkpoints is not None and checkpoints.last_model_path:
            note_interruption(f"the state after the last finished episode is in {checkpoints.last_model_path!r}; "
                              "run the same command with --ckpt_path last to resume")
        else:
            note_interruption("no state was saved: stopped before the first checkpoint")
        raise Interrupted(received_signal() or signal.SIGTERM)  # a rank that got none stops as the others

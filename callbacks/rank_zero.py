"""Run a callback's work on rank 0 while the other ranks wait, without hanging on failure."""

from __future__ import annotations

from typing import Callable

import lightning as L


def on_rank_zero(trainer: L.Trainer, work: Callable[[], object]) -> None:
    """Run ``work()`` on global rank 0, then synchronise all ranks.

    The synchronisation is a broadcast of rank 0's success flag (a collective, so it is also
    the barrier): if ``work`` raises, rank 0 re-raises its error and every other rank raises
    too, instead of waiting forever at a barrier rank 0 never reaches.

    Raises:
        whatever ``work`` raised (rank 0); RuntimeError on the other ranks when rank 0 failed.
    """
    error: BaseException | None = None
    if trainer.is_global_zero:
        try:
            work()
        except BaseException as exc:  # re-raised below, after the other ranks are told
            error = exc
    ok = trainer.strategy.broadcast(error is None, src=0)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError("rank 0 failed at the end of the fit (see its error); this rank stops too")

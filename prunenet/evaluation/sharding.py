"""Sharded evaluation: this process's rank, where it evaluates, and the one failure-aware exchange.

A sharded evaluation runs the same code on every rank of a ``torch.distributed`` process group
(the one Lightning's DDP made for the fit, or one made here from ``torchrun``'s environment
variables). Each rank scores its own share of the work: lm-eval's documents
(:mod:`prunenet.evaluation.lm`) and the perplexity's batches of windows
(:mod:`prunenet.evaluation.perplexity`); rank 0 gathers them and writes the report.

The protocol that keeps a failure from hanging the others: every collective of the evaluation is
:meth:`Shards.exchange` (one ``all_gather_object`` of ``(ok, payload)``), and all ranks make the same
sequence of them. A rank whose own work fails (:meth:`Shards.guarded`) sends ``(False, message)`` in
one exchange and stops; every other rank is on its way to its next exchange (there are no other
collectives to block in), which meets that message, so every rank raises: the failing one its own
error, the others :class:`ShardFailed` naming the rank and the error. One line each, no hang.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from prunenet.errors import EvaluationError, is_user_error

T = TypeVar("T")

#: Keys of a task or perplexity record that describe how one run was sharded (not stored in the cache).
RANK_KEYS = ("processes", "requests_per_rank", "windows_per_rank", "cpu_s_per_rank")


class ShardFailed(EvaluationError):
    """Another rank's evaluation failed (it said so in an exchange), or the ranks lost contact."""


def one_line(exc: BaseException) -> str:
    """``"<type>: <first line of the message>"`` of an exception."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def rank_device(device: str | None, local_rank: int) -> str:
    """The device a rank evaluates on: ``cuda:<local_rank>`` for None (when CUDA is available) or
    ``cuda``; ``cpu`` for None without CUDA; any other value as given (``cpu``, ``cuda:1``)."""
    import torch

    if device is None:
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if str(device) == "cuda" else str(device)


@dataclass(frozen=True)
class Shards:
    """This process's place in an evaluation over ``world_size`` processes.

    Attributes:
        rank: global rank, in [0, world_size).
        world_size: processes that evaluate; 1 = a plain single-process evaluation (every method
            then runs the work directly, with no collective and no error rewriting).
        device: where this rank evaluates (``cuda:<local rank>``, ``cpu``); None = the settings' device.
    """

    rank: int = 0
    world_size: int = 1
    device: str | None = None

    @property
    def is_zero(self) -> bool:
        """True on rank 0, the rank that writes reports."""
        return self.rank == 0

    def exchange(self, payload: Any) -> list[Any]:
        """Every rank's ``payload``, in rank order (a collective: every rank calls it, in the same order).

        Raises:
            ShardFailed: a rank reported a failure instead of a payload, or the ranks lost contact.
        """
        if self.world_size == 1:
            return [payload]
        items = self._gather((True, payload))
        failed = [(r, message) for r, (ok, message) in enumerate(items) if not ok]
        if failed:
            rank, message = failed[0]
            raise ShardFailed(f"evaluation failed on rank {rank} of {self.world_size}: {message} "
                              f"(every rank stops; nothing was written)")
        return [payload for _, payload in items]

    def guarded(self, work: Callable[[], T]) -> T:
        """``work()`` on this rank; if it fails, tell the others (one exchange) and raise.

        A user error (:class:`~prunenet.errors.PruneNetError`) is re-raised as it is; any other
        exception becomes a one-line :class:`EvaluationError` naming this rank (the original is its
        ``__cause__``: ``PRUNENET_VERBOSE=1`` prints the traceback). With one process, ``work()``
        runs as is.
        """
        try:
            return work()
        except ShardFailed:  # met another rank's failure in an exchange: that exchange was made
            raise
        except BaseException as exc:
            if self.world_size == 1:
                raise
            with contextlib.suppress(ShardFailed):
                self._gather((False, one_line(exc)))
            if isinstance(exc, Exception) and not is_user_error(exc):
                raise EvaluationError(f"evaluation failed on rank {self.rank} of {self.world_size}: "
                                      f"{one_line(exc)}") from exc
            raise

    def step(self, work: Callable[[], T]) -> list[T]:
        """:meth:`guarded` ``work()``, then :meth:`exchange` its value: every rank's value, in rank order."""
        return self.exchange(self.guarded(work))

    def barrier(self) -> None:
        """Wait until every rank is here (a collective), so that they leave the group together.

        Raises:
            ShardFailed: the ranks lost contact.
        """
        import torch.distributed as dist

        with self._lost_contact(" at the end"):
            dist.barrier()

    def _gather(self, item: tuple[bool, Any]) -> list[tuple[bool, Any]]:
        import torch.distributed as dist

        items: list[Any] = [None] * self.world_size
        with self._lost_contact():
            dist.all_gather_object(items, item)
        return items

    @contextlib.contextmanager
    def _lost_contact(self, when: str = "") -> Iterator[None]:
        """A failed collective (a peer process died, gloo: connection closed; or the group is gone)
        as the one-line :class:`ShardFailed`."""
        try:
            yield
        except Exception as exc:
            raise ShardFailed(f"evaluation stopped on rank {self.rank} of {self.world_size}: lost contact with "
                              f"the other ranks{when} ({one_line(exc)})") from exc


def current(device: str | None = None, local_rank: int | None = None) -> Shards:
    """The shards of the initialized default process group (one :class:`Shards` of world size 1
    when there is none or it has one process); ``device`` per :func:`rank_device`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Shards(device=device)
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    return Shards(rank=rank, world_size=dist.get_world_size(), device=rank_device(device, local))


@contextlib.contextmanager
def from_environment(device: str | None = None, keep_group: bool = False) -> Iterator[Shards]:
    """The shards of a launch by ``torchrun`` (or anything that sets ``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); a single process without them.

    Joins a gloo process group for the exchanges (they carry only Python objects: scores, counts,
    errors; the models run on each rank's own device). Once the work is done every rank passes a
    final barrier, so that they leave together. The group is then left (``destroy_process_group``),
    after the work or an error, unless ``keep_group``: an entry point that ends its process right
    after (``prunenet.evaluate``'s command, through :func:`prunenet.cli.run_main`) keeps it, because
    gloo's teardown, in ``destroy_process_group`` or at interpreter exit, sometimes aborts a rank with
    SIGABRT ("terminate called without an active exception", seen in CI after successful runs and
    after a peer failed): that entry point ends the process without it
    (:func:`prunenet.cli.exit_now`). Either way this returns or raises; it never ends the process.

    Raises:
        EvaluationError: ``WORLD_SIZE`` > 1 without ``RANK``.
        ShardFailed: the ranks lost contact at the final barrier.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield Shards(device=device)
        return
    if "RANK" not in os.environ:
        raise EvaluationError(f"WORLD_SIZE={world} but no RANK is set; launch with torchrun --nproc_per_node={world}")
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        shards = current(device, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        yield shards
        if created:  # leave together: gloo aborts a rank whose peer closed the connection first
            shards.barrier()
    finally:
        if created and not keep_group:
            dist.destroy_process_group()

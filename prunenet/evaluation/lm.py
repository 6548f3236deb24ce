"""The lm-eval model PruneNet evaluates with: lm-eval's ``HFLM`` on a loaded model, told its rank.

lm-eval 0.4's evaluator shards by document when its model reports ``rank`` / ``world_size``: each
rank builds the requests of documents ``rank, rank + world_size, ...`` (within the limit), scores
them, computes their per-document metrics, and ``gather_object`` brings those to rank 0, which
aggregates (means, stderr, MMLU's group). :class:`RankedHFLM` gives lm-eval that: the rank and world
size of the :class:`~prunenet.evaluation.sharding.Shards`, ``gather_object`` as one
:meth:`Shards.exchange <prunenet.evaluation.sharding.Shards.exchange>` (which also carries each
rank's request count and CPU time), and local ``all_gather`` / ``barrier``: lm-eval uses those only
to pad every rank to the same number of requests and to wait, which a model whose forward pass has
collectives (FSDP) needs and one full model per rank does not. So each rank scores exactly its own
requests, and the task's one exchange is the only collective (the protocol of ``sharding.py``).
"""

from __future__ import annotations

import time
from typing import Any

from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from prunenet.evaluation import shared_context
from prunenet.evaluation.sharding import Shards


class RankedHFLM(HFLM):
    """``HFLM`` on an already-loaded model, scoring this rank's share of each task's documents.

    Use per task: :meth:`begin_task`, then lm-eval's ``simple_evaluate`` on an active rank, then
    :meth:`end_task` on every rank; :attr:`requests_per_rank` / :attr:`cpu_s_per_rank` then hold
    what each rank did (on every rank).

    Args:
        model: the model, already on this rank's device.
        tokenizer: its tokenizer.
        batch_size: requests per forward pass.
        shards: this process's rank and world size.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, shards: Shards) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.shards = shards
        self.active = True
        self.requests = 0
        self.requests_per_rank: list[int] = []
        self.cpu_s_per_rank: list[float] = []
        self._cpu0 = 0.0
        self._exchanged = False

    def begin_task(self, n_docs: int | None) -> bool:
        """Shard the next task over min(world size, ``n_docs``) ranks (a rank with no document would
        break lm-eval's evaluator). Returns whether this rank scores documents of it."""
        world = self.shards.world_size if n_docs is None else max(1, min(self.shards.world_size, n_docs))
        self.active = self.shards.rank < world
        self._rank, self._world_size = (self.shards.rank, world) if self.active else (0, 1)
        self.requests, self._exchanged, self._cpu0 = 0, False, time.process_time()
        self.requests_per_rank, self.cpu_s_per_rank = [], []
        return self.active

    def end_task(self) -> None:
        """Make the task's exchange if lm-eval did not (an idle rank, or one active rank of several)."""
        if not self._exchanged:
            self._exchange(None)

    def _exchange(self, obj: Any) -> list[Any]:
        mine = (obj, self.requests, round(time.process_time() - self._cpu0, 2)) if self.active else None
        parts = self.shards.exchange(mine)
        self._exchanged = True
        self.requests_per_rank = [p[1] if p else 0 for p in parts]
        self.cpu_s_per_rank = [p[2] if p else 0.0 for p in parts]
        return [p[0] for p in parts if p]

    # ---------------------------------------------------------------- lm-eval's distributed hooks
    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        objs = self._exchange(obj)
        return objs if self.rank == dst else None

    def all_gather(self, tensor):
        """Every rank "has" this rank's value: lm-eval pads no rank (see the module docstring)."""
        return tensor.reshape(-1).repeat(self.world_size)

    def barrier(self) -> None:
        return None

    # ---------------------------------------------------------------- counting
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.requests += len(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """lm-eval's scoring, except that requests sharing a context run it once
        (:mod:`prunenet.evaluation.shared_context`); the others go through lm-eval's batched path."""
        cache_arg = shared_context.cache_argument(self.model)
        if self.backend != "causal" or cache_arg is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        groups, rest = shared_context.split_shared(requests, self.max_length)
        results: list[Any] = [None] * len(requests)
        if rest:
            scored = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm, override_bs)
            for i, answer in zip(rest, scored, strict=True):
                results[i] = answer
        bar = tqdm(total=sum(map(len, groups.values())), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (shared contexts)")
        # a quarter of the batch size in contexts: as many rows a forward as lm-eval's batches (~4 choices each)
        for chunk in shared_context.batches(groups, max(1, self.batch_size // 4), self.model):
            answers = shared_context.score_groups(self.model, [(ctx, [requests[i][2] for i in groups[ctx]])
                                                               for ctx in chunk],
                                                  self.device, self.softmax_dtype, cache_arg)
            for ctx, group_answers in zip(chunk, answers, strict=True):
                for i, answer in zip(groups[ctx], group_answers, strict=True):
                    results[i] = answer
                    if requests[i][0] is not None:  # lm-eval's cache hook, as its own loop calls it
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(groups[ctx]))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self.requests += len(requests)
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.requests += len(requests)
        return super().generate_until(requests, disable_tqdm=disable_tqdm)


def doc_count(task: Any, limit: int | float | None) -> int:
    """Documents lm-eval evaluates of ``task`` with ``limit`` (a group: its smallest subtask's)."""
    from lm_eval.api.group import Group
    from lm_eval.evaluator_utils import get_sample_size

    from prunenet.evaluation.tasks import no_map_bars

    leaves = task.get_all_tasks() if isinstance(task, Group) else [task]
    with no_map_bars():
        sizes = [len(t.eval_docs) for t in leaves]
    return min(min(n, get_sample_size(t, limit) or n) for t, n in zip(leaves, sizes))

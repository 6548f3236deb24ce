"""Score multiple-choice requests that share a context with one forward pass of the context (ours).

lm-eval's ``HFLM._loglikelihood_tokens`` runs every (context, continuation) request as its own sequence:
a HellaSwag document's context (about 70 tokens) goes through the model once per ending (4 times), an
ARC question once per answer. Here the requests of one document are grouped by their context tokens;
the context minus its last token runs once and its key/value cache is repeated for the group's
continuations, each fed as ``[last context token] + continuation[:-1]`` (the positions whose logits
predict the continuation, exactly the positions lm-eval reads). The log-likelihood and the greedy flag
are computed as lm-eval computes them (``log_softmax`` over the vocabulary, sum of the continuation
tokens' log-probabilities, argmax equal at every position). The context's logits are never computed
(``logits_to_keep=1``), which matters for a 262k-token vocabulary (Gemma 3).

The numbers differ from lm-eval's only by floating-point rounding (another association order of the
same sums): the test and the measured comparison are in ``tests/test_shared_context.py`` and the
closing note of issue 27.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

Request = tuple[tuple[str, str], list[int], list[int]]  # lm-eval's ((context, continuation), ctx ids, cont ids)


def cache_argument(model: Any) -> str | None:
    """The name under which ``model``'s forward takes and returns a key/value cache (``cache`` from
    transformers 5.25, ``past_key_values`` before), or None when its forward lacks what
    :func:`score_group` passes (the cache, ``attention_mask``, ``logits_to_keep``, ``use_cache``)."""
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    name = "cache" if "cache" in params else "past_key_values"
    return name if {"input_ids", name, "attention_mask", "logits_to_keep", "use_cache"} <= params else None


def split_shared(requests: list[Request], max_length: int) -> tuple[dict[tuple[int, ...], list[int]], list[int]]:
    """Group request indices by context tokens.

    Returns:
        ``(groups, rest)``: ``groups`` maps a context (token ids) to the indices of its requests, for
        contexts of two or more requests whose every sequence fits in ``max_length + 1`` tokens (no
        truncation, which would cut the shared context differently per request); ``rest`` is every
        other index, for lm-eval's own batched path.
    """
    by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (_, ctx, _) in enumerate(requests):
        by_context[tuple(ctx)].append(i)
    groups, rest = {}, []
    for ctx, idx in by_context.items():
        fits = all(len(ctx) + len(requests[i][2]) <= max_length + 1 for i in idx)
        if len(idx) > 1 and len(ctx) > 0 and fits:
            groups[ctx] = idx
        else:
            rest.extend(idx)
    return groups, rest


@torch.no_grad()
def score_group(model: Any, context: tuple[int, ...], continuations: list[list[int]], device: torch.device,
                softmax_dtype: torch.dtype | None = None, cache_arg: str = "cache") -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation after ``context``, the context run once.

    Args:
        model: a causal LM (transformers), in eval mode, on ``device``.
        context: the context's token ids, length >= 1.
        continuations: n lists of token ids, each non-empty.
        device: where the inputs go.
        softmax_dtype: dtype of the log-softmax (lm-eval's ``softmax_dtype``; None: the logits' dtype).
        cache_arg: the model's name for its key/value cache (:func:`cache_argument`).

    Returns:
        n pairs ``(sum of log p(continuation token), every token is the argmax)`` in nats, as
        lm-eval's ``_loglikelihood_tokens`` returns them.
    """
    n, width = len(continuations), max(len(c) for c in continuations)
    prefix = torch.tensor([list(context[:-1])], dtype=torch.long, device=device)
    past = None
    if prefix.shape[1]:
        past = getattr(model(input_ids=prefix, use_cache=True, logits_to_keep=1), cache_arg)
        past.batch_repeat_interleave(n)
    rows = torch.zeros((n, width), dtype=torch.long, device=device)
    mask = torch.zeros((n, prefix.shape[1] + width), dtype=torch.long, device=device)
    mask[:, : prefix.shape[1]] = 1
    for r, cont in enumerate(continuations):
        inp = [context[-1], *cont[:-1]]  # position t predicts cont[t]
        rows[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        mask[r, prefix.shape[1]: prefix.shape[1] + len(inp)] = 1  # right padding: never attended to
    logits = model(input_ids=rows, attention_mask=mask, use_cache=past is not None, **{cache_arg: past}).logits
    logprobs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
    out = []
    for r, cont in enumerate(continuations):
        lp = logprobs[r, : len(cont)]
        target = torch.tensor(cont, dtype=torch.long, device=device)
        greedy = bool((lp.argmax(dim=-1) == target).all())
        out.append((float(lp.gather(1, target[:, None]).sum()), greedy))
    return out

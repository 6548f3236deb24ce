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


#: A context's requests take the shared path when it runs at most this fraction of the tokens lm-eval's path
#: runs: measured on SmolLM2 (2 CPU cores), the shared path costs about 1.5x more per token (smaller, masked
#: batches), so it pays off below 2/3: HellaSwag (0.53) and ARC (0.36) gain 23-38%, PIQA (0.82) would lose.
MAX_TOKEN_FRACTION = 2 / 3


def split_shared(requests: list[Request], max_length: int) -> tuple[dict[tuple[int, ...], list[int]], list[int]]:
    """Group request indices by context tokens.

    Returns:
        ``(groups, rest)``: ``groups`` maps a context (token ids) to the indices of its requests, for
        contexts of two or more requests whose every sequence fits in ``max_length + 1`` tokens (no
        truncation, which would cut the shared context differently per request) and that save enough
        tokens (:data:`MAX_TOKEN_FRACTION`); ``rest`` is every other index, for lm-eval's own batched path.
    """
    by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (_, ctx, _) in enumerate(requests):
        by_context[tuple(ctx)].append(i)
    groups, rest = {}, []
    for ctx, idx in by_context.items():
        conts = [len(requests[i][2]) for i in idx]
        fits = all(len(ctx) + c <= max_length + 1 for c in conts)
        shared, alone = len(ctx) - 1 + sum(conts), sum(len(ctx) - 1 + c for c in conts)
        if len(idx) > 1 and len(ctx) > 0 and fits and shared <= MAX_TOKEN_FRACTION * alone:
            groups[ctx] = idx
        else:
            rest.extend(idx)
    return groups, rest


def batches(groups: dict[tuple[int, ...], list[int]], batch_size: int, model: Any) -> list[list[tuple[int, ...]]]:
    """The contexts of ``groups`` in batches for :func:`score_groups`: longest first (as lm-eval orders its
    requests: the least padding), ``batch_size`` contexts a batch; one a batch for a context of one token
    (its row would have no real prefix token) and for a model whose forward takes no ``position_ids``."""
    try:
        positions = "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        positions = False
    order = sorted(groups, key=len, reverse=True)
    multi = [c for c in order if len(c) > 1] if positions else []
    single = [c for c in order if not positions or len(c) == 1]
    return [multi[i: i + batch_size] for i in range(0, len(multi), batch_size)] + [[c] for c in single]


@torch.no_grad()
def score_groups(model: Any, groups: list[tuple[tuple[int, ...], list[list[int]]]], device: torch.device,
                 softmax_dtype: torch.dtype | None = None, cache_arg: str = "cache") -> list[list[tuple[float, bool]]]:
    """Log-likelihood of each continuation after its context, every context run once, the groups batched.

    The G contexts minus their last tokens are left-padded to the longest (P tokens) and run as one
    batch, with position ids that count real tokens only, so each row's real tokens sit right before its
    continuations and sliding-window distances are real distances; each row of the cache is then
    repeated for its group's continuations, which run as one right-padded batch after it. With one
    group nothing is padded. Pass one group at a time for a model whose forward takes no
    ``position_ids`` (positions would count the padding).

    Args:
        model: a causal LM (transformers), in eval mode, on ``device``.
        groups: G pairs (context token ids, length >= 2 when G > 1; its continuations, lists of token ids,
            each non-empty).
        device: where the inputs go.
        softmax_dtype: dtype of the log-softmax (lm-eval's ``softmax_dtype``; None: the logits' dtype).
        cache_arg: the model's name for its key/value cache (:func:`cache_argument`).

    Returns:
        per group, one pair per continuation: ``(sum of log p(continuation token), every token is the
        argmax)`` in nats, as lm-eval's ``_loglikelihood_tokens`` returns them.
    """
    lengths = [len(ctx) - 1 for ctx, _ in groups]  # the prefix: context minus its last token
    owner = [g for g, (_, conts) in enumerate(groups) for _ in conts]
    conts = [c for _, cs in groups for c in cs]
    n, p, width = len(conts), max(lengths), max(len(c) for c in conts)
    prefix_mask = torch.zeros((len(groups), p), dtype=torch.long, device=device)
    past = None
    if p:
        prefix = torch.zeros((len(groups), p), dtype=torch.long, device=device)
        for g, (ctx, _) in enumerate(groups):
            prefix[g, p - lengths[g]:] = torch.tensor(ctx[:-1], dtype=torch.long)
            prefix_mask[g, p - lengths[g]:] = 1
        kwargs = {} if len(groups) == 1 else {"attention_mask": prefix_mask,
                                              "position_ids": (prefix_mask.cumsum(-1) - 1).clamp(min=0)}
        past = getattr(model(input_ids=prefix, use_cache=True, logits_to_keep=1, **kwargs), cache_arg)
        past.batch_select_indices(torch.tensor(owner, device=device))
    rows = torch.zeros((n, width), dtype=torch.long, device=device)
    mask = torch.cat([prefix_mask[owner], torch.zeros((n, width), dtype=torch.long, device=device)], dim=1)
    for r, cont in enumerate(conts):
        inp = [groups[owner[r]][0][-1], *cont[:-1]]  # position t predicts cont[t]
        rows[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        mask[r, p: p + len(inp)] = 1  # right padding: never attended to
    kwargs = {} if len(groups) == 1 else {
        "position_ids": torch.tensor(lengths, device=device)[owner][:, None] + torch.arange(width, device=device)}
    logits = model(input_ids=rows, attention_mask=mask, use_cache=past is not None, **{cache_arg: past}, **kwargs).logits
    logprobs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
    out: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for r, cont in enumerate(conts):
        lp = logprobs[r, : len(cont)]
        target = torch.tensor(cont, dtype=torch.long, device=device)
        greedy = bool((lp.argmax(dim=-1) == target).all())
        out[owner[r]].append((float(lp.gather(1, target[:, None]).sum()), greedy))
    return out

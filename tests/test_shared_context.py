"""Shared-context scoring (prunenet/evaluation/shared_context.py) gives lm-eval's log-likelihoods."""

from __future__ import annotations

import random

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer

from prunenet.evaluation import shared_context
from prunenet.evaluation.lm import RankedHFLM
from prunenet.evaluation.sharding import Shards
from tests.tiny import tiny_model

# float32 (unit roundoff u = 6e-8). A log-probability here is ~10 dot products deep (2-3 layers, d = 24,
# a 101-token log-softmax) over O(1) values, so re-associating its sums moves it by at most ~24 * 10 * u
# = 1.5e-5 per token; a continuation sums at most 6 tokens: 1e-4 bounds the difference with margin.
ATOL = 1e-4

# Sliding windows (8 tokens) shorter than the contexts, ALiBi, learned positions, local attention:
# the families whose cache or mask differs from LLaMA's.
FAMILIES = ["llama", "gemma3_text", "gpt2", "bloom", "gpt_neo", "qwen2"]


def _requests(seed: int) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """Multiple-choice-shaped requests: documents of 2-4 continuations (1-6 tokens) after one context
    (1-20 tokens), plus single requests; token ids in [3, 100]."""
    rng = random.Random(seed)
    out = []
    for doc in range(12):
        ctx = [rng.randint(3, 100) for _ in range(rng.randint(1, 20))]
        for c in range(1 if doc % 4 == 3 else rng.randint(2, 4)):
            cont = [rng.randint(3, 100) for _ in range(rng.randint(1, 6))]
            out.append(((f"doc{doc}", f"choice{c}"), ctx, cont))
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_loglikelihoods_as_lm_eval(family, tokenizer):
    model = tiny_model(family, seed=0).float().eval()
    lm = RankedHFLM(model, tokenizer, batch_size=4, shards=Shards())
    assert shared_context.cache_argument(lm.model) is not None
    reqs = _requests(seed=1)
    groups, rest = shared_context.split_shared(reqs, lm.max_length)
    assert groups and rest  # both paths are exercised
    ours = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    theirs = HFLM._loglikelihood_tokens(lm, reqs, disable_tqdm=True)
    assert len(ours) == len(theirs) == len(reqs)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, theirs, strict=True):
        assert ll == pytest.approx(ll_ref, abs=ATOL)
        assert greedy == greedy_ref


def test_groups_only_shared_contexts_that_fit_and_save_tokens():
    reqs = [(("a", "1"), [5] * 8, [7]), (("a", "2"), [5] * 8, [8, 9]),      # 7 + 3 of 17 tokens: shared
            (("b", "1"), [5], [7]),                                          # alone
            (("c", "1"), [1] * 12, [2]), (("c", "2"), [1] * 12, [3, 4]),    # 12 + 2 > 13 tokens: truncated
            (("d", "1"), [5, 6], [1] * 6), (("d", "2"), [5, 6], [2] * 6)]    # 13 of 14 tokens: not worth it
    groups, rest = shared_context.split_shared(reqs, max_length=12)
    assert groups == {(5,) * 8: [0, 1]}
    assert sorted(rest) == [2, 3, 4, 5, 6]


def test_a_model_without_a_cache_interface_uses_lm_eval_path():
    class Plain(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    assert shared_context.cache_argument(Plain()) is None


def test_batches_longest_first_one_token_contexts_alone():
    groups = {(1,): [0, 1], (1, 2, 3): [2, 3], (4, 5): [4, 5], (6, 7, 8, 9): [6, 7]}

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask, cache, use_cache, logits_to_keep):
            return input_ids

    assert shared_context.batches(groups, 2, tiny_model("llama")) == [[(6, 7, 8, 9), (1, 2, 3)], [(4, 5)], [(1,)]]
    # positions would count the left padding: one context a batch
    assert shared_context.batches(groups, 2, NoPositions()) == [[(6, 7, 8, 9)], [(1, 2, 3)], [(4, 5)], [(1,)]]

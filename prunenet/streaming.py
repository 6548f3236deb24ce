"""Models bigger than memory: read FFN input matrices straight from safetensors, and slice
a (sharded) safetensors checkpoint shard by shard.

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

from prunenet.arch import ArchAdapter, check_finite, get_adapter
from prunenet.errors import ModelLoadError
from prunenet.slicing import EVAL_JSON, EVAL_MD, PLAN_FILE

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


class StreamedStates(Sequence):
    """Per-layer policy states read from safetensors on demand: ``states[i]`` is (n, d).

    Args:
        folder: the safetensors checkpoint folder.
        keys: checkpoint key of the first FFN input weight of every layer.
        adapter: turns the stored weight into the (n, d) state.
        cache: keep every layer once read (fast); False reads it again at each use
            (one layer in memory at a time: the ``low_memory`` mode).
    """

    def __init__(self, folder: Path, files: dict[str, str], keys: list[str], adapter: ArchAdapter,
                 cache: bool) -> None:
        self.folder, self.files, self.keys, self.adapter, self.cache = Path(folder), files, keys, adapter, cache
        self._cache: dict[int, torch.Tensor] = {}
        self._checked: set[int] = set()
        self.device: torch.device | str = "cpu"

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i in self._cache:
            return self._cache[i]
        from safetensors import safe_open

        key = self.keys[i]
        try:
            with safe_open(self.folder / self.files[key], framework="pt") as f:
                weight = f.get_tensor(key)
        except Exception as exc:
            raise ModelLoadError(f"cannot read {key} from {self.folder / self.files[key]}: {exc}") from None
        state = self.adapter.state_from_weight(weight)
        if i not in self._checked:
            check_finite(state, key)
            self._checked.add(i)
        state = state.to(self.device)
        if self.cache:
            self._cache[i] = state
        return state

    def to(self, device) -> "StreamedStates":
        """Move (future reads and the cache) to ``device``; returns self."""
        self.device = device
        self._cache = {i: w.to(device) for i, w in self._cache.items()}
        return self


def stream_states(folder: str | os.PathLike, config: Any, low_memory: bool | None = None,
                  low_memory_threshold: int = 1 << 30) -> tuple[StreamedStates, dict[str, Any]] | None:
    """Open the policy states of a local safetensors checkpoint without building the model.

    Args:
        folder: resolved local model folder.
        config: its config.
        low_memory: True = one layer at a time; False = read all once; None = True when the
            states total more than ``low_memory_threshold`` bytes (default 1 GiB).
    Returns:
        ``(states, info)`` with info ``params_dense``, ``state_names``, ``low_memory``; or None when
        ``folder`` is not a safetensors checkpoint or its names cannot be matched (the caller then
        loads the model with transformers).
    """
    files = safetensors_files(folder)
    if files is None:
        return None
    adapter = get_adapter(config)
    model = meta_model(config)
    names = {id(p): n for n, p in model.named_parameters()}
    layers = adapter.layers(model)
    state_names = [names[id(adapter.input_modules(layer)[0].weight)] for layer in layers]
    try:
        mapping = match_keys(state_names, list(files))
    except KeyError:
        return None
    metas = [adapter.state(layer) for layer in layers]
    nbytes = sum(int(w.numel()) * w.element_size() for w in metas)
    params_dense = sum(p.numel() for p in model.parameters())
    del model
    if low_memory is None:
        low_memory = nbytes > low_memory_threshold
    states = StreamedStates(Path(folder), files, [mapping[n] for n in state_names], adapter, cache=not low_memory)
    return states, {"params_dense": params_dense, "state_names": state_names, "low_memory": low_memory,
                    "streamed": True}


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

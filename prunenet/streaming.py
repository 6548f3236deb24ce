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
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prunenet.arch import check_finite, get_adapter
from prunenet.arch.bias import bias_value, enable_output_bias
from prunenet.artifacts import EVAL_JSON, EVAL_MD, EVAL_PNG, PLAN_FILE
from prunenet.cache import MANIFEST
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


def slice_checkpoint(folder: str | os.PathLike, config: Any, kept: Sequence[torch.Tensor], out: Path,
                     biases: Sequence[torch.Tensor] | None = None,
                     output_weights: Sequence[torch.Tensor] | None = None) -> int:
    """Write a sliced copy of a safetensors checkpoint into ``out``, one shard at a time.

    FFN tensors are sliced with the adapter's ``slice_tensor``; every other tensor is copied;
    shard names, the index (with the new total size) and non-weight files are kept; the config
    gets the new FFN width. Peak memory is about one shard.

    With ``biases`` (per layer the (d,) FLAP compensation, ``arch.bias``) each FFN output bias becomes
    ``bias.bias_value``; a family that gets its FFN biases now (``bias.bias_mode`` ``create``) gets them as new
    tensors (zeros for the inputs) in the shard of their weight and in the index, and the config key turned on.
    With ``output_weights`` (per layer the refit output weight in its sliced shape, ``refit.py``) each FFN output
    weight is that tensor rounded to the stored dtype instead of the stored columns.

    Returns:
        Number of parameters of the sliced checkpoint.
    Raises:
        ModelLoadError: not a safetensors checkpoint, or FFN tensors missing from it.
        ConfigurationError: the family's config cannot express the new width.
    """
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
    bias_keys: dict[str, tuple[int, str, str]] = {}  # FFN bias written -> (layer, role, its weight's key)
    if biases is not None:
        create = enable_output_bias(adapter, new_config)
        bias_keys = {key[: -len("weight")] + "bias": (layer, role, key) for key, (layer, role, kind)
                     in key_roles.items() if kind == "weight" and (role == "output" or create)}

    def bias_tensor(key: str, stored: torch.Tensor | None, dtype: str) -> torch.Tensor:
        layer, role, _ = bias_keys[key]
        if role == "input":  # a new input bias: zeros, the function is unchanged
            return torch.zeros(kept[layer].numel() * (2 if adapter.fused_gate_up else 1), dtype=_DTYPES[dtype])
        return bias_value(stored, biases[layer], _DTYPES[dtype])

    total_params, total_bytes, new_keys = 0, 0, {}
    for shard in sorted(set(files.values())):
        entries, data_start = read_header(folder / shard)
        metadata = entries.pop("__metadata__", None) or {"format": "pt"}

        def sliced(key: str, t: torch.Tensor) -> torch.Tensor:
            if key not in key_roles:
                return t
            if not t.is_meta:
                check_finite(t, key)  # an error leaves no output: the caller writes into a temp folder
            layer, role, kind = key_roles[key]
            if output_weights is not None and role == "output" and kind == "weight" and not t.is_meta:
                return output_weights[layer].to(t.dtype)
            return adapter.slice_tensor(t, kept[layer], role, kind)

        # The output header needs every output shape first: slice tensors on the meta device (no data).
        order = sorted(entries, key=lambda key: entries[key]["data_offsets"][0])
        shapes = {key: sliced(key, _meta_tensor(entries[key])) if key in key_roles else None for key in order}
        added = {b: bias_tensor(b, None, entries[w]["dtype"]) for b, (_, _, w) in bias_keys.items()
                 if b not in files and files[w] == shard}
        new_keys.update(dict.fromkeys(added, shard))
        out_entries, offset = {}, 0
        for key in order + list(added):
            info = {"dtype": entries[bias_keys[key][2]]["dtype"], "shape": list(added[key].shape)} \
                if key in added else entries[key]
            shape = list(shapes[key].shape) if shapes.get(key) is not None else info["shape"]
            nbytes = math.prod(shape) * _DTYPES[info["dtype"]].itemsize
            out_entries[key] = {"dtype": info["dtype"], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            total_params += math.prod(shape)
        total_bytes += offset
        # Plain reads (no mmap, whose touched pages would stay in the process's resident memory): an FFN
        # tensor is read, sliced and written; any other is copied as bytes in chunks. Peak: one FFN tensor.
        with open(folder / shard, "rb") as src, open(out / shard, "wb") as dst:
            _write_header(dst, out_entries, metadata)
            for key in order:
                if key not in key_roles and key not in bias_keys:
                    _copy_bytes(src, dst, data_start + entries[key]["data_offsets"][0],
                                out_entries[key]["data_offsets"][1] - out_entries[key]["data_offsets"][0])
                    continue
                t = _read_tensor(src, entries[key], data_start)
                t = bias_tensor(key, t, entries[key]["dtype"]) if key in bias_keys else sliced(key, t)
                if list(t.shape) != out_entries[key]["shape"]:
                    raise ModelLoadError(f"{key}: sliced to {tuple(t.shape)}, expected {out_entries[key]['shape']}")
                if t.numel():
                    dst.write(t.contiguous().view(torch.uint8).reshape(-1).numpy().data)
                del t
            for t in added.values():
                dst.write(t.contiguous().view(torch.uint8).reshape(-1).numpy().data)
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        index.setdefault("metadata", {})["total_size"] = total_bytes
        index["weight_map"].update(new_keys)
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    new_config.save_pretrained(out)
    # PruneNet's own files of a source that was itself pruned are rewritten, not copied.
    # ... and a cached source's manifest (it lists the dense files; the copy is not that folder).
    skip = {INDEX_FILE, "config.json", PLAN_FILE, EVAL_JSON, EVAL_MD, EVAL_PNG, MANIFEST, *set(files.values())}
    for item in folder.iterdir():
        if item.is_file() and item.name not in skip and not item.name.endswith((".safetensors", ".bin", ".pt")):
            shutil.copy2(item, out / item.name)
    return total_params


#: safetensors dtype names -> torch dtypes (the format's own table).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """``(header, data_start)`` of a safetensors file: the JSON header (tensor name -> dtype, shape,
    data_offsets; ``__metadata__``) and the byte offset where the data begins.

    Raises:
        ModelLoadError: a truncated or corrupted header, or a dtype this reader does not know.
    """
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path} is truncated or corrupted: {exc}") from None
    for key, info in header.items():
        if key != "__metadata__" and info.get("dtype") not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {key} has dtype {info.get('dtype')!r}, not supported here")
    return header, 8 + size


def _meta_tensor(info: dict[str, Any]) -> torch.Tensor:
    return torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")


def _read_tensor(f, info: dict[str, Any], data_start: int) -> torch.Tensor:
    """One tensor of an open safetensors file, read into a fresh buffer."""
    begin, end = info["data_offsets"]
    dtype = _DTYPES[info["dtype"]]
    if end == begin:
        return torch.empty(info["shape"], dtype=dtype)
    f.seek(data_start + begin)
    buf = bytearray(end - begin)
    if f.readinto(buf) != len(buf):
        raise ModelLoadError(f"{f.name} is truncated (tensor data ends early)")
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def _copy_bytes(src, dst, start: int, size: int, chunk: int = 16 << 20) -> None:
    """Copy ``size`` bytes of ``src`` from ``start`` to the end of ``dst``, ``chunk`` bytes at a time."""
    src.seek(start)
    while size > 0:
        data = src.read(min(chunk, size))
        if not data:
            raise ModelLoadError(f"{src.name} is truncated (tensor data ends early)")
        dst.write(data)
        size -= len(data)


def _write_header(f, entries: dict[str, Any], metadata: dict[str, str]) -> None:
    """The safetensors header: its length, then the JSON padded with spaces to a multiple of 8 bytes."""
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    f.write(struct.pack("<Q", len(header)))
    f.write(header)

"""States: the policy's input, the first FFN input matrix W_i (n, d) of every layer, read once by one
loader: streamed by name from safetensors files (no model built), or taken from a loaded model.

PruneNet never runs the LLM forward, so fitting needs only these matrices. Streamed states are read
with ``safetensors.safe_open`` by the names the architecture adapter gives a model built on the meta
device; with ``low_memory`` a layer is read when used and dropped after (one layer in memory).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prunenet import loading
from prunenet.arch import ArchAdapter, check_finite, get_adapter
from prunenet.errors import ModelLoadError
from prunenet.slicing import count_parameters
from prunenet.streaming import match_keys, meta_model, safetensors_files


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


def load_ffn_states(model_name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False,
                    low_memory: bool | None = None) -> tuple[Sequence[torch.Tensor], dict[str, Any]]:
    """Read the policy states (first FFN input matrix of every layer) of a model.

    A local safetensors checkpoint loaded in its own dtype is streamed: only the FFN input
    tensors are read, by name, without building the model (``streaming.stream_states``;
    ``low_memory`` reads one layer at a time). Otherwise the model is loaded with transformers,
    detached views of its FFN input matrices are kept (no copy) and the rest is freed.

    Returns:
        ``(states, info)``: states is a sequence of (n, d) tensors in the checkpoint dtype;
        info has ``params_dense`` and ``state_names`` (parameter paths).
    Raises:
        InvalidWeightsError: an FFN matrix has NaN/Inf (named by its parameter path).
        ModelLoadError, UnsupportedModelError: see ``loading`` and ``arch``.
    """
    path = loading.resolve(model_name_or_path)
    if loading.parse_dtype(dtype) == "auto" and Path(path).is_dir():
        streamed = stream_states(path, loading.load_config(path, trust_remote_code), low_memory)
        if streamed is not None:
            states, info = streamed
            for i in range(len(states)):  # validate every layer (NaN/Inf) before any training
                states[i]
            return states, info
    model = loading.load_model(model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    states, state_names = model_states(model)
    info = {"params_dense": count_parameters(model), "state_names": state_names, "streamed": False}
    del model
    return states, info


def model_states(model, adapter: ArchAdapter | None = None) -> tuple[list[torch.Tensor], list[str]]:
    """``(states, names)`` of a loaded model: views (no copy) of every layer's policy state (n, d),
    checked for NaN/Inf, and their parameter paths.

    Raises:
        InvalidWeightsError: naming the parameter path.
    """
    adapter = adapter or get_adapter(model.config)
    names = {id(p): name for name, p in model.named_parameters()}
    states, state_names = [], []
    for layer in adapter.layers(model):
        name = names.get(id(adapter.input_modules(layer)[0].weight), "?")
        w = adapter.state(layer)
        check_finite(w, name)
        states.append(w)
        state_names.append(name)
    return states, state_names


def load_output_peaks(model_name_or_path: str, trust_remote_code: bool = False) -> list[torch.Tensor]:
    """Per layer, max |w| of each FFN neuron's output column, shape (n,) float32 (ours: what
    ``selection.protected_rows`` and the ``peak`` selection rank). See :func:`per_layer`.

    Raises:
        ModelLoadError, UnsupportedModelError: see ``loading`` and ``arch``.
    """
    return per_layer(model_name_or_path, trust_remote_code, lambda a, layer: [a.output_module(layer)],
                     lambda a, weights: a.output_peaks(weights[0]))


def load_row_norms(model_name_or_path: str, trust_remote_code: bool = False) -> list[torch.Tensor]:
    """Per layer, the L2 norm of each FFN neuron's input weights, shape (n,) float32 (the ``magnitude``
    selection; ``ArchAdapter.row_norms_of``). See :func:`per_layer`.

    Raises:
        ModelLoadError, UnsupportedModelError: see ``loading`` and ``arch``.
    """
    return per_layer(model_name_or_path, trust_remote_code, lambda a, layer: a.input_modules(layer),
                     lambda a, weights: a.row_norms_of(weights))


def load_output_norms(model_name_or_path: str, trust_remote_code: bool = False) -> list[torch.Tensor]:
    """Per layer, the L1 and L2 norms of each FFN neuron's output column, shape (2, n) float32 (row 0: L1,
    row 1: L2; ``ArchAdapter.output_norms``): what Wanda-sp and FLAP weigh activations by. See :func:`per_layer`.

    Raises:
        ModelLoadError, UnsupportedModelError: see ``loading`` and ``arch``.
    """
    return per_layer(model_name_or_path, trust_remote_code, lambda a, layer: [a.output_module(layer)],
                     lambda a, weights: a.output_norms(weights[0]))


def load_output_grams(model_name_or_path: str, trust_remote_code: bool = False) -> list[torch.Tensor]:
    """Per layer, W_out^T W_out of the FFN output weight, shape (n, n) float32 (``ArchAdapter.output_gram``).
    See :func:`per_layer`.

    Raises:
        ModelLoadError, UnsupportedModelError: see ``loading`` and ``arch``.
    """
    return per_layer(model_name_or_path, trust_remote_code, lambda a, layer: [a.output_module(layer)],
                     lambda a, weights: a.output_gram(weights[0]))


def per_layer(model_name_or_path: str, trust_remote_code: bool, modules, reduce) -> list[torch.Tensor]:
    """One statistic per decoder layer, from the stored weights of some of its modules.

    Streamed from a local safetensors checkpoint one layer at a time (no model built) when the names
    match; otherwise the model is loaded with transformers.

    Args:
        modules: ``(adapter, layer) -> [nn.Module]``, the modules (of a meta model) whose weights are read.
        reduce: ``(adapter, [weight]) -> Tensor``, the statistic from their stored weights.
    Returns:
        One tensor per layer, as ``reduce`` returns it.
    Raises:
        ModelLoadError, UnsupportedModelError: see ``loading`` and ``arch``.
    """
    path = loading.resolve(model_name_or_path)
    files = safetensors_files(path) if Path(path).is_dir() else None
    if files is not None:
        config = loading.load_config(path, trust_remote_code)
        adapter = get_adapter(config)
        model = meta_model(config)
        names = {id(p): n for n, p in model.named_parameters()}
        wanted = [[names[id(m.weight)] for m in modules(adapter, layer)] for layer in adapter.layers(model)]
        try:
            mapping = match_keys([n for group in wanted for n in group], list(files))
        except KeyError:
            mapping = None
        if mapping is not None:
            from safetensors import safe_open

            out = []
            for group in wanted:
                weights = []
                for name in group:
                    key = mapping[name]
                    with safe_open(Path(path) / files[key], framework="pt") as f:
                        weights.append(f.get_tensor(key))
                out.append(reduce(adapter, weights))
            return out
    model = loading.load_model(model_name_or_path, trust_remote_code=trust_remote_code)
    adapter = get_adapter(model.config)
    return [reduce(adapter, [m.weight for m in modules(adapter, layer)]) for layer in adapter.layers(model)]

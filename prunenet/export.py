"""Export: the last step of the pruning pipeline (``pipeline.py``): from (source model, kept rows per layer,
policy) to a saved pruned Hugging Face checkpoint and its plan.

The source is sliced in memory (``slicing.slice_model``) or, for checkpoints larger than memory,
shard by shard from its safetensors files (``streaming.slice_checkpoint``); either way the folder is
written atomically with the weights (safetensors), config, tokenizer, ``policy.pt`` (when a policy
chose the rows) and ``prunenet.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunenet import loading
from prunenet.arch import get_adapter
from prunenet.arch.bias import add_output_biases, bias_mode
from prunenet.artifacts import atomic_write_dir, check_output_dir, save_policy
from prunenet.errors import ConfigurationError
from prunenet.plan import Plan, make_plan, write_plan
from prunenet.policy import RowPolicy
from prunenet.slicing import check_kept, count_parameters, slice_model
from prunenet.streaming import meta_model, safetensors_files, slice_checkpoint


@dataclass
class Exported:
    """What :func:`export` wrote.

    Attributes:
        path: the checkpoint folder (symlinks resolved).
        plan: the ``prunenet.json`` written there.
        kept: the kept rows per layer, sorted LongTensors of shape (k,).
        model: the sliced model when it was built in memory (reused for evaluation), else None.
    """

    path: Path
    plan: Plan
    kept: Sequence[torch.Tensor]
    model: Any = None


def use_shardwise(source: str, shardwise: bool | None, dtype: str = "auto") -> bool:
    """Slice the safetensors files shard by shard instead of loading the model: when asked, or
    (``shardwise=None``) whenever the source is a local safetensors checkpoint kept in its own dtype.
    Shard-wise slicing holds one tensor at a time and builds no model, so it is the cheaper way for
    any size (a fit of SmolLM2 peaks 0.5 GiB lower than with the model loaded for slicing).

    Raises:
        ConfigurationError: shard-wise asked for a source without local safetensors files, or with a dtype.
    """
    path = Path(loading.resolve(source))
    local = path.is_dir() and safetensors_files(path) is not None
    if shardwise is None:
        return local and loading.parse_dtype(dtype) == "auto"
    if shardwise and not local:
        raise ConfigurationError(f"shard-wise slicing needs a local safetensors checkpoint, got {source!r}")
    if shardwise and loading.parse_dtype(dtype) != "auto":
        raise ConfigurationError(f"shard-wise slicing keeps the checkpoint's dtype; it cannot be combined "
                                 f"with --model.dtype={dtype} (use dtype auto)")
    return bool(shardwise)


def export(source: str, kept: Sequence[torch.Tensor], output_dir: str | os.PathLike, *, selection: str | None,
           compression_ratio: float, seed: int = 0, round_to: int = 1,
           extra: dict[str, Any] | None = None, policy: RowPolicy | None = None,
           policy_meta: dict[str, Any] | None = None, overwrite: bool = False, shardwise: bool | None = False,
           dtype: str = "auto", trust_remote_code: bool = False, model: Any = None,
           biases: Sequence[torch.Tensor] | None = None,
           output_weights: Sequence[torch.Tensor] | None = None) -> Exported:
    """Slice ``source`` to ``kept`` and save it with its provenance.

    Args:
        source: the dense model (asset name, folder or hub id), recorded as ``source_model``.
        kept: one sorted LongTensor of shape (k,) per decoder layer.
        output_dir: where to write (absent or empty unless ``overwrite``; a symlink is written through).
        selection, compression_ratio, seed, round_to, extra: recorded in the plan (``selection``: a name in
            ``selection.SELECTIONS``, or None for kept rows that no selection chose).
        policy, policy_meta: written as ``policy.pt`` when given.
        shardwise: slice the safetensors files (True), load the model (False), or decide (None).
        dtype: dtype to load the model in (``auto``: the checkpoint's).
        model: the dense model already loaded; it is sliced in place (never copied).
        biases: per layer the (d,) FLAP bias compensation (``compensation.py``) written into the FFN output bias
            (``arch.bias``), or None.
        output_weights: per layer the refit FFN output weight in its sliced shape (``refit.py``), written in place
            of the kept columns, or None.
    Returns:
        :class:`Exported`.
    Raises:
        ConfigurationError: kept indices that do not fit the model, bad shard-wise settings, biases the family
            cannot hold (``arch.bias.bias_mode``) or of the wrong shape.
        OutputExistsError: see ``artifacts.check_output_dir``. Both before any weight is loaded.
    """
    config = model.config if model is not None else loading.load_config(source, trust_remote_code)
    adapter = get_adapter(config)
    n, d = adapter.intermediate_size(config), adapter.hidden_size(config)
    layers = getattr(adapter.text_config(config), "num_hidden_layers", None)
    check_kept(kept, n, layers if layers is not None else len(kept))
    if biases is not None:
        check_biases(biases, adapter, config, len(kept), d)
    if output_weights is not None:
        check_output_weights(output_weights, adapter, len(kept), int(kept[0].numel()), d)
    resolved = loading.resolve(source)
    check_output_dir(output_dir, overwrite, resolved)
    shard = model is None and use_shardwise(source, shardwise, dtype)

    def plan_of(params_dense: int, params_pruned: int) -> Plan:
        return make_plan(source_model=source, model_type=config.model_type, compression_ratio=compression_ratio,
                         round_to=round_to, intermediate_size=n, hidden_size=d, kept=kept,
                         selection=selection, seed=seed, params_dense=params_dense, params_pruned=params_pruned,
                         extra={**(extra or {}), "shardwise": bool(shard)})

    if shard:
        written: dict[str, Plan] = {}

        def write(tmp: Path) -> None:
            params = slice_checkpoint(resolved, config, kept, tmp, biases, output_weights)
            written["plan"] = plan_of(count_parameters(meta_model(config)), params)
            write_provenance(tmp, written["plan"], policy, policy_meta)

        size = sum(f.stat().st_size for f in Path(resolved).glob("*.safetensors"))  # at most the source's
        return Exported(atomic_write_dir(output_dir, overwrite, write, resolved, size), written["plan"], kept)
    if model is None:
        model = loading.load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)
    params_dense = count_parameters(model)
    slice_model(model, kept, adapter)
    if output_weights is not None:
        with torch.no_grad():
            for layer, w in zip(adapter.layers(model), output_weights):
                out = adapter.output_module(layer).weight
                out.copy_(w.to(out.dtype))
    if biases is not None:
        add_output_biases(adapter, model, list(biases))
    plan = plan_of(params_dense, count_parameters(model))
    path = save_pruned(model, output_dir, plan, policy=policy, policy_meta=policy_meta,
                       tokenizer=loading.load_tokenizer(source, trust_remote_code), overwrite=overwrite,
                       source=resolved)
    return Exported(path, plan, kept, model)


def check_biases(biases: Sequence[torch.Tensor], adapter: Any, config: Any, layers: int, d: int) -> None:
    """One (d,) compensation per layer, for a family that can hold it (``arch.bias.bias_mode``).

    Raises:
        ConfigurationError: naming what differs.
    """
    bias_mode(adapter, config)
    shapes = {tuple(b.shape) for b in biases}
    if len(biases) != layers or shapes != {(d,)}:
        raise ConfigurationError(f"bias compensation needs one ({d},) bias per layer ({layers}), got {len(biases)} "
                                 f"of shapes {sorted(shapes)}")


def check_output_weights(weights: Sequence[torch.Tensor], adapter: Any, layers: int, k: int, d: int) -> None:
    """One refit output weight per layer, of the sliced shape ((d, k), or (k, d) for Conv1D), finite.

    Raises:
        ConfigurationError: naming what differs.
    """
    shape = (k, d) if adapter.conv1d else (d, k)
    shapes = {tuple(w.shape) for w in weights}
    if len(weights) != layers or shapes != {shape}:
        raise ConfigurationError(f"refit needs one {shape} output weight per layer ({layers}), got {len(weights)} "
                                 f"of shapes {sorted(shapes)}")
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        raise ConfigurationError("refit output weights hold NaN or Inf (a degenerate activation Gram)")


def save_pruned(model: torch.nn.Module, output_dir: str | os.PathLike, plan: Plan,
                policy: RowPolicy | None = None, policy_meta: dict[str, Any] | None = None,
                tokenizer: Any = None, overwrite: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Save a sliced model as a standard Hugging Face checkpoint, atomically.

    Writes: safetensors weights, ``config.json``, ``generation_config.json``, the
    tokenizer (when given), ``policy.pt`` (state dict + metadata, when given) and
    ``prunenet.json`` (``plan``: source model, ratio, kept indices per layer, ...).

    Raises:
        OutputExistsError: see :func:`check_output_dir`.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_provenance(tmp, plan, policy, policy_meta)

    weights = {t.data_ptr(): t.nbytes for t in model.state_dict().values()}  # tied tensors are saved once
    return atomic_write_dir(output_dir, overwrite, write, source, sum(weights.values()))


def write_provenance(folder: Path, plan: Plan, policy: RowPolicy | None = None,
                     policy_meta: dict[str, Any] | None = None) -> None:
    """Write ``prunenet.json`` and (when given) ``policy.pt`` into a checkpoint folder being built."""
    if policy is not None:
        save_policy(folder, policy, policy_meta)
    write_plan(folder, plan)

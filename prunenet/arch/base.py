"""The architecture adapter: every fact about where a family keeps its FFN.

One :class:`ArchAdapter` per family answers: the decoder layers, the FFN input
module(s) (1 or 2, or a fused gate_up), the FFN output module, the weight
orientation (``Conv1D`` stores (in, out)), and the config key of the FFN width.
Everything else in PruneNet is architecture-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunenet.errors import ConfigurationError, InvalidWeightsError


def _get_path(root: object, path: str) -> object:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ArchAdapter:
    """Where one decoder family keeps its FFN, and how to slice it.

    Attributes:
        model_types: ``config.model_type`` values served by this adapter.
        layers_paths: attribute paths from the ``*ForCausalLM`` model to the list of
            decoder layers; the first that exists is used (e.g. ``model.layers``).
        ffn_inputs: paths (relative to a decoder layer) of the FFN input modules whose
            rows are kept (gate and up for gated FFNs). The first one is the policy state.
        ffn_output: path of the FFN output module whose columns are kept.
        attention: paths (relative to a decoder layer) of the attention projections (query, key,
            value, output; fused where the family fuses them). Only recovery fine-tuning uses them,
            as LoRA targets next to the FFN modules (:meth:`projections`).
        width_key: key in the text config holding the FFN width n; None when the family
            has no such key (the width is then ``width_default`` and cannot be changed).
        hidden_key: key in the text config holding the hidden size d.
        conv1d: weights stored as (in, out) (GPT-2 ``Conv1D``) instead of (out, in).
        fused_gate_up: the single input module stacks [gate; up] along its output rows
            (Phi-3 ``gate_up_proj``); both halves are sliced with the same indices.
        width_default: FFN width when ``width_key`` is None in the config (e.g. GPT-2's
            ``n_inner=None`` means 4 * n_embd).
        width_settable: False if the config cannot express a new FFN width (then slicing
            refuses before writing anything).
        note: why, for a family with ``width_settable=False`` (shown in the error).
        output_bias: whether the FFN output module can hold a bias (FLAP bias compensation, ``arch/bias.py``):
            None (never), ``"always"`` (built with one), or the config key that gives it one when true.
        output_bias_settable: that key adds biases to the FFN modules only, so PruneNet may turn it on.
    """

    model_types: tuple[str, ...]
    layers_paths: tuple[str, ...]
    ffn_inputs: tuple[str, ...]
    ffn_output: str
    width_key: str | None = "intermediate_size"
    hidden_key: str = "hidden_size"
    conv1d: bool = False
    fused_gate_up: bool = False
    width_default: Callable[[object], int] | None = None
    width_settable: bool = True
    note: str = ""
    attention: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    output_bias: str | None = None
    output_bias_settable: bool = False

    def __post_init__(self) -> None:
        if self.width_key is None and self.width_settable:
            raise ValueError(f"adapter {self.model_types}: no width_key, so width_settable must be False")
        if self.width_key is None and self.width_default is None:
            raise ValueError(f"adapter {self.model_types}: no width_key needs a width_default")

    # ----------------------------------------------------------------- config
    @staticmethod
    def text_config(config: object) -> object:
        """The config that holds the decoder's sizes (``text_config`` for multimodal wrappers)."""
        getter = getattr(config, "get_text_config", None)
        return getter() if callable(getter) else config

    def intermediate_size(self, config: object) -> int:
        """FFN width n read from the config."""
        tc = self.text_config(config)
        value = getattr(tc, self.width_key, None) if self.width_key else None
        if value is None and self.width_default is not None:
            value = self.width_default(tc)
        if not isinstance(value, int):
            raise ConfigurationError(
                f"config key {self.width_key!r} of model_type {config.model_type!r} is {value!r}; "
                "expected one integer FFN width shared by all layers"
            )
        return value

    def hidden_size(self, config: object) -> int:
        """Hidden size d read from the config."""
        return int(getattr(self.text_config(config), self.hidden_key))

    def check_sliceable(self, config: object, width: int | None = None) -> None:
        """Raise before anything is sliced or written if the config cannot express a new FFN width.

        Raises:
            ConfigurationError: naming the model_type and the reason.
        """
        if not self.width_settable:
            target = f"intermediate size {width}" if width is not None else "a pruned FFN width"
            raise ConfigurationError(
                f"model_type {config.model_type!r} fixes the FFN width in code"
                f"{' (' + self.note + ')' if self.note else ''}, so its config cannot express {target}; "
                "a sliced checkpoint would not reload with from_pretrained, so PruneNet refuses to slice it"
            )

    def set_intermediate_size(self, config: object, width: int) -> None:
        """Write the new FFN width into the config (in place) so ``from_pretrained`` rebuilds it.

        Raises:
            ConfigurationError: if this family's config cannot express a new width.
        """
        self.check_sliceable(config, width)
        setattr(self.text_config(config), self.width_key, int(width))

    # ----------------------------------------------------------------- modules
    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers of ``model``, in order."""
        for path in self.layers_paths:
            try:
                return list(_get_path(model, path))
            except AttributeError:
                continue
        raise ConfigurationError(
            f"{type(model).__name__} has none of the layer paths {list(self.layers_paths)}"
        )

    def input_modules(self, layer: nn.Module) -> list[nn.Module]:
        """The FFN input modules of one decoder layer (rows are sliced)."""
        return [_get_path(layer, p) for p in self.ffn_inputs]

    def projections(self, group: str) -> tuple[str, ...]:
        """Paths (relative to a decoder layer) of the linear projections of one group: ``ffn`` (the FFN
        input and output modules), ``attention`` or ``all`` (both): the LoRA targets of recovery.

        Raises:
            ConfigurationError: an unknown group.
        """
        groups = {"ffn": (*self.ffn_inputs, self.ffn_output), "attention": self.attention}
        groups["all"] = groups["attention"] + groups["ffn"]
        if group not in groups:
            raise ConfigurationError(f"unknown projection group {group!r}; known: {', '.join(groups)}")
        return groups[group]

    def output_module(self, layer: nn.Module) -> nn.Module:
        """The FFN output module of one decoder layer (columns are sliced)."""
        return _get_path(layer, self.ffn_output)

    def state(self, layer: nn.Module) -> torch.Tensor:
        """The policy state W of one layer: the first FFN input matrix, shape (n, d).

        Returned as a detached view in the weight's own dtype (no copy of the LLM).
        For ``Conv1D`` the stored (d, n) weight is transposed; for a fused gate_up
        the gate half (first n rows) is returned.
        """
        return self.state_from_weight(self.input_modules(layer)[0].weight.detach())

    def row_norms(self, layer: nn.Module) -> torch.Tensor:
        """L2 norm of each FFN neuron's input weights, shape (n,), float32: the magnitude baseline.

        For gated FFNs the norm covers the neuron's gate row AND up row together,
        ``sqrt(||gate_j||^2 + ||up_j||^2)`` (fused gate_up: both halves); bias is excluded.
        """
        return self.row_norms_of([mod.weight for mod in self.input_modules(layer)])

    def row_norms_of(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`row_norms` from the stored weights of the layer's FFN input modules (in
        :meth:`input_modules` order, as a checkpoint stores them), shape (n,) float32."""
        total = None
        for w in weights:
            w = w.detach().float()
            w = w.t() if self.conv1d else w
            sq = (w * w).sum(dim=1)
            if self.fused_gate_up:
                half = sq.shape[0] // 2
                sq = sq[:half] + sq[half:]
            total = sq if total is None else total + sq
        return total.sqrt()

    def output_peaks(self, weight: torch.Tensor) -> torch.Tensor:
        """max |w| of each neuron's column in the stored FFN output weight, shape (n,), float32:
        what ``selection.protected_rows`` ranks (ours). nn.Linear stores (d, n), Conv1D (n, d)."""
        return weight.detach().abs().amax(dim=1 if self.conv1d else 0).float()

    def output_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """L1 (row 0) and L2 (row 1) norm of each neuron's column in the stored FFN output weight, shape
        (2, n), float32: what Wanda-sp (L1) and FLAP (squared L2) weigh activations by. nn.Linear stores
        (d, n), Conv1D (n, d)."""
        w = weight.detach().float()
        dim = 1 if self.conv1d else 0
        return torch.stack([w.abs().sum(dim=dim), w.norm(dim=dim)])

    def output_gram(self, weight: torch.Tensor) -> torch.Tensor:
        """Inner products of the neurons' output columns, W_out^T W_out, shape (n, n), float32: with the
        activations' Gram, the error of dropping a set of neurons (``selectors.ReconstructionSelector``)."""
        w = weight.detach().float()
        return w @ w.T if self.conv1d else w.T @ w

    # ----------------------------------------------------------------- slicing
    def state_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Policy state (n, d) from the stored weight of the first FFN input module
        (transposed for ``Conv1D``; the gate half of a fused gate_up). A view, no copy."""
        w = weight.t() if self.conv1d else weight
        return w[: w.shape[0] // 2] if self.fused_gate_up else w

    def slice_tensor(self, tensor: torch.Tensor, kept: torch.Tensor, role: str, kind: str) -> torch.Tensor:
        """Slice one stored FFN tensor to the kept neurons (a new contiguous tensor).

        The single place that knows orientation: nn.Linear stores (out, in), Conv1D (in, out);
        a fused gate_up keeps ``kept`` in both halves.

        Args:
            tensor: the stored weight or bias.
            kept: sorted LongTensor (k,), neuron indices in [0, n).
            role: ``"input"`` (rows kept: FFN input module) or ``"output"`` (columns kept).
            kind: ``"weight"`` or ``"bias"`` (an output module's bias is not sliced).
        """
        idx = kept.to(tensor.device)
        if role == "output":
            if kind == "bias":
                return tensor
            return tensor.index_select(0 if self.conv1d else 1, idx).contiguous()
        neuron_dim = 0 if kind == "bias" else (1 if self.conv1d else 0)
        if self.fused_gate_up:
            idx = torch.cat([idx, idx + tensor.shape[neuron_dim] // 2])
        return tensor.index_select(neuron_dim, idx).contiguous()

    def slice_layer(self, layer: nn.Module, kept: torch.Tensor) -> None:
        """Keep FFN neurons ``kept`` in one layer, in place.

        Input modules keep rows ``kept`` (and the bias entries); the output module keeps
        columns ``kept``. Source: PruneNet Section 3 (row slicing of the FFN).

        Args:
            layer: a decoder layer of this family.
            kept: sorted LongTensor of shape (k,), indices in [0, n).
        """
        size = kept.numel() * (2 if self.fused_gate_up else 1)
        for mod in self.input_modules(layer):
            self._replace(mod, "weight", self.slice_tensor(mod.weight.data, kept, "input", "weight"))
            if getattr(mod, "bias", None) is not None:
                self._replace(mod, "bias", self.slice_tensor(mod.bias.data, kept, "input", "bias"))
            for attr in ("out_features", "nf"):
                if hasattr(mod, attr):
                    setattr(mod, attr, size)
        out = self.output_module(layer)
        self._replace(out, "weight", self.slice_tensor(out.weight.data, kept, "output", "weight"))
        for attr in ("in_features", "nx"):
            if hasattr(out, attr):
                setattr(out, attr, kept.numel())

    def tensor_roles(self, model: nn.Module) -> dict[str, tuple[int, str, str]]:
        """Parameter name -> (layer index, role, kind) for every FFN tensor that slicing changes.

        Works on a model built on the meta device, so a checkpoint can be sliced shard by shard
        without materializing the model.
        """
        names = {id(p): n for n, p in model.named_parameters()}
        roles: dict[str, tuple[int, str, str]] = {}
        for i, layer in enumerate(self.layers(model)):
            for mod in self.input_modules(layer):
                roles[names[id(mod.weight)]] = (i, "input", "weight")
                if getattr(mod, "bias", None) is not None:
                    roles[names[id(mod.bias)]] = (i, "input", "bias")
            roles[names[id(self.output_module(layer).weight)]] = (i, "output", "weight")
        return roles

    @staticmethod
    def _replace(mod: nn.Module, name: str, value: torch.Tensor) -> None:
        old = getattr(mod, name)
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Raise :class:`InvalidWeightsError` naming ``name`` if ``weight`` has NaN or Inf."""
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise InvalidWeightsError(f"FFN matrix {name} has {bad} NaN/Inf values; refusing to prune it")

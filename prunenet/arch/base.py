"""The architecture adapter: every fact about where a family keeps its FFN.

One :class:`ArchAdapter` per family answers: the decoder layers, the FFN input
module(s) (1 or 2, or a fused gate_up), the FFN output module, the weight
orientation (``Conv1D`` stores (in, out)), and the config key of the FFN width.
Everything else in PruneNet is architecture-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
        width_key: key in the text config holding the FFN width n.
        hidden_key: key in the text config holding the hidden size d.
        conv1d: weights stored as (in, out) (GPT-2 ``Conv1D``) instead of (out, in).
        fused_gate_up: the single input module stacks [gate; up] along its output rows
            (Phi-3 ``gate_up_proj``); both halves are sliced with the same indices.
        width_default: FFN width when ``width_key`` is None in the config (e.g. GPT-2's
            ``n_inner=None`` means 4 * n_embd).
        width_settable: False if the config cannot express a new FFN width (then slicing
            refuses before writing anything).
    """

    model_types: tuple[str, ...]
    layers_paths: tuple[str, ...]
    ffn_inputs: tuple[str, ...]
    ffn_output: str
    width_key: str = "intermediate_size"
    hidden_key: str = "hidden_size"
    conv1d: bool = False
    fused_gate_up: bool = False
    width_default: Callable[[object], int] | None = None
    width_settable: bool = True

    # ----------------------------------------------------------------- config
    @staticmethod
    def text_config(config: object) -> object:
        """The config that holds the decoder's sizes (``text_config`` for multimodal wrappers)."""
        getter = getattr(config, "get_text_config", None)
        return getter() if callable(getter) else config

    def intermediate_size(self, config: object) -> int:
        """FFN width n read from the config."""
        tc = self.text_config(config)
        value = getattr(tc, self.width_key, None)
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

    def set_intermediate_size(self, config: object, width: int) -> None:
        """Write the new FFN width into the config (in place) so ``from_pretrained`` rebuilds it.

        Raises:
            ConfigurationError: if this family's config cannot express a new width.
        """
        if not self.width_settable:
            raise ConfigurationError(
                f"model_type {config.model_type!r} fixes the FFN width in code, so its config cannot "
                f"express intermediate size {width}; slicing it would not reload with from_pretrained"
            )
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

    def output_module(self, layer: nn.Module) -> nn.Module:
        """The FFN output module of one decoder layer (columns are sliced)."""
        return _get_path(layer, self.ffn_output)

    def parameter_names(self, layer_prefix: str) -> list[str]:
        """Parameter names of the policy-state weight for a layer at ``layer_prefix``."""
        return [f"{layer_prefix}.{self.ffn_inputs[0]}.weight"]

    def state(self, layer: nn.Module) -> torch.Tensor:
        """The policy state W of one layer: the first FFN input matrix, shape (n, d).

        Returned as a detached view in the weight's own dtype (no copy of the LLM).
        For ``Conv1D`` the stored (d, n) weight is transposed; for a fused gate_up
        the gate half (first n rows) is returned.
        """
        w = self.input_modules(layer)[0].weight.detach()
        if self.conv1d:
            w = w.t()
        if self.fused_gate_up:
            w = w[: w.shape[0] // 2]
        return w

    # ----------------------------------------------------------------- slicing
    def slice_layer(self, layer: nn.Module, kept: torch.Tensor) -> None:
        """Keep FFN neurons ``kept`` in one layer, in place.

        Input modules keep rows ``kept`` (and the bias entries); the output module keeps
        columns ``kept``. Source: PruneNet Section 3 (row slicing of the FFN).

        Args:
            layer: a decoder layer of this family.
            kept: sorted LongTensor of shape (k,), indices in [0, n).
        """
        for mod in self.input_modules(layer):
            n_out = mod.weight.shape[1 if self.conv1d else 0]
            idx = kept.to(mod.weight.device)
            if self.fused_gate_up:
                idx = torch.cat([idx, idx + n_out // 2])
            self._keep(mod, idx, out_dim=True)
        out = self.output_module(layer)
        self._keep(out, kept.to(out.weight.device), out_dim=False)

    def _keep(self, mod: nn.Module, idx: torch.Tensor, out_dim: bool) -> None:
        # nn.Linear stores (out, in); Conv1D stores (in, out).
        weight_dim = (1 if self.conv1d else 0) if out_dim else (0 if self.conv1d else 1)
        w = mod.weight.data.index_select(weight_dim, idx).contiguous()
        mod.weight = nn.Parameter(w, requires_grad=mod.weight.requires_grad)
        if out_dim and getattr(mod, "bias", None) is not None:
            mod.bias = nn.Parameter(mod.bias.data.index_select(0, idx).contiguous(),
                                    requires_grad=mod.bias.requires_grad)
        size = idx.numel()
        if out_dim:
            for attr in ("out_features", "nf"):
                if hasattr(mod, attr):
                    setattr(mod, attr, size)
        else:
            for attr in ("in_features", "nx"):
                if hasattr(mod, attr):
                    setattr(mod, attr, size)


def check_finite(weight: torch.Tensor, name: str) -> None:
    """Raise :class:`InvalidWeightsError` naming ``name`` if ``weight`` has NaN or Inf."""
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise InvalidWeightsError(f"FFN matrix {name} has {bad} NaN/Inf values; refusing to prune it")

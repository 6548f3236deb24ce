"""FLAP bias compensation, the architecture side (FLAP, An et al. 2024, bias compensation: "Fluctuation-based
Adaptive Structured Pruning for Large Language Models", AAAI 2024): whether a family's FFN output module can hold
a bias and how it gets one (the adapter's ``output_bias`` fields, set in ``arch/__init__.py``), the compensation
b = W_out[:, R] @ mean(h)[R] from a stored output weight, and the value written into a bias.

Removing the FFN neurons R drops sum_{j in R} h_j w_j from every token's FFN output (h_j: neuron j's activation,
w_j: column j of the output projection); FLAP adds its mean over the calibration tokens back as a bias.
"""

from __future__ import annotations

import torch
from torch import nn

from prunenet.arch import ADAPTERS
from prunenet.arch.base import ArchAdapter
from prunenet.errors import ConfigurationError


def bias_families() -> str:
    """The families whose FFN output can hold a bias, and on which condition (for error messages)."""
    parts = []
    for a in ADAPTERS:
        if a.output_bias is None or not a.width_settable:  # bloom cannot be sliced at all
            continue
        names = ", ".join(a.model_types)
        if a.output_bias == "always":
            parts.append(names)
        else:
            parts.append(f"{names} ({a.output_bias}{'' if a.output_bias_settable else '=true'})")
    return "; ".join(parts)


def bias_mode(adapter: ArchAdapter, config: object) -> str:
    """How a model of this config holds the compensation: ``"add"`` (its FFN output module has a bias: the
    compensation is added to it) or ``"create"`` (the config key ``adapter.output_bias`` is turned on: the FFN
    input modules get zero biases, so the function is unchanged, and the output module gets the compensation).
    Cheap (config only): call it before any work.

    Raises:
        ConfigurationError: one line naming the model type and the families that can hold one.
    """
    key, text = adapter.output_bias, adapter.text_config(config)
    if key == "always" or (key is not None and getattr(text, key, False) is True):
        return "add"
    if key is not None and adapter.output_bias_settable:
        return "create"
    why = ("builds its FFN output projection without a bias" if key is None
           else f"has {key}=false, and {key} would give the attention projections biases too")
    raise ConfigurationError(f"--bias_compensation needs an FFN output bias, but model_type {config.model_type!r} "
                             f"{why}; families that can hold one: {bias_families()}")


def enable_output_bias(adapter: ArchAdapter, config: object) -> bool:
    """Turn the config key on (in place) where :func:`bias_mode` is ``create``; True when it did (the FFN modules
    then need new bias tensors: zeros for the inputs, the compensation for the output).

    Raises:
        ConfigurationError: see :func:`bias_mode`.
    """
    if bias_mode(adapter, config) != "create":
        return False
    setattr(adapter.text_config(config), adapter.output_bias, True)
    return True


def compensation(adapter: ArchAdapter, weight: torch.Tensor, kept: torch.Tensor, mean: torch.Tensor,
                 refit: torch.Tensor | None = None) -> torch.Tensor:
    """FLAP's bias compensation of one layer, b = W_out[:, R] @ mean(h)[R] for R the neurons not in ``kept``.

    Args:
        weight: the stored (dense) FFN output weight: (d, n) for nn.Linear, (n, d) for Conv1D.
        kept: LongTensor (k,), the kept neurons.
        mean: (n,), each neuron's mean activation on the calibration text (``calibration.NeuronStats.mean``).
        refit: the kept neurons' refit output weight in its sliced shape (``refit.py``), or None. With it the
            bias is W mean(h) - W'_S mean(h)[S] (ours): the mean of what the refit layer still misses.
    Returns:
        (d,) float64.
    """
    if refit is not None:
        w, m, r = weight.detach().double().cpu(), mean.double().cpu(), refit.double().cpu()
        kept_mean = m[kept.long().cpu()]
        return (m @ w - kept_mean @ r) if adapter.conv1d else (w @ m - r @ kept_mean)
    removed = torch.ones(mean.numel(), dtype=torch.bool)
    removed[kept.long()] = False
    idx = removed.nonzero().squeeze(1)
    cols = weight.detach().index_select(0 if adapter.conv1d else 1, idx.to(weight.device)).double().cpu()
    m = mean.double().cpu()[idx]
    return m @ cols if adapter.conv1d else cols @ m


def bias_value(existing: torch.Tensor | None, compensation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output bias written: the existing bias plus the compensation, summed in float64 and rounded once to the
    bias's dtype (``dtype``, the output weight's, when there is no bias yet). (d,)."""
    total = compensation.double() if existing is None else existing.double() + compensation.double()
    return total.to(existing.dtype if existing is not None else dtype)


def add_output_biases(adapter: ArchAdapter, model: nn.Module, biases: list[torch.Tensor]) -> None:
    """Write the compensations into a model sliced in memory (in place, config included): per layer, the output
    module's bias becomes :func:`bias_value`; where the family gets its biases now (``create``), the input modules
    get zero biases of their output width.

    Raises:
        ConfigurationError: see :func:`bias_mode` (before anything changes).
    """
    create = enable_output_bias(adapter, model.config)
    for layer, b in zip(adapter.layers(model), biases):
        out = adapter.output_module(layer)
        if create:
            for mod in adapter.input_modules(layer):
                width = mod.weight.shape[1 if adapter.conv1d else 0]
                mod.bias = nn.Parameter(torch.zeros(width, dtype=mod.weight.dtype, device=mod.weight.device),
                                        requires_grad=mod.weight.requires_grad)
        old = None if create else out.bias.detach()
        value = bias_value(old, b, out.weight.dtype).to(out.weight.device)
        out.bias = nn.Parameter(value, requires_grad=out.weight.requires_grad)

"""Policies: networks that score the n rows of an FFN input matrix (plain ``nn.Module``s, no Lightning).

``RowPolicy`` is the plug point (ours); ``SparsityPredictor`` is the paper's policy, ``RowMLP`` a
nonlinear one (ours). Choose one with ``--model.policy`` (a name in :data:`POLICIES` or a class_path:
``plugins.py``).

Source: PruneNet paper, Section 3 ("policy learning"), and the authors' code.
The network scores every row (intermediate neuron) of an FFN input matrix
``W`` of shape ``(n, d)`` = (intermediate size, hidden size):

    alpha = sigmoid((W A^T + 1 b^T) v)             A: (n, d), b: (n,), v: (n, 1)

and turns the scores into relaxed-Bernoulli keep probabilities

    p = sigmoid(logit(eps) + logit(alpha)),        eps ~ U(0, 1).

``(W A^T + 1 b^T) v`` is computed as ``W (A^T v) + b . v``: the same function
at O(n d) instead of O(n^2 d) time and without the (n, n) intermediate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RowPolicy(nn.Module):
    """A policy: scores the n rows of an FFN input matrix W of shape (n, d) (ours: the plug point).

    A subclass sets ``name`` (its registry key), takes ``(intermediate_size, hidden_size)`` and
    implements :meth:`logits`. Training asks for the logits of every layer without a graph, takes
    the loss gradient dL/dz per layer, then calls :meth:`surrogate`: a scalar whose gradient with
    respect to the parameters is ``dz^T dz/dtheta``. The default builds the layer's graph (autograd:
    correct for any policy); a policy may fold it into fewer tensors (``SparsityPredictor`` does).

    Args:
        intermediate_size: n, rows of the FFN input matrix (FFN width).
        hidden_size: d, columns of the FFN input matrix (model width).
    Raises:
        ValueError: non-positive sizes.
    """

    name = ""
    #: What the policy scores a layer's rows from: ``state`` (the FFN input matrix W, (n, d)) or ``features``
    #: (``features.neuron_features`` on calibration text, (n, F); the policy then carries ``settings``).
    input = "state"

    def __init__(self, intermediate_size: int, hidden_size: int) -> None:
        super().__init__()
        if intermediate_size < 1 or hidden_size < 1:
            raise ValueError(
                f"{type(self).__name__} needs positive sizes, got intermediate_size={intermediate_size}, "
                f"hidden_size={hidden_size}"
            )
        self.intermediate_size = int(intermediate_size)
        self.hidden_size = int(hidden_size)

    def hparams(self) -> dict[str, Any]:
        """The policy's init arguments besides (n, d) (what ``plugins.describe`` records)."""
        return {}

    @property
    def shape(self) -> tuple[int, int]:
        """(n, d): the FFN input matrix shape this policy accepts."""
        return (self.intermediate_size, self.hidden_size)

    def _check(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or tuple(weight.shape) != self.shape:
            raise ValueError(
                f"{type(self).__name__} expects its input ({self.input}) of shape {self.shape}, got {tuple(weight.shape)}"
            )

    def logits(self, weight: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        """Row scores z = logit(alpha), shape (n,), float32, differentiable in the parameters.

        Args:
            weight: W, shape (n, d), any float dtype.
            prepared: what :meth:`prepare` returned (an optional per-episode precomputation).
        """
        raise NotImplementedError

    def prepare(self) -> Any:
        """Per-episode precomputation shared by all layers (connected to the parameters); None by default."""
        return None

    def detached_logits(self, weight: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        """:meth:`logits` without an autograd graph, shape (n,), float32."""
        with torch.no_grad():
            return self.logits(weight, prepared)

    def surrogate(self, weight: torch.Tensor, dz: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        """A scalar whose parameter gradient is ``sum_j dz_j dz_j/dtheta`` (dz: dL/dz of this layer, (n,))."""
        return (self.logits(weight, prepared) * dz).sum()

    def keep_probabilities(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Relaxed-Bernoulli keep probabilities ``p = sigmoid(logit(eps) + z)``, eps ~ U(0, 1) (paper, Section 3).

        Args:
            z: row logits, shape (n,).
            generator: source of eps; pass a seeded one for reproducible, resumable runs.
        Returns:
            p, shape (n,), same dtype as z. Using z directly instead of ``logit(sigmoid(z))``
            is the same value without overflow.
        """
        eps = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        eps = eps.clamp(torch.finfo(z.dtype).tiny, 1.0 - torch.finfo(z.dtype).eps)
        return torch.sigmoid(torch.logit(eps) + z)

    def alpha(self, weight: torch.Tensor) -> torch.Tensor:
        """Deterministic keep scores ``alpha = sigmoid(logits)``, shape (n,), in (0, 1)."""
        return torch.sigmoid(self.logits(weight))

    def forward(
        self, weight: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Relaxed-Bernoulli keep probabilities for one layer.

        Args:
            weight: FFN input matrix W, shape (n, d).
            generator: source of eps ~ U(0, 1); pass a seeded one for reproducible,
                resumable runs.
        Returns:
            ``(p, z)``: keep probabilities p and logits z, both of shape (n,), float32.
        """
        z = self.logits(weight)
        return self.keep_probabilities(z, generator), z


class SparsityPredictor(RowPolicy):
    """The paper's row-importance policy, shared by all layers of one model shape.

    Parameters (names follow the authors' code so their policies map 1:1):
        ``proj_intermediate``: ``nn.Linear(d, n)``, weight A of shape (n, d), bias b (n,).
        ``row_sparsities``: v, shape (n, 1), initialised U(0, 1).

    Its scores are linear in W (``z = W u + c`` with ``(u, c) = (A^T v, b . v)``), so the training
    gradient of a layer folds into (u, c) without holding W in the graph (:meth:`surrogate`).
    """

    name = "sparsity_predictor"

    def __init__(self, intermediate_size: int, hidden_size: int) -> None:
        super().__init__(intermediate_size, hidden_size)
        self.proj_intermediate = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.row_sparsities = nn.Parameter(torch.rand(intermediate_size, 1))

    def direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The score's parameters folded into ``(u, c) = (A^T v, b . v)``: shapes (d,) and (), float32.

        The row scores are ``z = W u + c``; everything the policy learns is in ``u`` and ``c``,
        which are connected to the parameters (differentiable).
        """
        a = self.proj_intermediate.weight.float()
        b = self.proj_intermediate.bias.float()
        v = self.row_sparsities.float()
        return (a.t() @ v).squeeze(-1), (b @ v).squeeze(-1)  # the O(n d) reordering of (W A^T) v

    def prepare(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, c)`` of :meth:`direction`, once per episode."""
        return self.direction()

    def logits(self, weight: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Pre-sigmoid row scores ``logit(alpha) = W (A^T v) + b . v``.

        Args:
            weight: FFN input matrix W, shape (n, d), any float dtype (computed in float32).
            prepared: ``(u, c)`` from :meth:`direction` (possibly detached), to reuse across
                layers; computed here when None.
        Returns:
            Tensor of shape (n,), float32.
        Raises:
            ValueError: if ``weight`` is not of shape (n, d).
        """
        self._check(weight)
        u, c = self.direction() if prepared is None else prepared
        return weight.float() @ u + c

    def detached_logits(self, weight: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        u, c = self.direction() if prepared is None else prepared
        return self.logits(weight, (u.detach(), c.detach()))

    def surrogate(self, weight: torch.Tensor, dz: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        """The fold of ``dz^T dz/dtheta`` for ``z = W u + c``: dL/du = W^T dz, dL/dc = sum dz, so
        ``(W^T dz) . u + (sum dz) c`` has the same parameter gradient, and the graph holds (u, c),
        not W (32 x 180 MB of float32 copies for LLaMA-2-7B)."""
        u, c = self.direction() if prepared is None else prepared
        return (weight.float().t() @ dz) @ u + dz.sum() * c


class RowMLP(RowPolicy):
    """A nonlinear policy (ours): each row w_j of W is scored by a small MLP,
    ``z_j = v . tanh(H w_j + b) + c``, H: (hidden, d). Row-wise, so it is independent of n like the paper's.

    Args:
        intermediate_size, hidden_size: see :class:`RowPolicy`.
        width: hidden units of the MLP.
    """

    name = "row_mlp"

    def __init__(self, intermediate_size: int, hidden_size: int, width: int = 16) -> None:
        super().__init__(intermediate_size, hidden_size)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"RowMLP width must be an integer >= 1, got {width!r}")
        self.width = width
        self.hidden = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, 1)

    def hparams(self) -> dict[str, Any]:
        return {"width": self.width}

    def logits(self, weight: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        self._check(weight)
        # Each row scaled to unit RMS: the MLP sees a row's shape, whatever the model's weight scale
        # (raw LLM weights are ~0.02, where tanh would be linear).
        x = weight.float()
        x = x / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


class FeaturePolicy(RowPolicy):
    """A linear policy on the activation features of each neuron (ours, issue 28): ``z = X theta + c`` with X the
    layer's (n, F) z-scored :data:`features.FEATURES` on calibration text (the model's own by default), theta
    (F,) and c shared by all layers. It starts from one feature's ranking (``init``: by default ``recon_rank``,
    the greedy reconstruction order, so its top k is the ``recon`` selection before any episode),
    scaled by ``scale``, and learns how to weigh the others, including the set-level ``alignment`` and
    ``recon_rank``. Small (F + 1 parameters): use a learning rate near 0.05.

    Args:
        intermediate_size, hidden_size: see :class:`RowPolicy` (the input is (n, F), not (n, d)).
        init: the feature theta starts on (a name in ``features.FEATURES``).
        scale: its starting weight (logit units per standard deviation of the feature), > 0.
        source, samples, length, temperature, top_p, seed, batch: the calibration text (``calibration.CalibrationSettings``).
    Raises:
        ConfigurationError: an unknown ``init``, a scale <= 0, a bad calibration setting.
    """

    name = "features"
    input = "features"

    def __init__(self, intermediate_size: int, hidden_size: int, init: str = "recon_rank", scale: float = 2.0,
                 source: str = "self", samples: int = 64, length: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, batch: int = 64) -> None:
        from prunenet.calibration import CalibrationSettings
        from prunenet.errors import ConfigurationError
        from prunenet.features import FEATURES

        super().__init__(intermediate_size, hidden_size)
        if init not in FEATURES:
            raise ConfigurationError(f"FeaturePolicy init must be one of {', '.join(FEATURES)}, got {init!r}")
        if not (isinstance(scale, (int, float)) and scale > 0):
            raise ConfigurationError(f"FeaturePolicy scale must be a number > 0, got {scale!r}")
        self.init, self.scale = init, float(scale)
        self.settings = CalibrationSettings(source, samples, length, temperature, top_p, seed, batch)
        self.theta = nn.Parameter(torch.zeros(len(FEATURES)))
        with torch.no_grad():
            self.theta[FEATURES.index(init)] = self.scale
        self.bias = nn.Parameter(torch.zeros(()))

    def hparams(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"init": self.init, "scale": self.scale, **asdict(self.settings)}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.intermediate_size, self.theta.shape[0])

    def logits(self, weight: torch.Tensor, prepared: Any = None) -> torch.Tensor:
        """Row scores ``X theta + c``, (n,) float32, from ``weight`` = the features X, (n, F)."""
        self._check(weight)
        return weight.float() @ self.theta + self.bias


#: Policies by short name (``--model.policy``; any class_path of a RowPolicy subclass works too: ``plugins.py``).
POLICIES: dict[str, type[RowPolicy]] = {cls.name: cls for cls in (SparsityPredictor, RowMLP, FeaturePolicy)}
DEFAULT_POLICY = SparsityPredictor.name

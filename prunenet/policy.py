"""The pruning policy (SparsityPredictor), a plain ``nn.Module``.

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

import torch
from torch import nn
from torch.nn import functional as F


class SparsityPredictor(nn.Module):
    """Row-importance policy shared by all layers of one model shape.

    Args:
        intermediate_size: n, rows of the FFN input matrix (FFN width).
        hidden_size: d, columns of the FFN input matrix (model width).

    Parameters (names follow the authors' code so their policies map 1:1):
        ``proj_intermediate``: ``nn.Linear(d, n)``, weight A of shape (n, d), bias b (n,).
        ``row_sparsities``: v, shape (n, 1), initialised U(0, 1).
    """

    def __init__(self, intermediate_size: int, hidden_size: int) -> None:
        super().__init__()
        if intermediate_size < 1 or hidden_size < 1:
            raise ValueError(
                f"SparsityPredictor needs positive sizes, got intermediate_size={intermediate_size}, "
                f"hidden_size={hidden_size}"
            )
        self.intermediate_size = int(intermediate_size)
        self.hidden_size = int(hidden_size)
        self.proj_intermediate = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.row_sparsities = nn.Parameter(torch.rand(intermediate_size, 1))

    @property
    def shape(self) -> tuple[int, int]:
        """(n, d): the FFN input matrix shape this policy accepts."""
        return (self.intermediate_size, self.hidden_size)

    def _check(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or tuple(weight.shape) != self.shape:
            raise ValueError(
                f"policy expects an FFN input matrix of shape (n, d)={self.shape}, got {tuple(weight.shape)}"
            )

    def direction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The score's parameters folded into ``(u, c) = (A^T v, b . v)``: shapes (d,) and (), float32.

        The row scores are ``z = W u + c``; everything the policy learns is in ``u`` and ``c``,
        which are connected to the parameters (differentiable).
        """
        a = self.proj_intermediate.weight.float()
        b = self.proj_intermediate.bias.float()
        v = self.row_sparsities.float()
        return (a.t() @ v).squeeze(-1), (b @ v).squeeze(-1)  # the O(n d) reordering of (W A^T) v

    def logits(self, weight: torch.Tensor, direction: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Pre-sigmoid row scores ``logit(alpha) = W (A^T v) + b . v``.

        Args:
            weight: FFN input matrix W, shape (n, d), any float dtype (computed in float32).
            direction: ``(u, c)`` from :meth:`direction` (possibly detached), to reuse across
                layers; computed here when None.
        Returns:
            Tensor of shape (n,), float32.
        Raises:
            ValueError: if ``weight`` is not of shape (n, d).
        """
        self._check(weight)
        u, c = self.direction() if direction is None else direction
        return weight.float() @ u + c

    def keep_probabilities(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Relaxed-Bernoulli keep probabilities ``p = sigmoid(logit(eps) + z)``, eps ~ U(0, 1).

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
            ``(p, z)``: keep probabilities p of shape (n,) and the logits z = logit(alpha)
            of shape (n,), both float32. ``p = sigmoid(logit(eps) + z)``; using z directly
            instead of ``logit(sigmoid(z))`` is the same value without overflow.
        """
        z = self.logits(weight)
        return self.keep_probabilities(z, generator), z

    @staticmethod
    def kl_regulariser(z: torch.Tensor) -> torch.Tensor:
        """The authors' optional ``use_kld`` term on alpha = sigmoid(z), summed over rows.

        ``sum_j [-(1 - a_j) log a_j - a_j log(1 - a_j) + log 0.5]`` (authors' code,
        ``calculate_KLD``), computed with log-sigmoids for stability.

        Args:
            z: logits of shape (n,).
        Returns:
            Scalar tensor.
        """
        a = torch.sigmoid(z)
        log_a = F.logsigmoid(z)
        log_1ma = F.logsigmoid(-z)
        return (-(1 - a) * log_a - a * log_1ma + torch.log(torch.tensor(0.5, device=z.device))).sum()

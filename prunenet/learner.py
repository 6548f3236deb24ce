"""Learners: how a layer's reward becomes a loss on its row logits (the plug point ``--model.learner``).

Source: PruneNet Section 3 for ``paper`` (REINFORCE with the paper's surrogate
``L_i = -gamma^i r_i sum_{j in kept} log p_j``, optional KL-style term on alpha from the authors'
code). The interface is ours.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from prunenet.errors import ConfigurationError
from prunenet.reward import discount


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


class Learner:
    """Turns one layer's outcome into a differentiable loss in that layer's logits ``z``.

    Subclasses set ``name`` (registry key) and implement :meth:`loss`. A learner with state (a
    running baseline, say) keeps it in :meth:`state_dict`, which the fit checkpoint stores.
    """

    name = ""

    def loss(self, *, z: torch.Tensor, p: torch.Tensor, kept: torch.Tensor, reward: float,
             layer: int) -> torch.Tensor:
        """Scalar loss of one layer.

        Args:
            z: row logits, shape (n,), requires grad.
            p: keep probabilities computed from z, shape (n,).
            kept: the rows drawn, LongTensor of shape (k,).
            reward: r_i of this layer (float).
            layer: layer index i.
        """
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PaperLearner(Learner):
    """The paper's REINFORCE: ``L_i = -gamma^i r_i sum_{j in kept} log p_j`` (+ ``kl_regulariser(z)``
    with ``use_kld``). Source: PruneNet Section 3 and the authors' code.

    Args:
        gamma: layer discount in (0, 1].
        use_kld: add the authors' KL-style term.
    """

    name = "paper"

    def __init__(self, gamma: float = 0.99, use_kld: bool = False) -> None:
        self.gamma, self.use_kld = float(gamma), bool(use_kld)

    def loss(self, *, z: torch.Tensor, p: torch.Tensor, kept: torch.Tensor, reward: float,
             layer: int) -> torch.Tensor:
        step_loss = -discount(reward, layer, self.gamma) * torch.log(p.index_select(0, kept)).sum()
        if self.use_kld:
            step_loss = step_loss + kl_regulariser(z)
        return step_loss


#: Learners by name (``--model.learner``).
LEARNERS: dict[str, type[Learner]] = {cls.name: cls for cls in (PaperLearner,)}


def build_learner(name: str, gamma: float, use_kld: bool) -> Learner:
    """The learner of registry name ``name``.

    Raises:
        ConfigurationError: an unknown name (lists the known ones).
    """
    if name not in LEARNERS:
        raise ConfigurationError(f"learner must be one of {sorted(LEARNERS)}, got {name!r}")
    return LEARNERS[name](gamma=gamma, use_kld=use_kld)

"""Learners: how a layer's reward becomes a loss on its row logits (the plug point ``--model.learner``).

Source: PruneNet Section 3 for ``paper`` (REINFORCE with the paper's surrogate
``L_i = -gamma^i r_i sum_{j in kept} log p_j``, optional KL-style term on alpha from the authors'
code). The interface and ``baseline`` (REINFORCE with a per-layer baseline, normalised advantages
and the exact likelihood of the draw) are ours.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from prunenet.checks import check_float
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
    running baseline, say) keeps it in :meth:`state_dict`, which the fit checkpoint stores, and
    updates it in :meth:`end_episode` from every layer's reward (summed over DDP ranks, so every
    rank holds the same state). A learner that compares with uniformly random rows sets
    ``wants_random_reference``; the module then gives it, once per layer before the first
    episode, the reward of a seeded random draw of the same size (:meth:`set_random_reference`).
    """

    name = ""
    wants_random_reference = False

    def hparams(self) -> dict:
        """The learner's init arguments (what ``plugins.describe`` records)."""
        return {}

    def loss(self, *, z: torch.Tensor, p: torch.Tensor, kept: torch.Tensor, drawn: torch.Tensor, reward: float,
             layer: int) -> torch.Tensor:
        """Scalar loss of one layer.

        Args:
            z: row logits, shape (n,), requires grad.
            p: keep probabilities computed from z, shape (n,).
            kept: the rows drawn, sorted, LongTensor of shape (k,).
            drawn: the same rows in draw order.
            reward: r_i of this layer (float).
            layer: layer index i.
        """
        raise NotImplementedError

    def set_random_reference(self, layer: int, reward: float) -> None:
        """The reward of a uniformly random draw in layer ``layer`` (only if ``wants_random_reference``)."""

    def end_episode(self, rewards: dict[int, float]) -> None:
        """Update the state after an episode with every trained layer's reward."""

    def state_dict(self) -> dict:
        """The learner's state as plain Python values (stored in the fit checkpoint); {} when stateless."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""


class PaperLearner(Learner):
    """The paper's REINFORCE: ``L_i = -gamma^i r_i sum_{j in kept} log p_j`` (+ ``kl_regulariser(z)``
    with ``use_kld``). Source: PruneNet Section 3 and the authors' code.

    Args:
        gamma: layer discount in (0, 1].
        use_kld: add the authors' KL-style term.
    """

    name = "paper"

    def __init__(self, gamma: float = 0.99, use_kld: bool = False) -> None:
        self.gamma = check_float(gamma, "model.learner.init_args.gamma", 0.0, 1.0, low_open=True)
        self.use_kld = bool(use_kld)

    def hparams(self) -> dict:
        return {"gamma": self.gamma, "use_kld": self.use_kld}

    def loss(self, *, z: torch.Tensor, p: torch.Tensor, kept: torch.Tensor, drawn: torch.Tensor, reward: float,
             layer: int) -> torch.Tensor:
        step_loss = -discount(reward, layer, self.gamma) * torch.log(p.index_select(0, kept)).sum()
        if self.use_kld:
            step_loss = step_loss + kl_regulariser(z)
        return step_loss


def ordered_draw_log_likelihood(p: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """Exact log-probability of drawing the rows ``drawn`` in that order without replacement, each
    with probability proportional to ``p`` among the rows not yet drawn (what ``torch.multinomial(p, k,
    replacement=False)`` does; Plackett-Luce, equivalently Gumbel-top-k on ``log p``). Ours; the paper
    uses the surrogate ``sum_{j in kept} log p_j``.

    ``log P = sum_t [log p_{d_t} - log(sum_j p_j - sum_{s<t} p_{d_s})]``, in float64; the remaining
    weight is summed from the rows not yet drawn, so a draw holding almost all the weight stays finite.

    Args:
        p: positive weights, shape (n,), differentiable.
        drawn: the draw, LongTensor of shape (k,), in draw order.
    Returns:
        Scalar tensor (float64).
    """
    p64 = p.double()
    picked = p64.index_select(0, drawn)
    # The weight still available at step t, summed from positive terms (never drawn + drawn at t or
    # later): ``sum(p) - cumsum`` cancels catastrophically when the draw holds almost all the weight.
    never = torch.ones(p64.shape[0], dtype=torch.bool, device=p64.device)
    never[drawn] = False
    remaining = (p64 * never).sum() + picked.flip(0).cumsum(0).flip(0)
    return (torch.log(picked) - torch.log(remaining)).sum()


class BaselineLearner(Learner):
    """REINFORCE with a per-layer baseline and normalised advantages, on the exact log-likelihood of
    the ordered draw (ours).

    ``L_i = -A_i log P(draw_i)`` with the advantage ``A_i = (r_i - b_i) / s_i``: b_i is an exponential
    running mean of layer i's rewards and s_i their running standard deviation (``momentum``). Before
    the first episode b_i is the reward of a uniformly random draw of the same size, and s_i 1% of it,
    so from the first episode the policy is pushed towards selections better than random rows. The
    state is updated after each episode with every layer's reward and saved in the fit checkpoint, so
    a resumed fit continues exactly. No gamma^i discount: each layer is compared with itself.

    Args:
        use_kld: add the authors' KL-style term.
        momentum: weight of the old baseline in each update, in [0, 1).
    Raises:
        ConfigurationError: momentum outside [0, 1).
    """

    name = "baseline"
    wants_random_reference = True

    def __init__(self, use_kld: bool = False, momentum: float = 0.9) -> None:
        self.use_kld = bool(use_kld)
        self.momentum = check_float(momentum, "model.learner.init_args.momentum", 0.0, 1.0, high_open=True)
        self.mean: dict[int, float] = {}
        self.std: dict[int, float] = {}

    def hparams(self) -> dict:
        return {"use_kld": self.use_kld, "momentum": self.momentum}

    def set_random_reference(self, layer: int, reward: float) -> None:
        if layer not in self.mean:  # a resumed fit keeps its state
            self.mean[layer], self.std[layer] = float(reward), max(0.01 * abs(float(reward)), 1e-6)

    def advantage(self, layer: int, reward: float) -> float:
        """``(r - b_layer) / s_layer`` with the state before this episode's update.

        Raises:
            ConfigurationError: a layer with no baseline yet (no random reference was set).
        """
        if layer not in self.mean:
            raise ConfigurationError(f"learner 'baseline' has no baseline for layer {layer}")
        return (float(reward) - self.mean[layer]) / self.std[layer]

    def loss(self, *, z: torch.Tensor, p: torch.Tensor, kept: torch.Tensor, drawn: torch.Tensor, reward: float,
             layer: int) -> torch.Tensor:
        step_loss = -self.advantage(layer, reward) * ordered_draw_log_likelihood(p, drawn).to(z.dtype)
        if self.use_kld:
            step_loss = step_loss + kl_regulariser(z)
        return step_loss

    def end_episode(self, rewards: dict[int, float]) -> None:
        m = self.momentum
        for layer, r in rewards.items():
            mean = self.mean.get(layer, float(r))
            self.mean[layer] = m * mean + (1 - m) * float(r)
            var = m * self.std.get(layer, 1.0) ** 2 + (1 - m) * (float(r) - mean) ** 2
            self.std[layer] = max(var, 1e-12) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": {str(k): v for k, v in self.mean.items()}, "std": {str(k): v for k, v in self.std.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.mean = {int(k): float(v) for k, v in state.get("mean", {}).items()}
        self.std = {int(k): float(v) for k, v in state.get("std", {}).items()}


#: Learners by short name (``--model.learner``; any class_path of a Learner subclass works too: ``plugins.py``).
LEARNERS: dict[str, type[Learner]] = {cls.name: cls for cls in (PaperLearner, BaselineLearner)}

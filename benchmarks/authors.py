"""Yardstick: a reimplementation of the authors' per-episode work (``efficient_pruners.PruneNet.fit``),
for timing only. Their package cannot be installed offline, so this is not their code: it repeats
what their training loop does, step for step, on the same model and episodes.

    python -m benchmarks.authors [--episodes 20] [--ratio 0.3]

Per run: load the model (``AutoModelForCausalLM``, here through ``prunenet.loading`` so the source is
the same cached float32 checkpoint), the reference spectra of every layer (``torch.svd`` of W_i,
float32). Per episode, as their loop does:

1. ``copy.deepcopy`` of the whole model;
2. per layer: ``state = copy.deepcopy(W_i)``; keep probabilities from their policy form
   ``sigmoid((W Aᵀ + 1 bᵀ) v)`` (an (n, n) intermediate) with relaxed-Bernoulli noise;
   ``torch.multinomial`` of k rows; the layer's gate/up rows and down columns sliced in the copy;
   ``torch.svd`` (U, S, V) of the sliced gate matrix in float32; ``scipy.stats.ks_2samp`` against
   the reference; reward 1 / KS (99999 at 0);
3. discount gamma^i; per layer again: the policy forward on the stored state, ``-R_i sum log p_kept``,
   and its own ``backward()`` (one backward per layer);
4. gradient clipping at 1 and one AdamW step.

Left out: ``torch.autocast(float16)`` (on a CPU it would only slow their matmuls) and the
GradScaler (a no-op without float16). Prints one JSON line: seconds of each episode, of the load and
of the reference spectra.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def keep_probabilities(policy, weight: torch.Tensor) -> torch.Tensor:
    """Their ``SparsityPredictor.forward``: alpha = sigmoid((W Aᵀ + 1 bᵀ) v) with the (n, n) intermediate,
    then the relaxed Bernoulli sigmoid(logit(eps) + logit(alpha)). ``logit(alpha)`` is taken as the
    score itself (the same number): their ``log(alpha) - log(1 - alpha)`` gives NaN once alpha rounds
    to 1, which the paper's loss reaches within 20 episodes here, and would stop the yardstick."""
    lin, v = policy.proj_intermediate, policy.row_sparsities
    score = (lin(weight) @ v).squeeze(-1)  # (n, n) @ (n, 1)
    eps = torch.rand_like(score).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid(torch.log(eps) - torch.log(1 - eps) + score)


def reward(reference: torch.Tensor, weight: torch.Tensor) -> float:
    """Their ``calculate_reward``: full ``torch.svd`` of the sliced matrix, scipy's KS, 1 / KS."""
    from scipy import stats

    _, s, _ = torch.svd(weight.detach().float())
    ks = stats.ks_2samp(reference.numpy(), s.numpy()).statistic
    return 99999.0 if ks == 0 else 1.0 / ks


def slice_layer(mlp, rows: torch.Tensor) -> None:
    """Their ``slice_layer_weights`` for a LLaMA MLP: rows of gate and up, columns of down."""
    mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight.data[rows])
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.data[rows])
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.data[:, rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--gamma", type=float, default=0.99)
    args = parser.parse_args(argv)

    from prunenet import loading
    from prunenet.policy import SparsityPredictor

    torch.manual_seed(0)
    start = time.perf_counter()
    model = loading.load_model(args.model).eval()
    load = time.perf_counter() - start
    layers = model.model.layers
    n, d = layers[0].mlp.gate_proj.weight.shape
    policy = SparsityPredictor(n, d)  # their parameter names and shapes
    start = time.perf_counter()
    references = [torch.svd(layer.mlp.gate_proj.weight.detach().float())[1] for layer in layers]
    ref_seconds = time.perf_counter() - start
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    k = int((1 - args.ratio) * n)
    episodes = []
    for _ in range(args.episodes):
        start = time.perf_counter()
        episode_model = copy.deepcopy(model)
        states, actions, rewards = [], [], []
        for i, layer in enumerate(episode_model.model.layers):
            state = copy.deepcopy(layer.mlp.gate_proj.weight.detach())
            probs = keep_probabilities(policy, state)
            rows = torch.multinomial(probs, k, replacement=False).sort().values
            slice_layer(layer.mlp, rows)
            rewards.append(reward(references[i], layer.mlp.gate_proj.weight))
            states.append(state)
            actions.append(rows)
        discounted = [r * args.gamma**i for i, r in enumerate(rewards)]
        for state, rows, r in zip(states, actions, discounted):
            probs = keep_probabilities(policy, state)
            loss = -torch.log(probs).gather(0, rows).sum() * r
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        del episode_model
        episodes.append(time.perf_counter() - start)
    print(json.dumps({"episodes": episodes, "load": load, "reference_spectra": ref_seconds}))


if __name__ == "__main__":
    main()

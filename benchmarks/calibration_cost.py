"""What self-calibrated selection and policy learning cost per layer at LLaMA-2-7B's FFN shape (n = 11008,
d = 4096), on random matrices: the reconstruction matrix M = G o (W^T W), the greedy order the ``recon``
selection keeps the head of, the policy features, one reconstruction reward and the refit of the kept output
columns (issue 28's cost table).

    python -m benchmarks.calibration_cost [--n 11008] [--d 4096] [--tokens 16384] [--layers 32]

The Gram G = H^T H is formed from ``--tokens`` random activations (what the activation pass accumulates per
layer), W^T W from a random output weight. Times are one layer's, with the ``--layers`` total beside them;
memory is what one layer's float64 M and G hold. Prints the rows and writes a markdown table
(``--output``, default benchmarks/results/calibration-cost.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, header, table


def main(argv: list[str] | None = None) -> None:
    from prunenet.calibration import NeuronStats, reconstruction_matrix, relative_output_error
    from prunenet.features import greedy_order, neuron_features
    from prunenet.refit import refit_columns

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=11008)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/calibration-cost.md"))
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = []

    def timed(what, fn):
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        rows.append([what, f"{seconds:.2f} s", f"{seconds * args.layers / 60:.1f} min"])
        print(rows[-1], flush=True)
        return out

    h = torch.randn(args.tokens, args.n, generator=g).relu()
    w = torch.randn(args.d, args.n, generator=g) * 0.02
    gram = timed("Gram H^T H of the tokens (float32 GEMM, kept in float64)", lambda: (h.T @ h).double())
    stats = NeuronStats(args.tokens, h.double().sum(0), (h.double() ** 2).sum(0), gram)
    del h
    wtw = timed("W^T W of the output weight (float32)", lambda: w.T @ w)
    m = timed("M = G o W^T W (float64)", lambda: reconstruction_matrix(gram, wtw))
    k = int(args.n * 0.7)
    timed(f"recon: greedy order of the first k = {k}", lambda: greedy_order(m, k))
    norms = torch.stack([w.abs().sum(0), w.norm(dim=0)])
    timed("policy features (includes the full greedy order)", lambda: neuron_features(stats, norms, w.abs().amax(0), m))
    m32 = m.float()
    kept = torch.randperm(args.n, generator=g)[:k]
    timed("one reconstruction reward (float32 M, one draw)", lambda: relative_output_error(m32, kept))
    timed(f"refit of the k = {k} kept output columns (float64 Cholesky solve)",
          lambda: refit_columns(w, gram, kept.sort().values))
    gib = args.n * args.n * 8 / 2 ** 30
    lines = ["# Self-calibration cost per layer at LLaMA-2-7B's FFN shape (random matrices)", "",
             header("python -m benchmarks.calibration_cost " + " ".join(argv if argv is not None else sys.argv[1:])),
             f"n = {args.n}, d = {args.d}, {args.tokens} tokens; one thread unless OMP_NUM_THREADS says otherwise. "
             f"Memory per layer: G and M {gib:.2f} GiB each in float64 ({gib * args.layers:.0f} GiB for "
             f"{args.layers} layers each); the fit holds M in float32 ({gib / 2 * args.layers:.0f} GiB).", "",
             table(["step", "one layer", f"{args.layers} layers"], rows)]
    Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

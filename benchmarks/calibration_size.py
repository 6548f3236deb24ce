"""How much self-generated text does a calibrated selection need? Perplexity of ``recon`` and ``wanda_sp``
selections computed on the first N sequences (first L tokens each) of the model's own text (issue 28).

    python -m benchmarks.calibration_size --model smollm2-135m [--ratio 0.3] [--seed 0]
        [--samples 4,8,16,32,64] [--lengths 64,128,256] [--tokens 16384]

The text is the default self-calibration text (64 x 256 tokens from BOS, ``--seed``), generated once and
cut: the first N sequences are what ``--calibration_samples N`` generates for N a multiple of
``--calibration_batch`` (the sequences are sampled that many a call from one seeded stream; the committed
results used 16), and a sequence's first L tokens what length L samples. Perplexity as ``benchmarks.quality_perplexity`` (first ``--tokens`` tokens of squad-wiki, context
512, removed neurons zeroed at the FFN output). Each finished cell is appended to a JSON-lines file next to
the table and skipped when run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, add_text_batch_argument, check_text_batch, header, load_records, table

KEY_NAMES = ("model", "ratio", "method", "seed", "samples", "length", "tokens")
METHODS = ("recon", "wanda_sp")


def main(argv: list[str] | None = None) -> None:
    from prunenet import calibration, loading
    from prunenet.arch import get_adapter
    from prunenet.evaluation.perplexity import PerplexitySettings, perplexity
    from prunenet.inputs import SelectionInputs
    from prunenet.selection import kept_width
    from prunenet.selectors import build_selector, select_layers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", default="4,8,16,32,64")
    parser.add_argument("--lengths", default="64,128,256")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--methods", default=",".join(METHODS))
    add_text_batch_argument(parser)
    args = parser.parse_args(argv)
    output = REPO / f"benchmarks/results/calibration-size-{args.model.split('-')[0]}.md"
    records_path = output.with_suffix(".jsonl")
    done = load_records(records_path, KEY_NAMES)
    check_text_batch(done.values(), args.calibration_batch, records_path)
    settings = calibration.CalibrationSettings(seed=args.seed, batch=args.calibration_batch)
    model = loading.load_model(args.model)
    tokenizer = loading.load_tokenizer(args.model)
    text = calibration.calibration_tokens(args.model, model, tokenizer, settings)
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    masks = [torch.ones(adapter.intermediate_size(model.config)) for _ in layers]
    hooks = [adapter.output_module(layer).register_forward_pre_hook(
        lambda _m, a, mask=mask: (a[0] * mask.to(a[0].dtype),) + tuple(a[1:])) for layer, mask in zip(layers, masks)]
    ppl_settings = PerplexitySettings(context_length=512, max_tokens=args.tokens)
    k = kept_width(masks[0].numel(), args.ratio)
    try:
        for length in [int(x) for x in args.lengths.split(",")]:
            for samples in [int(x) for x in args.samples.split(",")]:
                for method in args.methods.split(","):
                    key = (args.model, args.ratio, method, args.seed, samples, length, args.tokens)
                    if key in done:
                        continue
                    for mask in masks:
                        mask.fill_(1.0)  # the statistics are the dense model's
                    t0 = time.perf_counter()
                    inputs = SelectionInputs(args.model, calibration=settings)
                    inputs.gram = method == "recon"
                    inputs._activations = calibration.activation_stats(model, text[:samples, :length], gram=inputs.gram,
                                                                       progress=False)
                    selector = build_selector(method, seed=args.seed)
                    kept = select_layers(selector, inputs.layers(selector.needs), k)
                    select_s = time.perf_counter() - t0
                    for mask, rows in zip(masks, kept):
                        mask.zero_()
                        mask[rows] = 1.0
                    result = perplexity(model, tokenizer, ppl_settings, progress=False)
                    rec = dict(zip(KEY_NAMES, key), perplexity=result["perplexity"], ppl_tokens=result["tokens"],
                               select_seconds=round(select_s, 1), calibration_batch=args.calibration_batch)
                    with records_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    done[key] = rec
                    print(f"{method} N={samples} L={length}: ppl {rec['perplexity']:,.1f} ({select_s:.0f} s)",
                          flush=True)
    finally:
        for h in hooks:
            h.remove()
    write_table(output, argv, done)


def write_table(output: Path, argv, done: dict) -> None:
    """The markdown table of every recorded cell: one row per (method, length), one column per N."""
    cells = sorted(done.values(), key=lambda c: (c["model"], c["ratio"], c["method"], c["length"], c["samples"]))
    samples = sorted({c["samples"] for c in cells})
    rows = {}
    for c in cells:
        rows.setdefault((c["model"], c["ratio"], c["method"], c["seed"], c["length"]), {})[c["samples"]] = c
    command = "python -m benchmarks.calibration_size " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Calibration size: calibrated selections on the first N x L tokens of the model's own text", "",
             header(command),
             "Perplexity on the first 16,384 tokens of squad-wiki (context 512), removed neurons zeroed; the text is "
             "the model's own (64 x 256 from BOS, seed as given), cut to its first N sequences and L tokens.", ""]
    body = [[m, f"{r:g}", str(s), str(length), *[f"{row[n]['perplexity']:,.1f}" if n in row else "—" for n in samples]]
            for (_, r, m, s, length), row in rows.items()]
    lines.append(table(["method", "r", "text seed", "L", *[f"N={n}" for n in samples]], body))
    output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

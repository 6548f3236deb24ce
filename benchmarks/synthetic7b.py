"""What LLaMA-2-7B costs, without downloading it: a synthetic 7B-shaped checkpoint.

    python -m benchmarks.synthetic7b [--layers-timed 2] [--keep]

Writes a LLaMA-2-7B-shaped safetensors checkpoint (32 layers, hidden 4096, intermediate
11008, vocab 32000, bf16, random N(0, 0.02) weights, sharded like the hub's, ~13.5 GB) to a
temporary folder, then measures in fresh processes:

1. the streaming fit (``low_memory``: FFN input tensors read by name from safetensors, one
   layer at a time): peak RSS and wall time of one episode. On a CPU-only machine a full
   episode of 32 layers is dominated by the spectra of 7705 x 4096 / 11008 x 4096 matrices
   (their (4096, 4096) Gram + eigvalsh), so
   ``--layers-timed N`` trains on N layers (``--data.layers``) and the per-layer time is
   reported with the 32-layer extrapolation (labelled as such);
2. shard-wise slicing of the whole checkpoint: peak RSS and wall time.

The checkpoint is deleted afterwards unless ``--keep``. Results: benchmarks/results/synthetic7b.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, header, run_measured, table
from prunenet.plan import load_plan

SHAPE = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32000,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def write_checkpoint(folder: Path, layers_per_shard: int = 4) -> float:
    """Write the synthetic checkpoint; returns its size in GiB."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    d, n, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    groups = [list(range(s, min(s + layers_per_shard, 32))) for s in range(0, 32, layers_per_shard)]
    weight_map, total = {}, 0
    shards = len(groups) + 1
    for g, layers in enumerate(groups):
        tensors = {}
        for i in layers:
            p = f"model.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{name}.weight"] = rand(d, d)
            tensors[p + "mlp.gate_proj.weight"] = rand(n, d)
            tensors[p + "mlp.up_proj.weight"] = rand(n, d)
            tensors[p + "mlp.down_proj.weight"] = rand(d, n)
            tensors[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        name = f"model-{g + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
    tensors = {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
               "lm_head.weight": rand(v, d)}
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(tensors, folder / name, metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    total += sum(t.numel() * 2 for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total / 2**30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers-timed", type=int, default=2, help="layers trained in the timed episode (32 = all)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--workdir", default=None, help="where to write the ~13.5 GB checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/synthetic7b.md"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="prunenet-7b-", dir=args.workdir))
    rows = []
    try:
        start = time.perf_counter()
        size = write_checkpoint(work / "llama2-7b-shaped")
        print(f"wrote {size:.1f} GiB in {time.perf_counter() - start:.0f} s", flush=True)
        ckpt = work / "llama2-7b-shaped"
        layers = list(range(args.layers_timed))
        fit_args = ["-m", "prunenet.fit", f"--model.model_name_or_path={ckpt}",
                    f"--model.compression_ratio={args.ratio}", "--model.low_memory=true", "--trainer.max_epochs=1",
                    "--trainer.accelerator=cpu", f"--trainer.default_root_dir={work / 'runs'}",
                    f"--data.layers={json.dumps(layers)}", f"--slicing.output_dir={work / 'pruned'}",
                    "--slicing.shardwise=true", "--spectrum.enabled=false", "--evaluation.enabled=false"]
        wall, rss, _ = run_measured(fit_args)
        # The fit process also slices (shard-wise) at the end: time slicing alone separately.
        plan = load_plan(work / "pruned")
        slice_wall, slice_rss, _ = run_measured(["-c", (
            "import json,sys,torch; from pathlib import Path; from transformers import AutoConfig;"
            "from prunenet.streaming import slice_checkpoint;"
            f"p=json.load(open({str(work / 'pruned' / 'prunenet.json')!r}));"
            "kept=[torch.tensor(p['kept_indices'][str(i)]) for i in range(len(p['kept_indices']))];"
            f"out=Path({str(work / 'sliced')!r}); out.mkdir();"
            f"slice_checkpoint({str(ckpt)!r}, AutoConfig.from_pretrained({str(ckpt)!r}), kept, out)")])
        episode = _episode_seconds(work / "runs")
        shard_gib = max(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 2**30
        per_layer = episode / len(layers) if episode else float("nan")
        rows = [
            ["checkpoint written", (f"{size:.2f} GiB bf16 in {len(list(ckpt.glob('*.safetensors')))} shards "
             f"(largest {shard_gib:.2f} GiB)"), "", ""],
            [f"fit, 1 episode on {len(layers)} of 32 layers (process incl. load + shard-wise slicing)",
             f"{wall:.0f} s", f"{rss:.2f} GiB", "streaming, low_memory"],
            ["episode time per layer (policy, dense and kept spectra, KS, backward; first episode)",
             f"{per_layer:.1f} s", "", ""],
            ["episode time, 32 layers (extrapolated = 32 x per layer)" if len(layers) < 32 else "episode, 32 layers",
             f"{32 * per_layer / 60:.1f} min", "", ""],
            ["shard-wise slicing of all 32 layers (alone)", f"{slice_wall:.0f} s", f"{slice_rss:.2f} GiB",
             f"kept width {plan['kept_width']}"],
        ]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = "# Synthetic LLaMA-2-7B-shaped checkpoint: fit and slicing cost\n\n" + header(
        "python -m benchmarks.synthetic7b " + " ".join(sys.argv[1:] if argv is None else argv)) + "\n" + table(
        ["what", "wall time", "peak RSS", "notes"], rows)
    text += ("\nTargets (issue 7): fit peak RSS < 4 GiB; slicing peak < one shard + 2 GiB.\n"
             "Singular values run on the CPU here (threads: OMP_NUM_THREADS of the run); no GPU was available.\n")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)


def _episode_seconds(runs: Path) -> float | None:
    """Seconds of the last episode, as the fit logged it (``time/episode_seconds``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(runs.rglob("events.out.tfevents.*"))
    if not events:
        return None
    acc = EventAccumulator(str(events[-1].parent))
    acc.Reload()
    if "time/episode_seconds" not in acc.Tags()["scalars"]:
        return None
    return acc.Scalars("time/episode_seconds")[-1].value


if __name__ == "__main__":
    main()

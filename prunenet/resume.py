"""Resume: which fit a Lightning checkpoint belongs to (resolved source, seed, the hyperparameters that
change the result), and which checkpoint ``--ckpt_path last`` means. Ours (the paper has no resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunenet.errors import ConfigurationError

#: Hyperparameters that change the result of a fit (the rest, e.g. low_memory, change only how it runs).
RESULT_HPARAMS = ("compression_ratio", "policy", "reward", "learner", "protect_outliers", "learning_rate",
                  "weight_decay", "dtype")
#: The plug points among them, compared as ``plugins.canonical`` records (class_path and every init argument).
PLUG_POINTS = ("policy", "reward", "learner")


def canonical_source(model_name_or_path: str) -> str:
    """One name per source model: ``asset:<name>``, the absolute real path of a local folder
    (``./m``, ``m`` and a symlink to it are the same), or the hub id as given."""
    from prunenet import assets

    name = str(model_name_or_path)
    if assets.is_asset(name):
        return f"asset:{name}"
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def checkpoint_settings(checkpoint: dict[str, Any], keys: tuple[str, ...] = RESULT_HPARAMS) -> dict[str, Any]:
    """:meth:`PruneNetModule.run_settings` of the fit that wrote a Lightning checkpoint (its saved
    hyperparameters ``keys`` and ``prunenet_run`` record; ``RecoveryModule.run_settings`` with the
    recovery's keys). Checkpoints written before the record existed give no seed (None: not compared),
    the source resolved from ``model_name_or_path`` now, and the stage ``fit``."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    run = dict(checkpoint.get("prunenet_run") or {})
    source = run.get("source")
    if source is None and hparams.get("model_name_or_path") is not None:
        source = canonical_source(hparams["model_name_or_path"])
    return {"source": source, "seed": run.get("seed"), "stage": run.get("stage", "fit"),
            **({"data": run["data"]} if "data" in run else {}),  # a recovery's training data
            **{key: _canonical(key, hparams.get(key)) for key in keys}}


def _canonical(key: str, value: Any) -> Any:
    """A plug point's saved hyperparameter (a short name or a class_path record) as its canonical record."""
    if key not in PLUG_POINTS:
        return value
    from prunenet import plugins

    try:
        return plugins.canonical(key, value)
    except ConfigurationError:  # a class that no longer exists: compared as stored, hence a mismatch
        return value


def _same(key: str, stored: Any, current: Any) -> bool:
    """Equal settings; dtypes compared by what they mean (``bf16`` is ``bfloat16``); no stage is ``fit``."""
    if key == "stage":
        return (stored or "fit") == (current or "fit")
    if key == "dtype":
        from prunenet.loading import parse_dtype
        from prunenet.errors import ModelLoadError

        try:
            return parse_dtype(stored) == parse_dtype(current)
        except ModelLoadError:
            pass
    return stored == current


def settings_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str:
    """``""`` when a stored fit can be resumed with the current settings, else what differs, as
    ``"seed=0 (this run: 5), compression_ratio=0.3 (this run: 0.25)"``. A stored None is not compared."""
    parts = [f"{key}={stored[key]!r} (this run: {current.get(key)!r})" for key in stored
             if stored[key] is not None and not _same(key, stored[key], current.get(key))]
    return ", ".join(parts)


def resolve_ckpt_path(ckpt_path: str | None, root_dir: str, settings: dict[str, Any],
                      keys: tuple[str, ...] = RESULT_HPARAMS) -> str | None:
    """``last`` -> the newest ``last.ckpt`` under ``root_dir`` of an earlier fit with the same
    settings (``PruneNetModule.run_settings``: resolved source, seed, and the hyperparameters that
    change the result); each run logs to a new ``lightning_logs/version_N``, so Lightning's own "last"
    would only look in the new, empty one. A given path must exist and have the same settings.
    ``keys`` are the hyperparameters compared (a recovery passes its own).

    Raises:
        ConfigurationError: no such checkpoint, or one trained with other settings (names them).
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        found = sorted(Path(root_dir).glob("**/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        same_source = []
        for path in found:
            stored = _stored_settings(path, keys)
            if stored is None or stored["source"] != settings["source"]:
                continue
            if not settings_mismatch(stored, settings):
                return str(path)
            same_source.append((path, stored))
        if same_source:
            path, stored = same_source[0]
            raise ConfigurationError(f"--ckpt_path last: the newest checkpoint of this model ({str(path)!r}) was "
                                     f"trained with {settings_mismatch(stored, settings)}; resume with its settings, "
                                     "or run without --ckpt_path")
        raise ConfigurationError(f"--ckpt_path last: no last.ckpt of {settings['source']!r} under "
                                 f"{str(Path(root_dir).resolve())!r}; run without --ckpt_path first")
    if not Path(ckpt_path).is_file():
        raise ConfigurationError(f"--ckpt_path {ckpt_path!r} does not exist (pass a .ckpt file or 'last')")
    stored = _stored_settings(Path(ckpt_path), keys)
    if stored is None:
        raise ConfigurationError(f"--ckpt_path {ckpt_path!r} is not a PruneNet checkpoint")
    differ = settings_mismatch(stored, settings)
    if differ:
        raise ConfigurationError(f"--ckpt_path {ckpt_path!r} was trained with {differ}; resume with its settings, "
                                 "or run without --ckpt_path")
    return ckpt_path


def _stored_settings(ckpt: Path, keys: tuple[str, ...] = RESULT_HPARAMS) -> dict[str, Any] | None:
    """The run settings stored in a Lightning checkpoint, or None if it is not a readable PruneNet one.
    Memory-mapped: the policy and optimizer tensors are not read."""
    import torch

    try:
        checkpoint = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is "not one of ours", skipped or refused by the caller
        return None
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        return None
    return checkpoint_settings(checkpoint, keys)


def save_run_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """What a ``PruneNetModule`` adds to its Lightning checkpoint: the episode history, the learner's
    state (e.g. a running baseline: exact resume) and the run's source and seed."""
    checkpoint["prunenet_history"] = list(module.history)
    checkpoint["prunenet_learner"] = module.learner.state_dict()
    checkpoint["prunenet_run"] = {k: v for k, v in module.run_settings().items() if k in ("source", "seed")}


def load_run_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """Restore what ``save_run_state`` stored. prunenet.fit checks the settings before the Trainer
    starts; the check here covers programmatic resumes (a trainer attached), not inspection.

    Raises:
        ConfigurationError: the checkpoint was trained with other settings (names them).
    """
    differ = module._trainer is not None and settings_mismatch(checkpoint_settings(checkpoint), module.run_settings())
    if differ:
        raise ConfigurationError(f"cannot resume: the checkpoint was trained with {differ}")
    module.history = list(checkpoint.get("prunenet_history", []))
    module.learner.load_state_dict(checkpoint.get("prunenet_learner", {}))

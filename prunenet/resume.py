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


#: The checkpoint key of a run's record (:func:`save_run_state`), and the settings it holds.
RUN_RECORD = "prunenet_run"
RUN_RECORD_KEYS = ("source", "seed", "stage", "data")
#: A run's state is stored under ``prunenet_<name>`` (:func:`save_run_state`).
_STATE_PREFIX = "prunenet_"


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
    run = dict(checkpoint.get(RUN_RECORD) or {})
    source = run.get("source")
    if source is None and hparams.get("model_name_or_path") is not None:
        source = canonical_source(hparams["model_name_or_path"])
    return {"source": source, "seed": run.get("seed"), "stage": run.get("stage", "fit"),
            **({"data": run["data"]} if "data" in run else {}),  # a recovery's training data
            **{key: _canonical(key, hparams.get(key), hparams) for key in keys}}


#: Module-level hyperparameters of fits written before the plug points took their own (issue 26): the
#: plug point whose init argument each one is now.
_LEGACY_KEYS = {"learner": ("gamma", "use_kld"), "reward": ("spectra_dtype", "spectra_method")}


def _canonical(key: str, value: Any, hparams: dict[str, Any]) -> Any:
    """A plug point's saved hyperparameter (a short name or a class_path record) as its canonical record; an
    older checkpoint's module-level settings (``gamma``, ``spectra_dtype``, ...) go into the init arguments
    that hold them now, so a resume with other values is still refused."""
    if key not in PLUG_POINTS:
        return value
    from prunenet import plugins

    try:
        record = plugins.canonical(key, value)
    except ConfigurationError:  # a class that no longer exists: compared as stored, hence a mismatch
        return value
    if isinstance(record, dict) and isinstance(record.get("init_args"), dict):
        for old in _LEGACY_KEYS.get(key, ()):
            if old in hparams and old in record["init_args"]:
                record["init_args"][old] = hparams[old]
        from prunenet.calibration import legacy_batch

        stored = value.get("init_args") if isinstance(value, dict) else None
        if isinstance(stored, dict) and "batch" in record["init_args"] and (old := legacy_batch(stored)) is not None:
            record["init_args"]["batch"] = old  # its text, as it was sampled
    return record


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


def save_run_state(checkpoint: dict[str, Any], settings: dict[str, Any], state: dict[str, Any]) -> None:
    """Write a run's state into its Lightning checkpoint (the one writer; :func:`load_run_state` reads it).

    Args:
        checkpoint: the dict Lightning saves (``on_save_checkpoint``'s argument).
        settings: the module's ``run_settings()``; its :data:`RUN_RECORD_KEYS` (source, seed, and a
            recovery's stage and data) go into the ``prunenet_run`` record that
            :func:`checkpoint_settings` reads back.
        state: what the module needs to continue exactly, by name; each value is stored under
            ``prunenet_<name>`` (a fit: ``history``, ``learner``; a recovery: ``tokens_seen``,
            ``val_loss_before``, ``rng_state``).
    """
    checkpoint[RUN_RECORD] = {k: v for k, v in settings.items() if k in RUN_RECORD_KEYS}
    for name, value in state.items():
        checkpoint[_STATE_PREFIX + name] = value


def load_run_state(checkpoint: dict[str, Any], defaults: dict[str, Any], current: dict[str, Any] | None = None,
                   keys: tuple[str, ...] = RESULT_HPARAMS) -> dict[str, Any]:
    """What :func:`save_run_state` stored: name -> value for each name in ``defaults`` (its default when the
    checkpoint lacks it, e.g. one written before it was saved).

    Args:
        checkpoint: the dict Lightning loaded (``on_load_checkpoint``'s argument).
        defaults: the state names to read, with the value each takes when absent.
        current: the module's ``run_settings()`` to check the checkpoint against (hyperparameters
            ``keys``), or None for no check. The entry points check before the Trainer starts
            (:func:`resolve_ckpt_path`); this covers programmatic resumes.

    Raises:
        ConfigurationError: the checkpoint was trained with other settings (names them).
    """
    differ = current is not None and settings_mismatch(checkpoint_settings(checkpoint, keys), current)
    if differ:
        raise ConfigurationError(f"cannot resume: the checkpoint was trained with {differ}")
    return {name: checkpoint.get(_STATE_PREFIX + name, default) for name, default in defaults.items()}

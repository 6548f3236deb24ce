"""Artifacts: the files PruneNet writes and reads (their names, output-folder checks, atomic writes,
policy files). Nothing here knows about models or selection.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prunenet.cli import signals_deferred
from prunenet.errors import DiskFullError, OutputExistsError, PolicyError
from prunenet.policy import DEFAULT_POLICY, RowPolicy

POLICY_FILE = "policy.pt"

PLAN_FILE = "prunenet.json"
#: The post-pruning evaluation written next to a pruned model (callbacks/evaluation.py).
EVAL_JSON, EVAL_MD, EVAL_PNG = "eval.json", "eval.md", "eval.png"


def resolve_output_path(output_dir: str | os.PathLike, what: str = "output path") -> Path:
    """The folder an output path really names. A symlink to a folder (or a path under one) is written
    through: the result replaces the folder the link points to, and the link itself stays.

    Raises:
        OutputExistsError: the path is (or goes through) a symlink loop, or a symlink whose target
            does not exist (a dangling link is never silently replaced by a folder).
    """
    out = Path(output_dir).expanduser()
    loop = f"{what} {str(out)!r} is a symlink loop; point the link at a folder or pass another path"
    try:
        real = out.resolve()
    except (RuntimeError, OSError):  # Python 3.10-3.12 raise RuntimeError for a loop
        raise OutputExistsError(loop) from None
    for part in (out, *out.parents):
        if not part.is_symlink():
            continue
        try:
            os.stat(part)
        except OSError as exc:  # Python 3.13 resolves a loop without raising: ask the kernel per link
            if exc.errno == errno.ELOOP:
                raise OutputExistsError(loop) from None
            where = "is" if part == out else f"goes through {str(part)!r},"
            raise OutputExistsError(f"{what} {str(out)!r} {where} a symlink to {os.readlink(part)!r}, which does "
                                    "not exist; create that folder or remove the link") from None
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
    if out.is_dir():  # moving the old folder aside rewrites its '..': it must be writable too
        check_writable(out, "output folder", shown)
    return out


def atomic_write_dir(output_dir: str | os.PathLike, overwrite: bool, write: Callable[[Path], None],
                     source: str | os.PathLike | None = None, size: int | None = None) -> Path:
    """Run ``write(tmp)`` into a temporary sibling folder, then rename it to ``output_dir``.

    A crash during ``write`` leaves no output (or the previous one intact). With
    ``overwrite`` the old folder is replaced only after the new one is complete.

    Args:
        size: about how many bytes ``write`` writes (said when they do not fit), if known.
    Raises:
        OutputExistsError: see :func:`check_output_dir`.
        DiskFullError: the disk, a quota or the file size limit (``ulimit -f``) stopped ``write``; the
            message names the folder, the space needed and the room there.
    """
    out = check_output_dir(output_dir, overwrite, source)
    made = missing_folders(out.parent) if not out.parent.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder
    try:
        try:
            write(tmp)
        except Exception as exc:
            _raise_if_full(exc, tmp, str(Path(output_dir).expanduser()), out.exists(), size)
            raise
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files; use the umask like any file
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        with signals_deferred():  # never between the two renames: the old folder aside and no new one
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
        if not out.exists():  # failed: the parents made for it go too
            remove_empty(made)
    return out


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and its parents that do not exist yet, innermost first: what creating it adds."""
    missing = [Path(folder)]
    while not missing[-1].parent.exists() and missing[-1].parent != missing[-1]:
        missing.append(missing[-1].parent)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first, as :func:`missing_folders` lists them) while they are empty:
    the first one that holds anything stays, and so do its parents."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _raise_if_full(exc: Exception, tmp: Path, shown: str, existed: bool, size: int | None) -> None:
    """Raise :class:`DiskFullError` (one line) if ``exc`` is a full disk, quota or file size limit."""
    from prunenet.diskspace import disk_errno, room, size_text

    code = disk_errno(exc)
    if code is None:
        return
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    needed = f"about {size_text(size)}" if size else f"more than the {size_text(written)} written"
    kept = "the previous output is intact" if existed else "nothing was written"
    raise DiskFullError(f"output folder {shown!r} does not fit ({os.strerror(code)} after {size_text(written)} "
                        f"written; it needs {needed}; {room(tmp.parent)}); {kept}: free some space or choose "
                        "another output folder") from exc


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


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (one space), atomically."""
    atomic_write_text(path, json.dumps(payload, indent=1, default=str) + "\n")


def save_policy(folder: Path, policy: RowPolicy, meta: dict[str, Any] | None = None) -> None:
    """Write ``policy.pt``: ``{"state_dict", "meta"}``; meta names the policy (``policy``, and its class_path
    and init_args under ``plug_points``) and its shape, so :func:`load_policy` rebuilds it."""
    from prunenet import plugins

    meta = {"policy": policy.name, **dict(meta or {})}
    meta.setdefault("plug_points", {})["policy"] = plugins.describe(policy)
    with open(folder / POLICY_FILE, "wb") as f:  # a file object: a full disk then keeps its errno (OSError)
        torch.save({"state_dict": policy.state_dict(), "meta": meta}, f)


def load_policy(path: str | os.PathLike) -> tuple[RowPolicy, dict[str, Any]]:
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
        from prunenet import plugins

        spec = (meta.get("plug_points") or {}).get("policy") or meta.get("policy", DEFAULT_POLICY)
        args = spec.get("init_args") if isinstance(spec, dict) else None
        from prunenet.calibration import legacy_batch

        if isinstance(args, dict) and (old := legacy_batch(args)) is not None:  # its text, as it was sampled
            spec = {**spec, "init_args": {**args, "batch": old}}
        policy = plugins.build("policy", spec, int(meta["intermediate_size"]), int(meta["hidden_size"]))
        policy.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:  # ConfigurationError is a ValueError
        # one line, but with the details (load_state_dict puts the size mismatches on later lines)
        raise PolicyError(f"{str(path)!r} is not a valid PruneNet policy: {' '.join(str(exc).split())}") from None
    return policy.eval(), meta

"""On-disk cache entries (ours): the one place where PruneNet's caches are read and written.

A cache must never change a result. An entry is a file with a header (a format number, the key it was
written for, the payload's length and SHA-256) followed by the payload, written atomically
(:func:`write_entry`); :func:`read_entry` returns the payload only if all four match, and anything
else (missing, truncated, damaged, foreign, written for another key) is a miss, recomputed by the
caller. A folder entry (a converted model) carries a manifest of its files' sizes and SHA-256
(:func:`write_manifest`, :func:`verify_manifest`) and is rebuilt into a fresh folder and swapped in
when it does not verify (:func:`build_folder`).

Optional caches (reference spectra, dense evaluation scores, the n-gram index) only save time: one
that cannot be read or written is skipped silently. Required ones (converted embedded models, the
assembled Gemma GGUF) check the cache root first (:func:`usable_cache_dir`) and stop with one line
saying what is wrong and how to choose another folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

from prunenet.cli import signals_deferred
from prunenet.errors import CacheError, OutputExistsError

#: Bumped whenever the entry layout (header or manifest) changes.
FORMAT = 1
MANIFEST = ".prunenet-manifest"
_MAGIC = b"prunenet-cache-entry\n"
_HEADER_MAX = 4096
_CHOOSE = "set PRUNENET_CACHE to a writable folder, e.g. PRUNENET_CACHE=/tmp/prunenet-cache"


def cache_dir() -> Path:
    """The cache root: ``$PRUNENET_CACHE`` or ``~/.cache/prunenet`` (not created here)."""
    return Path(os.environ.get("PRUNENET_CACHE", Path.home() / ".cache" / "prunenet")).expanduser()


def usable_cache_dir(purpose: str) -> Path:
    """The cache root, for a cache that is required (``purpose`` says what for, e.g. "converting the
    smollm2-135m asset"): checked to be a folder (or creatable) in which files can be created, by
    creating and removing one (:func:`prunenet.artifacts.check_writable`). Nothing is left behind.

    Returns:
        The cache root (:func:`cache_dir`).
    Raises:
        CacheError: one line naming the path, what is wrong, and how to choose another folder.
    """
    from prunenet.artifacts import check_writable

    root = cache_dir()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == root else f"is inside {str(existing)!r}, which is a file"
        raise CacheError(f"the cache folder {str(root)!r} {what}; {purpose} needs it: {_CHOOSE}")
    try:
        check_writable(root, "the cache folder")
    except OutputExistsError as exc:
        raise CacheError(f"{exc}; {purpose} needs it: {_CHOOSE}") from None
    return root


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes, key: str) -> None:
    header = json.dumps({"format": FORMAT, "key": key, "length": len(data), "sha256": _sha256(data)},
                        sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + header + b"\n" + data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_entry(path: str | os.PathLike, data: bytes, key: str) -> None:
    """Store ``data`` at ``path`` for ``key``, atomically (a temporary file renamed into place), with
    the header :func:`read_entry` checks. Returns None; a failure to write (``OSError``: no space, no
    permission, the cache root a file...) is skipped silently, as a cache only saves time."""
    try:
        _write(Path(path), data, key)
    except OSError:
        pass


def read_entry(path: str | os.PathLike, key: str) -> bytes | None:
    """The payload stored at ``path`` by :func:`write_entry` for ``key``.

    Returns:
        The payload, or None (a miss) unless the file exists and is readable, its header parses, and
        its format, key, payload length and SHA-256 all match. Never raises for a bad entry.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    end = raw.find(b"\n", len(_MAGIC), len(_MAGIC) + _HEADER_MAX)
    if not raw.startswith(_MAGIC) or end < 0:
        return None
    try:
        header = json.loads(raw[len(_MAGIC):end])
    except ValueError:
        return None
    data = raw[end + 1:]
    if not isinstance(header, dict) or [header.get(k) for k in ("format", "key", "length", "sha256")] != [
            FORMAT, key, len(data), _sha256(data)]:
        return None
    return data


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in 16 MiB pieces: hashlib.file_digest is Python 3.11+
        for piece in iter(lambda: f.read(16 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, key: str) -> None:
    """Write ``folder``'s manifest (each file's relative name, size and SHA-256) as an entry for
    ``key`` (:data:`MANIFEST`, inside the folder). Returns None.

    Raises:
        OSError: the manifest could not be written (unlike :func:`write_entry`: a folder entry
            without its manifest would never verify).
    """
    folder = Path(folder)
    listing = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _file_sha256(p)}
               for p in _files(folder)}
    _write(folder / MANIFEST, json.dumps(listing, sort_keys=True).encode(), key)


def verify_manifest(folder: str | os.PathLike, key: str) -> bool:
    """Whether ``folder`` holds exactly the files its manifest (written for ``key``) lists, with their
    sizes and SHA-256. Hashing is done at most once per process for one state of the folder (memo
    keyed on the path, the key and every file's size and mtime). Never raises.

    Returns:
        True if the folder verifies; False if it, or its manifest, is missing, unreadable, written for
        another key, or lists other files, sizes or checksums.
    """
    folder = Path(folder)
    try:
        stats = tuple((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in [*_files(folder), folder / MANIFEST])
    except OSError:
        return False
    return _verified(str(folder), key, stats)


@lru_cache(maxsize=32)
def _verified(folder: str, key: str, stats: tuple[tuple[str, int, int], ...]) -> bool:
    data = read_entry(Path(folder) / MANIFEST, key)
    try:
        listing = json.loads(data) if data is not None else None
        sizes = {name: size for name, size, _ in stats[:-1]}
        return (isinstance(listing, dict) and set(listing) == set(sizes)
                and all(listing[name] == {"size": sizes[name], "sha256": _file_sha256(Path(folder) / name)}
                        for name in sizes))
    except (OSError, ValueError):
        return False


def build_folder(target: str | os.PathLike, key: str, build: Callable[[Path], None], purpose: str) -> Path:
    """A folder entry: ``target`` as it is if it verifies for ``key`` (:func:`verify_manifest`), else
    ``build(tmp)`` into a fresh temporary sibling folder, its manifest written, swapped in atomically
    (an unverified ``target`` is moved aside and deleted). Processes building the same folder take
    turns (a file lock beside it): the first builds, the others then find it verified. Never uses a
    folder that does not verify.

    Returns:
        ``target``.
    Raises:
        CacheError: the cache root is unusable (:func:`usable_cache_dir`, with ``purpose``).
        Whatever ``build`` raises (nothing is left behind), or ``OSError`` writing the folder.
    """
    target = Path(target)
    if verify_manifest(target, key):
        return target
    usable_cache_dir(purpose)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        # One process builds (e.g. one DDP rank); the others wait here, then find the folder built: no
        # process ever swaps away a folder another one may be loading.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if verify_manifest(target, key):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        old = None
        try:
            build(tmp)
            write_manifest(tmp, key)
            with signals_deferred():  # never between the two renames
                if target.exists() or target.is_symlink():
                    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                    os.replace(target, old / "x")
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    return target

"""Full disks, file size limits and quotas (ours): which errors they are, and how much room there is.

Writers turn these into one line (``artifacts.atomic_write_dir`` with the space its output needs;
``cli.run_main`` for any other write), and the previous output stays as it was.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil

#: Errors of a full disk, a file size limit (``ulimit -f``) and a full quota.
DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def disk_errno(exc: BaseException | None) -> int | None:
    """The errno of a full disk, file size limit or quota met anywhere in ``exc``'s chain (its causes and
    contexts), also inside the text of a safetensors error (``I/O error: File too large (os error 27)``); else None."""
    return _find_errno(exc, DISK_ERRNOS)


def _find_errno(exc: BaseException | None, codes: tuple[int, ...]) -> int | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else _errno_in_text(str(exc))
        if code in codes:
            return code
        exc = exc.__cause__ or exc.__context__
    return None


def permission_errno(exc: BaseException | None) -> int | None:
    """The errno of a denied permission or a read-only filesystem in ``exc``'s chain, else None."""
    return _find_errno(exc, (errno.EACCES, errno.EPERM, errno.EROFS))


def _errno_in_text(text: str) -> int | None:
    """The errno a Rust I/O error quotes: ``(os error 27)`` or ``Os { code: 27, ... }``."""
    found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", text)
    return int(found.group(1) or found.group(2)) if found else None


def room(path: str | os.PathLike | None) -> str:
    """``"<free> free in '<folder>'"`` for the nearest existing folder of ``path`` (the working folder if
    None), plus ``", file size limit <n> (ulimit -f)"`` when a limit is set."""
    folder = os.path.abspath(path) if path else os.getcwd()
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    try:
        free = f"{size_text(shutil.disk_usage(folder).free)} free in {folder!r}"
    except OSError:
        free = f"free space in {folder!r} unknown"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return free + (f", file size limit {size_text(limit)} (ulimit -f)" if limit != resource.RLIM_INFINITY else "")


def size_text(n: float) -> str:
    """Bytes as ``"512 B"``, ``"1.9 MiB"``, ``"540.3 MiB"``, ``"12.6 GiB"``."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"

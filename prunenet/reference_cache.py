"""On-disk cache of the dense model's reference spectra (ours): computed once per model, read back by
a second or resumed fit instead of being recomputed.

One file per layer, ``cache_dir() / "spectra" / <key> / <layer>.pt`` (a float tensor of the
singular values, on CPU), written atomically, so ranks that compute different layers never write
the same file. The key joins the FFN fingerprint (``plan.ffn_fingerprint``: the SHA-256 of the
policy states, so any change of the weights is a new key), the reward's ``cache_key`` (reward,
spectra method and dtype) and the torch version (its LAPACK may round the last bits differently;
a fit must see the same numbers whether the cache was warm or not).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

#: Bumped whenever what a cached file holds changes.
FORMAT = 1


def cache_folder(fingerprint: str, reward_key: str) -> Path:
    """The folder holding one model's reference spectra for one reward configuration."""
    from prunenet.assets import cache_dir

    version = torch.__version__.replace("+", "-")
    return cache_dir() / "spectra" / f"v{FORMAT}-{fingerprint[:32]}-{reward_key}-torch{version}"


def load(fingerprint: str, reward_key: str, layer: int) -> torch.Tensor | None:
    """The cached reference spectrum of ``layer``, or None if absent or unreadable (then recomputed)."""
    path = cache_folder(fingerprint, reward_key) / f"{layer:05d}.pt"
    if not path.is_file():
        return None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged entry is only a miss: the spectrum is recomputed and rewritten
        return None
    return value if isinstance(value, torch.Tensor) and value.dim() == 1 else None


def save(fingerprint: str, reward_key: str, layer: int, spectrum: torch.Tensor) -> None:
    """Store ``spectrum`` (1-D) for ``layer``; a cache that cannot be written is skipped silently
    (it only saves time)."""
    folder = cache_folder(fingerprint, reward_key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".spectrum.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(spectrum.detach().cpu().clone(), f)
            os.replace(tmp, folder / f"{layer:05d}.pt")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass

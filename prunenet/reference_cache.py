"""On-disk cache of the dense model's reference spectra (ours): computed once per model, read back by
a second or resumed fit instead of being recomputed.

One entry per layer, ``cache_dir() / "spectra" / <key> / <layer>.entry`` (a :mod:`prunenet.cache`
entry whose payload is the ``torch.save`` bytes of the singular values, a float tensor on CPU),
written atomically, so ranks that compute different layers never write the same file. The key joins
the FFN fingerprint (``plan.ffn_fingerprint``: the SHA-256 of the policy states, so any change of the
weights is a new key), the reward's ``cache_key`` (reward, spectra method and dtype) and the torch
version (its LAPACK may round the last bits differently; a fit must see the same numbers whether the
cache was warm or not). An entry that is not exactly what was written for this key and layer, or not a
1-D floating tensor of the expected length, is a miss: recomputed and rewritten.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from prunenet.cache import cache_dir, read_entry, write_entry

#: Bumped whenever what a cached file holds changes (2: checked entries of :mod:`prunenet.cache`).
FORMAT = 2


def cache_folder(fingerprint: str, reward_key: str) -> Path:
    """The folder holding one model's reference spectra for one reward configuration."""
    version = torch.__version__.replace("+", "-")
    return cache_dir() / "spectra" / f"v{FORMAT}-{fingerprint[:32]}-{reward_key}-torch{version}"


def _entry(fingerprint: str, reward_key: str, layer: int) -> tuple[Path, str]:
    folder = cache_folder(fingerprint, reward_key)
    return folder / f"{layer:05d}.entry", f"{folder.name}/{layer}"


def load(fingerprint: str, reward_key: str, layer: int, n: int | None = None) -> torch.Tensor | None:
    """The cached reference spectrum of ``layer``.

    Returns:
        A 1-D floating tensor (of length ``n`` when given), or None for a miss (absent, unreadable,
        damaged, written for another key or layer, or of another shape or dtype): then recomputed.
    """
    data = read_entry(*_entry(fingerprint, reward_key, layer))
    if data is None:
        return None
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # checksummed, so only a payload that never was a tensor: a miss
        return None
    ok = (isinstance(value, torch.Tensor) and value.dim() == 1 and value.is_floating_point()
          and (n is None or value.numel() == n))
    return value if ok else None


def save(fingerprint: str, reward_key: str, layer: int, spectrum: torch.Tensor) -> None:
    """Store ``spectrum`` (1-D) for ``layer``. Returns None; a cache that cannot be written is
    skipped silently (it only saves time)."""
    buffer = io.BytesIO()
    torch.save(spectrum.detach().cpu().clone(), buffer)
    path, key = _entry(fingerprint, reward_key, layer)
    write_entry(path, buffer.getvalue(), key)

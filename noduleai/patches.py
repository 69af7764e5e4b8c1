"""Cubic patches cut from and pasted into (z, y, x) volumes, padding outside with a fill value."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _bounds(shape: Sequence[int], center: Sequence[float], size: int):
    start = [int(round(c)) - size // 2 for c in center]
    src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
    return src, dst


def extract_patch(volume: np.ndarray, center_zyx: Sequence[float], size: int, fill: float = 0.0) -> np.ndarray:
    """The ``size``^3 patch centred on ``center_zyx`` (voxel ``size // 2`` is the centre), float32."""
    patch = np.full((size,) * 3, fill, np.float32)
    src, dst = _bounds(volume.shape, center_zyx, size)
    if all(s.stop > s.start for s in src):
        patch[dst] = volume[src]
    return patch


def paste_patch_max(volume: np.ndarray, patch: np.ndarray, center_zyx: Sequence[float]) -> None:
    """Write ``patch`` into ``volume`` at ``center_zyx`` keeping the element-wise maximum (in place)."""
    src, dst = _bounds(volume.shape, center_zyx, patch.shape[0])
    if all(s.stop > s.start for s in src):
        volume[src] = np.maximum(volume[src], patch[dst])

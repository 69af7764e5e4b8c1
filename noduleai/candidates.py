"""Classical candidate generation shared by detection (proposals) and training (hard negatives).

Tissue denser than ``TISSUE_THRESHOLD`` inside the lung, opened to cut thin vessels; the Euclidean
distance to its surface is the radius of the largest sphere inscribed there: large at a nodule's centre,
small along vessels. Its local maxima are compact blobs: nodules, and the vessel crossings and thick
vessel segments a nodule detector confuses with them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TISSUE_THRESHOLD = 0.22  # normalised ~ -690 HU with the default window: solid and ground-glass tissue


def inscribed_radius(volume: np.ndarray, mask: np.ndarray, spacing) -> np.ndarray:
    """Radius (mm) of the largest sphere of lung tissue inscribed at each voxel (0 outside tissue)."""
    solid = ndimage.binary_opening((volume > TISSUE_THRESHOLD) & mask,
                                   structure=ndimage.generate_binary_structure(3, 1))
    return ndimage.distance_transform_edt(solid, sampling=spacing).astype(np.float32)


def blob_centres(radius: np.ndarray, min_radius_mm: float = 1.5, limit: int = 200) -> np.ndarray:
    """Voxel indices (z, y, x) of local maxima of ``radius`` >= ``min_radius_mm``, thickest first."""
    peaks = (radius == ndimage.maximum_filter(radius, size=5)) & (radius >= min_radius_mm)
    points = np.argwhere(peaks)
    return points[np.argsort(-radius[peaks], kind="stable")][:limit]

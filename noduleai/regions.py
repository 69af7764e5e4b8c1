"""Candidate regions as a label map on the CT grid: the voxels of ``<case>_regions.nrrd`` and the DICOM SEG.

Kept apart from ``dicom_export`` so that writing results never needs highdicom (Slicer 5.10 does not
ship it; only the DICOM set does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from noduleai.geometry import lps_to_array_index


def candidate_regions(ct: sitk.Image, candidates: Sequence[Any]) -> sitk.Image:
    """Label map on the CT grid: voxels within half the estimated diameter of a candidate's centre.

    The label is the candidate's rank; where spheres overlap the better-ranked candidate keeps the
    voxel, and every candidate keeps at least its centre voxel, so each label is present.
    """
    size = ct.GetSize()
    labels = np.zeros(size[::-1], np.uint16)
    spacing = np.asarray(ct.GetSpacing())[::-1]  # (z, y, x) mm per voxel
    # Direction is orthonormal on images this engine reads, so distances follow from index offsets.
    for c in sorted(candidates, key=lambda c: c.rank, reverse=True):  # best rank painted last
        centre = np.asarray(lps_to_array_index(ct, c.position_lps))
        radius = max(float(c.diameter_mm) / 2, 0.5 * float(spacing.max()))
        lo = np.maximum(np.floor(centre - radius / spacing), 0).astype(int)
        hi = np.minimum(np.ceil(centre + radius / spacing) + 1, labels.shape).astype(int)
        if np.any(hi <= lo):
            continue
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        dist2 = sum(((g - c0) * s) ** 2 for g, c0, s in zip(grids, centre, spacing))
        box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        box[dist2 <= radius**2] = c.rank
    for c in candidates:  # a centre covered by a better candidate's sphere still marks its own label
        z, y, x = np.clip(np.round(lps_to_array_index(ct, c.position_lps)).astype(int), 0, np.array(labels.shape) - 1)
        if not np.any(labels == c.rank):
            labels[z, y, x] = c.rank
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    return image

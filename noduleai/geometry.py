"""Geometry: the one place that converts between array indices, LPS (DICOM/ITK) and RAS (Slicer).

Arrays from SimpleITK are indexed (z, y, x); SimpleITK indices and physical points are (x, y, z).
Physical points in this package are LPS millimetres unless a name says ``ras``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

_LPS_RAS_FLIP = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(point_lps: Sequence[float]) -> tuple[float, float, float]:
    """Convert a physical point from LPS to RAS (negate x and y)."""
    x, y, z = np.asarray(point_lps, dtype=float) * _LPS_RAS_FLIP
    return float(x), float(y), float(z)


def ras_to_lps(point_ras: Sequence[float]) -> tuple[float, float, float]:
    """Convert a physical point from RAS to LPS (the flip is its own inverse)."""
    return lps_to_ras(point_ras)


def array_index_to_lps(image: sitk.Image, zyx: Sequence[float]) -> tuple[float, float, float]:
    """Physical LPS point of a (possibly fractional) array index (z, y, x) of ``image``."""
    z, y, x = (float(v) for v in zyx)
    return tuple(image.TransformContinuousIndexToPhysicalPoint((x, y, z)))


def lps_to_array_index(image: sitk.Image, point_lps: Sequence[float]) -> tuple[float, float, float]:
    """Fractional array index (z, y, x) of a physical LPS point in ``image``."""
    x, y, z = image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point_lps))
    return z, y, x


def peak_lps(image: sitk.Image) -> tuple[float, float, float] | None:
    """LPS point of ``image``'s hottest voxel (the first one on ties), or None when nothing is above 0."""
    array = sitk.GetArrayViewFromImage(image)
    if array.size == 0 or not array.max() > 0:
        return None
    return array_index_to_lps(image, np.unravel_index(int(np.argmax(array)), array.shape))


def image_from_array(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    """A SimpleITK image holding ``array`` (z, y, x) with the geometry of ``like``."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def resample_like(image: sitk.Image, reference: sitk.Image, linear: bool = True,
                  default: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto the grid (size, spacing, origin, direction) of ``reference``."""
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tol``)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix that Slicer uses for a volume with the geometry of ``image``."""
    flip = np.diag(_LPS_RAS_FLIP)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = flip @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = flip @ np.asarray(image.GetOrigin(), float)
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) in LPS, as SimpleITK wants them, from a 4x4 IJK-to-RAS matrix."""
    flip = np.diag(_LPS_RAS_FLIP)
    linear = flip @ np.asarray(matrix, float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = flip @ np.asarray(matrix, float)[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())

"""Real nodule pixels pasted into real lungs (the v2 insertion data).

A real LIDC nodule crop (:mod:`noduleai.crops`) is denoised lightly, randomly flipped and turned
in-plane, scaled (up to masses of 80 mm), blurred to the host's slice profile and resampled onto the
host grid. Only its *contrast over the smoothed host* is added: ``host + window * max(lesion -
smooth(host), 0)``. The host's own voxels, and so its own (spatially correlated) noise, stay under the
lesion; a vessel or the chest wall denser than the lesion keeps its value. v1 replaced lesion interiors
by ``target + white noise`` at an estimated noise level, which left them smoother than the lung
around them: a texture a network can learn instead of density.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from noduleai.crops import NoduleCrop
from noduleai.insertion import PLACEMENTS, Host, InsertedNodule, placement_ok
from noduleai.lidc import TEXTURE_NAMES

PASTE_VERSION = 2  # part of every cohort's key: raise it whenever pasting changes what it writes
DENOISE_MM = 0.7  # removes most of the source scanner's noise, keeps spiculation and margins (> 1 mm)
EDGE_MM = 1.5  # the mask grown by this much: the readers draw on the boundary, partial volume lies beyond
HOST_SMOOTH_MM = 1.5  # the host level the lesion's contrast is measured against (noise removed)
BACKGROUND_HU = -850.0  # lung parenchyma behind the lesion in the crop's padding
MIN_INSIDE_LUNG = 0.9  # share of a nodule's weight inside the host's lung region
MIN_INSIDE_LUNG_MASS = 0.6  # masses (> MASS_MM) may invade the chest wall or the mediastinum
MASS_MM = 30.0


@dataclass
class PastedLesion:
    """A lesion on a host sub-grid: HU (``hu``), support in [0, 1] (``weight``: the readers' mask grown
    by the partial-volume edge), the readers' mask itself (``core``, as a fraction), index offset ``lo``."""

    hu: np.ndarray
    weight: np.ndarray
    core: np.ndarray
    lo: np.ndarray  # (z, y, x) of the sub-grid's first voxel in the host array


def _oriented_crop(hu: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flips along each axis and an in-plane transpose (LIDC pixels are square)."""
    for axis in range(3):
        if rng.random() < 0.5:
            hu, mask = np.flip(hu, axis), np.flip(mask, axis)
    if rng.random() < 0.5:
        hu, mask = hu.transpose(0, 2, 1), mask.transpose(0, 2, 1)
    return np.ascontiguousarray(hu), np.ascontiguousarray(mask)


def lesion_on_host(crop_hu: sitk.Image, crop_mask: sitk.Image, host: sitk.Image, center_lps, scale: float,
                   rng: np.random.Generator) -> PastedLesion:
    """The crop as it would look in ``host`` with its centre of mass at ``center_lps``."""
    spacing_zyx = np.asarray(crop_hu.GetSpacing()[::-1]) * scale
    hu, mask = _oriented_crop(sitk.GetArrayFromImage(crop_hu), sitk.GetArrayFromImage(crop_mask) > 0, rng)
    # Crops end at the mask in z: pad so that the blur below has room to fade out.
    pad = np.ceil(4 * EDGE_MM / spacing_zyx).astype(int) + 1
    hu = np.pad(hu, [(p, p) for p in pad], mode="edge")
    mask = np.pad(mask, [(p, p) for p in pad])
    grown = ndimage.binary_dilation(mask, iterations=1) | (ndimage.distance_transform_edt(
        ~mask, sampling=spacing_zyx) <= EDGE_MM)
    weight = ndimage.gaussian_filter(grown.astype(np.float32), EDGE_MM / 2 / spacing_zyx)
    hu = ndimage.gaussian_filter(hu, DENOISE_MM / spacing_zyx)
    hu = weight * hu + (1 - weight) * BACKGROUND_HU
    # Slice profile: a host with thicker slices than the (scaled) crop sees the lesion blurred along z.
    host_spacing_zyx = np.asarray(host.GetSpacing()[::-1])
    extra = np.sqrt(np.maximum(host_spacing_zyx ** 2 - spacing_zyx ** 2, 0.0)) / 2.355
    core = mask.astype(np.float32)
    if extra.any():
        hu = ndimage.gaussian_filter(hu, extra / spacing_zyx)
        weight = ndimage.gaussian_filter(weight, extra / spacing_zyx)
        core = ndimage.gaussian_filter(core, extra / spacing_zyx)
    direction = np.asarray(host.GetDirection()).reshape(3, 3)
    com = np.asarray(ndimage.center_of_mass(mask))[::-1] * spacing_zyx[::-1]
    origin = tuple(np.asarray(center_lps) - direction @ com)
    half = np.ceil(np.asarray(hu.shape) * spacing_zyx / host_spacing_zyx / 2).astype(int) + 1
    centre = np.round(np.asarray(host.TransformPhysicalPointToContinuousIndex(tuple(center_lps)))[::-1]).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, np.asarray(host.GetSize()[::-1]))
    grid = sitk.Image([int(v) for v in (hi - lo)[::-1]], sitk.sitkFloat32)
    grid.SetSpacing(host.GetSpacing())
    grid.SetDirection(host.GetDirection())
    grid.SetOrigin(host.TransformIndexToPhysicalPoint([int(v) for v in lo[::-1]]))
    out = []
    for array, default in ((hu, BACKGROUND_HU), (weight, 0.0), (core, 0.0)):
        source = sitk.GetImageFromArray(array.astype(np.float32))
        source.SetSpacing(tuple(float(v) for v in spacing_zyx[::-1]))
        source.SetDirection(host.GetDirection())
        source.SetOrigin(origin)
        out.append(sitk.GetArrayFromImage(sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, default)))
    return PastedLesion(out[0], np.clip(out[1], 0.0, 1.0), np.clip(out[2], 0.0, 1.0), lo)


def paste(host: Host, lesion: PastedLesion, smooth_host: np.ndarray) -> np.ndarray:
    """Add the lesion's contrast over the smoothed host into ``host.hu`` (in place); returns the
    added HU on the lesion's sub-grid."""
    box = tuple(slice(a, a + n) for a, n in zip(lesion.lo, lesion.hu.shape))
    window = np.clip(4 * lesion.weight, 0.0, 1.0)  # full contrast from a quarter of the support on
    added = window * np.maximum(lesion.hu - smooth_host[box], 0.0)
    host.hu[box] += added
    return added


def smoothed(host: Host) -> np.ndarray:
    """The host without its noise: the level a lesion's contrast is measured against."""
    return ndimage.gaussian_filter(host.hu, HOST_SMOOTH_MM / np.asarray(host.image.GetSpacing()[::-1]))


def insert_real_nodules(host: Host, crops: list[tuple[NoduleCrop, sitk.Image, sitk.Image, float]],
                        rng: np.random.Generator, labels: np.ndarray,
                        avoid_lps: list[tuple[tuple[float, float, float], float]] | None = None,
                        label_offset: int = 0, tries: int = 4000) -> list[InsertedNodule]:
    """Paste ``crops`` ((crop, HU, mask, target diameter in mm)) into ``host.hu`` in place.

    ``labels`` receives each lesion's number (``label_offset`` + 1, + 2, ...) on its readers' mask
    (never over an existing label); its diameter is the mask's volume-equivalent one. Lesions keep clear of
    each other and of ``avoid_lps`` (centre, radius) by 10 mm; a lesion that finds no place is left out.
    """
    inserted: list[InsertedNodule] = []
    avoid = list(avoid_lps or [])
    smooth_host = smoothed(host)
    spacing = np.asarray(host.image.GetSpacing()[::-1])
    lung_points = np.argwhere(host.lung[::2, ::2, ::2]) * 2
    for crop, hu, mask, diameter in crops:
        scale = diameter / crop.diameter_mm
        radius = diameter / 2
        mass = diameter > MASS_MM
        placement = "juxta_pleural" if mass else str(rng.choice(list(PLACEMENTS), p=list(PLACEMENTS.values())))
        for _ in range(tries):
            zyx = tuple(lung_points[rng.integers(len(lung_points))])
            if mass:  # a mass fills much of a lung: centre in the lung, near its boundary
                if not 0.3 * radius <= float(host.wall_mm[zyx]) <= radius + 1.5:
                    continue
            elif not placement_ok(host, zyx, radius, placement):
                continue
            lps = np.asarray(host.image.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]]))
            if any(np.linalg.norm(lps - np.asarray(c)) < r + radius + 10.0 for c, r in avoid):
                continue
            lesion = lesion_on_host(hu, mask, host.image, lps, scale, rng)
            box = tuple(slice(a, a + n) for a, n in zip(lesion.lo, lesion.hu.shape))
            total = float(lesion.weight.sum())
            inside = float((lesion.weight * host.lung[box]).sum())
            if total <= 0 or inside < (MIN_INSIDE_LUNG_MASS if mass else MIN_INSIDE_LUNG) * total:
                continue
            # The label is the readers' mask (at half its partial volume, or its densest voxel for a
            # lesion thinner than a slice): the grown support would inflate small nodules by ~3 mm.
            if float(lesion.core.max()) < 0.1:
                continue
            core = lesion.core >= min(0.5, 0.99 * float(lesion.core.max()))
            if np.any(labels[box][core]):
                continue
            paste(host, lesion, smooth_host)
            label = label_offset + len(inserted) + 1
            labels[box][core] = label
            centre = np.asarray(ndimage.center_of_mass(lesion.core)) + lesion.lo
            centre_lps = host.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre[::-1]])
            volume = float(lesion.core.sum()) * float(np.prod(spacing))
            inserted.append(InsertedNodule(
                tuple(float(v) for v in centre_lps), float(2 * (3 * volume / (4 * np.pi)) ** (1 / 3)),
                TEXTURE_NAMES[crop.texture], crop.texture, placement, crop.patient_id, crop.nodule_id, label))
            avoid.append((inserted[-1].center_lps, radius))
            break
    return inserted


def target_diameters(crops: list[NoduleCrop], rng: np.random.Generator, mass_fraction: float = 0.1,
                     mass_range_mm: tuple[float, float] = (30.0, 80.0)) -> list[float]:
    """Diameters to paste ``crops`` at: their own size (x0.85-1.2), or for ``mass_fraction`` of the
    larger crops (>= 10 mm) a mass of 30-80 mm (real texture scaled up; LIDC crops stop at ~32 mm)."""
    out = []
    for crop in crops:
        if crop.diameter_mm >= 10.0 and rng.random() < mass_fraction:
            out.append(float(rng.uniform(*mass_range_mm)))
        else:
            out.append(float(max(3.0, crop.diameter_mm * rng.uniform(0.85, 1.2))))
    return out

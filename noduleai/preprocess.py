"""The shared preprocessing used by training and detection alike.

HU clipping, a classical lung region, crop to the lungs with a margin, resampling (SimpleITK) either to
a target spacing or to fit the model's input size, and normalisation to [0, 1]. The output keeps its
geometry, so any model-space voxel maps back to physical coordinates of the original CT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from noduleai.geometry import array_index_to_lps, resample_like

AIR_HU = -1000.0
# How the lung region is drawn (PreprocessConfig.lung_region): "closing" is the v1 mask, kept bit for bit
# for checkpoints written before the field existed; "envelope" also holds what indents the lungs.
LUNG_REGIONS = ("closing", "envelope")
ENVELOPE_WORK_MM = 4.0  # grid of the envelope's rolling ball: 8x fewer voxels than the 2 mm mask grid
# Tubes up to 24 mm across (trachea, main bronchi) are not lung body for the envelope; see _lung_bodies.
AIRWAY_RADIUS_MM = 12.0


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; stored in every checkpoint so detection matches training.

    Sizes and spacings are (x, y, z) as in SimpleITK. Exactly one of ``spacing_mm`` (resample to this
    spacing, size follows the lung crop) and ``output_size`` (fit the crop into this grid with a
    uniform spacing that keeps the aspect ratio) is set.
    """

    hu_window: tuple[float, float] = (-1000.0, 400.0)
    spacing_mm: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    output_size: tuple[int, int, int] | None = None
    margin_mm: float = 10.0
    lung_threshold_hu: float = -320.0
    mask_spacing_mm: float = 2.0
    closing_mm: float = 10.0  # "closing" region only; see lung_mask for what it really closes
    lung_region: str = "envelope"  # one of LUNG_REGIONS; see lung_mask
    envelope_radius_mm: float = 55.0  # "envelope" only: the rolling ball; see lung_mask

    def __post_init__(self) -> None:
        if (self.spacing_mm is None) == (self.output_size is None):
            raise ValueError("PreprocessConfig needs exactly one of spacing_mm and output_size")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"hu_window {self.hu_window} must be increasing")
        if self.lung_region not in LUNG_REGIONS:
            raise ValueError(f"lung_region {self.lung_region!r} must be one of {LUNG_REGIONS}")
        if not self.envelope_radius_mm > 0:
            raise ValueError(f"envelope_radius_mm {self.envelope_radius_mm} must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown preprocessing parameters: {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        # A checkpoint written before lung_region existed was trained and evaluated on the v1 mask: it
        # keeps that mask (and so its recorded results) instead of taking today's default.
        values.setdefault("lung_region", "closing")
        return cls(**values)


SCAN_PREPROCESS = PreprocessConfig(spacing_mm=None, output_size=(128, 128, 128))
PATCH_PREPROCESS = PreprocessConfig(spacing_mm=(1.0, 1.0, 1.0))
# What lung_mask draws when given no config: the v1 mask, the lungs' air and what it encloses. Lesion
# insertion places lesions with it; the envelope's filled dents (hilum, wall, heart border) are tissue,
# and a ground-glass lesion placed there came out at +350 HU (Testing/test_insertion.py).
V1_LUNG_MASK = PreprocessConfig(lung_region="closing")


@dataclass
class PreprocessedCT:
    """A preprocessed volume with the geometry that maps it back to the original CT."""

    image: sitk.Image  # float32 in [0, 1], model-space grid in the original CT's physical space
    lung_mask: sitk.Image  # uint8 on the same grid
    lung_found: bool
    config: PreprocessConfig

    @property
    def array(self) -> np.ndarray:
        """Normalised intensities, indexed (z, y, x)."""
        return sitk.GetArrayFromImage(self.image)

    @property
    def mask_array(self) -> np.ndarray:
        return sitk.GetArrayFromImage(self.lung_mask).astype(bool)

    def index_to_lps(self, zyx) -> tuple[float, float, float]:
        return array_index_to_lps(self.image, zyx)


def lung_mask(ct: sitk.Image, config: PreprocessConfig = V1_LUNG_MASK) -> sitk.Image:
    """The lung region on a coarse isotropic grid (uint8, same direction as ``ct``); preprocessing passes
    its config, callers without one get the v1 mask.

    Both regions start from air below ``lung_threshold_hu``, minus air connected to the in-plane border
    (outside the body), keeping components of at least a tenth of the largest.

    ``lung_region="closing"`` (v1): then closed with a ball of ``round(closing_mm / mask_spacing_mm / 2)``
    voxels (4 mm at the defaults, not the 10 mm the name suggests) and 3-D hole-filled. Vessels and
    nodules surrounded by lung lie inside; most of a juxta-pleural nodule over ~8 mm, or a mass on the
    chest wall or mediastinum, does not. Kept unchanged for checkpoints trained on it.

    ``lung_region="envelope"``: each lung apart (left and right split where they touch, the trachea and
    main bronchi taking no part, so nothing between the lungs is bridged; their lumen stays in the
    region as in v1) is closed with a rolling ball of ``envelope_radius_mm`` on a 4 mm grid; the dents
    this fills, grown by one mask voxel and kept inside the body, are added to the mask, then holes are
    filled. ``closing_mm`` plays no part. What dents a lung lies inside: juxta-pleural and hilar
    nodules, masses against the wall or the mediastinum (phantom at 55 mm: a 25 mm juxta-pleural sphere
    99 %, a 70 mm mass on the mediastinum 98 %, an 80 mm one 96 %). Concavities wider than the ball (the
    liver dome, most of the heart) stay out, and so does a lesion's part beyond the lung's outline (in
    the wall or the mediastinum). Limits: a mass whose mouth onto the mediastinum is nearly as wide as
    itself is only partly inside (~87 % with a quarter of its diameter beyond the outline), and where a
    lung wraps the mediastinum (heart border, hilum, great vessels) a band of it is inside.
    LIDC-IDRI-0001: 1.11x the v1 mask's volume, ~1 s on 2 cores like the v1 mask (resampling included).
    """
    coarse = _coarse_grid(ct, config.mask_spacing_mm)
    small = resample_like(ct, coarse, linear=True, default=AIR_HU)
    air = sitk.GetArrayViewFromImage(small) < config.lung_threshold_hu
    # Clear air touching the border slice by slice: in 3-D, outside air can leak into the lungs
    # through the trachea or a coarse body wall (seen on LIDC-IDRI-0001 at 2 mm).
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    slices, _ = ndimage.label(air, structure=in_plane)
    border = np.unique(np.concatenate([slices[:, 0, :].ravel(), slices[:, -1, :].ravel(),
                                       slices[:, :, 0].ravel(), slices[:, :, -1].ravel()]))
    outside = np.isin(slices, border)
    inside = air & ~outside
    labels, _ = ndimage.label(inside)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    keep = counts >= max(1, 0.1 * counts.max())
    keep[0] = False
    if config.lung_region == "envelope":
        mask = sitk.GetImageFromArray(_lung_envelope(keep[labels], air & outside, config).astype(np.uint8))
        mask.CopyInformation(small)
        return sitk.BinaryFillhole(mask)
    mask = sitk.GetImageFromArray(keep[labels].astype(np.uint8))
    mask.CopyInformation(small)
    radius = max(1, int(round(config.closing_mm / config.mask_spacing_mm / 2)))
    mask = sitk.BinaryMorphologicalClosing(mask, [radius] * 3)
    return sitk.BinaryFillhole(mask)


def _lung_envelope(lungs: np.ndarray, outside: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The lungs plus what indents each of them (bool, same grid as ``lungs``; holes not yet filled)."""
    factor = max(1, int(round(ENVELOPE_WORK_MM / config.mask_spacing_mm)))
    # A lesion's dent is tens of millimetres: a 4 mm grid draws it well and keeps the distance maps
    # cheap (a 2 mm one took ~5 s on LIDC-IDRI-0001). A work voxel is lung if most of it is.
    work = _block_mean(lungs, factor) >= 0.5
    work_mm = factor * config.mask_spacing_mm
    sides = _lung_bodies(work, AIRWAY_RADIUS_MM / work_mm)
    filled = np.zeros_like(work)
    for side in range(1, int(sides.max()) + 1):
        filled |= _closing(sides == side, config.envelope_radius_mm / work_mm)
    # Only the dents go back to the fine grid: where the closing adds nothing the region is the fine
    # mask itself, not its 4 mm staircase.
    filled &= ~work
    filled = np.repeat(np.repeat(np.repeat(filled, factor, 0), factor, 1), factor, 2)
    filled = filled[:lungs.shape[0], :lungs.shape[1], :lungs.shape[2]]
    # One more mask voxel around each filled dent: at the -320 HU threshold the lung outline lies about
    # a voxel inside the pleura, and without it a juxta-pleural lesion's contact with the wall stays out
    # (phantom, 25 mm juxta-pleural sphere: 85 % inside without, 99 % with).
    filled = ndimage.binary_dilation(filled)
    # Air outside the body stays out even where a coarse work voxel straddles the skin.
    return lungs | (filled & ~outside)


def _block_mean(mask: np.ndarray, factor: int) -> np.ndarray:
    """The share of ``mask`` in each block of ``factor``^3 voxels (edges padded with background)."""
    if factor == 1:
        return mask.astype(np.float32)
    padded = np.pad(mask, [(0, -n % factor) for n in mask.shape]).astype(np.float32)
    z, y, x = (n // factor for n in padded.shape)
    return padded.reshape(z, factor, y, factor, x, factor).mean(axis=(1, 3, 5))


def _lung_bodies(mask: np.ndarray, airway_radius: float) -> np.ndarray:
    """``mask`` split into the left and right lung, labelled 1 and 2 (all 1 when only one lung is found),
    without what joins them (0).

    The lung bodies are the opening of ``mask`` with a ball of ``airway_radius`` voxels. Where they still
    touch (anterior junction), erode further until two comparable parts appear; each body voxel goes to
    the nearer part. What the opening removed goes back to its lung when it touches only that lung (thin
    tips, the lips of a dent). What touches both, the trachea and main bronchi above all, goes back only
    within half that radius of a body: whole, a lung's closing would fill the mediastinum between that
    airway and the lung (LIDC-IDRI-0001: a quarter of the tissue around the trachea; phantom: 60 %).
    """
    depth = ndimage.distance_transform_edt(mask)
    core = depth > airway_radius
    if not core.any():
        return mask.astype(np.uint8)
    bodies = mask & (ndimage.distance_transform_edt(~core) <= airway_radius)
    sides = bodies.astype(np.uint8)
    for level in np.arange(airway_radius, depth.max(), 1.0):
        parts, n = ndimage.label(depth > level)
        if n < 2:
            continue
        counts = np.bincount(parts.ravel())
        counts[0] = 0
        first, second = np.argsort(counts)[::-1][:2]
        if counts[second] < 0.2 * counts[first]:  # a lung's own tip breaking off, not the other lung
            continue
        seeds = np.where(parts == first, 1, np.where(parts == second, 2, 0)).astype(np.uint8)
        _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        sides = np.where(bodies, seeds[tuple(nearest)], 0).astype(np.uint8)
        break
    rest, n = ndimage.label(mask & ~bodies)
    if n:
        touches = np.zeros((n + 1, 3), bool)
        for side in (1, 2):
            near = ndimage.binary_dilation(sides == side) & (rest > 0)
            touches[np.unique(rest[near]), side] = True
        owner = np.where(touches[:, 1] & ~touches[:, 2], 1, np.where(touches[:, 2] & ~touches[:, 1], 2, 0))
        owner[0] = 0
        distance, nearest = ndimage.distance_transform_edt(sides == 0, return_indices=True)
        close = np.where(distance <= airway_radius / 2, sides[tuple(nearest)], 0)
        sides = np.where(rest > 0, np.where(owner[rest] > 0, owner[rest], close), sides).astype(np.uint8)
    return sides


def _closing(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing with a ball of ``radius`` voxels, by two Euclidean distance maps over the mask's box."""
    if not mask.any():
        return mask
    pad = int(np.ceil(radius)) + 1
    nz = np.nonzero(mask)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    box = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], pad)
    grown = ndimage.distance_transform_edt(~box) <= radius
    closed_box = ndimage.distance_transform_edt(grown) > radius
    closed = np.zeros_like(mask)
    # The closing lies inside the convex hull of the mask, hence inside its box: the padding drops off.
    closed[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = closed_box[pad:-pad, pad:-pad, pad:-pad]
    return closed


def _coarse_grid(ct: sitk.Image, spacing: float) -> sitk.Image:
    extent = np.asarray(ct.GetSize()) * np.asarray(ct.GetSpacing())
    size = [max(1, int(np.ceil(e / spacing))) for e in extent]
    origin = np.asarray(ct.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    origin = origin + np.asarray(ct.GetDirection()).reshape(3, 3) @ np.full(3, spacing / 2)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(tuple(origin))
    grid.SetDirection(ct.GetDirection())
    return grid


def _crop_grid(mask: sitk.Image, ct: sitk.Image, config: PreprocessConfig) -> tuple[sitk.Image, bool]:
    """The output grid: the lung bounding box plus margin, at the configured spacing or size."""
    array = sitk.GetArrayViewFromImage(mask)
    cs = mask.GetSpacing()[0]
    found = bool(array.any())
    if found:
        zyx = np.nonzero(array)
        lo = np.array([zyx[2].min(), zyx[1].min(), zyx[0].min()], float) - 0.5  # x, y, z in coarse index
        hi = np.array([zyx[2].max(), zyx[1].max(), zyx[0].max()], float) + 0.5
    else:  # no lungs found: keep the whole field of view
        lo = np.full(3, -0.5)
        hi = np.asarray(mask.GetSize(), float) - 0.5
    lo_mm = lo * cs - config.margin_mm
    extent = (hi - lo) * cs + 2 * config.margin_mm
    if config.spacing_mm is not None:
        spacing = np.asarray(config.spacing_mm, float)
        size = np.maximum(1, np.ceil(extent / spacing)).astype(int)
    else:
        size = np.asarray(config.output_size, int)
        spacing = np.full(3, float(np.max(extent / size)))  # uniform: keep the aspect ratio
        lo_mm = lo_mm - (size * spacing - extent) / 2  # centre the crop in the grid
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    corner = np.asarray(mask.GetOrigin()) + direction @ lo_mm
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(spacing))
    grid.SetOrigin(tuple(corner + direction @ (spacing / 2)))
    grid.SetDirection(ct.GetDirection())
    return grid, found


def normalise_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``window`` and scale to [0, 1] (float32)."""
    low, high = window
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def same_lung_region(a: PreprocessConfig, b: PreprocessConfig) -> bool:
    """Whether ``a`` and ``b`` find the same lung region on a CT (they may differ in their output grid)."""
    grid = {"spacing_mm": b.spacing_mm, "output_size": b.output_size, "margin_mm": b.margin_mm,
            "hu_window": b.hu_window}
    return dataclasses.replace(a, **grid) == b


def preprocess_ct(ct: sitk.Image, config: PreprocessConfig, mask: sitk.Image | None = None) -> PreprocessedCT:
    """Run the shared preprocessing on a CT in HU (as returned by :func:`noduleai.io.read_ct`).

    ``mask``: :func:`lung_mask` of this very CT cast to float32 (as here) under a config with
    :func:`same_lung_region`, when the caller already has it (a detector that preprocesses one CT on two
    grids computes the region once)."""
    ct = sitk.Cast(ct, sitk.sitkFloat32)
    mask = lung_mask(ct, config) if mask is None else mask
    grid, found = _crop_grid(mask, ct, config)
    hu = resample_like(ct, grid, linear=True, default=AIR_HU)
    image = sitk.GetImageFromArray(normalise_hu(sitk.GetArrayViewFromImage(hu), config.hu_window))
    image.CopyInformation(grid)
    return PreprocessedCT(image=image, lung_mask=resample_like(mask, grid, linear=False),
                          lung_found=found, config=config)

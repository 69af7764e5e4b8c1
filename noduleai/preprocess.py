"""The shared preprocessing used by training and detection alike.

HU clipping, a classical lung mask, crop to the lungs with a margin, resampling (SimpleITK) either to
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
    closing_mm: float = 10.0

    def __post_init__(self) -> None:
        if (self.spacing_mm is None) == (self.output_size is None):
            raise ValueError("PreprocessConfig needs exactly one of spacing_mm and output_size")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"hu_window {self.hu_window} must be increasing")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown preprocessing parameters: {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


SCAN_PREPROCESS = PreprocessConfig(spacing_mm=None, output_size=(128, 128, 128))
PATCH_PREPROCESS = PreprocessConfig(spacing_mm=(1.0, 1.0, 1.0))


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


def lung_mask(ct: sitk.Image, config: PreprocessConfig = PATCH_PREPROCESS) -> sitk.Image:
    """A classical lung mask on a coarse isotropic grid (uint8, same direction as ``ct``).

    Air below ``lung_threshold_hu``, minus components touching the in-plane border (air outside the
    body), keeping components of at least a tenth of the largest; then closed and hole-filled so that
    vessels and nodules, including juxta-pleural ones, lie inside.
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
    inside = air & ~np.isin(slices, border)
    labels, _ = ndimage.label(inside)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    keep = counts >= max(1, 0.1 * counts.max())
    keep[0] = False
    mask = sitk.GetImageFromArray(keep[labels].astype(np.uint8))
    mask.CopyInformation(small)
    radius = max(1, int(round(config.closing_mm / config.mask_spacing_mm / 2)))
    mask = sitk.BinaryMorphologicalClosing(mask, [radius] * 3)
    return sitk.BinaryFillhole(mask)


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


def preprocess_ct(ct: sitk.Image, config: PreprocessConfig) -> PreprocessedCT:
    """Run the shared preprocessing on a CT in HU (as returned by :func:`noduleai.io.read_ct`)."""
    ct = sitk.Cast(ct, sitk.sitkFloat32)
    mask = lung_mask(ct, config)
    grid, found = _crop_grid(mask, ct, config)
    hu = resample_like(ct, grid, linear=True, default=AIR_HU)
    image = sitk.GetImageFromArray(normalise_hu(sitk.GetArrayViewFromImage(hu), config.hu_window))
    image.CopyInformation(grid)
    return PreprocessedCT(image=image, lung_mask=resample_like(mask, grid, linear=False),
                          lung_found=found, config=config)

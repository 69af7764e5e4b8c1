"""Real LIDC-IDRI nodule crops (``lidc-nodule-crops/`` in the shared data): pixels in HU with a mask each.

990 crops from 549 LIDC patients, with the readers' majority ratings. They are the lesions of the
v2 insertion data (:mod:`noduleai.lesion_paste`): real texture, spiculation, calcification and partial
volume, where v1 filled reader outlines with a density drawn from the texture rating.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CROPS_FOLDER = "lidc-nodule-crops"
INDEX = "index.csv"
_REQUIRED = ("file", "patient_id", "nodule_id", "diameter_mm", "Texture_value", "coordX", "coordY", "coordZ")


@dataclass(frozen=True)
class NoduleCrop:
    """One real nodule crop: where its files are, whose it is, and the readers' ratings."""

    file: str  # relative to the crops folder, e.g. image/LIDC-IDRI-0004_R_1.nii.gz
    patient_id: str
    nodule_id: int
    diameter_mm: float
    texture: int  # LIDC rating: 1 ground-glass .. 5 solid
    calcification: int  # LIDC rating: 6 absent, 1-5 kinds of calcification
    center_lps: tuple[float, float, float]

    @property
    def mask_file(self) -> str:
        return "mask/" + Path(self.file).name


def read_crop_index(root: str | os.PathLike) -> list[NoduleCrop]:
    """Every crop listed in ``root/index.csv`` (``root`` is the crops folder), in file order."""
    index = Path(root) / INDEX
    try:
        with open(index, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise FileNotFoundError(f"{index}: cannot read the nodule crop index ({err.strerror})") from err
    if not rows or any(key not in rows[0] for key in _REQUIRED):
        raise ValueError(f"{index}: not a nodule crop index (needs columns {', '.join(_REQUIRED)})")
    crops = []
    for line, row in enumerate(rows, 2):
        try:
            crops.append(NoduleCrop(row["file"], row["patient_id"], int(row["nodule_id"]),
                                    float(row["diameter_mm"]), int(row["Texture_value"]),
                                    int(row.get("Calcification_value") or 6),
                                    (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))))
        except ValueError as err:
            raise ValueError(f"{index}, line {line}: {err}") from err
    return crops


def load_crop(root: str | os.PathLike, crop: NoduleCrop) -> tuple[sitk.Image, sitk.Image]:
    """The crop in HU (float32) and its mask (uint8, same grid)."""
    image_path, mask_path = Path(root) / crop.file, Path(root) / crop.mask_file
    try:
        image = sitk.Cast(sitk.ReadImage(str(image_path)), sitk.sitkFloat32)
        mask = sitk.Cast(sitk.ReadImage(str(mask_path)) > 0, sitk.sitkUInt8)
    except RuntimeError as err:
        raise ValueError(f"{image_path}: cannot read the nodule crop or its mask ({str(err).strip()[:200]})") from err
    if image.GetSize() != mask.GetSize():
        raise ValueError(f"{mask_path}: mask size {mask.GetSize()} differs from the crop's {image.GetSize()}")
    if not sitk.GetArrayViewFromImage(mask).any():
        raise ValueError(f"{mask_path}: empty nodule mask")
    mask.CopyInformation(image)
    return image, mask


def split_by_patient(crops: list[NoduleCrop], fractions: dict[str, float],
                     seed: int) -> dict[str, list[NoduleCrop]]:
    """Crops split into named parts by LIDC patient (no patient in two parts), in the given proportions.

    The assignment of a patient depends only on its id and ``seed`` (a hash, not the order of the
    list), so adding crops never moves a patient from one part to another.
    """
    names = list(fractions)
    bounds = np.cumsum([fractions[n] for n in names]) / sum(fractions.values())
    parts: dict[str, list[NoduleCrop]] = {n: [] for n in names}
    for crop in crops:
        digest = hashlib.sha256(f"{seed}:{crop.patient_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2 ** 64
        parts[names[int(np.searchsorted(bounds, u, side="right"))]].append(crop)
    return parts

"""Reading and validating chest CT volumes (DICOM series, NRRD, NIfTI, MHA/MHD) with SimpleITK.

Every rejection raises :class:`CTInputError` whose message names the file and the problem.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from noduleai.files import atomic_path

if TYPE_CHECKING:
    from noduleai.dicom_series import DicomSource

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
MAX_VOXELS = 1024**3  # about 4 GiB as float32: beyond this a CT is not a chest CT we can process
MAX_AXIS = 4096
MIN_AXIS = 8
# Air in a chest CT reads about -1000 HU; a volume whose darkest 1 % is above this is not in HU.
MAX_AIR_PERCENTILE_HU = -500.0
HU_RANGE = (-4000.0, 40000.0)
NON_CT_MODALITIES = {"MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT", "SEG", "RTSTRUCT"}


class CTInputError(ValueError):
    """A CT input that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found under a folder."""

    uid: str
    files: tuple[str, ...]
    modality: str | None


def is_volume_file(path: str | os.PathLike) -> bool:
    """True for file names that :func:`read_ct` reads as a single volume file."""
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def find_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """All DICOM image series under ``folder`` (searched recursively, headers only), largest first."""
    from noduleai.dicom_series import scan_folder

    return [DicomSeries(s.uid, tuple(dict.fromkeys(p.path for p in s.slices)), s.modality)
            for s in scan_folder(folder)]


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages start with file/line noise; the last line states the problem.
    return lines[-1] if lines else type(err).__name__


@dataclass
class LoadedCT:
    """A CT read from disk, with what the reader did and, for DICOM, the source series to reference."""

    image: sitk.Image  # float32, Hounsfield units, validated
    path: str
    report: dict[str, Any] = field(default_factory=dict)  # input facts for the case report; no identifiers
    dicom: DicomSource | None = None  # set when the input was a DICOM series
    identifiers: dict[str, str] = field(default_factory=dict)  # patient name/ID/birth date/accession


def load_ct(path: str | os.PathLike, series_uid: str | None = None) -> LoadedCT:
    """Read a CT volume in Hounsfield units, validated, with the reader's report.

    ``path`` is a DICOM folder (searched recursively; the CT series with most slices is taken unless
    ``series_uid`` names one; see :mod:`noduleai.dicom_series` for the geometry checks) or a
    NRRD/NIfTI/MHA/MHD file. ITK's warnings of this read are captured into ``report["itk_warnings"]``.
    """
    from noduleai.dicom_series import capture_itk_messages, read_dicom_series

    path = Path(path)
    if not path.exists():
        raise CTInputError(path, "does not exist")
    if path.is_dir():
        read = read_dicom_series(path, series_uid)
        image, report, dicom, identifiers = read.image, read.report, read.source, read.identifiers
    else:
        if path.stat().st_size == 0:
            raise CTInputError(path, "file is empty")
        with capture_itk_messages() as messages:
            try:
                image = sitk.ReadImage(str(path))
            except RuntimeError as err:
                raise CTInputError(path, f"cannot read image ({_first_line(err)}); truncated or not an image?") \
                    from err
        modality = image.GetMetaData("0008|0060").strip() if image.HasMetaDataKey("0008|0060") else None
        if modality in NON_CT_MODALITIES:
            raise CTInputError(path, f"modality {modality}, not CT")
        report, dicom, identifiers = {"format": path.suffix.lstrip(".") or "file",
                                      "itk_warnings": list(messages)}, None, {}
    validate_ct(image, path)
    return LoadedCT(sitk.Cast(image, sitk.sitkFloat32), str(path), report, dicom, identifiers)


def read_ct(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a CT volume in Hounsfield units as a float32 SimpleITK image, validated.

    ``path`` is a DICOM folder (searched recursively; the CT series with most slices is taken unless
    ``series_uid`` names one) or a NRRD/NIfTI/MHA/MHD file. :func:`load_ct` also returns the reader's
    report (chosen series, gaps, tilt, ITK warnings) and the DICOM source for DICOM export.
    """
    loaded = load_ct(path, series_uid)
    for message in loaded.report.get("itk_warnings", []):
        log.warning("%s: %s", path, message)
    return loaded.image


def validate_ct(image: sitk.Image, path: str | os.PathLike = "<image>") -> None:
    """Raise :class:`CTInputError` unless ``image`` is a plausible 3-D CT in Hounsfield units."""
    if image.GetDimension() != 3:
        raise CTInputError(path, f"image is {image.GetDimension()}-D; a CT volume must be 3-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(path, f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                                 "(colour or vector image); a CT has one")
    size = image.GetSize()
    if min(size) < MIN_AXIS:
        raise CTInputError(path, f"size {size} is too small: every axis needs at least {MIN_AXIS} voxels")
    if max(size) > MAX_AXIS or int(np.prod(size)) > MAX_VOXELS:
        raise CTInputError(path, f"size {size} exceeds the limits ({MAX_AXIS} per axis, {MAX_VOXELS} voxels)")
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise CTInputError(path, f"spacing {tuple(spacing)} is not positive; the geometry is unusable")
    if np.any(spacing > 20):
        raise CTInputError(path, f"spacing {tuple(spacing)} mm is implausibly coarse for a CT")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise CTInputError(path, "contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < HU_RANGE[0] or high > HU_RANGE[1]:
        raise CTInputError(path, f"values {low:.0f}..{high:.0f} are outside the Hounsfield range of CT")
    air = float(np.percentile(array[::2, ::4, ::4], 1))
    if air > MAX_AIR_PERCENTILE_HU:
        raise CTInputError(path, f"darkest 1% of voxels reads {air:.0f}, but air in CT reads about -1000 HU: "
                                 "not a CT in Hounsfield units (MR, or an offset/rescale missing?)")


def case_name(path: str | os.PathLike) -> str:
    """A file-system friendly case name derived from an input path."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "case"


def write_image_atomic(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write an image so that ``path`` is either complete or absent."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)

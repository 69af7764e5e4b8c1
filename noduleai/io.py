"""Reading and validating chest CT volumes (DICOM series, NRRD, NIfTI, MHA/MHD) with SimpleITK.

Every rejection raises :class:`CTInputError` whose message names the file and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from noduleai.files import atomic_path

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
    """All DICOM series under ``folder`` (searched recursively), largest first."""
    found: list[DicomSeries] = []
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns for every folder without a series
    for root, _dirs, _files in os.walk(folder):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, uid))
            if files:
                found.append(DicomSeries(uid, files, _dicom_tag(files[0], "0008|0060")))
    return sorted(found, key=lambda s: len(s.files), reverse=True)


def _dicom_tag(path: str, tag: str) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else None


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    series = find_dicom_series(folder)
    if not series:
        raise CTInputError(folder, "no DICOM series found in this folder (is it empty or not DICOM?)")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            uids = ", ".join(s.uid or "(no UID)" for s in series)
            raise CTInputError(folder, f"series {series_uid} not found; series present: {uids}")
        pick = chosen[0]
    else:
        ct = [s for s in series if s.modality in (None, "CT")]
        if not ct:
            kinds = ", ".join(sorted({s.modality or "?" for s in series}))
            raise CTInputError(folder, f"no CT series here (modality {kinds}); NoduleAI needs a chest CT")
        pick = ct[0]  # most slices: the diagnostic series rather than a scout or a dose report
    if pick.modality in NON_CT_MODALITIES:
        raise CTInputError(folder, f"series {pick.uid} has modality {pick.modality}, not CT")
    if len(pick.files) < MIN_AXIS:
        raise CTInputError(folder, f"series {pick.uid or '(no UID)'} has only {len(pick.files)} slice(s)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(pick.files))
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise CTInputError(folder, f"cannot read DICOM series {pick.uid}: {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages start with file/line noise; the last line states the problem.
    return lines[-1] if lines else type(err).__name__


def read_ct(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a CT volume in Hounsfield units as a float32 SimpleITK image, validated.

    ``path`` is a DICOM folder (searched recursively; the CT series with most slices is taken unless
    ``series_uid`` names one) or a NRRD/NIfTI/MHA/MHD file.
    """
    path = Path(path)
    if not path.exists():
        raise CTInputError(path, "does not exist")
    if path.is_dir():
        image = _read_dicom_folder(path, series_uid)
    else:
        if path.stat().st_size == 0:
            raise CTInputError(path, "file is empty")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise CTInputError(path, f"cannot read image ({_first_line(err)}); truncated or not an image?") from err
        modality = image.GetMetaData("0008|0060").strip() if image.HasMetaDataKey("0008|0060") else None
        if modality in NON_CT_MODALITIES:
            raise CTInputError(path, f"modality {modality}, not CT")
    validate_ct(image, path)
    return sitk.Cast(image, sitk.sitkFloat32)


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

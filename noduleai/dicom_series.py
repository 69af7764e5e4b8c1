"""Reading a DICOM CT series without geometry traps.

A scanner's series is read from the slice headers themselves (pydicom), not from the assumption that
slices form a regular, orthogonal stack. Before any pixel is used this module

- groups the files of a folder by series and chooses one (the CT series with most slices, or the one
  named), recording every other series it saw;
- drops localizer (scout) images and images whose orientation differs from the stack's, naming them;
- removes exact duplicates (same SOP instance, or same position and identical pixels) and refuses
  positions that hold two different images (mixed acquisitions);
- measures the slice positions along the slice normal: missing slices and non-uniform spacing are
  resampled onto a regular grid from the real positions (or refused when a gap is too large), the
  largest gap is always reported;
- measures the shear of the stack (gantry tilt): the slices are resampled onto an orthogonal grid
  from their real in-plane offsets;
- expands enhanced (multi-frame) CT from its per-frame functional groups;
- checks that the installed codecs can decode the transfer syntax, and names it when they cannot;
- captures ITK's warnings per read (instead of silencing them for the whole process).

Every refusal raises :class:`noduleai.io.CTInputError` naming the folder (or file) and the problem.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from noduleai.io import CTInputError

# Slices whose gap exceeds this multiple of the nominal spacing are not interpolated: a nodule smaller
# than the gap could vanish or be invented. One or two missing slices (a gap of 2x or 3x) are resampled.
MAX_GAP_FACTOR = 3.0
MAX_GAP_MM = 10.0
SPACING_TOLERANCE = 0.02  # relative deviation of a slice step from the nominal spacing still called uniform
SHEAR_TOLERANCE_PX = 0.1  # in-plane drift of the stack (pixels) below which there is no tilt to correct
MAX_TILT_DEG = 45.0  # gantries tilt up to ~30 degrees; more than this is not a plausible axial stack
ORIENTATION_TOLERANCE = 1e-3
FILL_HU = -1024.0  # outside the field of view after shear correction: air
NON_IMAGE_MODALITIES = {"SR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "KO", "PR", "REG", "DOC"}
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
# Patient identifiers: never written to logs or the JSON report unless the user asks for them.
IDENTIFIER_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")


@dataclass(frozen=True)
class SliceHeader:
    """One image plane: a single-frame file, or one frame of a multi-frame file."""

    path: str
    frame: int | None
    sop_instance_uid: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row direction, column direction)
    position: tuple[float, float, float] | None  # ImagePositionPatient of the first pixel
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), as DICOM orders it
    rows: int
    columns: int
    transfer_syntax: str
    acquisition_number: str | None
    rescale: tuple[float, float] | None = None  # multi-frame: (slope, intercept) per frame


@dataclass
class SeriesInfo:
    """All image planes of one series found in a folder."""

    uid: str
    modality: str | None
    description: str
    number: str | None
    study_uid: str | None
    frame_of_reference_uid: str | None
    slices: list[SliceHeader] = field(default_factory=list)

    def summary(self, root: Path) -> dict[str, Any]:
        return {"series_uid": self.uid, "modality": self.modality, "description": self.description,
                "series_number": self.number, "images": len(self.slices),
                "files": len({s.path for s in self.slices})}


@dataclass
class DicomSource:
    """What DICOM export needs to reference the source series (the files in slice order)."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    files: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    modality: str
    # True when the image grid is not the source slices' own (resampled): derived objects then carry
    # their own plane positions and reference the series, not one source image per frame.
    resampled: bool


@dataclass
class DicomRead:
    """A DICOM series read onto a regular grid, with what was done to it and why."""

    image: sitk.Image
    source: DicomSource
    report: dict[str, Any]
    identifiers: dict[str, str]


class _Collector(sitk.LoggerBase):
    """Collects ITK/GDCM messages of one read (SimpleITK's logger replaces ITK's output window)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def _add(self, kind: str, text: str) -> None:
        # ITK prefixes "WARNING: In /build/path/file.hxx, line N\nClass (0xADDR): "; keep the statement.
        lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.startswith(("WARNING: In",
                                                                                                 "ERROR: In"))]
        body = re.sub(r"^\w+ \(0x[0-9a-f]+\): ", "", " ".join(lines))
        if body:
            self.messages.append(f"{kind}: {body}")

    def DisplayText(self, t: str) -> None:  # noqa: N802 (SimpleITK's names)
        self._add("message", t)

    def DisplayErrorText(self, t: str) -> None:  # noqa: N802
        self._add("error", t)

    def DisplayWarningText(self, t: str) -> None:  # noqa: N802
        self._add("warning", t)

    def DisplayGenericOutputText(self, t: str) -> None:  # noqa: N802
        self._add("message", t)

    def DisplayDebugText(self, t: str) -> None:  # noqa: N802
        pass


@contextlib.contextmanager
def capture_itk_messages() -> Iterator[list[str]]:
    """Route ITK's warnings to a list for the duration of the block; the previous logger is restored.

    Unlike ``SetGlobalWarningDisplay(False)`` this silences nothing for the rest of the process (nor
    for Slicer, which shares the ITK output window), and the messages reach the case's report.
    """
    collector = _Collector()
    previous = collector.SetAsGlobalITKLogger()
    try:
        yield collector.messages
    finally:
        previous.SetAsGlobalITKLogger()


# -- scanning a folder ---------------------------------------------------------------------------------
def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _get(ds: Any, keyword: str, default: Any = None) -> Any:
    value = getattr(ds, keyword, default)
    return default if value is None or value == "" else value


def _functional(ds: pydicom.Dataset, index: int, sequence: str) -> Any:
    """The item of a functional-group macro for one frame: per-frame first, then shared."""
    for groups in (_get(ds, "PerFrameFunctionalGroupsSequence"), _get(ds, "SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[index] if len(groups) > 1 else groups[0]
        value = _get(item, sequence)
        if value:
            return value[0]
    return None


def _headers(ds: pydicom.Dataset, path: str) -> list[SliceHeader]:
    syntax = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else ""
    common = {"path": path, "sop_class_uid": str(_get(ds, "SOPClassUID", "")),
              "rows": int(_get(ds, "Rows", 0)), "columns": int(_get(ds, "Columns", 0)),
              "transfer_syntax": syntax, "acquisition_number": _opt_str(_get(ds, "AcquisitionNumber"))}
    image_type = tuple(str(v).upper() for v in (_get(ds, "ImageType") or ()))
    frames = int(_get(ds, "NumberOfFrames", 1) or 1)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        spacing = _floats(_get(ds, "PixelSpacing"), 2)
        return [SliceHeader(frame=None, sop_instance_uid=str(_get(ds, "SOPInstanceUID", "")), image_type=image_type,
                            orientation=_floats(_get(ds, "ImageOrientationPatient"), 6),
                            position=_floats(_get(ds, "ImagePositionPatient"), 3),
                            pixel_spacing=spacing, **common)]
    planes = []
    for i in range(frames):  # enhanced CT: geometry and rescale live in the functional groups
        position = _functional(ds, i, "PlanePositionSequence")
        orientation = _functional(ds, i, "PlaneOrientationSequence")
        measures = _functional(ds, i, "PixelMeasuresSequence")
        transform = _functional(ds, i, "PixelValueTransformationSequence")
        frame_type = _functional(ds, i, "CTImageFrameTypeSequence")
        ftype = tuple(str(v).upper() for v in (_get(frame_type, "FrameType") or ())) if frame_type else image_type
        rescale = (float(_get(transform, "RescaleSlope", 1.0)), float(_get(transform, "RescaleIntercept", 0.0))) \
            if transform else (float(_get(ds, "RescaleSlope", 1.0)), float(_get(ds, "RescaleIntercept", 0.0)))
        planes.append(SliceHeader(
            frame=i, sop_instance_uid=str(_get(ds, "SOPInstanceUID", "")), image_type=ftype,
            orientation=_floats(_get(orientation, "ImageOrientationPatient"), 6) if orientation else None,
            position=_floats(_get(position, "ImagePositionPatient"), 3) if position else None,
            pixel_spacing=_floats(_get(measures, "PixelSpacing"), 2) if measures else None,
            rescale=rescale, **common))
    return planes


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value).strip() or None


def scan_folder(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Every image series under ``folder`` (recursively), read from headers only; largest first."""
    series: dict[str, SeriesInfo] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, KeyError, AttributeError):
                continue  # not DICOM (a readme, a thumbnail) or truncated: not part of any series
            modality = _opt_str(_get(ds, "Modality"))
            if "Rows" not in ds or modality in NON_IMAGE_MODALITIES or "SeriesInstanceUID" not in ds:
                continue  # DICOMDIR, reports, segmentations: no image plane to read
            uid = str(ds.SeriesInstanceUID)
            info = series.get(uid)
            if info is None:
                info = series[uid] = SeriesInfo(
                    uid=uid, modality=modality, description=str(_get(ds, "SeriesDescription", "")),
                    number=_opt_str(_get(ds, "SeriesNumber")), study_uid=_opt_str(_get(ds, "StudyInstanceUID")),
                    frame_of_reference_uid=_opt_str(_get(ds, "FrameOfReferenceUID")))
            info.slices.extend(_headers(ds, path))
    return sorted(series.values(), key=lambda s: len(s.slices), reverse=True)


# -- choosing and checking the stack -------------------------------------------------------------------
def _rel(path: str, root: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def _is_localizer(plane: SliceHeader) -> bool:
    return "LOCALIZER" in plane.image_type


def _choose_series(folder: Path, series: list[SeriesInfo], series_uid: str | None) -> SeriesInfo:
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            uids = ", ".join(s.uid for s in series)
            raise CTInputError(folder, f"series {series_uid} not found; series present: {uids}")
        return chosen[0]
    ct = [s for s in series if s.modality in (None, "CT")]
    if not ct:
        kinds = ", ".join(sorted({s.modality or "?" for s in series}))
        raise CTInputError(folder, f"no CT series here (modality {kinds}); NoduleAI needs a chest CT")
    # Most non-localizer planes: the diagnostic series rather than a scout or a thin extract.
    return max(ct, key=lambda s: sum(not _is_localizer(p) for p in s.slices))


def _orientation_key(orientation: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v / ORIENTATION_TOLERANCE) * ORIENTATION_TOLERANCE + 0.0 for v in orientation)


def _select_planes(folder: Path, info: SeriesInfo, excluded: list[dict]) -> list[SliceHeader]:
    planes = []
    for p in info.slices:
        where = _rel(p.path, folder) + (f" frame {p.frame + 1}" if p.frame is not None else "")
        if _is_localizer(p):
            excluded.append({"file": where, "reason": "localizer (scout) image"})
        elif p.orientation is None or p.position is None or p.pixel_spacing is None:
            raise CTInputError(folder, f"{where} has no ImagePositionPatient/ImageOrientationPatient/"
                                           "PixelSpacing: the slice cannot be placed in space")
        else:
            planes.append(p)
    groups: dict[tuple[float, ...], list[SliceHeader]] = {}
    for p in planes:
        groups.setdefault(_orientation_key(p.orientation), []).append(p)
    if len(groups) > 1:
        ranked = sorted(groups.values(), key=len, reverse=True)
        described = "; ".join(f"{len(g)} image(s) with orientation {_fmt(g[0].orientation)}" for g in ranked)
        if len(ranked[0]) * 2 <= len(planes):
            raise CTInputError(folder, f"series {info.uid} mixes orientations and none holds a majority "
                                           f"({described}); export one orientation as its own series")
        for group in ranked[1:]:
            for p in group:
                excluded.append({"file": _rel(p.path, folder) + (f" frame {p.frame + 1}" if p.frame is not None
                                                                 else ""),
                                 "reason": f"orientation {_fmt(p.orientation)} differs from the stack's "
                                           f"{_fmt(ranked[0][0].orientation)}"})
        planes = ranked[0]
    sizes = {(p.rows, p.columns) for p in planes}
    if len(sizes) > 1:
        raise CTInputError(folder, f"series {info.uid} mixes image sizes {sorted(sizes)}")
    spacings = {tuple(round(v, 4) for v in p.pixel_spacing) for p in planes}
    if len(spacings) > 1:
        raise CTInputError(folder, f"series {info.uid} mixes pixel spacings {sorted(spacings)}")
    return planes


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _axes(plane: SliceHeader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row = np.asarray(plane.orientation[:3], float)
    col = np.asarray(plane.orientation[3:], float)
    row /= np.linalg.norm(row)
    col /= np.linalg.norm(col)
    return row, col, np.cross(row, col)


# -- pixel data ------------------------------------------------------------------------------------------
# Syntaxes newer than the installed pydicom's dictionary (DICOM 2024); named so a refusal says what it is.
NEWER_SYNTAXES = {"1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
                  "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
                  "1.2.840.10008.1.2.4.112": "JPEG XL",
                  "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression"}


def _syntax_name(uid: str) -> str:
    name = pydicom.uid.UID(uid).name
    if name == uid:
        name = NEWER_SYNTAXES.get(uid, "unknown transfer syntax")
    return f"{name} ({uid})"


def _read_frame_pixels(planes: list[SliceHeader], folder: Path, messages: list[str]) -> np.ndarray:
    """Pixel data in Hounsfield units, one (rows, columns) plane per header, in the given order."""
    if all(p.frame is None for p in planes):
        first = planes[0]
        try:  # one plane first: a codec problem is named with the syntax instead of a stack error
            sitk.ReadImage(first.path)
        except RuntimeError as err:
            raise CTInputError(folder, f"{_rel(first.path, folder)}: transfer syntax "
                                           f"{_syntax_name(first.transfer_syntax)} cannot be decoded by the "
                                           f"installed codecs (SimpleITK {sitk.__version__} with GDCM): "
                                           f"{_last_line(err)}; decompress the series first "
                                           "(e.g. `gdcmconv --raw` or `dcmdjpeg`)") from err
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([p.path for p in planes])
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise CTInputError(folder, f"cannot read the pixel data of series: {_last_line(err)}") from err
        # ITK's series reader computes its own (regular) geometry; only the pixels are used here.
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        if array.shape != (len(planes), planes[0].rows, planes[0].columns):
            raise CTInputError(folder, f"pixel data of shape {array.shape} does not match "
                                           f"{len(planes)} planes of {planes[0].rows}x{planes[0].columns}")
        return array
    out = np.empty((len(planes), planes[0].rows, planes[0].columns), np.float32)
    datasets: dict[str, np.ndarray] = {}
    for i, p in enumerate(planes):
        if p.path not in datasets:
            try:
                ds = pydicom.dcmread(p.path)
                frames = ds.pixel_array
            except Exception as err:  # noqa: BLE001 (pydicom raises many kinds for codec problems)
                raise CTInputError(folder, f"{_rel(p.path, folder)}: transfer syntax "
                                               f"{_syntax_name(p.transfer_syntax)} cannot be decoded by the "
                                               f"installed codecs (pydicom {pydicom.__version__}): {err}") from err
            datasets[p.path] = frames.reshape((-1, p.rows, p.columns))
        slope, intercept = p.rescale or (1.0, 0.0)
        out[i] = datasets[p.path][p.frame].astype(np.float32) * slope + intercept
    return out


def _last_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _same_pixels(a: SliceHeader, b: SliceHeader, folder: Path) -> bool:
    pixels = _read_frame_pixels([a, b], folder, []) if a.frame is None and b.frame is None else None
    if pixels is None:
        return False
    return bool(np.array_equal(pixels[0], pixels[1]))


# -- the reader ----------------------------------------------------------------------------------------
def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> DicomRead:
    """Read one CT series of ``folder`` onto a regular orthogonal grid from its real slice positions.

    Raises :class:`CTInputError` naming the folder (and file) when the series cannot be placed in
    space safely. ``report`` records the chosen series, the others present, excluded images, slice
    spacing, largest gap, tilt, any resampling and ITK's warnings; it holds no patient identifier.
    """
    folder = Path(folder)
    with capture_itk_messages() as messages:
        found = scan_folder(folder)
        if not found:
            raise CTInputError(folder, "no DICOM series found in this folder (is it empty or not DICOM?)")
        info = _choose_series(folder, found, series_uid)
        if info.modality not in (None, "CT"):
            raise CTInputError(folder, f"series {info.uid} has modality {info.modality}, not CT")
        excluded: list[dict] = []
        planes = _select_planes(folder, info, excluded)
        image, geometry = _stack(folder, info, planes, excluded, messages)
    first = pydicom.dcmread(planes[0].path, stop_before_pixels=True)
    identifiers = {k: str(_get(first, k, "")) for k in IDENTIFIER_KEYWORDS}
    syntaxes = sorted({p.transfer_syntax for p in planes})
    report = {
        "format": "DICOM",
        "series_uid": info.uid,
        "series_description": info.description,
        "series_number": info.number,
        "study_uid": info.study_uid,
        "frame_of_reference_uid": info.frame_of_reference_uid,
        "other_series": [s.summary(folder) for s in found if s is not info],
        "images_used": len(geometry["used"]),
        "multiframe": any(p.frame is not None for p in planes),
        "transfer_syntaxes": [_syntax_name(s) for s in syntaxes],
        "excluded_images": excluded,
        **{k: v for k, v in geometry.items() if k != "used"},
        "itk_warnings": list(messages),
    }
    used = geometry["used"]
    source = DicomSource(
        study_uid=info.study_uid or "", series_uid=info.uid, frame_of_reference_uid=info.frame_of_reference_uid or "",
        files=tuple(dict.fromkeys(p.path for p in used)), sop_instance_uids=tuple(dict.fromkeys(
            p.sop_instance_uid for p in used)), modality=info.modality or "CT", resampled=geometry["resampled"])
    return DicomRead(image=image, source=source, report=report, identifiers=identifiers)


def _stack(folder: Path, info: SeriesInfo, planes: list[SliceHeader], excluded: list[dict],
           messages: list[str]) -> tuple[sitk.Image, dict[str, Any]]:
    row, col, normal = _axes(planes[0])
    row_spacing, col_spacing = planes[0].pixel_spacing  # DICOM: between rows (along col), between columns
    positions = np.array([p.position for p in planes])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    planes = [planes[i] for i in order]
    positions, depth = positions[order], depth[order]

    # Duplicates: two planes at the same place. Identical copies are dropped; different images refused.
    keep = [0]
    for i in range(1, len(planes)):
        j = keep[-1]
        if abs(depth[i] - depth[j]) > 1e-3 or np.linalg.norm(positions[i] - positions[j]) > 1e-2:
            keep.append(i)
            continue
        a, b = planes[j], planes[i]
        where = _rel(b.path, folder)
        if a.sop_instance_uid == b.sop_instance_uid and a.frame == b.frame:
            excluded.append({"file": where, "reason": f"duplicate of {_rel(a.path, folder)} (same SOP instance)"})
        elif _same_pixels(a, b, folder):
            excluded.append({"file": where, "reason": f"duplicate of {_rel(a.path, folder)} (same position, "
                                                      "identical pixels)"})
        else:
            acq = {a.acquisition_number, b.acquisition_number}
            raise CTInputError(folder, f"{_rel(a.path, folder)} and {where} are different images at the same "
                                           f"position {_fmt(positions[i])} mm (acquisition numbers "
                                           f"{', '.join(sorted(str(x) for x in acq))}): the series mixes "
                                           "acquisitions or phases; export one of them as its own series")
    planes, positions, depth = [planes[i] for i in keep], positions[keep], depth[keep]
    if len(planes) < 8:
        raise CTInputError(folder, f"series {info.uid} has only {len(planes)} usable slice(s)")

    steps = np.diff(depth)
    nominal = float(np.median(steps))
    largest = int(np.argmax(steps))
    gap = float(steps[largest])
    uniform = bool(np.all(np.abs(steps - nominal) <= SPACING_TOLERANCE * nominal))
    gap_info = {"slice_spacing_mm": round(nominal, 4), "largest_gap_mm": round(gap, 4),
                "largest_gap_between": [_rel(planes[largest].path, folder), _rel(planes[largest + 1].path, folder)],
                "largest_gap_at_mm": [round(float(depth[largest]), 3), round(float(depth[largest + 1]), 3)]}
    if gap > MAX_GAP_FACTOR * nominal + 1e-3 or (not uniform and gap > MAX_GAP_MM):
        raise CTInputError(folder, f"slices missing: a gap of {gap:.2f} mm between "
                                       f"{gap_info['largest_gap_between'][0]} and {gap_info['largest_gap_between'][1]} "
                                       f"(nominal spacing {nominal:.2f} mm); more than "
                                       f"{MAX_GAP_FACTOR - 1:.0f} consecutive slices are missing and interpolating "
                                       "across the gap would invent or erase anatomy")

    # Shear: where each slice's first pixel lies in the plane, relative to the first slice (pixels).
    drift = positions - positions[0] - np.outer(depth - depth[0], normal)
    shift_rows = drift @ col / row_spacing
    shift_cols = drift @ row / col_spacing
    sheared = bool(max(np.abs(shift_rows).max(), np.abs(shift_cols).max()) > SHEAR_TOLERANCE_PX)
    span = float(depth[-1] - depth[0])
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(drift[-1]), span))) if span > 0 else 0.0
    if tilt > MAX_TILT_DEG:
        raise CTInputError(folder, f"the slice stack is sheared by {tilt:.1f} degrees (slice positions do not "
                                       "follow the slice normal); this is not a plausible tilted axial series")

    pixels = _read_frame_pixels(planes, folder, messages)
    origin = positions[0]
    direction = np.column_stack([row, col, normal]).ravel()
    reasons = []
    if not uniform:
        reasons.append(f"non-uniform slice spacing (steps {steps.min():.3g}..{steps.max():.3g} mm; largest gap "
                       f"{gap:.3g} mm): resampled to {nominal:.4g} mm from the real slice positions")
    if sheared:
        reasons.append(f"gantry tilt / sheared stack of {tilt:.2f} degrees: resampled onto an orthogonal grid "
                       "from the real slice positions")
    if not reasons:
        spacing_z = span / (len(planes) - 1)
        volume = pixels
    else:
        volume, spacing_z = _resample(pixels, depth - depth[0], shift_rows, shift_cols, nominal)
    image = sitk.GetImageFromArray(volume)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing((float(col_spacing), float(row_spacing), float(spacing_z)))
    image.SetDirection(tuple(float(v) for v in direction))
    geometry = {**gap_info, "uniform_spacing": uniform, "gantry_tilt_deg": round(tilt, 3),
                "resampled": bool(reasons), "resampling": reasons, "used": planes}
    return image, geometry


def _resample(pixels: np.ndarray, depth: np.ndarray, shift_rows: np.ndarray, shift_cols: np.ndarray,
              nominal: float) -> tuple[np.ndarray, float]:
    """Resample planes at ``depth`` (mm along the normal) with in-plane offsets onto a regular stack.

    Output plane m lies at depth m*h; each output voxel is linear between the two source planes around
    it, each sampled (bilinear) at the point where the slice normal through the voxel crosses it.
    """
    n_out = int(round(depth[-1] / nominal)) + 1
    h = float(depth[-1] / (n_out - 1))
    out = np.empty((n_out, *pixels.shape[1:]), np.float32)

    def plane(k: int) -> np.ndarray:
        if abs(shift_rows[k]) < 1e-6 and abs(shift_cols[k]) < 1e-6:
            return pixels[k]
        # The voxel (i, j) of the output grid lies at (i - shift_rows, j - shift_cols) of plane k.
        return ndimage.shift(pixels[k], (shift_rows[k], shift_cols[k]), order=1, mode="constant", cval=FILL_HU)

    for m in range(n_out):
        d = m * h
        k = int(np.clip(np.searchsorted(depth, d, side="right") - 1, 0, len(depth) - 2))
        w = float(np.clip((d - depth[k]) / (depth[k + 1] - depth[k]), 0.0, 1.0))
        out[m] = plane(k) if w < 1e-6 else plane(k + 1) if w > 1 - 1e-6 else \
            (1 - w) * plane(k) + w * plane(k + 1)
    return out, h

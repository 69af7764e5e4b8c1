"""DICOM geometry traps, each on a series written for the purpose from the REAL LIDC-IDRI-0001 slices.

Every test that changes the geometry paints a phantom nodule (a 10 mm sphere of +60 HU in the lung)
into the real pixels at a known physical point *of the geometry written to the headers*, then checks
that the reader puts it within one voxel of that point (or refuses the series with a clear message),
and, where the trap is a silent one, that ITK's plain series reading misplaces it: the test can fail.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import LIDC_0001, TS_DICOM, require
from pydicom.uid import generate_uid
from scipy import ndimage

from noduleai.geometry import array_index_to_lps, lps_to_array_index
from noduleai.io import CTInputError, load_ct, read_ct

CROP = slice(50, 90)  # 40 real slices through both lungs (sorted by position)
NODULE_HU = 60.0
NODULE_RADIUS_MM = 5.0


@pytest.fixture(scope="module")
def real_slices() -> list[pydicom.Dataset]:
    files = sorted(require(LIDC_0001).rglob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return datasets[CROP]


@pytest.fixture(scope="module")
def lung_point(real_slices) -> np.ndarray:
    """A point (as (row, column) pixel and slice index of the crop) with only lung within 9 mm."""
    hu = np.stack([ds.pixel_array.astype(np.float32) - 1024 for ds in real_slices])
    lung = ndimage.minimum_filter(hu < -700, size=(9, 27, 27))  # 22 mm along z, 19 mm in-plane
    lung[:12] = lung[-12:] = False  # away from the crop's ends: slices get removed around the middle
    candidates = np.argwhere(lung)
    centre = np.array(hu.shape) / 2
    return candidates[np.argmin(np.linalg.norm((candidates - centre) * [2.5, 0.7, 0.7], axis=1))]


def _write(folder: Path, slices: list[pydicom.Dataset], positions, orientation=(1, 0, 0, 0, 1, 0),
           nodule_lps=None, series_uid: str | None = None, names=None) -> list[Path]:
    """Write real slices with the given geometry; paint the phantom nodule by that geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    paths = []
    for k, (source, position) in enumerate(zip(slices, positions)):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        if nodule_lps is not None:
            pixels = ds.pixel_array.copy()
            dy, dx = (float(v) for v in ds.PixelSpacing)
            ii, jj = np.mgrid[: ds.Rows, : ds.Columns]
            points = (np.asarray(position, float)[None, None, :] + jj[..., None] * dx * row
                      + ii[..., None] * dy * col)
            inside = np.linalg.norm(points - nodule_lps, axis=-1) <= NODULE_RADIUS_MM
            pixels[inside] = int(NODULE_HU + 1024)
            ds.PixelData = pixels.tobytes()
        path = folder / (names[k] if names else f"slice{k:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _positions(slices) -> list[np.ndarray]:
    return [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in slices]


def _nodule_truth(slices, lung_point) -> np.ndarray:
    k, i, j = lung_point
    ds = slices[k]
    dy, dx = (float(v) for v in ds.PixelSpacing)
    return np.array([float(v) for v in ds.ImagePositionPatient]) + [j * dx, i * dy, 0.0]


def _found_nodule(image: sitk.Image, near_zyx) -> np.ndarray:
    """Array index (z, y, x) of the centroid of the phantom nodule around array index ``near_zyx``."""
    array = sitk.GetArrayViewFromImage(image)
    near = np.round(near_zyx).astype(int)
    box = tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(near, (4, 12, 12)))  # inside the lung-only zone
    labels, _ = ndimage.label(array[box] > -200)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    assert sizes.max() > 20, "no phantom nodule found near its true position"
    centroid = np.array(ndimage.center_of_mass(labels == np.argmax(sizes)))
    return centroid + [s.start for s in box]


def _assert_within_one_voxel(image: sitk.Image, truth_lps) -> float:
    truth_index = np.array(lps_to_array_index(image, truth_lps))
    found = _found_nodule(image, truth_index)
    assert np.all(np.abs(found - truth_index) < 1.0), (found, truth_index)
    return float(np.linalg.norm(np.subtract(array_index_to_lps(image, found), truth_lps)))


def _itk_plain(folder: Path) -> sitk.Image:
    """How the series reads when nothing checks its geometry: ITK's own sorted series reading."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _itk_error_mm(folder: Path, painted_zyx, truth_lps) -> float:
    """How far ITK's plain reading puts the nodule painted at stack index ``painted_zyx`` (mm)."""
    image = _itk_plain(folder)
    found = _found_nodule(image, painted_zyx)
    return float(np.linalg.norm(np.subtract(array_index_to_lps(image, found), truth_lps)))


# -- a clean series -----------------------------------------------------------------------------------
def test_clean_real_series_reads_exactly_as_itk_with_report():
    folder = require(LIDC_0001)
    loaded = load_ct(folder)
    series_dir = next(p.parent for p in folder.rglob("*.dcm"))
    reference = _itk_plain(series_dir)
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded.image), sitk.GetArrayViewFromImage(reference))
    for ours, theirs in ((loaded.image.GetOrigin(), reference.GetOrigin()),
                         (loaded.image.GetSpacing(), reference.GetSpacing()),
                         (loaded.image.GetDirection(), reference.GetDirection())):
        assert np.allclose(ours, theirs, atol=1e-4)
    report = loaded.report
    assert report["series_uid"] == series_dir.name and report["images_used"] == 133
    assert report["slice_spacing_mm"] == 2.5 and report["largest_gap_mm"] == 2.5
    assert not report["resampled"] and report["gantry_tilt_deg"] == 0.0
    assert report["itk_warnings"] == [] and report["excluded_images"] == []
    assert loaded.dicom.resampled is False and len(loaded.dicom.files) == 133


# -- missing slices, non-uniform spacing ---------------------------------------------------------------
def test_missing_slices_are_resampled_from_real_positions(tmp_path, real_slices, lung_point):
    truth = _nodule_truth(real_slices, lung_point)
    k = int(lung_point[0])
    keep = [i for i in range(len(real_slices)) if i not in (k - 5, k - 4)]  # two slices lost below the nodule
    slices = [real_slices[i] for i in keep]
    paths = _write(tmp_path / "s", slices, _positions(slices), nodule_lps=truth)

    loaded = load_ct(tmp_path / "s")
    report = loaded.report
    assert report["resampled"] and not report["uniform_spacing"]
    assert report["largest_gap_mm"] == pytest.approx(7.5, abs=1e-3)
    assert report["largest_gap_between"] == [paths[k - 6].name, paths[k - 5].name]
    assert "non-uniform slice spacing" in report["resampling"][0]
    assert any("Non uniform sampling" in w for w in report["itk_warnings"])  # ITK's own warning, kept
    assert loaded.image.GetSize()[2] == len(real_slices)  # the regular 2.5 mm grid is back
    assert np.allclose(loaded.image.GetSpacing()[2], 2.5)
    ours = _assert_within_one_voxel(loaded.image, truth)
    # Without the check, ITK spreads the 38 slices evenly over the span: the nodule moves by ~2.4 mm.
    naive = _itk_error_mm(tmp_path / "s", lung_point - [2, 0, 0], truth)
    print(f"phantom error: reader {ours:.2f} mm, ITK plain reading {naive:.2f} mm")
    assert naive > 1.5 and naive > 3 * ours, (naive, ours)


def test_gap_too_large_is_refused_naming_the_gap(tmp_path, real_slices):
    slices = [ds for i, ds in enumerate(real_slices) if not 15 <= i < 20]  # five consecutive slices lost
    paths = _write(tmp_path / "s", slices, _positions(slices))
    with pytest.raises(CTInputError) as err:
        read_ct(tmp_path / "s")
    message = str(err.value)
    assert str(tmp_path / "s") in message and "gap of 15.00 mm" in message
    assert paths[14].name in message and paths[15].name in message


def test_non_uniform_spacing_is_resampled(tmp_path, real_slices, lung_point):
    truth_k = int(lung_point[0])
    # First half at 2.5 mm, second half at 1.25 mm (as a scanner's mixed reconstruction would be).
    z0 = float(real_slices[0].ImagePositionPatient[2])
    z = [z0 + 2.5 * i if i <= 20 else z0 + 50 + 1.25 * (i - 20) for i in range(len(real_slices))]
    base = _positions(real_slices)[0]
    positions = [np.array([base[0], base[1], v]) for v in z]
    k, i, j = lung_point
    dy, dx = (float(v) for v in real_slices[0].PixelSpacing)
    truth = np.array([base[0] + j * dx, base[1] + i * dy, z[truth_k]])
    _write(tmp_path / "s", real_slices, positions, nodule_lps=truth)
    loaded = load_ct(tmp_path / "s")
    assert loaded.report["resampled"] and loaded.report["largest_gap_mm"] == pytest.approx(2.5)
    assert loaded.report["slice_spacing_mm"] in (1.25, 2.5)
    ours = _assert_within_one_voxel(loaded.image, truth)
    naive = _itk_error_mm(tmp_path / "s", lung_point, truth)
    print(f"phantom error: reader {ours:.2f} mm, ITK plain reading {naive:.2f} mm")
    assert naive > 1.5 and naive > 3 * ours, (naive, ours)


# -- gantry tilt -----------------------------------------------------------------------------------------
def test_gantry_tilt_is_corrected_onto_an_orthogonal_grid(tmp_path, real_slices, lung_point):
    tilt = np.radians(15.0)
    orientation = (1, 0, 0, 0, np.cos(tilt), -np.sin(tilt))  # rows tilted about x, as a tilted gantry makes
    base = _positions(real_slices)[0]
    # The table moves along z by 2.5 mm per slice; the slice planes are tilted, so the stack is sheared.
    positions = [base + [0, 0, 2.5 * k] for k in range(len(real_slices))]
    k, i, j = lung_point
    dy, dx = (float(v) for v in real_slices[0].PixelSpacing)
    col = np.array(orientation[3:])
    truth = positions[k] + j * dx * np.array([1.0, 0, 0]) + i * dy * col
    _write(tmp_path / "s", real_slices, positions, orientation=orientation, nodule_lps=truth)

    loaded = load_ct(tmp_path / "s")
    assert loaded.report["gantry_tilt_deg"] == pytest.approx(15.0, abs=0.01)
    assert loaded.report["resampled"] and "gantry tilt" in loaded.report["resampling"][0]
    direction = np.array(loaded.image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-6)  # an orthogonal grid
    assert np.allclose(loaded.image.GetSpacing()[2], 2.5 * np.cos(tilt), atol=1e-3)
    ours = _assert_within_one_voxel(loaded.image, truth)
    naive = _itk_error_mm(tmp_path / "s", lung_point, truth)  # the silent error this check removes
    print(f"phantom error: reader {ours:.2f} mm, ITK plain reading {naive:.2f} mm")
    assert naive > 5.0 and naive > 10 * ours, (naive, ours)


# -- duplicates, localizers, orientations, several series ---------------------------------------------------
def test_duplicate_copies_are_dropped_and_different_images_refused(tmp_path, real_slices):
    _write(tmp_path / "s", real_slices, _positions(real_slices))
    shutil.copy(tmp_path / "s" / "slice010.dcm", tmp_path / "s" / "copy_of_slice010.dcm")
    loaded = load_ct(tmp_path / "s")
    assert loaded.image.GetSize()[2] == len(real_slices) and not loaded.report["resampled"]
    assert {"file": "slice010.dcm", "reason": "duplicate of copy_of_slice010.dcm (same SOP instance)"} \
        in loaded.report["excluded_images"] or \
        {"file": "copy_of_slice010.dcm", "reason": "duplicate of slice010.dcm (same SOP instance)"} \
        in loaded.report["excluded_images"]

    # A second acquisition interleaved at the same positions: different pixels, nothing to choose from.
    other = copy.deepcopy(real_slices[12])
    other.PixelData = (other.pixel_array + 7).astype(other.pixel_array.dtype).tobytes()
    other.AcquisitionNumber = 2
    _write(tmp_path / "s", [other], [_positions(real_slices)[12]], series_uid=loaded.dicom.series_uid,
           names=["second_acquisition.dcm"])
    with pytest.raises(CTInputError, match="different images at the same position") as err:
        read_ct(tmp_path / "s")
    assert "second_acquisition.dcm" in str(err.value) and "slice012.dcm" in str(err.value)


def test_localizer_and_other_orientations_are_excluded_by_name(tmp_path, real_slices, lung_point):
    truth = _nodule_truth(real_slices, lung_point)
    paths = _write(tmp_path / "s", real_slices, _positions(real_slices), nodule_lps=truth)
    uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    scout = copy.deepcopy(real_slices[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    _write(tmp_path / "s", [scout], [(-250.0, 0.0, 0.0)], orientation=(1, 0, 0, 0, 0, -1), series_uid=uid,
           names=["scout.dcm"])
    sagittal = [copy.deepcopy(ds) for ds in real_slices[:2]]
    _write(tmp_path / "s", sagittal, [(0.0, -200.0, 100.0), (2.0, -200.0, 100.0)], orientation=(0, 1, 0, 0, 0, -1),
           series_uid=uid, names=["sag1.dcm", "sag2.dcm"])
    loaded = load_ct(tmp_path / "s")
    reasons = {e["file"]: e["reason"] for e in loaded.report["excluded_images"]}
    assert reasons["scout.dcm"] == "localizer (scout) image"
    assert "differs from the stack's" in reasons["sag1.dcm"] and "sag2.dcm" in reasons
    assert loaded.image.GetSize()[2] == len(real_slices) and not loaded.report["resampled"]
    _assert_within_one_voxel(loaded.image, truth)


def test_several_series_in_one_folder_the_choice_is_named(tmp_path, real_slices):
    main = _write(tmp_path / "study" / "a", real_slices, _positions(real_slices))
    extract = real_slices[::4]  # a thick-slice extract of the same scan: 10 slices at 10 mm
    _write(tmp_path / "study" / "b", extract, _positions(extract))
    main_uid = pydicom.dcmread(main[0]).SeriesInstanceUID
    loaded = load_ct(tmp_path / "study")
    assert loaded.report["series_uid"] == main_uid
    assert [s["images"] for s in loaded.report["other_series"]] == [len(extract)]
    other_uid = loaded.report["other_series"][0]["series_uid"]
    thick = load_ct(tmp_path / "study", series_uid=other_uid)
    assert thick.report["series_uid"] == other_uid and thick.image.GetSize()[2] == len(extract)
    assert np.allclose(thick.image.GetSpacing()[2], 10.0)


# -- enhanced (multi-frame) CT -------------------------------------------------------------------------
def test_enhanced_multiframe_ct_reads_like_its_single_frame_source(tmp_path, real_slices):
    import highdicom as hd

    _write(tmp_path / "single", real_slices, _positions(real_slices))
    singles = [pydicom.dcmread(p) for p in sorted((tmp_path / "single").iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        singles, series_instance_uid=generate_uid(), series_number=9, sop_instance_uid=generate_uid(),
        instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    single = load_ct(tmp_path / "single")
    multi = load_ct(tmp_path / "multi")
    assert multi.report["multiframe"] and multi.report["images_used"] == len(real_slices)
    assert np.array_equal(sitk.GetArrayViewFromImage(multi.image), sitk.GetArrayViewFromImage(single.image))
    for getter in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert np.allclose(getattr(multi.image, getter)(), getattr(single.image, getter)(), atol=1e-4)


# -- compressed transfer syntaxes ------------------------------------------------------------------------
def test_jpeg_ls_compressed_real_slices_decode_identically(tmp_path, real_slices):
    from pydicom.uid import JPEGLSLossless

    _write(tmp_path / "raw", real_slices, _positions(real_slices))
    (tmp_path / "jls").mkdir()
    for path in sorted((tmp_path / "raw").iterdir()):
        ds = pydicom.dcmread(path)
        ds.compress(JPEGLSLossless)
        ds.save_as(tmp_path / "jls" / path.name, enforce_file_format=True)
    raw, jls = load_ct(tmp_path / "raw"), load_ct(tmp_path / "jls")
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in jls.report["transfer_syntaxes"]
    assert np.array_equal(sitk.GetArrayViewFromImage(raw.image), sitk.GetArrayViewFromImage(jls.image))


def test_undecodable_transfer_syntax_is_named(tmp_path):
    """Real JPEG 2000 slices relabelled JPEG XL (DICOM 2024), which the installed GDCM cannot decode."""
    target = tmp_path / "jxl"
    target.mkdir()
    for path in sorted(require(TS_DICOM).iterdir()):
        ds = pydicom.dcmread(path)
        # pydicom 3.0 cannot write a syntax it does not know: write HTJ2K (same UID length), then patch.
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
        ds.save_as(target / path.name, enforce_file_format=True)
        data = (target / path.name).read_bytes()
        (target / path.name).write_bytes(data.replace(b"1.2.840.10008.1.2.4.201\x00", b"1.2.840.10008.1.2.4.110\x00",
                                                      1))
    with pytest.raises(CTInputError) as err:
        read_ct(target)
    message = str(err.value)
    assert str(target) in message and "JPEG XL Lossless (1.2.840.10008.1.2.4.110)" in message
    assert "cannot be decoded by the installed codecs" in message


# -- ITK warnings per read ---------------------------------------------------------------------------------
def test_itk_warnings_are_captured_per_read_not_silenced(tmp_path, real_slices):
    slices = [ds for i, ds in enumerate(real_slices) if i != 20]
    _write(tmp_path / "s", slices, _positions(slices))
    loaded = load_ct(tmp_path / "s")
    assert any("Non uniform sampling" in w for w in loaded.report["itk_warnings"])
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # nothing switched off for the process (or Slicer)
    assert sitk.LoggerBase.GetGlobalITKLogger().GetName() == "ITKLogger"  # ITK's own logger is back
    clean = load_ct(require(LIDC_0001))
    assert clean.report["itk_warnings"] == []  # the next read starts with an empty list

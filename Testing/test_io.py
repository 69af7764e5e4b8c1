"""Reading real CTs in every supported format, and refusing bad inputs with specific messages."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import LIDC_0001, RADIOMICS_IMAGE, TS_DICOM, TS_NIFTI, require

from noduleai.io import CTInputError, case_name, find_dicom_series, read_ct


def test_lidc_dicom_series_reads_with_geometry():
    ct = read_ct(require(LIDC_0001))  # the patient folder: the series is found recursively
    assert ct.GetSize() == (512, 512, 133)
    assert np.allclose(ct.GetSpacing(), (0.703125, 0.703125, 2.5))
    array = sitk.GetArrayViewFromImage(ct)
    assert array.min() < -900 and 0 < array.max() < 4000
    assert ct.GetPixelID() == sitk.sitkFloat32


def test_radiomics_nrrd_and_totalsegmentator_nifti():
    nrrd = read_ct(require(RADIOMICS_IMAGE))
    assert nrrd.GetSize() == (512, 512, 48)
    assert np.allclose(nrrd.GetSpacing(), (0.5703125, 0.5703125, 5.0))
    nifti = read_ct(require(TS_NIFTI))
    assert nifti.GetSize() == (122, 101, 112)
    assert np.allclose(nifti.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))  # NIfTI RAS on disk -> LPS


def test_jpeg2000_dicom_decodes_to_hounsfield_units():
    ct = read_ct(require(TS_DICOM))
    assert ct.GetSize() == (512, 512, 20)
    array = sitk.GetArrayViewFromImage(ct)
    assert array.min() == -1024
    # Soft tissue dominates the body: the median of voxels above -200 HU lies in its range.
    assert -100 < np.median(array[array > -200]) < 150


def _write_series(folder, volume: np.ndarray, series_uid: str, modality: str = "CT"):
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[0]):
        image = sitk.GetImageFromArray(volume[k].astype(np.int16))
        image.SetSpacing((1.0, 1.0))
        for tag, value in (("0008|0060", modality), ("0020|000e", series_uid), ("0020|000d", "1.2.3"),
                           ("0020|0032", f"0\\0\\{2.0 * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(k + 1)), ("0008|0018", f"{series_uid}.{k + 1}"),
                           ("0028|1052", "0"), ("0028|1053", "1")):
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}_{k:03d}.dcm"))
        writer.Execute(image)


def _chest_like(n: int) -> np.ndarray:
    volume = np.full((n, 32, 32), 40, np.int16)
    volume[:, :4] = -1000
    volume[:, 10:20, 8:14] = -850
    return volume


def test_series_choice_most_slices_or_named(tmp_path):
    _write_series(tmp_path / "a", _chest_like(12), "1.2.826.0.1.1")
    _write_series(tmp_path / "b", _chest_like(9), "1.2.826.0.1.2")
    series = find_dicom_series(tmp_path)
    assert [s.uid for s in series] == ["1.2.826.0.1.1", "1.2.826.0.1.2"]
    assert read_ct(tmp_path).GetSize()[2] == 12
    assert read_ct(tmp_path, series_uid="1.2.826.0.1.2").GetSize()[2] == 9
    with pytest.raises(CTInputError, match="series 9.9 not found"):
        read_ct(tmp_path, series_uid="9.9")


def _bad(tmp_path, name: str):
    path = tmp_path / name
    if name == "slice2d.nrrd":
        sitk.WriteImage(sitk.Image([64, 64], sitk.sitkInt16), str(path))
    elif name == "four_d.nrrd":
        sitk.WriteImage(sitk.Image([16, 16, 16, 3], sitk.sitkInt16), str(path))
    elif name == "mr_values.nrrd":
        values = np.random.default_rng(0).integers(0, 900, (16, 32, 32)).astype(np.int16)
        sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    elif name == "nan.nrrd":
        arr = np.full((16, 32, 32), -1000.0, np.float32)
        arr[3, 4, 5] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    elif name == "truncated.nrrd":
        data = require(RADIOMICS_IMAGE).read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif name == "zero_spacing.mha":
        raw = np.full((16, 16, 16), -1000, np.int16)
        path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementSpacing = 0 1 1\n"
                         b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + raw.tobytes())
    elif name == "empty_folder":
        path.mkdir()
    elif name == "mr_series":
        _write_series(path, _chest_like(10), "1.2.826.0.1.9", modality="MR")
    return path


BAD_INPUTS = {
    "slice2d.nrrd": "2-D",
    "four_d.nrrd": "4-D",
    "mr_values.nrrd": "not a CT in Hounsfield units",
    "nan.nrrd": "NaN",
    "truncated.nrrd": "cannot read image",
    "zero_spacing.mha": "spacing",
    "empty_folder": "no DICOM series",
    "mr_series": "modality MR",
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_are_refused_with_file_and_problem(tmp_path, name):
    path = _bad(tmp_path, name)
    with pytest.raises(CTInputError) as err:
        read_ct(path)
    assert str(path) in str(err.value)
    assert BAD_INPUTS[name] in str(err.value)


def test_missing_path_and_case_names(tmp_path):
    with pytest.raises(CTInputError, match="does not exist"):
        read_ct(tmp_path / "nope.nrrd")
    assert case_name("/x/lung1_image.nrrd") == "lung1_image"
    assert case_name("/x/example_ct.nii.gz") == "example_ct"
    assert case_name("/x/LIDC-IDRI-0001") == "LIDC-IDRI-0001"


def test_copy_of_real_scan_in_odd_folder_still_reads(tmp_path):
    target = tmp_path / "scan with spaces"
    shutil.copytree(require(TS_DICOM), target)
    assert read_ct(target).GetSize() == (512, 512, 20)

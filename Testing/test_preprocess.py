"""The shared preprocessing on the real LIDC scan: geometry, lung mask, the nodule where it belongs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from noduleai.geometry import (
    array_index_to_lps,
    image_from_array,
    lps_to_array_index,
    lps_to_ras,
    peak_lps,
    ras_to_lps,
)
from noduleai.preprocess import (
    PATCH_PREPROCESS,
    SCAN_PREPROCESS,
    PreprocessConfig,
    normalise_hu,
    preprocess_ct,
)


@pytest.fixture(scope="module")
def lidc_patch(lidc_ct):
    return preprocess_ct(lidc_ct, PATCH_PREPROCESS)


def _hu(normalised: np.ndarray) -> np.ndarray:
    low, high = PATCH_PREPROCESS.hu_window
    return normalised * (high - low) + low


def test_nodule_centroid_lands_in_the_nodule_after_preprocessing(lidc_patch, lidc_case):
    nodule = lidc_case.nodules[0]
    assert 25 < nodule.diameter_mm < 40  # the ~32 mm solid nodule of LIDC-IDRI-0001
    z, y, x = (int(round(v)) for v in lps_to_array_index(lidc_patch.image, nodule.center_lps))
    volume = _hu(lidc_patch.array)
    core = volume[z - 2:z + 3, y - 2:y + 3, x - 2:x + 3]
    assert np.median(core) > -300, "soft tissue at the nodule centre"
    # Lung air around it: a shell at 1.5x the radius is mostly parenchyma.
    zz, yy, xx = np.mgrid[-25:26, -25:26, -25:26]
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    shell = (r > 0.75 * nodule.diameter_mm) & (r < 0.75 * nodule.diameter_mm + 3)
    ring = volume[z - 25:z + 26, y - 25:y + 26, x - 25:x + 26][shell]
    assert np.median(ring) < -600
    assert lidc_patch.mask_array[z, y, x], "the lung mask holds the nodule (holes filled)"


def test_patch_preprocessing_geometry(lidc_patch, lidc_ct):
    image = lidc_patch.image
    assert np.allclose(image.GetSpacing(), (1, 1, 1))
    assert np.allclose(image.GetDirection(), lidc_ct.GetDirection())
    values = lidc_patch.array
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1
    # The crop lies inside the CT's physical extent plus the margin.
    lo = np.array(lidc_ct.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    hi = np.array(lidc_ct.TransformContinuousIndexToPhysicalPoint([n - 0.5 for n in lidc_ct.GetSize()]))
    first = np.array(image.GetOrigin())
    last = np.array(image.TransformIndexToPhysicalPoint([n - 1 for n in image.GetSize()]))
    margin = PATCH_PREPROCESS.margin_mm + 2
    assert np.all(first >= np.minimum(lo, hi) - margin) and np.all(last <= np.maximum(lo, hi) + margin)
    # Lungs take a large share of the crop on a chest CT (both lungs found, outside air excluded).
    assert 0.1 < lidc_patch.mask_array.mean() < 0.6
    assert lidc_patch.lung_found


def test_model_space_voxels_map_back_to_ct_voxels(lidc_patch, lidc_ct):
    """Any model-space voxel maps to the physical point of the same tissue in the original CT."""
    ct_array = sitk.GetArrayViewFromImage(lidc_ct)
    rng = np.random.default_rng(0)
    mask_idx = np.argwhere(lidc_patch.mask_array)
    for zyx in mask_idx[rng.choice(len(mask_idx), 20)]:
        lps = array_index_to_lps(lidc_patch.image, zyx)
        k, j, i = (int(round(v)) for v in lps_to_array_index(lidc_ct, lps))
        back = np.array(lps_to_array_index(lidc_patch.image, lps))
        assert np.allclose(back, zyx, atol=1e-6)
        expected = normalise_hu(np.array(ct_array[k, j, i]), PATCH_PREPROCESS.hu_window)
        assert abs(float(lidc_patch.array[tuple(zyx)]) - float(expected)) < 0.25  # interpolation only


def test_lps_ras_round_trip_on_real_scan(lidc_ct):
    corner = lidc_ct.GetOrigin()
    ras = lps_to_ras(corner)
    assert ras == (-corner[0], -corner[1], corner[2])
    assert np.allclose(ras_to_lps(ras), corner)


def test_a_heatmaps_peak_is_read_as_the_lps_point_of_its_hottest_voxel(lidc_ct):
    """The point a heatmap peaks at, on the real CT's grid (its own spacing and origin): the hottest voxel
    (not the first voxel, not x/y swapped), and no point at all for a map without heat."""
    shape = sitk.GetArrayViewFromImage(lidc_ct).shape
    heat = np.zeros(shape, np.float32)
    hottest = (shape[0] // 3, shape[1] // 4, 2 * shape[2] // 3)
    heat[hottest] = 1.0
    heat[shape[0] // 2, shape[1] // 2, shape[2] // 2] = 0.9
    image = image_from_array(heat, lidc_ct)
    assert np.allclose(peak_lps(image), array_index_to_lps(lidc_ct, hottest))
    assert peak_lps(image_from_array(np.zeros(shape, np.float32), lidc_ct)) is None


def test_scan_preprocessing_fits_model_input_keeping_aspect(lidc_ct):
    pre = preprocess_ct(lidc_ct, SCAN_PREPROCESS)
    assert pre.image.GetSize() == (128, 128, 128)
    spacing = pre.image.GetSpacing()
    assert spacing[0] == spacing[1] == spacing[2] > 1.5  # uniform: the lungs are not distorted
    assert pre.mask_array.mean() > 0.05


def test_config_round_trip_and_validation():
    data = PATCH_PREPROCESS.to_dict()
    assert PreprocessConfig.from_dict(data) == PATCH_PREPROCESS
    assert PreprocessConfig.from_dict(SCAN_PREPROCESS.to_dict()) == SCAN_PREPROCESS
    with pytest.raises(ValueError, match="exactly one"):
        PreprocessConfig(spacing_mm=None, output_size=None)
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict(data | {"gamma": 1})


def test_no_lungs_falls_back_to_whole_field_of_view():
    abdomen = sitk.GetImageFromArray(np.full((20, 40, 40), 40, np.int16))
    abdomen = sitk.Cast(abdomen, sitk.sitkFloat32)
    pre = preprocess_ct(abdomen, PATCH_PREPROCESS)
    assert not pre.lung_found
    assert pre.image.GetSize()[0] >= 40

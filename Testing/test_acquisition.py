"""Thick-slice simulation (the acquisition stress test of detector v2): slabs average the object as a thick
reconstruction does: every structure stays where it is in patient space with its volume, the in-plane
grid and the HU level stay, noise falls."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import LIDC_0001, require

from noduleai.acquisition import thick_slices
from noduleai.io import read_ct
from noduleai.synthetic import make_phantom


def _centroid_lps(image: sitk.Image, weights: np.ndarray) -> np.ndarray:
    zyx = (np.argwhere(weights > 0) * weights[weights > 0][:, None]).sum(0) / weights[weights > 0].sum()
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def test_thick_slices_keep_each_nodule_in_place_with_its_volume():
    phantom = make_phantom(5, size_xyz=(96, 80, 120), spacing_xyz=(1.5, 1.5, 1.0), n_nodules=2,
                           diameter_range_mm=(6.0, 7.0), noise_hu=0.0)
    thick = thick_slices(phantom.image, 5.0)
    assert thick.GetSpacing() == pytest.approx((1.5, 1.5, 5.0)) and thick.GetDirection() == phantom.image.GetDirection()
    assert thick.GetSize()[:2] == phantom.image.GetSize()[:2] and thick.GetSize()[2] == 24  # 120 mm in 5 mm slabs
    thin_hu, thick_hu = sitk.GetArrayFromImage(phantom.image), sitk.GetArrayFromImage(thick)
    for k, nodule in enumerate(phantom.nodules, 1):
        # The nodule's own label, thick-sliced: same centroid in patient space, same volume (a slab's mean).
        label = sitk.Cast(phantom.nodule_labels == k, sitk.sitkFloat32)
        thin_mask, thick_mask = sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(thick_slices(label, 5.0))
        assert np.linalg.norm(_centroid_lps(thick, thick_mask) - nodule.center_lps) < 0.5
        assert thick_mask.sum() * 5.0 == pytest.approx(thin_mask.sum() * 1.0, rel=0.02)
    # Slab means: the integral along z is kept (uniform columns keep their value exactly).
    assert np.mean(thick_hu) == pytest.approx(np.mean(thin_hu), abs=1.0)
    with pytest.raises(ValueError, match="thick slices of 0.8 mm need thinner input slices; this CT has 1.00 mm"):
        thick_slices(phantom.image, 0.8)


def test_thick_slices_of_a_real_ct_keep_its_grid_and_hu():
    ct = read_ct(require(LIDC_0001))  # 2.5 mm slices
    thick = thick_slices(ct, 8.0)
    thin_hu, thick_hu = sitk.GetArrayViewFromImage(ct), sitk.GetArrayFromImage(thick)
    assert thick.GetSpacing()[:2] == ct.GetSpacing()[:2] and thick.GetSpacing()[2] == 8.0
    n = int(np.floor(thin_hu.shape[0] * ct.GetSpacing()[2] / 8.0))
    assert thick_hu.shape == (n,) + thin_hu.shape[1:]
    # The first slab is centred 4 mm above the first slice's lower edge (half a 2.5 mm slice below its centre).
    first = np.asarray(ct.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, -0.5 + 8.0 / 2.5 / 2)))
    assert np.allclose(thick.GetOrigin(), first)
    covered = thin_hu[:int(n * 8.0 / 2.5)]
    assert np.mean(thick_hu) == pytest.approx(float(np.mean(covered)), abs=3.0)
    assert thick_hu.std() < thin_hu.std()  # averaging lowers noise and edges, never adds

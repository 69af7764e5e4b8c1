"""The lung region holds what dents a lung (juxta-pleural nodules, masses on the mediastinum) but not the
mediastinum between the lungs, the body wall or the air outside: a phantom with exact truth, the real
lesions of LIDC-IDRI-0001 and radiomics lung1, and a real LIDC nodule pasted against the chest wall of
LIDC-IDRI-0001. ``closing`` is the v1 mask, kept for the shipped model; ``envelope`` is today's default."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import RADIOMICS_IMAGE, RADIOMICS_LABEL, SHARED_DATA, require
from scipy import ndimage

from noduleai.preprocess import LUNG_REGIONS, PATCH_PREPROCESS, PreprocessConfig, lung_mask

CLOSING = PreprocessConfig(lung_region="closing")
ENVELOPE = PreprocessConfig(lung_region="envelope")
LIDC_NODULE_LPS = (56.2, 86.2, -115.9)  # centre of the ~32 mm nodule of LIDC-IDRI-0001
CROPS = SHARED_DATA / "lidc-nodule-crops"


def _inside(region: sitk.Image, image: sitk.Image, voxels: np.ndarray) -> np.ndarray:
    """Whether each voxel of ``image`` flagged in ``voxels`` (a (z, y, x) bool array) lies in ``region``."""
    zyx = np.argwhere(voxels).astype(float)
    if not len(zyx):
        return np.zeros(0, bool)
    d_img = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (zyx[:, ::-1] * np.asarray(image.GetSpacing())) @ d_img.T
    d_reg = np.asarray(region.GetDirection()).reshape(3, 3)
    ijk = ((points - np.asarray(region.GetOrigin())) @ d_reg) / np.asarray(region.GetSpacing())
    ijk = np.round(ijk).astype(int)
    size = np.asarray(region.GetSize())
    ok = np.all((ijk >= 0) & (ijk < size), axis=1)
    array = sitk.GetArrayViewFromImage(region)
    out = np.zeros(len(ijk), bool)
    out[ok] = array[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]] > 0
    return out


def _share(region: sitk.Image, image: sitk.Image, voxels: np.ndarray) -> float:
    return float(_inside(region, image, voxels).mean())


# --- phantom ------------------------------------------------------------------------------------------

def _chest_phantom() -> tuple[sitk.Image, dict]:
    """A chest in HU: body (soft tissue), two ellipsoidal lungs, trachea and main bronchi joining them, and
    (a) a 25 mm sphere against the lateral chest wall of the left lung (centre half its radius inside the
    lung's outline), (b) a 70 mm mass against the mediastinal side of the right lung (a contact disc
    0.6 of its radius wide), (c) a 6 mm nodule inside the left lung, (d) a 20 mm hilar nodule on the left
    lung's mediastinal side below the bronchus. Each lesion's truth is its part inside the lungs' outline:
    what lies beyond it is wall or mediastinum, 40 HU like the lesion, and belongs to no lung region."""
    spacing = np.array([1.5, 1.5, 2.5])
    size = np.array([240, 200, 100])
    origin = -size * spacing / 2 + spacing / 2
    z, y, x = np.meshgrid(*(origin[i] + np.arange(size[i]) * spacing[i] for i in (2, 1, 0)), indexing="ij")
    hu = np.full(z.shape, -1000.0, np.float32)
    body = (x / 175) ** 2 + (y / 135) ** 2 <= 1
    hu[body] = 40.0
    cavity = np.zeros(z.shape, bool)
    for cx in (-85.0, 85.0):
        cavity |= ((x - cx) / 60) ** 2 + (y / 85) ** 2 + (z / 110) ** 2 <= 1
    hu[cavity] = -850.0
    airway = ((x ** 2 + (y + 10) ** 2 <= 9 ** 2) & (z > 30)) | (((y + 10) ** 2 + (z - 30) ** 2 <= 6 ** 2)
                                                                 & (np.abs(x) <= 45))
    hu[airway] = -1000.0

    def half_width(at_z: float) -> float:  # a lung's half width in x at height z
        return 60 * np.sqrt(1 - (at_z / 110) ** 2)

    centres = [(85 + half_width(40) - 0.5 * 12.5, 0.0, 40.0), (-85 + half_width(-20) - 0.8 * 35, 10.0, -20.0),
               (85.0, -30.0, -40.0), (85 - half_width(16) + 0.8 * 10, -10.0, 16.0)]
    diameters = [25.0, 70.0, 6.0, 20.0]
    balls = [(x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= (d / 2) ** 2 for c, d in zip(centres, diameters)]
    for ball in balls:
        hu[ball & body] = 40.0
    hu = ndimage.gaussian_filter(hu, (0.5, 0.7, 0.7))  # partial volume
    hu += np.random.default_rng(0).normal(0, 20, hu.shape).astype(np.float32)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(origin))
    near_lesion = np.zeros_like(body)
    for c, d in zip(centres, diameters):
        near_lesion |= (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= (d / 2 + 20) ** 2
    tissue = body & ~cavity & ~airway
    to_airway = ndimage.distance_transform_edt(~airway, sampling=spacing[::-1])
    to_cavity = ndimage.distance_transform_edt(~cavity, sampling=spacing[::-1])
    truth = {
        "lesions": [ball & cavity for ball in balls],
        # between the lungs, away from the airways and the lesions
        "mediastinum": tissue & (np.abs(x) < 15) & (to_airway > 5) & ~near_lesion,
        "paratracheal": tissue & (to_airway > 2) & (to_airway < 12) & (z > 45),
        "wall": tissue & (to_cavity > 8) & ~near_lesion,
        "outside": ~body,
    }
    return image, truth


@pytest.fixture(scope="module")
def phantom():
    image, truth = _chest_phantom()
    return image, truth, lung_mask(image, CLOSING), lung_mask(image, ENVELOPE)


def test_envelope_holds_lesions_that_dent_the_lung_where_the_v1_mask_does_not(phantom):
    image, truth, old, new = phantom
    names = ["juxta-pleural 25 mm", "mediastinal mass 70 mm", "isolated 6 mm", "hilar 20 mm"]
    old_shares = [_share(old, image, lesion) for lesion in truth["lesions"]]
    new_shares = [_share(new, image, lesion) for lesion in truth["lesions"]]
    report = ", ".join(f"{n}: v1 {o:.3f} -> {s:.3f}" for n, o, s in zip(names, old_shares, new_shares))
    assert min(new_shares) >= 0.95, report
    # The v1 mask leaves most of the two dents out (measured 0.12 and 0.06): the test is not trivial.
    assert old_shares[0] < 0.5 and old_shares[1] < 0.5, report
    assert old_shares[2] >= 0.95, report  # a nodule surrounded by lung was always inside


def test_envelope_keeps_mediastinum_airways_wall_and_outside_out(phantom):
    image, truth, old, new = phantom
    for name in ("mediastinum", "paratracheal", "wall"):
        assert truth[name].sum() > 1000
        share, v1 = _share(new, image, truth[name]), _share(old, image, truth[name])
        assert share <= 0.01, f"{name}: {share:.4f} of it inside the lung region (v1 mask {v1:.4f})"
    assert not _inside(new, image, truth["outside"]).any()


def test_region_choice_is_validated_and_old_checkpoints_keep_the_v1_mask():
    assert PATCH_PREPROCESS.lung_region == "envelope" and set(LUNG_REGIONS) == {"closing", "envelope"}
    with pytest.raises(ValueError, match="lung_region"):
        PreprocessConfig(lung_region="hull")
    with pytest.raises(ValueError, match="envelope_radius_mm"):
        PreprocessConfig(envelope_radius_mm=0)
    written_before = PATCH_PREPROCESS.to_dict()
    del written_before["lung_region"], written_before["envelope_radius_mm"]
    assert PreprocessConfig.from_dict(written_before).lung_region == "closing"
    assert PreprocessConfig.from_dict(PATCH_PREPROCESS.to_dict()) == PATCH_PREPROCESS


# --- real CT ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lidc_regions(lidc_ct):
    ct = sitk.Cast(lidc_ct, sitk.sitkFloat32)
    return ct, lung_mask(ct, CLOSING), lung_mask(ct, ENVELOPE)


def _ball(image: sitk.Image, centre_lps, radius_mm: float) -> np.ndarray:
    k, j, i = np.round(image.TransformPhysicalPointToContinuousIndex(centre_lps)[::-1]).astype(int)
    sz, sy, sx = image.GetSpacing()[::-1]
    zz, yy, xx = np.ogrid[:image.GetSize()[2], :image.GetSize()[1], :image.GetSize()[0]]
    return ((zz - k) * sz) ** 2 + ((yy - j) * sy) ** 2 + ((xx - i) * sx) ** 2 <= radius_mm ** 2


def test_real_lesions_lie_inside(lidc_regions):
    ct, old, new = lidc_regions
    nodule = _ball(ct, LIDC_NODULE_LPS, 12.0) & (sitk.GetArrayViewFromImage(ct) > -400)
    assert nodule.sum() > 2000
    share, v1 = _share(new, ct, nodule), _share(old, ct, nodule)
    assert share >= 0.95, f"LIDC-IDRI-0001 nodule: {share:.3f} inside (v1 mask {v1:.3f})"
    image = sitk.Cast(sitk.ReadImage(str(require(RADIOMICS_IMAGE))), sitk.sitkFloat32)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(require(RADIOMICS_LABEL)))) == 1
    assert label.sum() > 100
    share, v1 = _share(lung_mask(image, ENVELOPE), image, label), _share(lung_mask(image, CLOSING), image, label)
    assert share >= 0.95, f"lung1 lesion: {share:.3f} inside (v1 mask {v1:.3f})"


def _paste_against_chest_wall(ct: sitk.Image, lung: sitk.Image) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """A real solid LIDC nodule (>= 15 mm, the one nearest 20 mm) pasted into ``ct`` so that it touches the
    right lateral chest wall: its centre goes to the most lateral right-lung voxel of the middle slice
    whose distance to the lung's boundary is the nodule's radius. Returns the CT, the lesion (the crop's
    mask on the CT grid) and the CT voxels that were lung before."""
    index = pd.read_csv(require(CROPS / "index.csv"))
    solid = index[(index.diameter_mm >= 15) & (index.Texture_value == 5)]
    row = solid.assign(off=(solid.diameter_mm - 20).abs()).sort_values(["off", "file"]).iloc[0]
    crop = sitk.Cast(sitk.ReadImage(str(CROPS / row.file)), sitk.sitkFloat32)
    mask = sitk.Cast(sitk.ReadImage(str(CROPS / "mask" / row.file.split("/")[-1])) > 0, sitk.sitkUInt8)
    radius = float(row.diameter_mm) / 2
    inside = sitk.GetArrayFromImage(lung) > 0
    spacing = lung.GetSpacing()[0]
    depth = ndimage.distance_transform_edt(inside) * spacing
    z_mid = int(np.mean(np.nonzero(inside.any(axis=(1, 2)))[0]))
    fits = np.argwhere(np.abs(depth[z_mid] - radius) <= spacing / 2)
    points = np.array([lung.TransformIndexToPhysicalPoint((int(x), int(y), z_mid)) for y, x in fits])
    target = points[np.argmin(points[:, 0])]  # LPS: smallest x is the patient's right side, laterally
    centre = np.asarray(mask.TransformContinuousIndexToPhysicalPoint(np.argwhere(sitk.GetArrayViewFromImage(mask))
                                                                       .mean(0)[::-1].tolist()))
    shift = sitk.TranslationTransform(3, (centre - target).tolist())
    corners = [ct.TransformPhysicalPointToIndex((target + s * 30).tolist()) for s in (-1, 1)]
    lo = np.maximum(np.minimum(*corners), 0)
    hi = np.minimum(np.maximum(*corners) + 1, ct.GetSize())
    roi = ct[int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])]
    values = sitk.GetArrayFromImage(sitk.Resample(crop, roi, shift, sitk.sitkLinear, -1000.0))
    grown = sitk.GetArrayFromImage(sitk.Resample(sitk.BinaryDilate(mask, [1, 1, 1]), roi, shift,
                                                 sitk.sitkNearestNeighbor, 0)) > 0
    lesion_roi = sitk.GetArrayFromImage(sitk.Resample(mask, roi, shift, sitk.sitkNearestNeighbor, 0)) > 0
    hu = sitk.GetArrayFromImage(ct)
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    host = hu[box]
    host[grown] = np.maximum(host, values)[grown]  # the host's own tissue and noise stay where brighter
    pasted = sitk.GetImageFromArray(hu)
    pasted.CopyInformation(ct)
    lesion = np.zeros(hu.shape, bool)
    lesion[box] = lesion_roi
    was_lung = np.zeros(hu.shape, bool)
    was_lung[lesion] = _inside(lung, ct, lesion)
    return pasted, lesion, was_lung


def test_real_nodule_pasted_against_the_chest_wall_lies_inside(lidc_regions):
    ct, old_host, _ = lidc_regions
    pasted, lesion, was_lung = _paste_against_chest_wall(ct, old_host)
    assert lesion.sum() > 1000 and was_lung.sum() > 0.8 * lesion.sum()
    old, new = lung_mask(pasted, CLOSING), lung_mask(pasted, ENVELOPE)
    # The lesion is its part inside the host lung's outline; the rest of the crop's mask landed in the wall.
    share, v1 = _share(new, pasted, was_lung), _share(old, pasted, was_lung)
    whole = _share(new, pasted, lesion)
    message = f"pasted nodule: {share:.3f} inside ({whole:.3f} of its whole mask), v1 mask {v1:.3f}"
    assert share >= 0.95, message
    assert v1 < 0.8, message  # it does touch the wall: the v1 mask leaves a clear part of it out


def test_region_stays_a_sane_size_without_trachea_surroundings_or_outside(lidc_regions):
    ct, old, new = lidc_regions
    old_a = sitk.GetArrayFromImage(old) > 0
    new_a = sitk.GetArrayFromImage(new) > 0
    ratio = new_a.sum() / old_a.sum()
    # Measured 1.11; a per-slice convex hull per lung gave 1.35 and one closing of both lungs together
    # (the mediastinum filled) more: 1.2 catches either.
    assert 1.0 < ratio <= 1.2, f"envelope / v1 volume {ratio:.3f}"
    assert (old_a & ~new_a).sum() <= 0.005 * old_a.sum()  # it holds what v1 held, but for ~0.2 %
    hu = sitk.GetArrayFromImage(sitk.Resample(ct, new, sitk.Transform(), sitk.sitkLinear, -1000.0))
    # Outside the body: the slice's air not enclosed by tissue.
    body = np.stack([ndimage.binary_fill_holes(s) for s in hu > -320])
    assert not (new_a & ~body).any()
    # The trachea: followed down from the top slice of the v1 mask (a small component there) until it
    # joins the lungs; tissue 4-20 mm from its axis stays out (measured 0.12 against v1's 0.02, mostly
    # vessels the right apex wraps; without the airway split it was 0.25).
    top = int(np.nonzero(old_a.any(axis=(1, 2)))[0].max())
    rows, cols = np.indices(old_a.shape[1:])
    around = np.zeros_like(old_a)
    axis = None
    for z in range(top, top - 35, -1):
        labels, n = ndimage.label(old_a[z])
        for k in range(1, n + 1):
            centre = np.array(ndimage.center_of_mass(labels == k))
            if (labels == k).sum() < 150 and (axis is None or np.linalg.norm(centre - axis) < 8):
                axis = centre
                break
        assert axis is not None, "no trachea in the top slice of the lung mask"
        distance = np.hypot(rows - axis[0], cols - axis[1]) * new.GetSpacing()[0]
        around[z] = (distance > 4) & (distance < 20)
    around &= hu > -320
    assert around.sum() > 3000
    share = new_a[around].mean()
    assert share <= 0.2, f"tissue around the trachea: {share:.3f} inside (v1 {old_a[around].mean():.3f})"


def test_one_lung_region_serves_two_grids():
    """A detector that preprocesses one CT on two grids may compute the region once: only when the two
    configs find the same region, and then the result is exactly that of computing it again."""
    from noduleai.preprocess import preprocess_ct, same_lung_region
    from noduleai.synthetic import make_phantom

    fine, coarse = PreprocessConfig(spacing_mm=(1.5, 1.5, 1.5)), PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0))
    assert same_lung_region(coarse, fine) and same_lung_region(fine, coarse)
    assert not same_lung_region(CLOSING, ENVELOPE)
    assert not same_lung_region(coarse, PreprocessConfig(spacing_mm=(1.5,) * 3, envelope_radius_mm=30.0))
    ct = sitk.Cast(make_phantom(5, n_nodules=1).image, sitk.sitkFloat32)  # as preprocess_ct casts it
    mask = lung_mask(ct, coarse)
    for config in (fine, coarse):
        shared, own = preprocess_ct(ct, config, mask), preprocess_ct(ct, config)
        assert np.array_equal(sitk.GetArrayViewFromImage(shared.image), sitk.GetArrayViewFromImage(own.image))
        assert np.array_equal(shared.mask_array, own.mask_array) and shared.lung_found == own.lung_found

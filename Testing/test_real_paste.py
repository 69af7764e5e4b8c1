"""v2 data: real LIDC nodule crops split by patient, pasted into a real CT as contrast over the smoothed
host (the host's own noise kept, only density added), masses scaled from real crops, keyed cohorts with
the host's real lesion labelled and excluded from scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import RADIOMICS_IMAGE, SHARED_DATA, require
from scipy import ndimage

from noduleai.crops import load_crop, read_crop_index, split_by_patient
from noduleai.insertion import Host
from noduleai.lesion_paste import insert_real_nodules, lesion_on_host, paste, smoothed
from noduleai.real_cohort import KEY_FILE, label_path, load_real_host, write_real_cohort

CROPS = SHARED_DATA / "lidc-nodule-crops"


@pytest.fixture(scope="module")
def crops():
    return read_crop_index(require(CROPS))


@pytest.fixture(scope="module")
def lung1_host():
    from noduleai.io import read_ct

    return Host.from_image("lung1", read_ct(require(RADIOMICS_IMAGE)))


def _solid(crops, low, high):
    """The first solid, non-calcified crop in a size range (deterministic: index order)."""
    return next(c for c in crops if c.texture == 5 and c.calcification == 6 and low <= c.diameter_mm <= high)


def test_crop_index_and_patient_split(crops):
    assert len(crops) == 990 and len({c.patient_id for c in crops}) == 549
    assert not {"LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"} & {c.patient_id for c in crops}
    parts = split_by_patient(crops, {"train": 0.7, "validation": 0.15, "test": 0.15}, seed=5)
    patients = {name: {c.patient_id for c in part} for name, part in parts.items()}
    assert not patients["train"] & patients["test"] and not patients["validation"] & patients["test"]
    assert not patients["train"] & patients["validation"]
    assert sum(len(p) for p in parts.values()) == len(crops)
    assert 0.6 < len(patients["train"]) / 549 < 0.8 and 0.08 < len(patients["test"]) / 549 < 0.22
    # A patient's part depends on its id and the seed only: a subset of the crops keeps every assignment.
    subset = split_by_patient(crops[::3], {"train": 0.7, "validation": 0.15, "test": 0.15}, seed=5)
    for name, part in subset.items():
        assert {c.patient_id for c in part} <= patients[name]


def test_crop_errors_name_the_file(tmp_path, crops):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "index.csv")):
        read_crop_index(tmp_path)
    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    (tmp_path / "image" / "x.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "mask" / "x.nii.gz").write_bytes(b"not a nifti")
    broken = type(crops[0])("image/x.nii.gz", "p", 1, 5.0, 5, 6, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="x.nii.gz"):
        load_crop(tmp_path, broken)


def _highpass_std(hu: np.ndarray, where: np.ndarray) -> float:
    return float(np.std((hu - ndimage.gaussian_filter(hu, (0, 1.5, 1.5)))[where]))


def test_pasted_real_nodule_keeps_host_noise_and_adds_only_density(lung1_host, crops):
    host = lung1_host.copy()
    crop = _solid(crops, 14.0, 20.0)
    hu, mask = load_crop(CROPS, crop)
    rng = np.random.default_rng(0)
    # An isolated place: deep in the lung, away from vessels.
    candidates = np.argwhere((host.wall_mm > 20) & (host.vessel_mm > 12))
    zyx = candidates[len(candidates) // 2]
    lps = host.image.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]])
    lesion = lesion_on_host(hu, mask, host.image, lps, 1.0, rng)
    before = host.hu.copy()
    added = paste(host, lesion, smoothed(host))
    assert added.min() >= 0.0  # only density added
    box = tuple(slice(a, a + n) for a, n in zip(lesion.lo, lesion.hu.shape))
    outside = np.ones(host.hu.shape, bool)
    outside[box] = False
    assert np.array_equal(before[outside], host.hu[outside])  # nothing else touched
    core = np.zeros(host.hu.shape, bool)
    core[box] = ndimage.binary_erosion(lesion.core >= 0.5, iterations=1)
    assert core.sum() > 50
    # Real density: the pasted interior reads like the crop's own interior.
    crop_inside = sitk.GetArrayFromImage(hu)[ndimage.binary_erosion(sitk.GetArrayFromImage(mask) > 0)]
    assert abs(float(np.median(host.hu[core])) - float(np.median(crop_inside))) < 120
    # The host's own noise stays under the lesion: its high-pass texture is that of the host's soft
    # tissue around it, not smoother (v1 replaced interiors by a level plus estimated white noise).
    host_tissue = (before > -100) & (before < 150) & ~ndimage.binary_dilation(core, iterations=5)
    ratio = _highpass_std(host.hu, core) / _highpass_std(before, host_tissue)
    assert 0.6 < ratio < 1.6, ratio
    # The lesion lands where asked: the readers' mask's centre within a voxel of the requested point.
    centre = np.asarray(ndimage.center_of_mass(lesion.core)) + lesion.lo
    got = host.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre[::-1]])
    assert np.linalg.norm(np.subtract(got, lps)) < max(host.image.GetSpacing())


def test_masses_from_scaled_real_crops_and_labels_follow_the_readers_mask(lung1_host, crops):
    host = lung1_host.copy()
    rng = np.random.default_rng(3)
    small, large = _solid(crops, 6.0, 8.0), _solid(crops, 20.0, 32.0)
    items = [(small, *load_crop(CROPS, small), small.diameter_mm), (large, *load_crop(CROPS, large), 60.0)]
    labels = np.zeros(host.hu.shape, np.uint8)
    inserted = insert_real_nodules(host, items, rng, labels)
    assert [n.label for n in inserted] == [1, 2]
    spacing = np.asarray(host.image.GetSpacing()[::-1])
    for nodule, target in zip(inserted, (small.diameter_mm, 60.0)):
        # The readers' outline sets the size (not the grown support): within 25 % of the target, on a
        # 5 mm-slice host whose partial volume blurs small lesions.
        assert abs(nodule.diameter_mm - target) / target < 0.25, (nodule.diameter_mm, target)
        where = np.argwhere(labels == nodule.label)
        centre = host.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in where.mean(0)[::-1]])
        assert np.linalg.norm(np.subtract(centre, nodule.center_lps)) < 2 * spacing.max()
    mass = labels == 2
    assert (mass & host.lung).sum() >= 0.6 * mass.sum()  # a mass may invade the wall, mostly in the lung


def test_cohort_is_keyed_and_real_lesion_labelled_but_excluded(tmp_path, crops):
    real = load_real_host(SHARED_DATA, "lung1")
    assert len(real.reference) == 1 and real.label is not None and real.label.sum() > 0
    chosen = [c for c in crops if c.patient_id in {"LIDC-IDRI-0004", "LIDC-IDRI-0005", "LIDC-IDRI-0006"}]
    out = tmp_path / "cohort"
    cases = write_real_cohort(real, chosen, CROPS, out, n_cases=1, seed=1, nodules_per_case=(2, 2))
    case = cases[0]
    assert case.nodules and case.excluded == real.reference
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path(case))))
    assert np.array_equal(label == 1, real.label == 1)  # the real lesion keeps label 1
    image = sitk.ReadImage(case.image_path)
    for k, nodule in enumerate(case.nodules, 2):
        index = image.TransformPhysicalPointToIndex(nodule.center_lps)
        assert label[index[::-1]] == k
    details = json.loads((out / "insertions.json").read_text())[case.case_id]
    assert {d["source_patient"] for d in details} <= {"LIDC-IDRI-0004", "LIDC-IDRI-0005", "LIDC-IDRI-0006"}
    stamp = (out / KEY_FILE).stat().st_mtime_ns
    again = write_real_cohort(real, chosen, CROPS, out, n_cases=1, seed=1, nodules_per_case=(2, 2))
    assert (out / KEY_FILE).stat().st_mtime_ns == stamp and again[0].nodules == case.nodules  # reused
    write_real_cohort(real, chosen, CROPS, out, n_cases=1, seed=2, nodules_per_case=(2, 2))
    assert (out / KEY_FILE).stat().st_mtime_ns != stamp  # another seed: rewritten, never reused
    assert json.loads((out / KEY_FILE).read_text())["parameters"]["seed"] == 2

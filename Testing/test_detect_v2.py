"""Two-stage detection (v2) end to end on a phantom: proposals from a candidate map land on the nodules
with their size, the classifier's probabilities follow the fitted temperature without changing the
ranking, the heatmap lies on the CT's grid without tile edges, and a cancel stops the run."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from noduleai.calibration import calibrated, expected_calibration_error, fit_temperature
from noduleai.candidate_net import CandidateNetConfig
from noduleai.checkpoint import ModelInfo
from noduleai.detect import DetectionCancelled
from noduleai.detect_v2 import TwoStageDetector
from noduleai.evaluate import hits
from noduleai.geometry import same_geometry
from noduleai.models import build_model
from noduleai.preprocess import PreprocessConfig
from noduleai.synthetic import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(21, n_nodules=3, diameter_range_mm=(8.0, 16.0))


def _oracle_net() -> torch.nn.Module:
    """The candidate network's stand-in: a real 1x1x1 Conv3d that maps a label map (fed in place of the
    CT on the candidate grid, below) to logits +-20. The test checks the plumbing (grids, sliding
    windows, proposals, sizes, ranking, maps), not a training run."""
    net = torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        net.weight.fill_(40.0)
        net.bias.fill_(-20.0)
    return net


def test_two_stage_detection_on_a_phantom(phantom, monkeypatch):
    candidate_pre = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0))
    classifier_pre = PreprocessConfig(spacing_mm=(1.5, 1.5, 1.5))
    labels = sitk.Cast(phantom.nodule_labels > 0, sitk.sitkFloat32)
    import noduleai.detect_v2 as detect_v2
    from noduleai.preprocess import preprocess_ct as real_preprocess

    def preprocess_with_labels(ct, config):
        pre = real_preprocess(ct, config)
        if config == candidate_pre:  # the oracle's input: the nodule labels on the candidate grid
            label = sitk.Resample(labels, pre.image, sitk.Transform(), sitk.sitkLinear, 0.0)
            pre.image = sitk.Cast(label > 0.5, sitk.sitkFloat32)
        return pre

    monkeypatch.setattr(detect_v2, "preprocess_ct", preprocess_with_labels)
    torch.manual_seed(0)
    classifier = build_model("resnet10_3d", width=0.125, small_input=True)
    info = ModelInfo("resnet10_3d", "patch", (32, 32, 32), classifier_pre.to_dict(), width=0.125, small_input=True,
                     cam_layer="layer2")
    config = CandidateNetConfig(roi=32)
    detector = TwoStageDetector(_oracle_net(), config, candidate_pre, classifier, info,
                                temperature=1.0, device="cpu")
    result = detector.detect(phantom.image)
    assert len(result.candidates) == len(phantom.nodules)
    for nodule in phantom.nodules:
        hit = [c for c in result.candidates if hits(c.position_lps, nodule.center_lps, nodule.diameter_mm)]
        assert len(hit) == 1, nodule
        assert abs(hit[0].diameter_mm - nodule.diameter_mm) < 0.3 * nodule.diameter_mm + 2.0
        assert np.allclose(hit[0].position_ras, np.asarray(hit[0].position_lps) * [-1, -1, 1])
    assert same_geometry(result.heatmap, phantom.image) and same_geometry(result.probability_map, phantom.image)
    heat = sitk.GetArrayFromImage(result.heatmap)
    assert heat.max() > 0 and heat.min() >= 0
    # Tukey blending: no step at any patch face (the largest voxel-to-voxel jump stays well below the peak).
    assert max(np.abs(np.diff(heat, axis=a)).max() for a in range(3)) < 0.5 * heat.max()
    # A hotter temperature keeps the ranking and pulls probabilities towards 0.5.
    probs = [c.probability for c in result.candidates]
    detector.temperature = 4.0
    warm = detector.detect(phantom.image)
    assert [c.position_lps for c in warm.candidates] == [c.position_lps for c in result.candidates]
    assert all(abs(w.probability - 0.5) <= abs(p - 0.5) + 1e-9 for w, p in zip(warm.candidates, probs))
    with pytest.raises(DetectionCancelled):
        detector.detect(phantom.image, progress=lambda f: f >= 0.6)


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 6, 4000)
    y = (rng.random(4000) < calibrated(z, 3.0)).astype(int)  # labels drawn at temperature 3
    t = fit_temperature(z, y)
    assert 2.6 < t < 3.4
    assert expected_calibration_error(calibrated(z, t), y) < expected_calibration_error(calibrated(z, 1.0), y)
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature([1.0, 2.0], [1, 1])

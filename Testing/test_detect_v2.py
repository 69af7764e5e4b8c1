"""Two-stage detection (v2) end to end on a phantom: proposals from a candidate map land on the nodules
with their size, the classifier's probabilities follow the fitted temperature without changing the
ranking, the heatmap lies on the CT's grid without tile edges, and a cancel stops the run."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from noduleai.calibration import calibrated, expected_calibration_error, fit_calibration
from noduleai.candidate_net import CandidateNetConfig
from noduleai.checkpoint import ModelInfo
from noduleai.detect import DetectionCancelled
from noduleai.detect_v2 import MAP_FLOOR, TwoStageDetector
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

    def preprocess_with_labels(ct, config, mask=None):
        pre = real_preprocess(ct, config, mask)
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
    # The candidate map keeps the lesions and drops the faint background (a small, fast output file).
    _proposals, candidate_map, _found = detector.propose(phantom.image)
    shown = sitk.GetArrayFromImage(candidate_map)
    assert shown.max() > 0.9 and shown[shown > 0].min() >= MAP_FLOOR
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
    # The proposal limit caps the peaks the classifier scores, best first.
    detector.proposal_limit = 2
    capped, _map, _found = detector.propose(phantom.image)
    assert [s for _p, s, _d in capped] == [s for _p, s, _d in _proposals[:2]]


def test_calibration_fit_recovers_a_known_temperature_and_bias():
    rng = np.random.default_rng(1)
    z = rng.normal(1.5, 6, 4000)  # logits shifted, as inverse class weights shift them
    y = (rng.random(4000) < calibrated(z, 3.0, -2.0)).astype(int)  # labels drawn at T = 3, b = -2
    t, b, w = fit_calibration(z, y)
    assert 2.6 < t < 3.4 and -2.4 < b < -1.6 and w == 0.0
    assert expected_calibration_error(calibrated(z, t, b), y) < 0.03
    # A temperature alone cannot remove the offset: the bias is needed for P >= 0.5 to mean what it says.
    def nll(t: float) -> float:
        p = np.clip(calibrated(z, t), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    t_only = min(np.exp(np.linspace(-2, 3, 200)), key=nll)
    assert expected_calibration_error(calibrated(z, t_only), y) > 2 * expected_calibration_error(calibrated(z, t, b), y)
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration([1.0, 2.0], [1, 1])


def test_fusion_recovers_the_candidate_weight_and_adds_nothing_when_the_score_is_noise():
    """P = sigmoid(z / T + w logit(s) + b): a known weight is recovered from labels drawn with it; a candidate
    score unrelated to the labels gets a weight near 0 (the fusion cannot invent evidence)."""
    from noduleai.calibration import score_logit

    rng = np.random.default_rng(2)
    z, s = rng.normal(0, 4, 6000), rng.uniform(0.05, 0.95, 6000)
    y = (rng.random(6000) < calibrated(z, 2.0, -1.0, s, 1.5)).astype(int)
    t, b, w = fit_calibration(z, y, s)
    assert 1.7 < t < 2.3 and -1.3 < b < -0.7 and 1.2 < w < 1.8
    alone = calibrated(z, *fit_calibration(z, y)[:2])
    fused = calibrated(z, t, b, s, w)
    assert expected_calibration_error(fused, y) < 0.03
    nll = [float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) for p in (alone, fused)]
    assert nll[1] < nll[0] - 0.05  # the candidate score carries evidence here, and the fit uses it
    y_noise = (rng.random(6000) < calibrated(z, 2.0, -1.0)).astype(int)
    assert abs(fit_calibration(z, y_noise, s)[2]) < 0.15
    assert np.isfinite(score_logit([0.0, 1.0])).all()  # a saturated score stays finite


def test_operating_threshold_allows_at_most_the_chosen_false_positives_per_scan():
    """The working point is the lowest threshold at which the scans' false positives average at most the
    target; lesions never count as false positives."""
    from noduleai.calibration import operating_threshold

    probs = [[0.9, 0.8, 0.3], [0.7, 0.6, 0.2]]
    lesion = [[True, False, False], [False, False, True]]
    t = operating_threshold(probs, lesion, 1.0)  # 2 scans: at most 2 false positives in all -> 0.8 and 0.7
    assert 0.6 < t <= 0.7 + 1e-9
    false = sum(p >= t and not hit for ps, ls in zip(probs, lesion) for p, hit in zip(ps, ls))
    assert false == 2 and all(p >= t for p in (0.9, 0.8, 0.7))
    assert operating_threshold(probs, lesion, 0.0) > 0.8  # no false positive allowed: above the highest
    assert operating_threshold(probs, lesion, 5.0) == 0.0  # every false positive allowed


def test_one_lesion_is_listed_once():
    """A proposal whose centre lies inside a better-ranked proposal's sphere (the hit rule), or that holds
    the better one inside its own, is the same lesion seen twice and is not listed; apart, both are."""
    from noduleai.detect_v2 import ScoredProposals

    detector = _tiny_two_stage()
    proposals = [((0.0, 0.0, 0.0), 0.9, 30.0),   # a 30 mm nodule
                 ((10.0, 0.0, 0.0), 0.8, 8.0),   # inside it: a duplicate
                 ((40.0, 0.0, 0.0), 0.7, 6.0),   # apart: another lesion
                 ((-12.0, 0.0, 0.0), 0.6, 40.0)]  # holds the first inside its own sphere: a duplicate
    scored = ScoredProposals(proposals, [], np.zeros(4), None, None, True, {})
    assert detector.ranked(scored, np.array([0.9, 0.8, 0.7, 0.6])) == [0, 2]
    # Ranked by probability first: the better-scored small proposal is kept and the 30 mm one that holds it
    # is then dropped; the 40 mm one (22 mm from the small one's centre) no longer overlaps anything listed.
    assert detector.ranked(scored, np.array([0.5, 0.95, 0.7, 0.1])) == [1, 2, 3]
    detector.min_probability = 0.75
    assert detector.ranked(scored, np.array([0.9, 0.8, 0.7, 0.6])) == [0]


def _tiny_two_stage(seed: int = 0) -> TwoStageDetector:
    """Real (untrained) networks of both stages, small enough for a CPU test."""
    from noduleai.candidate_net import build_net

    torch.manual_seed(seed)
    config = CandidateNetConfig(features=(4, 4, 8, 8, 16, 4), roi=48)
    classifier = build_model("resnet10_3d", width=0.125, small_input=True)
    info = ModelInfo("resnet10_3d", "patch", (32, 32, 32), PreprocessConfig(spacing_mm=(1.5, 1.5, 1.5)).to_dict(),
                     width=0.125, small_input=True, cam_layer="layer2", name="tiny-two-stage")
    return TwoStageDetector(build_net(config), config, PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0)), classifier, info,
                            temperature=2.5, device="cpu", bias=-1.25)


def test_detector_file_round_trip_and_format_dispatch(phantom, tmp_path):
    """One file holds both stages and the temperature; it loads with weights_only (plain data), gives the
    same detections as the detector it was written from, and load_detector tells it from a v1 model."""
    from noduleai.checkpoint import CheckpointError, save_model
    from noduleai.detect import Detector
    from noduleai.detect_v2 import DETECTOR_FORMAT, DETECTOR_FORMAT_VERSION, load_detector, save_detector

    detector = _tiny_two_stage()
    detector.candidate_weight, detector.operating_threshold = 0.7, 0.42
    path = tmp_path / "two_stage.pt"
    save_detector(path, detector)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == DETECTOR_FORMAT and payload["temperature"] == 2.5 and payload["bias"] == -1.25
    assert (payload["candidate_weight"], payload["operating_threshold"]) == (0.7, 0.42)
    assert "optimiser" not in payload["candidate"]  # weights only: what detection needs
    loaded = load_detector(path, "cpu", max_candidates=5, stride_mm=16.0)  # stride_mm: v1 only, ignored
    assert isinstance(loaded, TwoStageDetector) and (loaded.temperature, loaded.bias) == (2.5, -1.25)
    assert loaded.max_candidates == 5
    detector.max_candidates = 5
    a, b = detector.detect(phantom.image), loaded.detect(phantom.image)
    assert [c.position_lps for c in a.candidates] == [c.position_lps for c in b.candidates]
    assert np.allclose([c.probability for c in a.candidates], [c.probability for c in b.candidates])
    assert b.model["file"] == "two_stage.pt" and b.model["task"] == "two-stage"
    # Reports decide at the model's operating threshold unless the user sets one.
    assert (loaded.candidate_weight, loaded.operating_threshold) == (0.7, 0.42)
    report = b.report("case")
    assert report["decision_threshold"] == 0.42 and "validation" in report["decision_threshold_source"]
    assert report["n_candidates_at_or_above_threshold"] == sum(c.probability >= 0.42 for c in b.candidates)
    assert b.report("case", 0.9)["decision_threshold"] == 0.9
    # A working point of 0 (every validation false positive allowed) never turns an empty list into a finding.
    from noduleai.detect import DetectionResult

    empty = DetectionResult(0.0, [], b.heatmap, None, True, {"operating_threshold": 0.0})
    assert empty.report("case")["decision"] == "no nodule found"
    # A file written before the working point existed loads with none and reports at 0.5.
    for key in ("candidate_weight", "operating_threshold"):
        del payload[key]
    torch.save(payload, tmp_path / "older.pt")
    older = load_detector(tmp_path / "older.pt", "cpu")
    assert (older.candidate_weight, older.operating_threshold) == (0.0, None)
    assert older.detect(phantom.image).report("case")["decision_threshold"] == 0.5
    payload = torch.load(path, map_location="cpu", weights_only=True)
    # A v1 model file still loads as a v1 detector.
    v1 = tmp_path / "v1.pt"
    save_model(v1, detector.classifier, detector.info)
    assert isinstance(load_detector(v1, "cpu", stride_mm=16.0), Detector)
    # Damaged or foreign files: the error names the file and the problem.
    del payload["classifier"]
    torch.save(payload, tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match=r"half\.pt: detector file without its 'classifier' part"):
        load_detector(tmp_path / "half.pt")
    payload["format_version"] = DETECTOR_FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=r"newer\.pt: format version .* is newer than this engine"):
        load_detector(tmp_path / "newer.pt")
    torch.save({"format": "noduleai-candidate-net"}, tmp_path / "net.pt")
    with pytest.raises(CheckpointError, match=r"net\.pt: is a 'noduleai-candidate-net' file, expected "
                                              r"'noduleai-detector' or 'noduleai-model'"):
        load_detector(tmp_path / "net.pt")


def test_detect_command_runs_a_two_stage_file(phantom, tmp_path):
    """`noduleai detect --model FILE` with a two-stage file writes the same outputs as with a v1 model."""
    import json

    from noduleai.cli import main
    from noduleai.detect_v2 import save_detector
    from noduleai.io import write_image_atomic

    save_detector(tmp_path / "two_stage.pt", _tiny_two_stage())
    write_image_atomic(phantom.image, tmp_path / "ct.nrrd")
    code = main(["-q", "detect", str(tmp_path / "ct.nrrd"), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--model", str(tmp_path / "two_stage.pt"), "--max-candidates", "4", "--no-dicom-out"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "ct_report.json").read_text())
    assert report["model"]["task"] == "two-stage" and report["model"]["temperature"] == 2.5
    assert 0 < report["n_candidates"] <= 4
    assert (tmp_path / "out" / "ct_heatmap.nrrd").exists()


def test_card_shows_every_held_out_host_with_its_own_numbers():
    """The card is written from a leave-one-host-out report made by the real metric functions: each host
    row carries that fold's candidate stage, CPM with its interval and real-lesion rank, and the pooled row."""
    from noduleai.evaluate import candidate_stage, froc
    from noduleai.modelcard import detector_card
    from noduleai.recipe_v2 import RANKINGS, operating_point, summarise_loho

    truths = [[((0.0, 0.0, 0.0), 12.0), ((50.0, 0.0, 0.0), 6.0)], [((0.0, 40.0, 0.0), 20.0)]]
    folds = {}
    for name, offset in (("lidc0001", 0.0), ("lung1", 30.0)):  # lung1's first nodule is missed
        detections = [[((offset, 0.0, 0.0), 0.9), ((50.0, 0.0, 0.0), 0.6), ((90.0, 90.0, 90.0), 0.7)],
                      [((0.0, 40.0, 0.0), 0.8)]]
        curve = froc(detections, truths, [[], []])
        folds[name] = {"candidate_stage": {"inserted": candidate_stage([[p for p, _ in d] for d in detections],
                                                                       truths)},
                       "froc": {"cpm": curve.cpm, "cpm_ci": curve.cpm_ci, "nodules": curve.n_nodules,
                                "scans": curve.n_scans, "sensitivity_at": curve.sensitivity_at},
                       "original_ct": {"real_lesions": [{"diameter_mm": 23.4, "rank": 1, "probability": 0.93}],
                                       "false_positives_at": {"0.5": 2, "0.9": 0}},
                       "calibration": {"temperature": 1.7, "bias": -0.5}, "classifier_patch_test": {},
                       "operating_point": operating_point(detections, truths, [[], []], 0.65),
                       "cpm_by_ranking": {way: {"cpm": curve.cpm, "cpm_ci": curve.cpm_ci} for way in RANKINGS}}
        folds[name]["original_ct"]["false_positives_at_operating_threshold"] = 1
        folds[name]["candidate_stage"]["original_ct"] = {"proposals": 40, "real_lesions": []}
    pooled = froc([[((0.0, 0.0, 0.0), 0.9)]] * 2, truths, [[], []])
    report = {"protocol": "PROTOCOL TEXT", "folds": folds, "not_held_out": ["totalseg"],
              "pooled_candidate_stage": candidate_stage([[(0.0, 0.0, 0.0)]] * 2, truths),
              "pooled": {"cpm": pooled.cpm, "cpm_ci": pooled.cpm_ci, "sensitivity_at": pooled.sensitivity_at}}
    detector = _tiny_two_stage()
    stressed = folds["lung1"] | {"original_ct": {"real_lesions": [{"diameter_mm": 14.2, "rank": None,
                                                                  "probability": None}],
                                                 "false_positives_at_operating_threshold": 4}}
    detector.info.metrics = {"thick_slice_stress": {"lung1": {"8.0": stressed}}, "held_out_explanations": {
        "lidc0001": [{"diameter_mm": 23.4, "rank": 1, "probability": 0.93, "heat_peak_inside": True,
                      "heat_peak_distance_mm": 4.2}],
        "lung1": [{"diameter_mm": 14.2, "rank": None, "probability": None, "heat_peak_inside": False,
                   "heat_peak_distance_mm": 61.0}]}}
    detector.info.training_data = {"classifier_epochs": 4}
    card = detector_card(detector, summarise_loho(report), {"lidc0001": "GE 2.5 mm", "lung1": "5 mm"})
    stress_row = next(line for line in card.splitlines() if line.startswith("| lung1 | 8 mm (simulated) |"))
    assert _cpm_text(folds["lung1"]["froc"]) in stress_row and "14 mm: missed" in stress_row
    assert stress_row.endswith("| 4 |")
    assert "PROTOCOL TEXT" in card and "research use" in card.lower()
    assert "- lidc0001: 23 mm lesion rank 1, P 0.93; heatmap peak inside it, 4 mm from its centre" in card
    assert "- lung1: 14 mm lesion not listed; heatmap peak outside it, 61 mm from its centre" in card
    assert "trained 4 epochs on the candidate" in card
    config = detector.candidate_config  # the card says how the shipped candidate network was trained
    assert f"trained {config.steps} steps" in card and config.lesion_sampling.replace("_", " ") in card
    assert "no fold of its own in this build): totalseg" in card
    for name, acquisition in (("lidc0001", "GE 2.5 mm"), ("lung1", "5 mm")):
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} ({acquisition}) |"))
        assert _cpm_text(folds[name]["froc"]) in row
        assert "23 mm: rank 1, P 0.93" in row and row.endswith("| 1 (2) |")
        point = folds[name]["operating_point"]
        assert f"| {100 * point['sensitivity']:.0f} %, {point['false_positives_per_scan']:.1f} |" in row
    assert folds["lidc0001"]["froc"]["cpm"] > folds["lung1"]["froc"]["cpm"]
    # At 0.65 the 6 mm nodule (P 0.6) is below the working point; lung1's 12 mm one is missed and its
    # detection 30 mm away is a false positive.
    assert folds["lidc0001"]["operating_point"] == {"threshold": 0.65, "sensitivity": pytest.approx(2 / 3),
                                                    "nodules": 3, "scans": 2, "false_positives_per_scan": 0.5}
    assert folds["lung1"]["operating_point"]["sensitivity"] == pytest.approx(1 / 3)
    assert folds["lung1"]["operating_point"]["false_positives_per_scan"] == 1.0
    assert "| **pooled** | " in card and "P = sigmoid(z / 2.50\n  +0.00 logit(s) -1.25)" in card
    assert "operating threshold none stored" in card
    from noduleai.modelcard import RANKING_LABELS

    assert tuple(RANKING_LABELS) == RANKINGS  # the card's columns are the recipe's rankings, in order


def _cpm_text(froc: dict) -> str:
    return f"{froc['cpm']:.2f} ({froc['cpm_ci'][0]:.2f}-{froc['cpm_ci'][1]:.2f})"

"""The candidate network (MONAI BasicUNet) and the candidate stage measured on its own: proposals from a
probability map, resumable training, weights-only checkpoints, the candidate-stage metric by hand."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from noduleai.candidate_net import (
    CandidateNetConfig,
    CentreFocalLoss,
    PreparedCase,
    centre_heat,
    lesion_regions,
    lesion_voxel,
    load_candidate_net,
    probability_map,
    proposals_from_map,
    sample_batch,
    size_fraction,
    train_candidate_net,
    widened_targets,
)
from noduleai.checkpoint import CheckpointError
from noduleai.evaluate import candidate_stage, hits
from noduleai.preprocess import PreprocessConfig

TINY = dict(features=(4, 4, 8, 8, 16, 4), patch=32, batch_size=2, roi=32, steps=4, seed=3)


def _ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


def test_proposals_are_components_with_size_and_lung_contact():
    shape = (40, 40, 40)
    prob = np.zeros(shape, np.float32)
    prob[_ball(shape, (10, 10, 10), 4)] = 0.9  # 8 voxels across at 2 mm: a 16-17 mm lesion
    prob[_ball(shape, (30, 30, 12), 1.2)] = 0.6  # a small one
    prob[_ball(shape, (30, 8, 30), 3)] = 0.95  # outside the lung region: not a candidate
    lung = np.zeros(shape, bool)
    lung[:, :25] = True
    lung[25:, 25:] = True
    lung[:, :, 26:] = False
    found = proposals_from_map(prob, lung, (2.0, 2.0, 2.0), threshold=0.1)
    assert len(found) == 2
    assert found[0].score == pytest.approx(0.9) and found[1].score == pytest.approx(0.6)
    assert np.allclose(found[0].zyx, (10, 10, 10), atol=0.01) and np.allclose(found[1].zyx, (30, 30, 12), atol=0.01)
    assert found[0].diameter_mm == pytest.approx(2 * (3 * _ball(shape, (10, 10, 10), 4).sum() * 8 / (4 * np.pi))
                                                 ** (1 / 3))
    assert proposals_from_map(prob, lung, (2.0, 2.0, 2.0), threshold=0.1, limit=1) == found[:1]
    assert proposals_from_map(np.zeros(shape, np.float32), lung, (2.0, 2.0, 2.0)) == []
    # A 60 mm mass with a bumpy map (many local maxima inside) is one proposal of about its size.
    big = (64, 64, 64)
    ball = _ball(big, (32, 32, 32), 15)
    bumpy = np.where(ball, 0.8 + 0.1 * np.random.default_rng(0).random(big), 0.0).astype(np.float32)
    mass = proposals_from_map(bumpy, np.ones(big, bool), (2.0, 2.0, 2.0))
    assert len(mass) == 1 and abs(mass[0].diameter_mm - 60.0) < 4.0


def test_recipe_proposals_are_lps_points_at_the_threshold_and_limit_asked():
    from noduleai.recipe_v2 import proposals_on_map

    shape = (30, 30, 30)
    prob = np.zeros(shape, np.float32)
    prob[_ball(shape, (8, 8, 8), 2)] = 0.8
    prob[_ball(shape, (20, 22, 18), 2)] = 0.03  # below the default threshold (0.05), above 0.01
    reference = sitk.Image([30, 30, 30], sitk.sitkUInt8)  # (x, y, z) on a rotated, offset 2 mm grid
    reference.SetSpacing((2.0, 2.0, 2.0))
    reference.SetOrigin((-100.0, 50.0, -300.0))
    reference.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    case = PreparedCase("rotated", prob, np.ones(shape, bool), np.zeros(shape, np.uint8), reference)
    default = proposals_on_map(prob, case, CandidateNetConfig())
    assert len(default) == 1 and default[0][1] == pytest.approx(0.8)
    assert np.allclose(default[0][0], reference.TransformIndexToPhysicalPoint((8, 8, 8)), atol=0.01)
    low = proposals_on_map(prob, case, CandidateNetConfig(), threshold=0.01)
    assert len(low) == 2
    assert np.allclose(low[1][0], reference.TransformIndexToPhysicalPoint((18, 22, 20)), atol=0.01)
    assert proposals_on_map(prob, case, CandidateNetConfig(), threshold=0.01, limit=1) == low[:1]


def test_touching_lesions_are_two_proposals_each_on_its_own_lesion():
    # Two 12 mm nodules 18 mm apart whose blurred maps join at ~0.6 between them (as seen on a validation
    # CT): half-height regions merged them into one proposal midway, which hit neither.
    shape = (40, 40, 40)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    a, b = np.asarray((20, 20, 15.0)), np.asarray((20, 20, 24.0))
    bump = lambda centre, height: height * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * 4.45 ** 2))  # noqa: E731
    prob = np.maximum(bump(a, 0.999), bump(b, 0.96)).astype(np.float32)
    assert 0.6 < prob[20, 20, 19] < 0.7 and 0.6 < prob[20, 20, 20] < 0.7
    found = proposals_from_map(prob, np.ones(shape, bool), (2.0, 2.0, 2.0), threshold=0.05)
    assert len(found) == 2
    for proposal, centre in zip(found, (a, b)):
        assert hits(np.asarray(proposal.zyx) * 2.0, centre * 2.0, 12.0)


def test_lesion_peaks_are_the_h_maxima_of_the_log_map():
    # The split keeps exactly the peaks whose dynamic (in log P) reaches the prominence: the peaks
    # scikit-image's h_maxima finds, computed ~10x faster from a watershed (see lesion_regions).
    from skimage.morphology import h_maxima

    rng = np.random.default_rng(1)
    prob = ndimage.gaussian_filter(rng.random((40, 48, 44)), 2.0)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    threshold, prominence = 0.3, 0.3
    peaks = (prob == ndimage.maximum_filter(prob, size=3)) & (prob >= threshold)
    regions, tops = lesion_regions(prob, peaks, prob >= threshold / 2, prominence)
    kept = {tuple(t) for t in tops[np.unique(regions[regions > 0]) - 1]}
    expected = (h_maxima(np.log(np.maximum(prob, threshold / 4)), prominence) > 0) & (prob >= threshold)
    assert len(kept) == ndimage.label(expected)[1] > 5
    assert all(expected[t] for t in kept)
    assert ndimage.label(peaks)[1] > len(kept)  # some peaks were bumps of a higher one


def _cases():
    rng = np.random.default_rng(0)
    cases = []
    for k in range(2):
        volume = rng.uniform(0.0, 0.1, (32, 32, 32)).astype(np.float32)
        target = np.zeros(volume.shape, np.uint8)
        ball = _ball(volume.shape, (16 + 3 * k, 14, 18), 3)
        volume[ball], target[ball] = 0.7, 1
        cases.append(PreparedCase(f"c{k}", volume, np.ones(volume.shape, bool), target, sitk.Image(32, 32, 32, 1)))
    return cases


def test_batches_depend_on_seed_and_step_only():
    config = CandidateNetConfig(**TINY)
    x1, y1 = sample_batch(_cases(), config, 7)
    x2, y2 = sample_batch(_cases(), config, 7)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (2, 1, 32, 32, 32) and set(np.unique(y1)) <= {0.0, 1.0}
    assert not np.array_equal(sample_batch(_cases(), config, 8)[0], x1)


def test_per_lesion_sampling_draws_small_nodules_as_often_as_masses():
    # A 60 mm mass (label 1) and a 3 mm nodule of one voxel at odd coordinates (label 2), on a 2 mm grid.
    target = np.zeros((48, 48, 48), np.uint8)
    target[_ball(target.shape, (20, 20, 20), 15)] = 1
    target[41, 41, 41] = 2
    rng = np.random.default_rng(0)
    per_lesion = [target[tuple(lesion_voxel(target, rng, "per_lesion"))] for _ in range(400)]
    per_voxel = [target[tuple(lesion_voxel(target, rng, "per_voxel"))] for _ in range(400)]
    assert 0.4 < np.mean(np.equal(per_lesion, 2)) < 0.6  # each lesion half the time
    assert np.mean(np.equal(per_voxel, 2)) < 0.01  # a voxel among ~14000
    assert lesion_voxel(np.zeros((8, 8, 8), np.uint8), rng, "per_lesion") is None
    with pytest.raises(ValueError, match="per_pixel"):
        lesion_voxel(target, rng, "per_pixel")


def test_small_lesions_train_as_a_ball_of_the_minimum_diameter():
    target = np.zeros((30, 30, 30), np.uint8)
    big = _ball(target.shape, (10, 10, 10), 5)
    target[big] = 1
    target[20, 21, 22] = 2  # a 3 mm nodule on a 2 mm grid: one voxel
    target[20, 21, 23] = 3  # a neighbour inside the ball: never overwritten
    reference = sitk.Image(30, 30, 30, sitk.sitkUInt8)
    reference.SetSpacing((2.0, 2.0, 2.0))
    case = PreparedCase("c", np.zeros(target.shape, np.float32), np.ones(target.shape, bool), target, reference)
    widened = widened_targets(case, 6.0).target
    assert np.array_equal(widened == 1, big)  # larger than 6 mm: as labelled
    ball = _ball(target.shape, (20, 21, 22), 1.5)
    ball[20, 21, 23] = False
    assert np.array_equal(widened == 2, ball) and widened[20, 21, 23] == 3
    assert widened_targets(case, 0.0) is case and np.array_equal(case.target, target)  # the input is untouched


def test_centre_heat_peaks_once_per_lesion_with_a_width_from_its_size():
    shape = (40, 40, 40)
    target = np.zeros(shape, np.uint8)
    target[_ball(shape, (10, 10, 10), 6)] = 1  # ~25 mm at 2 mm
    target[_ball(shape, (30, 30, 30), 1)] = 2  # 7 voxels: ~5 mm
    reference = sitk.Image([40, 40, 40], sitk.sitkUInt8)
    reference.SetSpacing((2.0, 2.0, 2.0))
    heat = centre_heat(PreparedCase("two", np.zeros(shape, np.float32), np.ones(shape, bool), target, reference))
    assert heat.dtype == np.float32 and heat.max() == 1.0
    assert {tuple(p) for p in np.argwhere(heat == 1.0)} == {(10, 10, 10), (30, 30, 30)}
    radius = (3 * target.__eq__(1).sum() / (4 * np.pi)) ** (1 / 3)  # voxels; sigma is half of it
    assert heat[10, 10, 16] == pytest.approx(np.exp(-0.5 * (6 / (radius / 2)) ** 2), rel=1e-4)
    assert heat[30, 30, 31] == pytest.approx(np.exp(-0.5), rel=1e-4)  # sigma never under a voxel
    assert heat[20, 20, 20] < 1e-6 and heat[0, 39, 0] == 0.0  # cut at three sigmas
    config = CandidateNetConfig(**{**TINY, "loss": "centre_focal"})
    case = replace(_cases()[0], heat=centre_heat(_cases()[0]))
    _x, y = sample_batch([case], config, 3)
    assert y.dtype == np.float32 and 0.0 < y[y < 1].max() < 1.0  # soft targets, not the mask


def test_a_centre_heat_map_gives_its_lesion_size_back():
    # A network that learnt its centre-heat target exactly must be given the lesion's size: its half-height
    # region is only ~0.59x the lesion (the first v2 centre-heat proposals reported 25 mm nodules as ~15 mm).
    shape = (48, 48, 48)
    target = np.zeros(shape, np.uint8)
    target[_ball(shape, (24, 24, 24), 8)] = 1  # ~33 mm at 2 mm
    reference = sitk.Image([48, 48, 48], sitk.sitkUInt8)
    reference.SetSpacing((2.0, 2.0, 2.0))
    case = PreparedCase("one", np.zeros(shape, np.float32), np.ones(shape, bool), target, reference)
    lesion = 2 * (3 * target.sum() * 8 / (4 * np.pi)) ** (1 / 3)
    heat = centre_heat(case)
    centre = CandidateNetConfig(loss="centre_focal")
    sized = proposals_from_map(heat, case.lung, (2.0, 2.0, 2.0), edge=size_fraction(centre))
    assert len(sized) == 1 and sized[0].diameter_mm == pytest.approx(lesion, rel=0.1)
    half = proposals_from_map(heat, case.lung, (2.0, 2.0, 2.0), edge=size_fraction(CandidateNetConfig()))
    assert half[0].diameter_mm == pytest.approx(np.sqrt(2 * np.log(2)) / 2 * lesion, rel=0.1)
    assert half[0].zyx == sized[0].zyx  # the centre is the half-height part's either way


def test_centre_focal_loss_is_centernets_formula_normalised_by_peaks():
    logits = torch.tensor([[2.0, -1.0, -3.0, 0.5], [-2.0, 1.0, -4.0, -0.5]])
    target = torch.tensor([[1.0, 0.6, 0.0, 0.2], [0.0, 1.0, 0.1, 0.0]])
    p = torch.sigmoid(logits)
    peak = target == 1.0
    by_hand = -(((1 - p) ** 2 * torch.log(p))[peak].sum()
                + ((1 - target) ** 4 * p ** 2 * torch.log(1 - p))[~peak].sum()) / 2
    loss = CentreFocalLoss()(logits, target)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # Each lesion weighs the same: two copies of a scene give the same loss as one.
    assert CentreFocalLoss()(logits.repeat(2, 1), target.repeat(2, 1)).item() == pytest.approx(loss.item(), rel=1e-5)
    # A confident, right map costs far less than a flat one; stable at large logits.
    right = torch.where(peak, 12.0, -12.0)
    assert CentreFocalLoss()(right, target).item() < 1e-3 * loss.item()
    assert torch.isfinite(CentreFocalLoss()(right * 10, target))


def test_training_resumes_to_the_same_weights_and_loads_weights_only(tmp_path):
    config = CandidateNetConfig(**TINY)
    pre = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0))
    whole = train_candidate_net(_cases(), config, pre, tmp_path / "whole", device="cpu", progress=False)
    train_candidate_net(_cases(), config, pre, tmp_path / "resumed", device="cpu", progress=False,
                        stop=lambda step: step == 2)  # cancelled after two steps
    assert torch.load(tmp_path / "resumed" / "candidate_net.pt", weights_only=True)["step"] == 2
    resumed = train_candidate_net(_cases(), config, pre, tmp_path / "resumed", device="cpu", progress=False)
    a = torch.load(whole, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    # A checkpoint made from other cases is never resumed: the run starts afresh (same weights as new).
    other = _cases()
    other[0].target[:] = 0
    train_candidate_net(other, config, pre, tmp_path / "stale", device="cpu", progress=False,
                        stop=lambda step: step == 2)
    fresh = train_candidate_net(_cases(), config, pre, tmp_path / "stale", device="cpu", progress=False)
    c = torch.load(fresh, weights_only=True)
    assert c["step"] == 4 and all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])
    net, loaded, preprocess = load_candidate_net(whole, "cpu")
    assert loaded == config and preprocess == pre
    prob = probability_map(net, _cases()[0].volume, loaded)
    assert prob.shape == (32, 32, 32) and 0.0 <= prob.min() and prob.max() <= 1.0
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_candidate_net(tmp_path / "bad.pt")


def test_candidate_stage_by_hand():
    truths = [[((0, 0, 0), 10.0), ((50, 0, 0), 4.0)], [((0, 0, 0), 40.0)], []]
    proposals = [[(30, 0, 0), (1, 1, 1)], [(100, 0, 0)] * 3 + [(5, 5, 5)], [(9, 9, 9)]]
    result = candidate_stage(proposals, truths, limit=50, bootstrap=0)
    assert result["nodules"] == 2 and result["sensitivity"] == 1.0  # the 4 mm nodule is below 5 mm
    assert result["candidates_per_scan"] == pytest.approx(7 / 3)
    assert candidate_stage(proposals, truths, limit=3, bootstrap=0)["sensitivity"] == 0.5  # 4th is cut
    every = candidate_stage(proposals, truths, limit=50, min_diameter_mm=0.0, bootstrap=0)
    assert every["nodules"] == 3 and every["sensitivity"] == pytest.approx(2 / 3)
    sizes = {row["size"]: row for row in every["by_size"]}
    assert sizes["3-5 mm"]["sensitivity"] == 0.0 and sizes["30-80 mm"]["sensitivity"] == 1.0
    low, high = candidate_stage(proposals, truths, limit=3, bootstrap=200)["sensitivity_ci"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0

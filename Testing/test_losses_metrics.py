"""Class weights, focal loss, metrics against scikit-learn and FROC/CPM on a hand-computed example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from noduleai.evaluate import classification_metrics, froc, size_table, write_classification_report
from noduleai.losses import CombinedLoss, FocalLoss, calculate_class_weights


def test_class_weights_follow_their_formulas():
    labels = [0] * 90 + [1] * 10
    inv = calculate_class_weights(labels, method="inverse").numpy()
    assert np.allclose(inv, np.array([1 / 90, 1 / 10]) / (1 / 90 + 1 / 10) * 2)
    sq = calculate_class_weights(labels, method="sqrt_inverse").numpy()
    raw = 1 / np.sqrt([90, 10])
    assert np.allclose(sq, raw / raw.sum() * 2)
    eff = calculate_class_weights(labels, method="effective", beta=0.99).numpy()
    raw = (1 - 0.99) / (1 - 0.99 ** np.array([90, 10]))
    assert np.allclose(eff, raw / raw.sum() * 2)
    assert eff[1] > eff[0]
    with pytest.raises(ValueError):
        calculate_class_weights(labels, method="median")


def test_focal_loss_reduces_to_cross_entropy_and_down_weights_easy_examples():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 2), torch.randint(0, 2, (16,))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, target), ce)
    easy = torch.tensor([[4.0, -4.0]])
    zero = torch.tensor([0])
    assert FocalLoss(gamma=2.0)(easy, zero) < 1e-3 * torch.nn.functional.cross_entropy(easy, zero)
    alpha = torch.tensor([0.25, 1.75])
    combined = CombinedLoss(alpha, gamma=0.0, focal_weight=0.5)(logits, target)
    weighted_ce = torch.nn.functional.cross_entropy(logits, target, weight=alpha)
    focal_alpha = FocalLoss(alpha, gamma=0.0)(logits, target)
    assert torch.allclose(combined, 0.5 * focal_alpha + 0.5 * weighted_ce)


def test_metrics_equal_scikit_learn_on_fixed_predictions():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0, 0, 1])
    p = np.array([0.1, 0.6, 0.8, 0.4, 0.9, 0.2, 0.55, 0.3, 0.7, 0.35])
    m = classification_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == skm.accuracy_score(y, pred) == 0.6
    assert m["precision"] == skm.precision_score(y, pred) == 0.6
    assert m["recall"] == skm.recall_score(y, pred) == 0.6
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p)) and m["auc"] == pytest.approx(0.76)
    assert m["confusion_matrix"] == [[3, 2], [2, 3]]
    assert classification_metrics([1, 1], [0.2, 0.9])["auc"] is None


def test_classification_report_files(tmp_path):
    y, p = [0, 1, 0, 1], [0.2, 0.7, 0.6, 0.9]
    write_classification_report(tmp_path, y, p)
    for name in ("test_results.csv", "predictions.csv", "roc_curve.png", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob(".tmp-*"))


def test_froc_and_cpm_on_a_hand_computed_example():
    # Scan A: nodules a1 (r=5 at origin), a2 (r=3 at x=50). Scan B: nodule b1 (r=4 at origin). Scan C: none.
    truths = [[((0, 0, 0), 10.0), ((50, 0, 0), 6.0)], [((0, 0, 0), 8.0)], []]
    detections = [
        [((1, 0, 0), 0.9), ((0, 2, 0), 0.5), ((100, 0, 0), 0.8), ((52, 0, 0), 0.3)],  # a1 hit twice, FP, a2
        [((0, 0, 3), 0.7)],                                                        # b1
        [((10, 10, 10), 0.6), ((20, 20, 20), 0.2)],                                # two FPs
    ]
    r = froc(detections, truths, bootstrap=0)
    # Ranked events: 0.9 TP(a1) 0.8 FP 0.7 TP(b1) 0.6 FP 0.3 TP(a2) 0.2 FP; a1's 0.5 duplicate ignored.
    # The staircase (fps, sens): (0,1/3) (1/3,1/3) (1/3,2/3) (2/3,2/3) (2/3,1) (1,1); read by linear
    # interpolation as LUNA16 does (here the staircase leaves nothing to interpolate).
    expected = {0.125: 1 / 3, 0.25: 1 / 3, 0.5: 2 / 3, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    assert r.sensitivity_at == pytest.approx(expected)
    assert r.cpm == pytest.approx(np.mean(list(expected.values())))
    assert r.n_nodules == 3 and r.n_scans == 3
    table = size_table(truths, r, threshold=0.5).set_index("size")
    # Bins are [low, high): a2 (6 mm, best 0.3) and b1 (8 mm, 0.7) in 5-10; a1 (10 mm, 0.9) in >10.
    assert table.loc["5-10 mm", "nodules"] == 2 and table.loc["5-10 mm", "detected"] == 1
    assert table.loc[">10 mm", "nodules"] == 1 and table.loc[">10 mm", "detected"] == 1
    assert table.loc["<5 mm", "nodules"] == 0


def test_froc_interpolates_ties_counts_failed_scans_and_ignores_excluded_findings():
    """The LUNA16 script's rules beyond the staircase: a tie between a hit and a false positive is a
    diagonal segment (linear interpolation, where v1's step function jumped); a failed scan (no
    candidates) keeps its nodules in the denominator and counts as a scan; a hit on an excluded finding
    (< 3 mm, fewer than 3 readers) is neither a hit nor a false positive."""
    truths = [[((0, 0, 0), 10.0)], [((0, 0, 0), 10.0)]]
    # Scan 1: its nodule and a false positive tie at 0.8; then two more false positives; scan 2 failed.
    detections = [[((0, 0, 1), 0.8), ((90, 0, 0), 0.8), ((60, 0, 0), 0.4), ((70, 0, 0), 0.3)], []]
    excluded = [[((60, 0, 0), 4.0)], []]  # the 0.4 candidate sits on an excluded finding
    r = froc(detections, truths, excluded, bootstrap=0)
    # Events: 0.8 {TP, FP} together, 0.3 FP. Curve: (0,0) -> (0.5, 0.5) -> (1.0, 0.5) over 2 scans, 2 nodules.
    assert r.sensitivity_at[0.25] == pytest.approx(0.25)   # halfway up the diagonal; a step function gives 0
    assert r.sensitivity_at[0.125] == pytest.approx(0.125)
    assert r.sensitivity_at[8.0] == pytest.approx(0.5)      # the failed scan's nodule is a miss
    assert r.n_scans == 2 and r.n_nodules == 2


def test_froc_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_scans():
    rng = np.random.default_rng(0)

    def cohort(n_scans):
        truths, detections = [], []
        for _ in range(n_scans):
            truths.append([((0, 0, 0), 10.0)])
            hit = [((0, 0, 0), float(rng.uniform(0.3, 1.0)))] if rng.random() < 0.7 else []
            fps = [((100 + 20 * k, 0, 0), float(rng.uniform(0, 0.8))) for k in range(int(rng.integers(0, 6)))]
            detections.append(hit + fps)
        return detections, truths

    small = froc(*cohort(10), bootstrap=500, seed=1)
    large = froc(*cohort(200), bootstrap=500, seed=1)
    for r in (small, large):
        lo, hi = r.cpm_ci
        assert lo <= r.cpm <= hi and 0 <= lo < hi <= 1
        assert all(a <= r.sensitivity_at[k] + 1e-9 and r.sensitivity_at[k] <= b + 1e-9
                   for k, (a, b) in r.sensitivity_at_ci.items())
    assert np.diff(large.cpm_ci)[0] < np.diff(small.cpm_ci)[0]


def test_console_summary_states_the_interval_and_protocol_and_empty_size_bins(capsys):
    """The demo and `noduleai evaluate` print every CPM with its 95 % interval and protocol; an empty size
    bin (NaN after pandas) reads n/a, not nan."""
    from noduleai.console import print_evaluation

    truths = [[((0, 0, 0), 12.0)], [((0, 0, 0), 14.0)], [((0, 0, 0), 11.0)]]
    detections = [[((0, 0, 1), 0.9), ((50, 0, 0), 0.4)], [((60, 0, 0), 0.7)], [((0, 1, 0), 0.6)]]
    r = froc(detections, truths, bootstrap=200)
    summary = {"froc": {"protocol": "LUNA16 test protocol", "cpm": r.cpm, "cpm_ci95": r.cpm_ci,
                        "sensitivity_at": {str(k): v for k, v in r.sensitivity_at.items()},
                        "n_nodules": r.n_nodules, "n_scans": r.n_scans},
               "by_size": size_table(truths, r).to_dict("records")}
    print_evaluation(summary)
    out = capsys.readouterr().out
    assert f"CPM {r.cpm:.3f} (95 % CI {r.cpm_ci[0]:.3f}-{r.cpm_ci[1]:.3f})" in out
    assert "protocol: LUNA16 test protocol" in out
    assert "<5 mm: 0/0 detected (sensitivity n/a)" in out and "nan" not in out

"""Probability calibration: temperature and bias (Platt scaling of the logit difference; temperature
scaling, Guo et al. 2017, plus an offset), fitted on a validation part only.

A classifier trained on class-weighted, mined patches ranks well but its softmax is not a frequency: v1
scored most candidates of a real CT above 0.5. A temperature alone cannot undo the offset that inverse
class weights put on the logits (log of the weight ratio): on detector v2's first fold it *raised* the
validation ECE (0.269 -> 0.286) and left 12 candidates of the real LIDC-IDRI-0001 CT above 0.5. An
increasing map ``z / T + b`` keeps the ranking and makes P >= 0.5 mean what it says on data like the
validation part.

The candidate network's own score can join the classifier's: P = sigmoid(z / T + w * logit(s) + b), with
``w`` fitted on the same validation part (logistic regression on two features, ``w = 0`` being the
classifier alone). Detector v2's leave-one-host-out folds report both, each fold fitted without its host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize


def score_logit(score: np.ndarray | Sequence[float]) -> np.ndarray:
    """logit of a probability-like score (the candidate network's peak height), clipped to stay finite."""
    s = np.clip(np.asarray(score, float), 1e-4, 1 - 1e-4)
    return np.log(s / (1 - s))


def calibrated(logit_diff: np.ndarray | Sequence[float], temperature: float, bias: float = 0.0,
               candidate_score: np.ndarray | Sequence[float] | None = None,
               candidate_weight: float = 0.0) -> np.ndarray:
    """P(nodule) = sigmoid((logit_1 - logit_0) / T + w * logit(candidate score) + b); T alone is the
    two-class softmax at temperature T."""
    z = np.asarray(logit_diff, float) / temperature + bias
    if candidate_weight:
        z = z + candidate_weight * score_logit(candidate_score)
    return 1.0 / (1.0 + np.exp(-z))


def fit_calibration(logit_diff: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int],
                    candidate_score: np.ndarray | Sequence[float] | None = None) -> tuple[float, float, float]:
    """Temperature (0.05-50), bias (-20-20) and, when ``candidate_score`` is given, the candidate weight
    (-5-5; otherwise 0) minimising the negative log-likelihood of ``labels``."""
    z, y = np.asarray(logit_diff, float), np.asarray(labels, float)
    if len(z) == 0 or y.min() == y.max():
        raise ValueError("calibration needs validation samples of both classes")
    fused = candidate_score is not None

    def nll(params: np.ndarray) -> float:
        p = calibrated(z, np.exp(params[0]), params[1], candidate_score, params[2] if fused else 0.0)
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    bounds = [(np.log(0.05), np.log(50.0)), (-20.0, 20.0)] + ([(-5.0, 5.0)] if fused else [])
    best = minimize(nll, np.zeros(len(bounds)), method="L-BFGS-B", bounds=bounds)
    return float(np.exp(best.x[0])), float(best.x[1]), float(best.x[2]) if fused else 0.0


def operating_threshold(probabilities: Sequence[Sequence[float]], is_lesion: Sequence[Sequence[bool]],
                        fp_per_scan: float) -> float:
    """The lowest probability threshold at which the scans' false positives (candidates that are no lesion)
    average at most ``fp_per_scan``; chosen on a validation part, it is the detector's working point."""
    false = np.sort([p for ps, ls in zip(probabilities, is_lesion) for p, hit in zip(ps, ls) if not hit])[::-1]
    allowed = int(np.floor(fp_per_scan * len(probabilities)))  # false positives the scans may hold in all
    if allowed >= len(false):
        return 0.0
    # Strictly above the (allowed + 1)-th highest false positive's probability.
    return float(np.nextafter(false[allowed], np.inf))  # above 1.0 too, when a false positive scores 1.0


def expected_calibration_error(prob: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int],
                               bins: int = 10) -> float:
    """Mean |observed frequency - mean probability| over equal-width bins, weighted by bin size."""
    p, y = np.asarray(prob, float), np.asarray(labels, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(y[which == b].mean() - p[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))

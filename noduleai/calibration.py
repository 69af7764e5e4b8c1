"""Probability calibration: temperature scaling (Guo et al. 2017) fitted on a validation part only.

A classifier trained on balanced, mined patches ranks well but its softmax is not a frequency: v1 scored
most candidates of a real CT above 0.5. Dividing the logit difference by one temperature keeps the
ranking and makes P >= 0.5 mean what it says on data like the validation part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar


def calibrated(logit_diff: np.ndarray | Sequence[float], temperature: float) -> np.ndarray:
    """P(nodule) = sigmoid((logit_1 - logit_0) / T): the two-class softmax at temperature T."""
    z = np.asarray(logit_diff, float) / temperature
    return 1.0 / (1.0 + np.exp(-z))


def fit_temperature(logit_diff: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """The temperature (0.05-50) minimising the negative log-likelihood of ``labels``."""
    z, y = np.asarray(logit_diff, float), np.asarray(labels, float)
    if len(z) == 0 or y.min() == y.max():
        raise ValueError("temperature scaling needs validation samples of both classes")

    def nll(log_t: float) -> float:
        p = np.clip(calibrated(z, np.exp(log_t)), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(50.0)), method="bounded").x))


def expected_calibration_error(prob: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int],
                               bins: int = 10) -> float:
    """Mean |observed frequency - mean probability| over equal-width bins, weighted by bin size."""
    p, y = np.asarray(prob, float), np.asarray(labels, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(y[which == b].mean() - p[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))

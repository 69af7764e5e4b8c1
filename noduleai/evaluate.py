"""Evaluation: classification metrics (scikit-learn), the seed's plots, FROC/CPM and errors by size."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: evaluation runs in CLIs, tests and background processes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from noduleai.files import atomic_path  # noqa: E402
from noduleai.render import save_figure  # noqa: E402

CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SIZE_BINS = (("<5 mm", 0.0, 5.0), ("5-10 mm", 5.0, 10.0), (">10 mm", 10.0, float("inf")))


def classification_metrics(y_true: Sequence[int], prob_positive: Sequence[float],
                           threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, AUC (None with a single class) and the confusion matrix."""
    y_true = np.asarray(y_true, int)
    prob = np.asarray(prob_positive, float)
    y_pred = (prob >= threshold).astype(int)
    two_classes = len(np.unique(y_true)) == 2
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "auc": float(skm.roc_auc_score(y_true, prob)) if two_classes else None,
        "threshold": threshold,
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
    }


def plot_roc(y_true: Sequence[int], prob_positive: Sequence[float], path: str | os.PathLike) -> None:
    """The seed's ROC figure."""
    fpr, tpr, _ = skm.roc_curve(y_true, prob_positive)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot(fpr, tpr, color="darkorange", lw=2, label=f"ROC curve (area = {skm.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="navy", lw=2, linestyle="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="False Positive Rate", ylabel="True Positive Rate",
           title="Receiver Operating Characteristic")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike) -> None:
    """The seed's confusion-matrix figure (annotated counts)."""
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xticklabels=class_names,
           yticklabels=class_names, xlabel="Predicted", ylabel="True", title="Confusion Matrix")
    save_figure(fig, path)


def write_classification_report(out_dir: str | os.PathLike, y_true: Sequence[int], prob_positive: Sequence[float],
                                class_names: Sequence[str] = ("No Nodule", "Nodule"),
                                threshold: float = 0.5, extra: dict | None = None) -> dict[str, Any]:
    """Metrics plus ``test_results.csv``, ``predictions.csv``, ``roc_curve.png`` and ``confusion_matrix.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = classification_metrics(y_true, prob_positive, threshold)
    row = {k: v for k, v in result.items() if k != "confusion_matrix"} | (extra or {})
    with atomic_path(out / "test_results.csv") as tmp:
        pd.DataFrame([row]).to_csv(tmp, index=False)
    with atomic_path(out / "predictions.csv") as tmp:
        pd.DataFrame({"target": list(y_true), "probability": list(prob_positive)}).to_csv(tmp, index=False)
    if result["auc"] is not None:
        plot_roc(y_true, prob_positive, out / "roc_curve.png")
    plot_confusion(result["confusion_matrix"], class_names, out / "confusion_matrix.png")
    return result


Finding = tuple[Sequence[float], float]  # a reference finding: (centre in mm, diameter in mm)


def hits(position_mm: Sequence[float], centre_mm: Sequence[float], diameter_mm: float) -> bool:
    """The one hit rule (LUNA16's): a candidate hits a finding when it lies within the finding's radius."""
    return float(np.linalg.norm(np.subtract(position_mm, centre_mm))) <= diameter_mm / 2


def hits_any(position_mm: Sequence[float], findings) -> bool:
    """Does a position hit any of ``findings`` (records with ``center_lps`` and ``diameter_mm``)?"""
    return any(hits(position_mm, n.center_lps, n.diameter_mm) for n in findings)


@dataclass
class FrocResult:
    """Sensitivity against false positives per scan, over all thresholds, as the LUNA16 script computes it."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    sensitivity_at: dict[float, float]
    cpm: float
    n_nodules: int
    n_scans: int
    detected: list[list[float | None]] = field(default_factory=list)  # best probability per true nodule
    cpm_ci: tuple[float, float] | None = None  # 95 % bootstrap interval over scans
    sensitivity_at_ci: dict[float, tuple[float, float]] = field(default_factory=dict)


def _scan_events(dets: Sequence[tuple[Sequence[float], float]], nods: Sequence[Finding],
                 excluded: Sequence[Finding]) -> tuple[list[tuple[float, bool]], list[float | None]]:
    """One scan's scored events (probability, is a true positive) and each nodule's best probability.

    Each nodule counts once, with its best hit; further hits on it, and candidates that hit an excluded
    finding (LUNA16: nodules < 3 mm, non-nodules, nodules of fewer than 3 readers), are neither true nor
    false positives; the rest are false positives.
    """
    best: list[float | None] = [None] * len(nods)
    events: list[tuple[float, bool]] = []
    for pos, prob in dets:
        hit = [k for k, (c, d) in enumerate(nods) if hits(pos, c, d)]
        for k in hit:
            best[k] = prob if best[k] is None else max(best[k], prob)
        if not hit and not any(hits(pos, c, d) for c, d in excluded):
            events.append((float(prob), False))
    events += [(float(p), True) for p in best if p is not None]
    return events, best


def _froc_curve(events: list[tuple[float, bool]], n_nodules: int, n_scans: int):
    """LUNA16's computeFROC: an ROC over the scored events (scikit-learn), rescaled to false positives per
    scan and to sensitivity over *all* nodules (missed ones and those of failed scans included)."""
    if not events:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    probs = np.array([e[0] for e in events])
    is_tp = np.array([e[1] for e in events])
    n_fp, n_tp = int((~is_tp).sum()), int(is_tp.sum())
    if n_fp == 0 or n_tp == 0:  # roc_curve is undefined without both classes: a staircase by hand
        order = np.argsort(-probs, kind="stable")
        fps = np.r_[0.0, np.cumsum(~is_tp[order]) / max(n_scans, 1)]
        sens = np.r_[0.0, np.cumsum(is_tp[order]) / max(n_nodules, 1)]
        return fps, sens, np.r_[np.inf, probs[order]]
    fpr, tpr, thresholds = skm.roc_curve(is_tp.astype(int), probs)
    return fpr * n_fp / max(n_scans, 1), tpr * n_tp / max(n_nodules, 1), thresholds


def _sensitivity_at(fps: np.ndarray, sens: np.ndarray) -> dict[float, float]:
    # LUNA16 interpolates the curve linearly (np.interp) and reads it at 1/8 ... 8 FP per scan.
    return {r: float(np.interp(r, fps, sens)) for r in CPM_FP_RATES}


def froc(detections: Sequence[Sequence[tuple[Sequence[float], float]]], truths: Sequence[Sequence[Finding]],
         excluded: Sequence[Sequence[Finding]] | None = None, bootstrap: int = 1000, seed: int = 0) -> FrocResult:
    """FROC and the LUNA16 competition performance metric (CPM), with 95 % bootstrap intervals.

    ``detections[s]``: (position_mm, probability) per candidate of scan s (empty for a scan that failed:
    its nodules count as missed and the scan counts in the per-scan rate); ``truths[s]``: (centre_mm,
    diameter_mm) per reference nodule; ``excluded[s]``: findings whose hits are neither true nor false
    positives. Hits follow :func:`hits`. Sensitivity at each rate is read off the linearly interpolated
    curve, as the LUNA16 evaluation script does; the interval resamples scans with replacement.
    """
    if len(detections) != len(truths):
        raise ValueError("detections and truths must have one entry per scan")
    excluded = excluded if excluded is not None else [[] for _ in truths]
    per_scan = [_scan_events(d, n, x) for d, n, x in zip(detections, truths, excluded)]
    n_nodules, n_scans = sum(len(n) for n in truths), len(truths)
    fps, sens, thresholds = _froc_curve([e for ev, _ in per_scan for e in ev], n_nodules, n_scans)
    at = _sensitivity_at(fps, sens)
    result = FrocResult(fps, sens, thresholds, at, float(np.mean(list(at.values()))), n_nodules, n_scans,
                        [best for _, best in per_scan])
    if bootstrap and n_scans > 1 and n_nodules:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            pick = rng.integers(0, n_scans, n_scans)
            curve = _froc_curve([e for i in pick for e in per_scan[i][0]],
                                sum(len(truths[i]) for i in pick), n_scans)
            samples.append(list(_sensitivity_at(*curve[:2]).values()))
        table = np.asarray(samples)
        lo, hi = np.percentile(table, [2.5, 97.5], axis=0)
        cpm_lo, cpm_hi = np.percentile(table.mean(axis=1), [2.5, 97.5])
        result.cpm_ci = (float(cpm_lo), float(cpm_hi))
        result.sensitivity_at_ci = {r: (float(a), float(b)) for r, a, b in zip(CPM_FP_RATES, lo, hi)}
    return result


def plot_froc(result: FrocResult, path: str | os.PathLike, label: str = "model") -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.step(np.maximum(result.fps_per_scan, 1 / 16), result.sensitivity, where="post",
            label=f"{label} (CPM {result.cpm:.3f})")
    ax.set_xscale("log", base=2)
    ax.set(xlim=(1 / 8, 8), ylim=(0, 1.02), xlabel="False positives per scan", ylabel="Sensitivity",
           title=f"FROC ({result.n_nodules} nodules, {result.n_scans} scans)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def size_table(truths: Sequence[Sequence[tuple[Sequence[float], float]]], result: FrocResult,
               threshold: float = 0.5) -> pd.DataFrame:
    """Sensitivity at ``threshold`` by nodule size (<5, 5-10, >10 mm): are small nodules missed?"""
    rows = []
    for name, low, high in SIZE_BINS:
        probs = [p for nods, best in zip(truths, result.detected) for (_c, d), p in zip(nods, best)
                 if low <= d < high]
        hits = sum(1 for p in probs if p is not None and p >= threshold)
        rows.append({"size": name, "nodules": len(probs), "detected": hits,
                     "sensitivity": hits / len(probs) if probs else None,
                     "mean_best_probability": float(np.mean([p or 0.0 for p in probs])) if probs else None})
    return pd.DataFrame(rows)


CANDIDATE_SIZE_BINS = (("3-5 mm", 0.0, 5.0), ("5-10 mm", 5.0, 10.0), ("10-30 mm", 10.0, 30.0),
                       ("30-80 mm", 30.0, float("inf")))


def candidate_stage(proposals: Sequence[Sequence[Sequence[float]]], truths: Sequence[Sequence[Finding]],
                    limit: int = 50, min_diameter_mm: float = 5.0, bootstrap: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """The candidate stage on its own: the share of reference nodules hit (:func:`hits`) by any of the
    first ``limit`` proposals of their scan (``proposals[s]``: positions in mm, best first), for nodules
    >= ``min_diameter_mm`` and by size, with the mean number of proposals per scan. The 95 % interval
    resamples scans with replacement."""
    if len(proposals) != len(truths):
        raise ValueError("proposals and truths must have one entry per scan")
    found = [[any(hits(p, c, d) for p in props[:limit]) for c, d in nods] for props, nods in zip(proposals, truths)]

    def share(scans, low=min_diameter_mm, high=float("inf")) -> tuple[int, int]:
        pairs = [(f, d) for s in scans for f, (_c, d) in zip(found[s], truths[s]) if low <= d < high]
        return sum(f for f, _ in pairs), len(pairs)

    scans = range(len(truths))
    hit, total = share(scans)
    result: dict[str, Any] = {
        "limit": limit, "min_diameter_mm": min_diameter_mm, "scans": len(truths), "nodules": total,
        "sensitivity": hit / total if total else None,
        "candidates_per_scan": float(np.mean([min(len(p), limit) for p in proposals])) if proposals else 0.0,
        "by_size": [{"size": name, "nodules": share(scans, lo, hi)[1],
                     "sensitivity": (lambda h, n: h / n if n else None)(*share(scans, lo, hi))}
                    for name, lo, hi in CANDIDATE_SIZE_BINS],
    }
    if bootstrap and len(truths) > 1 and total:
        rng = np.random.default_rng(seed)
        values = []
        for _ in range(bootstrap):
            h, n = share(rng.integers(0, len(truths), len(truths)))
            if n:
                values.append(h / n)
        result["sensitivity_ci"] = tuple(float(v) for v in np.percentile(values, [2.5, 97.5]))
    return result

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


@dataclass
class FrocResult:
    """Sensitivity against false positives per scan, over all thresholds."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    sensitivity_at: dict[float, float]
    cpm: float
    n_nodules: int
    n_scans: int
    detected: list[list[float | None]] = field(default_factory=list)  # best probability per true nodule


def froc(detections: Sequence[Sequence[tuple[Sequence[float], float]]],
         truths: Sequence[Sequence[tuple[Sequence[float], float]]]) -> FrocResult:
    """FROC and the LUNA16 competition performance metric (CPM).

    ``detections[s]``: (position_mm, probability) per candidate of scan s; ``truths[s]``:
    (centre_mm, diameter_mm) per nodule. As in LUNA16, a candidate hits a nodule when it lies within
    the nodule's radius; each nodule counts once (its best hit), further hits on it are neither true
    nor false positives, candidates hitting nothing are false positives. Sensitivity at a rate r is the
    highest reached with at most r false positives per scan (a step function, no interpolation).
    """
    if len(detections) != len(truths):
        raise ValueError("detections and truths must have one entry per scan")
    events = []  # (probability, scan, nodule index or -1)
    detected: list[list[float | None]] = []
    for s, (dets, nods) in enumerate(zip(detections, truths)):
        best: list[float | None] = [None] * len(nods)
        for pos, prob in dets:
            hits = [k for k, (c, d) in enumerate(nods) if np.linalg.norm(np.subtract(pos, c)) <= d / 2]
            if not hits:
                events.append((prob, s, -1))
            for k in hits:
                best[k] = prob if best[k] is None else max(best[k], prob)
        for k, p in enumerate(best):
            if p is not None:
                events.append((p, s, k))
        detected.append(best)
    n_nodules = sum(len(n) for n in truths)
    n_scans = len(truths)
    events.sort(key=lambda e: -e[0])
    probs = np.array([e[0] for e in events], float)
    is_tp = np.array([e[2] >= 0 for e in events], bool)
    tp = np.cumsum(is_tp)
    fp = np.cumsum(~is_tp)
    # Only the last event of a run of equal probabilities is a reachable operating point.
    last = np.r_[probs[1:] != probs[:-1], True] if len(probs) else np.zeros(0, bool)
    fps = np.r_[0.0, fp[last] / max(n_scans, 1)]
    sens = np.r_[0.0, tp[last] / max(n_nodules, 1)]
    thresholds = np.r_[np.inf, probs[last]]
    at = {r: float(sens[fps <= r].max()) for r in CPM_FP_RATES}
    return FrocResult(fps, sens, thresholds, at, float(np.mean(list(at.values()))), n_nodules, n_scans, detected)


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

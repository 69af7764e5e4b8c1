"""Run a detector over labelled cases: scan-level metrics, FROC/CPM, and errors by size and texture."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from noduleai import DISCLAIMER
from noduleai.detect import Candidate, DetectionResult, Detector
from noduleai.evaluate import froc, hits, plot_froc, size_table, write_classification_report
from noduleai.files import atomic_path, write_json_atomic
from noduleai.io import read_ct
from noduleai.records import CaseRecord, NoduleRecord


def nodule_hit(candidates: Sequence[Candidate], nodule: NoduleRecord) -> dict[str, Any]:
    """The best-ranked candidate within the nodule's radius (the FROC hit rule): rank and probability,
    or None for both when no candidate hits it."""
    for c in sorted(candidates, key=lambda c: c.rank):
        if hits(c.position_lps, nodule.center_lps, nodule.diameter_mm):
            return {"diameter_mm": nodule.diameter_mm, "texture": nodule.texture, "rank": c.rank,
                    "probability": c.probability}
    return {"diameter_mm": nodule.diameter_mm, "texture": nodule.texture, "rank": None, "probability": None}


def evaluate_cases(detector: Detector, cases: Sequence[CaseRecord], out_dir: str | os.PathLike,
                   threshold: float = 0.5, progress: bool = True,
                   on_result: Callable[[CaseRecord, DetectionResult], None] | None = None) -> dict[str, Any]:
    """Detect on every case and write ``evaluation.json``, ``test_results.csv``, ROC, confusion matrix,
    ``froc.png``, ``froc.csv``, ``by_size.csv`` and ``by_texture.csv`` into ``out_dir``.

    ``detector`` is anything with ``detect(ct)``, ``describe()`` and ``info.name`` (the model's
    :class:`Detector`, or a baseline); ``on_result`` sees each case's full result (e.g. its heatmap).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels, scan_probs, detections, truths, failures, per_case = [], [], [], [], [], []
    textures: list[list[str]] = []
    for case in tqdm(cases, desc="evaluate", unit="scan", disable=not progress):
        truths.append([(n.center_lps, n.diameter_mm) for n in case.nodules])
        textures.append([n.texture or "unknown" for n in case.nodules])
        try:
            result = detector.detect(read_ct(case.image_path, case.series_uid))
        except Exception as err:  # recorded, and the evaluation goes on
            failures.append({"case": case.case_id, "error": str(err)})
            # As LUNA16 scores a scan without candidates: its nodules are misses and it counts in the
            # per-scan false-positive rate. It has no scan probability, so it is left out of the
            # scan-level metrics (listed under "failures").
            detections.append([])
            continue
        if on_result is not None:
            on_result(case, result)
        labels.append(case.label)
        scan_probs.append(result.scan_probability)
        detections.append([(c.position_lps, c.probability) for c in result.candidates])
        per_case.append({"case": case.case_id, "label": case.label, "scan_probability": result.scan_probability,
                         "n_candidates": len(result.candidates), "n_nodules": len(case.nodules),
                         "nodules": [nodule_hit(result.candidates, n) for n in case.nodules]})
    summary: dict[str, Any] = {"disclaimer": DISCLAIMER, "model": detector.describe(), "cases": len(per_case),
                               "failures": failures, "per_case": per_case}
    if per_case:
        summary["scan_level"] = write_classification_report(out, labels, scan_probs, threshold=threshold)
    if truths:
        fr = froc(detections, truths)
        summary["froc"] = {"protocol": "LUNA16: hit within the nodule radius, linear interpolation at 1/8-8 "
                                       "FP/scan, failed scans as misses, 95 % bootstrap over scans",
                           "cpm": fr.cpm, "cpm_ci95": fr.cpm_ci,
                           "sensitivity_at": {str(k): v for k, v in fr.sensitivity_at.items()},
                           "sensitivity_at_ci95": {str(k): v for k, v in fr.sensitivity_at_ci.items()},
                           "n_nodules": fr.n_nodules, "n_scans": fr.n_scans, "n_failed_scans": len(failures)}
        with atomic_path(out / "froc.csv") as tmp:
            pd.DataFrame({"fps_per_scan": fr.fps_per_scan, "sensitivity": fr.sensitivity,
                          "threshold": fr.thresholds}).to_csv(tmp, index=False)
        if fr.n_nodules:
            plot_froc(fr, out / "froc.png", label=detector.info.name)
        by_size = size_table(truths, fr, threshold)
        with atomic_path(out / "by_size.csv") as tmp:
            by_size.to_csv(tmp, index=False)
        summary["by_size"] = by_size.to_dict("records")
        rows = {}
        for tex, best in ((t, b) for ts, bs in zip(textures, fr.detected) for t, b in zip(ts, bs)):
            row = rows.setdefault(tex, {"texture": tex, "nodules": 0, "detected": 0})
            row["nodules"] += 1
            row["detected"] += int(best is not None and best >= threshold)
        by_texture = pd.DataFrame(list(rows.values()), columns=["texture", "nodules", "detected"])
        with atomic_path(out / "by_texture.csv") as tmp:
            by_texture.to_csv(tmp, index=False)
        summary["by_texture"] = by_texture.to_dict("records")
    write_json_atomic(summary, out / "evaluation.json")
    return summary

"""Reading one case's detection outputs (as ``noduleai detect`` writes them) back into a DetectionResult."""

from __future__ import annotations

import json
import os
from pathlib import Path

import SimpleITK as sitk

from noduleai.detect import Candidate, DetectionResult


def read_detection(out_dir: str | os.PathLike, case_id: str) -> DetectionResult:
    """The result of ``case_id`` in ``out_dir``: candidates, scan probability and model from its report,
    heatmap and probability map (same grid as the CT) from their NRRD files."""
    out = Path(out_dir)
    report_path = out / f"{case_id}_report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path}: no detection report for case {case_id!r}")
    report = json.loads(report_path.read_text())
    files = report["files"]
    candidates = [Candidate(int(c["rank"]), tuple(c["position_lps"]), tuple(c["position_ras"]),
                            float(c["probability"]), float(c["diameter_mm"])) for c in report["candidates"]]
    heatmap = sitk.ReadImage(str(out / files["heatmap"]))
    probability = sitk.ReadImage(str(out / files["probability"])) if "probability" in files else None
    return DetectionResult(float(report["scan_probability"]), candidates, heatmap, probability,
                           bool(report.get("lung_found", True)), report["model"], report.get("timings_s", {}))

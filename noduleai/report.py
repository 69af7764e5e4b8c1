"""Writing one case's detection outputs: heatmap, candidates (CSV, JSON), report, overlay PNGs.

Files are staged in a hidden folder and moved into place only when all of them were written, so a
failing case leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from noduleai.detect import DetectionResult
from noduleai.files import write_json_atomic
from noduleai.render import PLANES, render_overlays


def output_names(case_id: str, with_probability: bool) -> dict[str, str]:
    names = {"heatmap": f"{case_id}_heatmap.nrrd", "candidates_csv": f"{case_id}_candidates.csv",
             "candidates_json": f"{case_id}_candidates.json", "report": f"{case_id}_report.json"}
    if with_probability:
        names["probability"] = f"{case_id}_probability.nrrd"
    names |= {plane: f"{case_id}_{plane}.png" for plane in PLANES}
    return names


def write_detection(result: DetectionResult, ct: sitk.Image, out_dir: str | os.PathLike, case_id: str,
                    threshold: float = 0.5) -> dict[str, Path]:
    """Write every output of one case into ``out_dir``; returns the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(case_id, result.probability_map is not None)
    stage = out / f".staging-{case_id}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        sitk.WriteImage(result.heatmap, str(stage / names["heatmap"]), useCompression=True)
        if result.probability_map is not None:
            sitk.WriteImage(result.probability_map, str(stage / names["probability"]), useCompression=True)
        rows = [c.to_dict() for c in result.candidates]
        flat = [{"rank": r["rank"], "probability": r["probability"], "diameter_mm": r["diameter_mm"],
                 **{f"{axis}_lps_mm": v for axis, v in zip("xyz", r["position_lps"])},
                 **{f"{axis}_ras_mm": v for axis, v in zip("xyz", r["position_ras"])}} for r in rows]
        columns = ["rank", "probability", "diameter_mm", "x_lps_mm", "y_lps_mm", "z_lps_mm",
                   "x_ras_mm", "y_ras_mm", "z_ras_mm"]
        pd.DataFrame(flat, columns=columns).to_csv(stage / names["candidates_csv"], index=False)
        write_json_atomic({"case": case_id, "coordinate_systems": {"position_lps": "LPS mm", "position_ras": "RAS mm"},
                           "candidates": rows}, stage / names["candidates_json"])
        write_json_atomic(result.report(case_id, threshold) | {"files": names}, stage / names["report"])
        if result.candidates:
            point = result.candidates[0].position_lps
        else:  # no candidate: show the centre of the scan
            point = ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()])
        render_overlays(ct, result.heatmap, point, {p: stage / names[p] for p in PLANES},
                        title=f"{case_id}: P={result.scan_probability:.2f}")
        for name in names.values():
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {kind: out / name for kind, name in names.items()}

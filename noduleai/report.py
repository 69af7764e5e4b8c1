"""Writing one case's detection outputs: heatmap, regions, candidates (CSV, JSON), report, overlay PNGs
and, for DICOM input, the DICOM set (SR, SEG, parametric map; see :mod:`noduleai.dicom_export`).

Files are staged in a hidden folder and moved into place only when all of them were written, so a
failing case leaves nothing half-written (no partial DICOM set either).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import SimpleITK as sitk

from noduleai.detect import DetectionResult
from noduleai.files import write_json_atomic
from noduleai.regions import candidate_regions
from noduleai.render import PLANES, render_overlays

if TYPE_CHECKING:
    from noduleai.io import LoadedCT


def output_names(case_id: str, with_probability: bool, with_dicom: bool = False) -> dict[str, str]:
    """File names of one case's outputs by kind (``dicom`` is a folder holding the DICOM set)."""
    names = {"heatmap": f"{case_id}_heatmap.nrrd", "regions": f"{case_id}_regions.nrrd",
             "candidates_csv": f"{case_id}_candidates.csv",
             "candidates_json": f"{case_id}_candidates.json", "report": f"{case_id}_report.json"}
    if with_probability:
        names["probability"] = f"{case_id}_probability.nrrd"
    names |= {plane: f"{case_id}_{plane}.png" for plane in PLANES}
    if with_dicom:
        names["dicom"] = f"{case_id}_dicom"
    return names


def write_detection(result: DetectionResult, ct: sitk.Image, out_dir: str | os.PathLike, case_id: str,
                    threshold: float | None = None, *, source: LoadedCT | None = None, dicom_out: bool | None = None,
                    include_identifiers: bool = False,
                    review: Mapping[int, Mapping[str, str]] | None = None) -> dict[str, Path]:
    """Write every output of one case into ``out_dir``; returns the paths by kind.

    ``source`` is what :func:`noduleai.io.load_ct` returned for this case: its reader report goes into
    the case report (chosen series, gaps, tilt, ITK warnings) and, for DICOM input, the DICOM set is
    written to ``<case>_dicom/`` unless ``dicom_out`` is False (``dicom_out=True`` without a DICOM
    source raises ValueError). Patient identifiers enter the JSON report only with
    ``include_identifiers``. ``review`` (rank -> {"review": ..., "note": ...}) adds reviewer decisions
    to the SR.
    """
    dicom_source = source.dicom if source is not None else None
    if dicom_out and dicom_source is None:
        raise ValueError(f"{case_id}: DICOM output needs a DICOM input (the SR, SEG and parametric map must "
                         "reference a source series)")
    with_dicom = dicom_source is not None and dicom_out is not False
    dicom_note = None
    if with_dicom and importlib.util.find_spec("highdicom") is None:
        # Slicer 5.10 ships pydicom but not highdicom: the DICOM set is then skipped when it was only the
        # default, and refused when it was asked for.
        if dicom_out:
            raise ValueError(f"{case_id}: DICOM output needs the Python package highdicom, which is not installed")
        with_dicom, dicom_note = False, "DICOM set not written: highdicom is not installed"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = output_names(case_id, result.probability_map is not None, with_dicom)
    stage = out / f".staging-{case_id}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        sitk.WriteImage(result.heatmap, str(stage / names["heatmap"]), useCompression=True)
        regions = candidate_regions(ct, result.candidates)
        sitk.WriteImage(regions, str(stage / names["regions"]), useCompression=True)
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
        dicom_files: dict[str, str] = {}
        if with_dicom:
            from noduleai.dicom_export import write_dicom_results

            written = write_dicom_results(stage / names["dicom"], result.candidates, result.heatmap, ct,
                                          dicom_source, result.model, regions=regions, review=review)
            dicom_files = {kind: f"{names['dicom']}/{path.name}" for kind, path in written.items()}
        report = result.report(case_id, threshold) | {"files": names | {f"dicom_{k}": v for k, v in
                                                                          dicom_files.items()}}
        if dicom_note:
            report["dicom_out"] = dicom_note
        if source is not None:
            report["input"] = source.report
            if include_identifiers:  # only on request: names, IDs and dates identify the patient
                report["patient"] = dict(source.identifiers)
        write_json_atomic(report, stage / names["report"])
        if result.candidates:
            point = result.candidates[0].position_lps
        else:  # no candidate: show the centre of the scan
            point = ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()])
        render_overlays(ct, result.heatmap, point, {p: stage / names[p] for p in PLANES},
                        title=f"{case_id}: P={result.scan_probability:.2f}")
        for name in names.values():
            target = out / name
            if (stage / name).is_dir() and target.is_dir():
                shutil.rmtree(target)  # a re-run replaces the previous DICOM set as a whole
            os.replace(stage / name, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {kind: out / name for kind, name in names.items()}

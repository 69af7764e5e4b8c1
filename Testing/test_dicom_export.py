"""DICOM out on the REAL LIDC-IDRI-0001 series: SR, SEG and parametric map written by `noduleai detect`,
validated with dciodvfy (dicom3tools), read back with highdicom and with dcmqi (QuantitativeReporting's
converters), compared voxel by voxel with our NRRD outputs; atomic writing; no patient identifiers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import LIDC_0001, RADIOMICS_IMAGE, require

from noduleai.cli import main
from noduleai.detect import Candidate, DetectionResult
from noduleai.io import load_ct
from noduleai.report import write_detection

IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """Path of a validation tool; missing: a failure under CI=true (it must be installed), else a skip."""
    found = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if found:
        return found
    message = f"{name} not installed (dciodvfy: Debian package dicom3tools; dcmqi: PyPI dcmqi)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy; fail on any error line, return (and print) the warnings."""
    run = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=300)
    lines = [ln.strip() for ln in (run.stdout + run.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    print(f"dciodvfy {path.name}: {len(warnings)} warning(s)")
    for line in warnings:
        print("   ", line)
    assert not errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    return warnings


@pytest.fixture(scope="module")
def lidc_run(tmp_path_factory):
    """`noduleai detect` on the real LIDC-IDRI-0001 series (bundled model), run once for this module.

    The series is reached through a neutrally named link, so a patient identifier found in any output
    came from the DICOM headers, not from the folder's name.
    """
    series_dir = next(require(LIDC_0001).rglob("*.dcm")).parent
    root = tmp_path_factory.mktemp("lidc")
    (root / "scan").symlink_to(series_dir, target_is_directory=True)
    out = root / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["-q", "detect", str(root / "scan"), "--out", str(out)])
    assert code == 0, stdout.getvalue() + stderr.getvalue()
    return {"out": out, "series": series_dir, "log": stdout.getvalue() + stderr.getvalue(), "case": "scan"}


def _outputs(run) -> dict:
    out, case = run["out"], run["case"]
    return {"report": json.loads((out / f"{case}_report.json").read_text()),
            "candidates": json.loads((out / f"{case}_candidates.json").read_text())["candidates"],
            "dicom": out / f"{case}_dicom", "heatmap": out / f"{case}_heatmap.nrrd",
            "regions": out / f"{case}_regions.nrrd"}


@pytest.mark.slow
def test_detect_writes_a_valid_dicom_set_per_case(lidc_run):
    o = _outputs(lidc_run)
    assert sorted(p.name for p in o["dicom"].iterdir()) == ["heatmap_pmap.dcm", "seg.dcm", "sr.dcm"]
    assert o["report"]["files"]["dicom_sr"] == "scan_dicom/sr.dcm"
    assert o["report"]["input"]["series_uid"] == lidc_run["series"].name  # the chosen series, named
    assert not list(lidc_run["out"].glob(".staging*"))
    source = pydicom.dcmread(next(lidc_run["series"].iterdir()), stop_before_pixels=True)
    for name in ("sr.dcm", "seg.dcm", "heatmap_pmap.dcm"):
        ds = pydicom.dcmread(o["dicom"] / name)
        dciodvfy(o["dicom"] / name)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert "research use, not for diagnosis" in ds.SeriesDescription.lower()
        assert ds.PatientID == source.PatientID  # the objects file under the same patient in PACS
        if name != "sr.dcm":
            assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
            assert "Research use, not for diagnosis" in ds.ContentDescription
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
            # On the source grid, every frame names the CT slice it was derived from.
            frame_refs = {item.SourceImageSequence[0].ReferencedSOPInstanceUID
                          for item in ds.PerFrameFunctionalGroupsSequence
                          for item in item.DerivationImageSequence}
            assert frame_refs <= {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                                  for p in lidc_run["series"].glob("*.dcm")} and frame_refs


@pytest.mark.slow
def test_sr_findings_equal_the_candidates(lidc_run):
    o = _outputs(lidc_run)
    sr = hd.sr.srread(o["dicom"] / "sr.dcm")
    source = pydicom.dcmread(next(lidc_run["series"].iterdir()), stop_before_pixels=True)
    evidence = {item.SeriesInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for item in study.ReferencedSeriesSequence}
    assert evidence == {source.SeriesInstanceUID}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    candidates = {c["rank"]: c for c in o["candidates"]}
    assert len(groups) == len(candidates) > 0
    seg = hd.seg.segread(o["dicom"] / "seg.dcm")
    seg_tracking = {d.segment_number: d.tracking_uid for d in (seg.get_segment_description(n)
                                                               for n in seg.segment_numbers)}
    for group in groups:
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        rank = int(values["Candidate rank"])
        c = candidates[rank]
        surface = group.roi
        assert surface.frame_of_reference_uid == source.FrameOfReferenceUID
        assert np.allclose(surface.graphic_data, [c["position_lps"]], atol=1e-3)  # SCOORD3D == position_lps
        assert values["Probability"] == pytest.approx(c["probability"], abs=1e-6)
        if c["diameter_mm"] > 0:
            assert values["Diameter"] == pytest.approx(c["diameter_mm"], abs=1e-6)
        else:  # not estimated by the detector: no "0 mm" diameter in the report
            assert "Diameter" not in values
        assert seg_tracking[rank] == group.tracking_uid  # the SR finding and its SEG segment are linked
        for measurement in group.get_measurements():  # TID 4019 algorithm identification on each value
            named = {item.ConceptNameCodeSequence[0].CodeMeaning: getattr(item, "TextValue", None)
                     for item in measurement[0].ContentSequence}
            assert named["Algorithm Name"] == o["report"]["model"]["name"]
            assert o["report"]["model"]["engine_version"] in named["Algorithm Version"]
    text = " ".join(str(item.TextValue) for item in sr.ContentSequence if "TextValue" in item)
    assert "Research use, not for diagnosis" in text


def _dcmqi(tool: str, dicom: Path, out: Path, *args: str) -> None:
    run = subprocess.run([_tool(tool), "--inputDICOM", str(dicom), "--outputDirectory", str(out), *args],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.mark.slow
def test_dcmqi_reads_seg_and_parametric_map_onto_our_nrrd_voxels(lidc_run, tmp_path):
    o = _outputs(lidc_run)
    regions = sitk.ReadImage(str(o["regions"]))
    heatmap = sitk.ReadImage(str(o["heatmap"]))
    _dcmqi("segimage2itkimage", o["dicom"] / "seg.dcm", tmp_path, "--outputType", "nrrd", "--prefix", "seg")
    meta = json.loads((tmp_path / "seg-meta.json").read_text())
    labels = {int(s["labelID"]): s for group in meta["segmentAttributes"] for s in group}
    assert sorted(labels) == sorted(np.unique(sitk.GetArrayViewFromImage(regions))[1:].tolist())
    for number in labels:
        # dcmqi writes one image per segment, cropped to its frames: put it back on the CT grid.
        part = sitk.ReadImage(str(tmp_path / f"seg-{number}.nrrd"))
        on_grid = sitk.Resample(part, regions, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        ours = sitk.GetArrayViewFromImage(regions) == number
        theirs = sitk.GetArrayViewFromImage(on_grid) > 0
        assert np.array_equal(ours, theirs), f"segment {number}: {int((ours ^ theirs).sum())} voxels differ"

    _dcmqi("paramap2itkimage", o["dicom"] / "heatmap_pmap.dcm", tmp_path, "-t", "nrrd", "-n", "pm")
    pmap = sitk.ReadImage(str(tmp_path / "pm-pmap.nrrd"))
    for getter in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert np.allclose(getattr(pmap, getter)(), getattr(heatmap, getter)(), atol=1e-3), getter
    assert np.allclose(sitk.GetArrayViewFromImage(pmap), sitk.GetArrayViewFromImage(heatmap), atol=1e-6)
    assert float(sitk.GetArrayViewFromImage(heatmap).max()) > 0.5  # a real heatmap, not an empty one

    # highdicom reads the same: the parametric map and the SEG as volumes on the NRRD outputs' voxels.
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(o["dicom"] / "heatmap_pmap.dcm"))
    assert _same_voxels(pm.get_volume().to_simpleitk(), heatmap, atol=1e-6)
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(o["dicom"] / "seg.dcm"))
    labels = seg.get_volume(combine_segments=True, relabel=False).to_simpleitk()
    assert _same_voxels(labels, regions, atol=0)


def _same_voxels(image: sitk.Image, reference: sitk.Image, atol: float) -> bool:
    """Every voxel of ``reference`` has the value of ``image`` at the same physical point."""
    on_grid = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, sitk.Transform(),
                            sitk.sitkNearestNeighbor, 0.0)
    return bool(np.allclose(sitk.GetArrayViewFromImage(on_grid), sitk.GetArrayViewFromImage(reference), atol=atol))


@pytest.mark.slow
def test_no_patient_identifier_in_logs_or_json_unless_asked(lidc_run, tmp_path):
    source = pydicom.dcmread(next(lidc_run["series"].iterdir()), stop_before_pixels=True)
    values = [str(source.get(k, "")) for k in IDENTIFIERS if str(source.get(k, "")).strip()]
    assert values  # LIDC keeps a patient ID and an accession number: there is something to leak
    texts = [lidc_run["log"]] + [p.read_text() for p in lidc_run["out"].glob("*.json")] + \
            [p.read_text() for p in lidc_run["out"].glob("*.csv")]
    for value in values:
        assert not any(value in text for text in texts), f"identifier {value!r} leaked"

    # On request they are there; and --no-dicom-out writes no DICOM set.
    result, ct, loaded = _reload(lidc_run)
    write_detection(result, ct, tmp_path, "asked", source=loaded, include_identifiers=True, dicom_out=False)
    report = json.loads((tmp_path / "asked_report.json").read_text())
    assert report["patient"]["AccessionNumber"] == str(source.AccessionNumber)
    assert not (tmp_path / "asked_dicom").exists() and "dicom" not in report["files"]


def _reload(run):
    """The CLI run's result rebuilt from its files (candidates, heatmap) with the re-read CT."""
    o = _outputs(run)
    loaded = load_ct(run["out"].parent / "scan")
    candidates = [Candidate(c["rank"], tuple(c["position_lps"]), tuple(c["position_ras"]), c["probability"],
                            c["diameter_mm"]) for c in o["candidates"]]
    result = DetectionResult(scan_probability=o["report"]["scan_probability"], candidates=candidates,
                             heatmap=sitk.ReadImage(str(o["heatmap"])), probability_map=None, lung_found=True,
                             model=o["report"]["model"])
    return result, loaded.image, loaded


@pytest.mark.slow
def test_a_failing_case_leaves_no_partial_dicom_files(lidc_run, tmp_path, monkeypatch):
    import noduleai.dicom_export as export

    result, ct, loaded = _reload(lidc_run)

    def broken_sr(*args, **kwargs):  # SEG and parametric map are already written when the SR fails
        raise OSError("disk full while writing the SR")

    monkeypatch.setattr(export, "_structured_report", broken_sr)
    with pytest.raises(OSError, match="disk full"):
        write_detection(result, ct, tmp_path, "case", source=loaded)
    assert list(tmp_path.iterdir()) == []  # no DICOM file, no NRRD, no staging folder

    monkeypatch.undo()
    marks = {1: {"review": "accepted", "note": "solid"}, 2: {"review": "rejected", "note": "vessel"}}
    files = write_detection(result, ct, tmp_path, "case", source=loaded, review=marks)
    sr = hd.sr.srread(files["dicom"] / "sr.dcm")
    decisions = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        rank = int({m.name.meaning: m.value for m in group.get_measurements()}["Candidate rank"])
        decisions[rank] = [e.value.meaning for e in group.get_qualitative_evaluations()]
    assert decisions[1] == ["Accepted by reviewer"] and decisions[2] == ["Rejected by reviewer"]
    assert decisions[3] == []
    dciodvfy(files["dicom"] / "sr.dcm")


def test_dicom_out_needs_a_dicom_input(tmp_path):
    loaded = load_ct(require(RADIOMICS_IMAGE))
    heat = sitk.Image(loaded.image.GetSize(), sitk.sitkFloat32)
    heat.CopyInformation(loaded.image)
    result = DetectionResult(0.5, [], heat, None, True, {"name": "m"})
    with pytest.raises(ValueError, match="DICOM output needs a DICOM input"):
        write_detection(result, loaded.image, tmp_path, "nrrd", source=loaded, dicom_out=True)
    assert list(tmp_path.iterdir()) == []
    files = write_detection(result, loaded.image, tmp_path, "nrrd", source=loaded)  # default: no DICOM set
    assert "dicom" not in files and files["regions"].exists()


def test_results_are_written_without_highdicom_and_the_dicom_set_is_skipped_or_refused(tmp_path, monkeypatch):
    """Slicer 5.10 ships pydicom but not highdicom: detection results must still be written for DICOM input
    (the DICOM set skipped, with a note, when it was only the default) and an explicit request refused."""
    import importlib.util

    series = tmp_path / "series"
    series.mkdir()
    paths = list(next(require(LIDC_0001).rglob("*.dcm")).parent.glob("*.dcm"))
    z = {p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in paths}
    for path in sorted(paths, key=z.get)[40:52]:  # 12 neighbouring slices (file names are not in z order)
        shutil.copy(path, series / path.name)
    loaded = load_ct(series)
    heat = sitk.Image(loaded.image.GetSize(), sitk.sitkFloat32)
    heat.CopyInformation(loaded.image)
    result = DetectionResult(0.5, [], heat, None, True, {"name": "m"})
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "highdicom" else real_find_spec(name, *a))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="needs the Python package highdicom"):
        write_detection(result, loaded.image, out, "asked", source=loaded, dicom_out=True)
    assert not out.exists() or list(out.iterdir()) == []
    files = write_detection(result, loaded.image, out, "default", source=loaded)
    report = json.loads(files["report"].read_text())
    assert "dicom" not in files and not (out / "default_dicom").exists()
    assert report["dicom_out"] == "DICOM set not written: highdicom is not installed"

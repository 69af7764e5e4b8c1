"""The command line: detect over a folder with a broken file, outputs aligned to the CT, clean failures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import SimpleITK as sitk
from conftest import LIDC_0001, RADIOMICS_IMAGE, TS_NIFTI, require

from noduleai.checkpoint import load_model
from noduleai.cli import expand_inputs, main
from noduleai.io import read_ct


def test_detect_runs_over_a_folder_and_survives_a_broken_file(demo, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(require(TS_NIFTI), scans / "example_ct.nii.gz")
    (scans / "broken.nrrd").write_bytes(require(RADIOMICS_IMAGE).read_bytes()[:4096])
    out = tmp_path / "out"
    code = main(["-q", "detect", str(scans), str(require(LIDC_0001)), "--model", str(demo.model_path),
                 "--out", str(out), "--device", "cpu"])
    assert code == 1, "a failed case makes the exit status non-zero"
    summary = json.loads((out / "summary.json").read_text())
    assert {r["case"] for r in summary["succeeded"]} == {"example_ct", "LIDC-IDRI-0001"}
    assert [r["case"] for r in summary["failed"]] == ["broken"]
    assert "broken.nrrd" in summary["failed"][0]["error"]
    assert not list(out.glob("broken*")) and not list(out.glob(".staging*")), "nothing half-written"
    printed = capsys.readouterr().out
    assert "FAILED broken" in printed and "Research use, not for diagnosis" in printed
    # The heatmap has exactly the CT's geometry; candidates name their coordinate systems.
    ct = read_ct(LIDC_0001)
    for kind in ("heatmap", "probability"):
        heat = sitk.ReadImage(str(out / f"LIDC-IDRI-0001_{kind}.nrrd"))
        assert heat.GetSize() == ct.GetSize()
        assert np.allclose(heat.GetSpacing(), ct.GetSpacing()) and np.allclose(heat.GetOrigin(), ct.GetOrigin())
        assert np.allclose(heat.GetDirection(), ct.GetDirection())
    data = json.loads((out / "LIDC-IDRI-0001_candidates.json").read_text())
    for c in data["candidates"]:
        assert {"position_lps", "position_ras", "probability", "diameter_mm"} <= set(c)
        assert c["position_ras"][:2] == [-c["position_lps"][0], -c["position_lps"][1]]
    table = pd.read_csv(out / "LIDC-IDRI-0001_candidates.csv")
    assert list(table.columns[:3]) == ["rank", "probability", "diameter_mm"] and "x_ras_mm" in table
    report = json.loads((out / "LIDC-IDRI-0001_report.json").read_text())
    assert report["disclaimer"] == "Research use, not for diagnosis."
    assert report["model"]["name"].startswith("demo-phantom")
    for plane in ("axial", "coronal", "sagittal"):
        assert (out / f"LIDC-IDRI-0001_{plane}.png").stat().st_size > 10_000


def test_detect_refuses_a_bad_model_cleanly(tmp_path, capsys):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not a checkpoint")
    code = main(["detect", str(require(TS_NIFTI)), "--model", str(fake), "--out", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err
    assert "model.pt" in err and "corrupt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_input_expansion(tmp_path):
    (tmp_path / "a.nrrd").write_bytes(b"")
    (tmp_path / "b.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dicom1").mkdir()
    found = expand_inputs([tmp_path])
    assert [name for name, _ in found] == ["a", "b", "dicom1"]
    patients = tmp_path / "patients"
    for p in ("p1", "p2"):
        (patients / p / "study").mkdir(parents=True)
    assert [name for name, _ in expand_inputs([patients])] == ["p1", "p2"]
    assert [name for name, _ in expand_inputs([patients / "p1"])] == ["p1"]
    assert [name for name, _ in expand_inputs([tmp_path / "a.nrrd", tmp_path / "a.nrrd"])] == ["a", "a_2"]


def test_prepare_and_evaluate_commands(demo, tmp_path, capsys):
    manifest = demo.out_dir / "data" / "manifest.json"
    cache = tmp_path / "cache"
    code = main(["-q", "prepare", "--manifest", str(manifest), "--cache", str(cache), "--task", "scan",
                 "--input-size", "48", "--workers", "2"])
    assert code == 0
    table = pd.read_csv(cache / "metadata.csv")
    assert len(table) == 24 and set(json.loads(table["shape"][0])) == {48}
    out = tmp_path / "eval"
    code = main(["-q", "evaluate", "--model", str(demo.model_path), "--manifest", str(manifest), "--split", "test",
                 "--out", str(out)])
    assert code == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    _, info = load_model(demo.model_path)
    assert {c["case"] for c in evaluation["per_case"]} == set(info.training_data["test_cases"])
    assert "CPM" in capsys.readouterr().out

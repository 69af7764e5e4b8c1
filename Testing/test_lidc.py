"""LIDC-IDRI through pylidc on the real scan: nodules, physical centroids, consensus masks, skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import LIDC_0001, LIDC_ROOT, ORIGINAL_HOME, REPO, require

from noduleai.geometry import lps_to_array_index
from noduleai.lidc import consensus_mask, lidc_cases, query_scans


def test_pylidc_finds_the_scan_and_its_nodule(lidc_case):
    assert lidc_case.patient_id == "LIDC-IDRI-0001" and lidc_case.label == 1
    assert len(lidc_case.nodules) == 1
    nodule = lidc_case.nodules[0]
    assert nodule.texture == "solid"
    assert Path(lidc_case.image_path).is_dir()


def test_centroid_and_consensus_mask_agree_in_physical_space(lidc_case, lidc_ct):
    scan = query_scans(["LIDC-IDRI-0001"])[0]
    assert np.allclose(sorted(sitk.GetArrayViewFromImage(lidc_ct).shape), sorted((133, 512, 512)))
    # pylidc slice order equals SimpleITK's: slice k sits at z = slice_zvals[k].
    z0 = lidc_ct.TransformIndexToPhysicalPoint((0, 0, 0))[2]
    assert np.isclose(z0, scan.slice_zvals[0])
    mask = consensus_mask(scan.cluster_annotations()[0], lidc_ct)
    inside = sitk.GetArrayViewFromImage(mask).astype(bool)
    hu = sitk.GetArrayViewFromImage(lidc_ct)
    assert inside.sum() > 1000
    assert -200 < hu[inside].mean() < 50  # ~ -77 HU (the shared data README)
    k, j, i = (int(round(v)) for v in lps_to_array_index(lidc_ct, lidc_case.nodules[0].center_lps))
    assert inside[k, j, i], "the physical centroid maps into the consensus mask"
    assert np.allclose(np.argwhere(inside).mean(0), (k, j, i), atol=3)


def test_missing_dicom_files_are_skipped_with_a_reason(tmp_path):
    require(LIDC_0001)
    cache = tmp_path / "nodules.json"
    cases, skipped = lidc_cases(LIDC_ROOT, patient_ids=["LIDC-IDRI-0001", "LIDC-IDRI-0002"], nodule_cache=cache)
    assert [c.patient_id for c in cases] == ["LIDC-IDRI-0001"]
    assert len(skipped) == 1 and skipped[0][0].startswith("LIDC-IDRI-0002")
    assert "DICOM files not found" in skipped[0][1]
    assert cache.exists()  # clustering is cached for the next run
    again, _ = lidc_cases(LIDC_ROOT, patient_ids=["LIDC-IDRI-0001"], nodule_cache=cache)
    assert again[0].nodules == cases[0].nodules


def test_newer_tcia_layout_is_found_by_series_uid(tmp_path):
    series = next(p for p in require(LIDC_0001).rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    target = tmp_path / "LIDC-IDRI-0001" / "01-01-2000-NA-CT" / "3000566-NA"
    shutil.copytree(series, target)
    cases, skipped = lidc_cases(tmp_path, patient_ids=["LIDC-IDRI-0001"])
    assert not skipped and Path(cases[0].image_path) == target


def test_tests_write_no_pylidcrc_into_home(test_home, lidc_case):
    assert not (test_home / ".pylidcrc").exists()


def _python312() -> str | None:
    """A working python3.12: on PATH, or pyenv's (whose shim fails while 3.12 is not selected)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path(ORIGINAL_HOME) / ".pyenv"))
    for candidate in [shutil.which("python3.12"), *sorted(map(str, pyenv.glob("versions/3.12*/bin/python3.12")))]:
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


def _venv312() -> Path | None:
    """A Python 3.12 venv with the engine's LIDC dependencies (made once, kept in .venv312)."""
    venv = REPO / ".venv312"
    python = venv / "bin" / "python"
    if (venv / ".ready").exists():
        return python
    base = _python312()
    if base is None:
        return None
    shutil.rmtree(venv, ignore_errors=True)  # an unfinished earlier attempt
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "-r",
                    str(REPO / "requirements-py312.txt")], check=True, timeout=900)
    (venv / ".ready").touch()
    return python


def test_pylidc_works_on_python_312_like_slicer():
    """The engine's pylidc import and nodule geometry on Python 3.12, current numpy, no setuptools."""
    python = _venv312()
    if python is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("python3.12 not found: the pylidc check for Slicer's Python cannot run")
        pytest.skip("python3.12 not found")
    require(LIDC_0001)
    code = ("import sys; assert sys.version_info[:2] == (3, 12), sys.version\n"
            "from noduleai.lidc import lidc_cases\n"
            f"cases, skipped = lidc_cases({str(LIDC_ROOT)!r}, patient_ids=['LIDC-IDRI-0001'])\n"
            "n = cases[0].nodules[0]; assert 25 < n.diameter_mm < 40, n\n"
            "import numpy; print('ok', numpy.__version__, n.center_lps)\n")
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok 2.") or out.stdout.startswith("ok 1.2"), out.stdout
    assert not (Path(env["HOME"]) / ".pylidcrc").exists()

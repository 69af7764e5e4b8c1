"""Shared fixtures. Tests that need ../shared/data fail (not skip) when CI=true and it is missing."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# An isolated HOME before anything imports pylidc or matplotlib: nothing lands in the user's home.
ORIGINAL_HOME = os.environ.get("HOME", "/root")
_HOME = tempfile.mkdtemp(prefix="noduleai-test-home-")
os.environ["HOME"] = _HOME
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
# The modules' Lib packages import like Slicer imports them: from the module folders.
for module in ("NoduleDetect", "NoduleTraining"):
    if str(REPO / module) not in sys.path:
        sys.path.insert(0, str(REPO / module))
SHARED_DATA = REPO.parent / "shared" / "data"
LIDC_ROOT = SHARED_DATA / "LIDC-IDRI"
LIDC_0001 = LIDC_ROOT / "LIDC-IDRI-0001"
RADIOMICS_IMAGE = SHARED_DATA / "radiomics" / "lung1_image.nrrd"
RADIOMICS_LABEL = SHARED_DATA / "radiomics" / "lung1_label.nrrd"
TS_NIFTI = SHARED_DATA / "totalsegmentator" / "example_ct.nii.gz"
TS_DICOM = SHARED_DATA / "totalsegmentator" / "example_ct_dicom"


def require(path: Path) -> Path:
    """The path, or a skip outside CI / a failure in CI when the shared data is missing."""
    if path.exists():
        return path
    message = f"shared test data missing: {path}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def test_home() -> Path:
    return Path(_HOME)


@pytest.fixture(scope="session")
def lidc_ct():
    from noduleai.io import read_ct

    return read_ct(require(LIDC_0001))


@pytest.fixture(scope="session")
def lidc_case():
    from noduleai.lidc import lidc_cases

    require(LIDC_0001)
    cases, _ = lidc_cases(LIDC_ROOT, patient_ids=["LIDC-IDRI-0001"])
    assert len(cases) == 1
    return cases[0]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """One run of the real demo (phantoms -> training -> evaluation -> detection), shared by tests."""
    from noduleai.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("demo"), progress=False, verbose=False)


@pytest.fixture(scope="session")
def demo_detector(demo):
    from noduleai.detect import Detector

    return Detector.from_checkpoint(demo.model_path, "cpu")


def pytest_sessionfinish(session, exitstatus):
    session.config._noduleai_exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's teardown once slicer-core was used.

    Seen in CI: every test had run and pytest had printed its summary, then the interpreter crashed
    (exit 139) while destroying slicer-core's VTK/MRML objects. Nothing is left to run at this point,
    so the exit status of the tests is returned directly.
    """
    status = getattr(config, "_noduleai_exit_status", None)
    if status is not None and "slicer" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

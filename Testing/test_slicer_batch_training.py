"""The batch script (its real entry, in a child process) on real scans, a broken file and every setup failure;
NoduleTraining's background runs (phases, resume, one run at a time, process-tree cancel); the packaging."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slicer
from conftest import LIDC_0001, RADIOMICS_IMAGE, REPO, TS_NIFTI, require
from launcher import gone, make_launcher, python_children
from NoduleTrainingLib.logic import LAST_MODEL_KEY, TrainingLogic, TrainingParameters, read_history
from slicer_scene import new_scene, read_mrb

from noduleai.modelpath import BUNDLED_MODEL_FILE

BATCH = REPO / "NoduleDetect" / "Scripts" / "batch_detect.py"


def _batch(*args: str, timeout: float = 120, env: dict | None = None, python: str = sys.executable,
           flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the batch script's entry as ``Slicer --python-script`` would run its file, under plain Python."""
    return subprocess.run([python, *flags, str(BATCH), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_batch_script_processes_a_folder_and_names_the_broken_file(tmp_path):
    """LIDC-IDRI-0001 (DICOM), the TotalSegmentator NIfTI and a truncated NRRD, with the bundled model."""
    scans = tmp_path / "scans"
    scans.mkdir()
    series = next(p for p in require(LIDC_0001).rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    (scans / "LIDC-IDRI-0001").symlink_to(series, target_is_directory=True)
    shutil.copy(require(TS_NIFTI), scans / "example_ct.nii.gz")
    (scans / "broken.nrrd").write_bytes(require(RADIOMICS_IMAGE).read_bytes()[:4096])
    out = tmp_path / "out"
    done = _batch("--input", str(scans), "--output", str(out), "--device", "cpu", timeout=1200)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "FAILED broken" in done.stdout and "2 succeeded, 1 failed" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {r["case"] for r in summary["succeeded"]} == {"LIDC-IDRI-0001", "example_ct"}
    assert [r["case"] for r in summary["failed"]] == ["broken"] and "broken.nrrd" in summary["failed"][0]["error"]
    assert summary["model"].endswith(BUNDLED_MODEL_FILE), "the bundled model by default"
    for case in ("LIDC-IDRI-0001", "example_ct"):
        for suffix in ("_heatmap.nrrd", "_candidates.csv", "_candidates.json", "_report.json", ".mrb"):
            assert (out / f"{case}{suffix}").exists(), case + suffix
    assert not list(out.glob("broken*")) and not list(out.glob(".*"))
    new_scene()  # slicer.mrmlScene for slicer.util (the batch ran in its own process)
    scene = read_mrb(out / "example_ct.mrb", tmp_path / "cache")
    assert scene.GetFirstNodeByName("example_ct NoduleAI heatmap") is not None
    table = scene.GetFirstNodeByName("example_ct NoduleAI candidates table")
    assert table is not None and table.GetAttribute("NoduleAI.case") == "example_ct"


def test_batch_script_refuses_a_missing_model_at_once(tmp_path):
    t0 = time.time()
    done = _batch("--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", str(tmp_path / "no.pt"))
    assert done.returncode == 2 and "no.pt: model file does not exist" in done.stderr, done.stderr[-2000:]
    assert time.time() - t0 < 60 and not (tmp_path / "out" / "summary.json").exists()


def test_batch_script_refuses_an_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root may write anywhere: a path through a file cannot be created
    done = _batch("--input", str(require(TS_NIFTI)), "--output", str(blocker / "out"))
    assert done.returncode == 2 and "batch_detect: error:" in done.stderr and "a-file" in done.stderr, done.stderr
    done = _batch("--output", str(tmp_path / "out"))  # argparse: --input missing
    assert done.returncode == 2 and "--input" in done.stderr


def test_batch_script_ends_slicer_with_a_status_when_noduleai_cannot_be_imported(tmp_path):
    """No site-packages (-S): NoduleDetectLib cannot import numpy, slicer or the engine. Under the Slicer
    application the script must call slicer.util.exit(3) (Slicer would otherwise keep running); a stand-in
    ``slicer`` package with an ``app`` records that call."""
    fake = tmp_path / "fake" / "slicer"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from . import util\napp = object()\n")
    (fake / "util.py").write_text("import os\ndef exit(status=0):\n"
                                  "    open(os.environ['EXIT_RECORD'], 'w').write(str(status))\n")
    record = tmp_path / "exit.txt"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(fake.parent), "EXIT_RECORD": str(record)}
    done = _batch("--input", "x", "--output", str(tmp_path / "o"), env=env, flags=("-S",))
    assert "cannot import NoduleAI" in done.stderr, done.stderr[-2000:]
    assert record.read_text() == "3", "slicer.util.exit(3) was called"
    plain = _batch("--input", "x", "--output", str(tmp_path / "o"), env={"PATH": os.environ["PATH"]}, flags=("-S",))
    assert plain.returncode == 3 and "cannot import NoduleAI" in plain.stderr


def test_batch_script_is_not_a_module_and_runs_only_as_a_script():
    text = BATCH.read_text()
    assert 'if __name__ == "__main__":' in text
    imported = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({str(BATCH)!r}, "
                               "run_name='batch_detect')"], capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0 and imported.stdout == "", "importing it (as Slicer's module scan would) is inert"


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory):
    from noduleai.synthetic import write_phantom_cohort

    root = tmp_path_factory.mktemp("training-module")
    write_phantom_cohort(root / "data", 6, seed=21, size_xyz=(64, 56, 40))
    return root / "data" / "manifest.json"


def _params(out: Path, manifest: Path, **kw) -> TrainingParameters:
    base = dict(output_dir=str(out), manifest=str(manifest), task="patch", arch="resnet10_3d", width=0.125,
                epochs=2, batch_size=8, max_steps=3, negatives=6, device="cpu")
    return TrainingParameters(**(base | kw))


def _wait(run, condition, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        run.poll()
        time.sleep(0.2)
    run.poll()


def test_training_runs_in_the_background_and_hands_its_model_to_detect(phantom_manifest, tmp_path):
    settings: dict[str, str] = {}
    logic = TrainingLogic(settings)
    run = logic.start(_params(tmp_path / "run", phantom_manifest))
    assert run.running and logic.is_running  # start() returned while the process works
    with pytest.raises(RuntimeError, match="already going on"):
        logic.start(_params(tmp_path / "other", phantom_manifest))
    phases = []
    _wait(run, lambda: phases.append(run.phase) or not run.running)
    phases.append(run.phase)
    assert run.error() is None and not logic.is_running
    names = [p["phase"] for p in phases]
    assert "preprocessing" in names and "training" in names and names[-1] == "done", names
    assert any(p["phase"] == "preprocessing" and p["total"] == 6 for p in phases)
    assert [r["epoch"] for r in run.epochs] == [1, 2] and run.resumed_epochs == []
    results = run.results()
    assert {"accuracy", "precision", "recall", "f1", "auc"} <= set(results["metrics"])
    assert results["confusion_matrix"].exists() and results["model_card"].exists()
    model = logic.use_in_detect(run)
    assert settings[LAST_MODEL_KEY] == str(model) and model.exists()
    assert logic.handed_over_model() == model


def test_cancel_kills_the_whole_training_tree_and_a_restart_resumes_with_its_history(phantom_manifest, tmp_path):
    """Started through a launcher (as PythonSlicer starts python-real): Cancel leaves no process behind,
    so nothing goes on writing into the folder; Start again resumes and reports the earlier epochs."""
    logic = TrainingLogic(python=str(make_launcher(tmp_path)))
    params = _params(tmp_path / "run", phantom_manifest, epochs=3, max_steps=25)
    run = logic.start(params)
    _wait(run, lambda: len(run.epochs) >= 1 or not run.running)
    assert run.running, run.error()
    child = python_children(run.process.pid)[0].pid
    run.cancel()
    assert gone(run.process.pid) and gone(child), "python-real must not outlive Cancel"
    assert not run.running and run.error() is None and run.phase["phase"] == "cancelled"
    assert 1 <= len(run.epochs) < 3
    size = (tmp_path / "run" / "progress.jsonl").stat().st_size
    time.sleep(3)
    assert (tmp_path / "run" / "progress.jsonl").stat().st_size == size, "nothing trains on after Cancel"
    resumed = logic.start(params)
    assert [r["epoch"] for r in resumed.resumed_epochs] == [r["epoch"] for r in run.epochs]
    assert read_history(tmp_path / "run") == resumed.resumed_epochs
    _wait(resumed, lambda: not resumed.running)
    assert resumed.error() is None
    assert [r["epoch"] for r in resumed.epochs] == [1, 2, 3]


def test_bad_training_data_is_reported(tmp_path):
    with pytest.raises(ValueError, match="exactly one data source"):
        TrainingParameters(output_dir=str(tmp_path)).command()
    run = TrainingLogic().start(TrainingParameters(output_dir=str(tmp_path / "r"), manifest=str(tmp_path / "no.json")))
    run.process.wait(120)
    assert "no.json" in run.error()


# -- packaging ----------------------------------------------------------------------------------------
def _cmake_lists(path: Path, variable: str) -> list[str]:
    text = path.read_text()
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{path}: no {variable}"
    module = re.search(r"set\(MODULE_NAME (\w+)\)", text)
    items = match.group(1).split()
    return [i.replace("${MODULE_NAME}", module.group(1)) if module else i for i in items]


@pytest.mark.parametrize("module", ["NoduleDetect", "NoduleTraining"])
def test_every_runtime_file_of_a_module_is_listed_in_cmake(module):
    folder = REPO / module
    scripts = _cmake_lists(folder / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_lists(folder / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    shipped = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.suffix in (".py", ".ui", ".png") and "__pycache__" not in p.parts}
    assert shipped == set(scripts) | set(resources)
    for name in scripts + resources:
        assert (folder / name).is_file(), name
    text = (folder / f"{module}.py").read_text()
    for cls in ("", "Widget", "Logic", "Test", "ParameterNode"):
        assert f"class {module}{cls}(" in text or f"class {module}{cls}:" in text, f"{module}{cls}"
    ui = (folder / "Resources" / "UI" / f"{module}.ui").read_text()
    bound = set(re.findall(r'name="SlicerParameterName" stdset="0"><string>(\w+)</string>', ui))
    fields = set(re.findall(r"^    (\w+): ", text.split("@parameterNodeWrapper")[1].split("\nclass ", 2)[1], re.M))
    assert bound == fields, "every parameter-node field has a widget and the reverse"


def test_engine_files_and_bundled_models_are_listed_and_the_extension_is_complete():
    engine = REPO / "noduleai"
    scripts = _cmake_lists(engine / "CMakeLists.txt", "ENGINE_PYTHON_SCRIPTS")
    assert set(scripts) == {p.name for p in engine.glob("*.py")}
    top = (REPO / "CMakeLists.txt").read_text()
    from noduleai.checkpoint import bundled_model_path, bundled_models_dir

    shipped = sorted(bundled_models_dir().glob("*"))
    assert bundled_model_path() in shipped and bundled_model_path().with_suffix(".md") in shipped
    for path in shipped:
        assert f"Resources/Models/{path.name}" in top, f"bundled {path.name} not in CMakeLists.txt"
    assert not list(engine.rglob("*.pt")), "models belong in Resources/Models"
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    for sub in ("noduleai", "NoduleDetect", "NoduleTraining"):
        assert f"add_subdirectory({sub})" in top
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in top and "Slicer_EXTENSION_CPACK" in top
    index = json.loads((REPO / "NoduleAI.json").read_text())
    assert index["build_dependencies"] == ["PyTorch"] and index["category"] == "Chest Imaging"
    assert (REPO / "LICENSE").exists() and (REPO / "Resources" / "Icons" / "NoduleAI.png").exists()
    from PIL import Image

    for icon in (REPO / "Resources" / "Icons" / "NoduleAI.png", REPO / "NoduleDetect" / "Resources" / "Icons" /
                 "NoduleDetect.png", REPO / "NoduleTraining" / "Resources" / "Icons" / "NoduleTraining.png"):
        assert Image.open(icon).size == (128, 128)


def test_logic_modules_never_import_qt():
    for path in list((REPO / "NoduleDetect" / "NoduleDetectLib").glob("*.py")) + list(
            (REPO / "NoduleTraining" / "NoduleTrainingLib").glob("*.py")) + list((REPO / "noduleai").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(qt|ctk|PythonQt)\b", text, re.M), path
    for path in (REPO / "noduleai").glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(slicer|vtk)\b", path.read_text(), re.M), path
    assert slicer  # the logic tests above ran against slicer-core's real MRML

"""The batch script on real scans and a broken file; NoduleTraining's background runs; the packaging."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import slicer
from conftest import LIDC_0001, RADIOMICS_IMAGE, REPO, TS_NIFTI, require
from NoduleDetectLib.batch import run_batch
from NoduleTrainingLib.logic import LAST_MODEL_KEY, TrainingLogic, TrainingParameters
from slicer_scene import new_scene, read_mrb


def test_batch_script_processes_a_folder_and_names_the_broken_file(demo, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    series = next(p for p in require(LIDC_0001).rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    (scans / "LIDC-IDRI-0001").symlink_to(series, target_is_directory=True)
    shutil.copy(require(TS_NIFTI), scans / "example_ct.nii.gz")
    (scans / "broken.nrrd").write_bytes(require(RADIOMICS_IMAGE).read_bytes()[:4096])
    out = tmp_path / "out"
    summary = run_batch([scans], out, demo.model_path, new_scene(), device="cpu")
    assert {r["case"] for r in summary["succeeded"]} == {"LIDC-IDRI-0001", "example_ct"}
    assert [r["case"] for r in summary["failed"]] == ["broken"] and "broken.nrrd" in summary["failed"][0]["error"]
    assert json.loads((out / "summary.json").read_text())["failed"][0]["case"] == "broken"
    for case in ("LIDC-IDRI-0001", "example_ct"):
        for suffix in ("_heatmap.nrrd", "_candidates.csv", "_candidates.json", "_report.json", ".mrb"):
            assert (out / f"{case}{suffix}").exists(), case + suffix
    assert not list(out.glob("broken*"))
    scene = read_mrb(out / "example_ct.mrb", tmp_path / "cache")
    assert scene.GetFirstNodeByName("example_ct NoduleAI heatmap") is not None
    assert scene.GetFirstNodeByName("example_ct NoduleAI candidates table") is not None


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
    assert run.running  # start() returned while the process works
    _wait(run, lambda: not run.running)
    assert run.error() is None
    assert [r["epoch"] for r in run.epochs] == [1, 2]
    results = run.results()
    assert {"accuracy", "precision", "recall", "f1", "auc"} <= set(results["metrics"])
    assert results["confusion_matrix"].exists() and results["model_card"].exists()
    model = logic.use_in_detect(run)
    assert settings[LAST_MODEL_KEY] == str(model) and model.exists()


def test_cancelled_training_resumes_where_it_stopped(phantom_manifest, tmp_path):
    logic = TrainingLogic()
    params = _params(tmp_path / "run", phantom_manifest, epochs=3, max_steps=25)
    run = logic.start(params)
    _wait(run, lambda: len(run.epochs) >= 1 or not run.running)
    run.cancel()
    assert not run.running and len(run.epochs) < 3
    resumed = logic.start(params)
    assert [r["epoch"] for r in resumed.epochs] == [r["epoch"] for r in run.epochs]
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

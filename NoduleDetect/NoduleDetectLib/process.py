"""Detection in a background process, so that Slicer stays responsive and Cancel really stops the work.

The CT node is written (voxels and IJK-to-RAS geometry, without its parent transform: results are placed
under that transform, as the CT is) to a temporary folder; ``python -m noduleai detect`` runs there with
JSON-lines progress; the panel polls; the results are read back into MRML nodes by
:class:`NoduleDetectLib.logic.DetectionLogic`. No Qt here: the panel owns the timer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from noduleai.geometry import geometry_from_ijk_to_ras
from noduleai.process import BackgroundProcess, engine_environment
from noduleai.progress import JsonLinesReader
from NoduleDetectLib.environment import startup_environment
from NoduleDetectLib.logic import DetectionLogic, DetectionNodes

CASE = "ct"  # the file name of the written CT, hence the prefix of every output of the child


@dataclass
class ProgressState:
    """What a background detection is doing, for the panel's progress bar and status line."""

    running: bool
    fraction: float
    phase: str
    message: str = ""
    error: str | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        """Ended successfully: results can be loaded."""
        return not self.running and self.error is None and not self.cancelled and self.fraction >= 1.0


def write_volume_node(node: slicer.vtkMRMLScalarVolumeNode, path: str | os.PathLike) -> None:
    """Write the node's voxels in their own type (no float copy) with its IJK-to-RAS geometry, in LPS."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    image = sitk.GetImageFromArray(np.ascontiguousarray(slicer.util.arrayFromVolume(node)))
    origin, spacing, direction = geometry_from_ijk_to_ras(
        np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=False)  # speed over size: the file lives seconds


class BackgroundDetection:
    """One detection of one CT node in a background ``noduleai detect`` process.

    ``start()`` returns at once; ``poll()`` from a timer; ``load_results()`` once ``poll().finished``;
    ``cancel()`` kills the whole process tree and leaves neither nodes nor files; ``cleanup()`` always.
    ``python`` is the interpreter to run (Slicer: ``PythonSlicer``, a launcher of ``python-real``).
    """

    def __init__(self, volume_node: slicer.vtkMRMLScalarVolumeNode, model_path: str | os.PathLike,
                 device: str = "auto", cam_method: str | None = None, cam_layer: str | None = None,
                 python: str | os.PathLike | None = None, work_dir: str | os.PathLike | None = None):
        self.volume_node = volume_node
        self.model_path = Path(model_path)
        self.device = device
        self.cam_method = cam_method or None
        self.cam_layer = cam_layer or None
        self.python = str(python or sys.executable)  # read now: Slicer sets it to PythonSlicer at start-up
        self._work_parent = work_dir
        self.folder: Path | None = None
        self.process: BackgroundProcess | None = None
        self._reader: JsonLinesReader | None = None
        self._state = ProgressState(False, 0.0, "not started")
        self._cancelled = False

    @property
    def out_dir(self) -> Path:
        return self.folder / "out"

    def command(self) -> list[str]:
        """The child's command line."""
        cmd = [self.python, "-m", "noduleai", "-q", "detect", str(self.folder / f"{CASE}.nrrd"),
               "--out", str(self.out_dir), "--model", str(self.model_path), "--device", self.device,
               "--progress-json", str(self.folder / "progress.jsonl")]
        if self.cam_method:
            cmd += ["--cam", self.cam_method]
        if self.cam_layer:
            cmd += ["--cam-layer", self.cam_layer]
        return cmd

    def start(self) -> None:
        """Write the CT and start the process; raises at once for a missing model or an empty volume."""
        if self.process is not None:
            raise RuntimeError("this detection was already started; make a new BackgroundDetection")
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: model file does not exist")
        if self.volume_node is None or self.volume_node.GetImageData() is None:
            raise ValueError("choose a CT volume that holds an image")
        self.folder = Path(tempfile.mkdtemp(prefix="NoduleAI-detect-", dir=self._work_parent))
        try:
            self._state = ProgressState(True, 0.0, "writing the CT for the detection process")
            write_volume_node(self.volume_node, self.folder / f"{CASE}.nrrd")
            self._reader = JsonLinesReader(self.folder / "progress.jsonl")
            self.process = BackgroundProcess(self.command(), self.folder / "detect.log",
                                             env=engine_environment(startup_environment())).start()
        except BaseException:
            self.cleanup()
            raise
        self._state = ProgressState(True, 0.0, "starting the detection process")

    def poll(self) -> ProgressState:
        """The state now: progress while it runs, then finished, failed (``error``) or ``cancelled``."""
        if self.process is None or self._cancelled:
            return self._state
        for record in self._reader.read_new():
            self._state.fraction = float(record.get("fraction", self._state.fraction))
            self._state.phase = str(record.get("phase", self._state.phase))
            self._state.message = str(record.get("message", record.get("error", self._state.message)))
        code = self.process.poll()
        if code is None:
            return self._state
        for record in self._reader.read_new():  # what it wrote just before it ended
            self._state.fraction = float(record.get("fraction", self._state.fraction))
            self._state.phase = str(record.get("phase", self._state.phase))
        self._state.running = False
        if code == 0:
            self._state.fraction, self._state.phase, self._state.message = 1.0, "finished", ""
        else:
            self._state.error = self._failure(code)
            self._state.phase = "failed"
        return self._state

    def _failure(self, code: int) -> str:
        summary = self.out_dir / "summary.json"
        if summary.exists():
            failed = json.loads(summary.read_text()).get("failed", [])
            if failed:  # the engine's own message: names the file and the problem
                return failed[0]["error"].replace(str(self.folder / f"{CASE}.nrrd"), self.volume_node.GetName())
        tail = self.process.log_tail().strip().splitlines()
        return f"detection stopped with exit status {code}: " + ("\n".join(tail[-8:]) or "no output")

    def cancel(self) -> None:
        """Kill the process and its children, and delete every file it wrote; the scene is not touched."""
        self._cancelled = True
        if self.process is not None:
            self.process.kill()
        self._remove_folder()
        self._state = ProgressState(False, self._state.fraction, "cancelled", "cancelled; the scene is unchanged",
                                    cancelled=True)

    def load_results(self, opacity: float = 0.5, threshold: float = 0.2) -> DetectionNodes:
        """Create or replace the CT's heatmap, candidate points and table from the finished run's files."""
        if not self.poll().finished:
            raise RuntimeError(f"no results to load: detection is {self._state.phase}"
                               + (f" ({self._state.error})" if self._state.error else ""))
        if self.volume_node.GetScene() is None:
            raise RuntimeError("the CT volume was removed from the scene while detection ran")
        from noduleai.results import read_detection

        result = read_detection(self.out_dir, CASE)
        return DetectionLogic().show_result(self.volume_node, result, opacity, threshold)

    def _remove_folder(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def cleanup(self) -> None:
        """Kill the process if it still runs and remove the temporary folder (idempotent)."""
        if self.process is not None and self.process.running:
            self.process.kill()
        self._remove_folder()

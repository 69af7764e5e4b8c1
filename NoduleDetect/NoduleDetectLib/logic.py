"""NoduleDetect logic: translates between MRML nodes and the ``noduleai`` engine. No GUI, no dialogs.

Runs in Slicer and, for tests and batch use, under plain Python with ``slicer-core``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from noduleai import DISCLAIMER
from noduleai.detect import DetectionResult, Detector, ProgressCallback
from noduleai.detect_v2 import TwoStageDetector, load_detector
from noduleai.files import atomic_path, write_json_atomic
from noduleai.geometry import geometry_from_ijk_to_ras, ijk_to_ras_matrix
from noduleai.io import validate_ct

HEATMAP_REF = "NoduleAIHeatmap"
CANDIDATES_REF = "NoduleAICandidates"
TABLE_REF = "NoduleAITable"
VOLUME_REF = "NoduleAIVolume"  # from the table back to its CT (case name, parent transform)
CASE_ATTRIBUTE = "NoduleAI.case"
COLOR_NODE_NAME = "NoduleAI Heat"
REVIEW_STATES = ("unreviewed", "accepted", "rejected")
THRESHOLD_ATTRIBUTE = "NoduleAI.decision_threshold"  # the model's operating threshold (see DetectionResult)
TABLE_COLUMNS = ("rank", "probability", "diameter_mm", "R", "A", "S", "review", "note")


@dataclass
class DetectionNodes:
    """The scene nodes holding one CT's results.

    ``result`` is the engine's result right after a detection; None when the nodes were found in a
    (reloaded) scene, where the table node holds everything the panel needs.
    """

    heatmap: slicer.vtkMRMLScalarVolumeNode
    candidates: slicer.vtkMRMLMarkupsFiducialNode
    table: slicer.vtkMRMLTableNode
    result: DetectionResult | None = None

    @property
    def case(self) -> str:
        """The case the results belong to: the CT's name when it was processed."""
        return self.table.GetAttribute(CASE_ATTRIBUTE) or ""

    @property
    def scan_probability(self) -> float:
        return float(self.table.GetAttribute("NoduleAI.scan_probability") or "nan")


def _vtk_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_vtk(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def image_from_volume_node(node: slicer.vtkMRMLScalarVolumeNode) -> sitk.Image:
    """The node's voxels (k, j, i) and IJK-to-RAS geometry as a SimpleITK image in LPS."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    image = sitk.GetImageFromArray(np.asarray(slicer.util.arrayFromVolume(node), np.float32))
    origin, spacing, direction = geometry_from_ijk_to_ras(_vtk_to_numpy(matrix))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def update_volume_node(node: slicer.vtkMRMLScalarVolumeNode, image: sitk.Image) -> None:
    """Put a SimpleITK image's voxels and geometry into a scalar volume node."""
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    node.SetIJKToRASMatrix(_numpy_to_vtk(ijk_to_ras_matrix(image)))


def heat_color_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode:
    """A 256-entry colour table from matplotlib's ``inferno`` (made once per scene)."""
    existing = scene.GetFirstNodeByName(COLOR_NODE_NAME)
    if existing is not None:
        return existing
    from matplotlib import colormaps

    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)  # SetColor names every entry (SetNamesInitialised is deprecated since 5.10)
    colours = colormaps["inferno"](np.linspace(0, 1, 256))
    for i, (r, g, b, _a) in enumerate(colours):
        node.SetColor(i, f"heat{i}", float(r), float(g), float(b), 1.0)
    return node


def _reference(ct: slicer.vtkMRMLNode, role: str, class_name: str, name: str) -> slicer.vtkMRMLNode:
    """The result node of ``role`` for this CT: reused on a re-run, created the first time."""
    node = ct.GetNodeReference(role)
    if node is None or not node.IsA(class_name):
        node = ct.GetScene().AddNewNodeByClass(class_name, name)
        ct.SetNodeReferenceID(role, node.GetID())
    return node


class DetectionLogic:
    """Runs detection on a CT volume node and keeps the results in the scene."""

    def __init__(self, detector: Detector | TwoStageDetector | None = None):
        self.detector = detector

    def load_model(self, path: str | os.PathLike, device: str = "auto", cam_method: str | None = None,
                   cam_layer: str | None = None) -> Detector | TwoStageDetector:
        self.detector = load_detector(path, device, cam_method=cam_method, cam_layer=cam_layer)
        return self.detector

    def process(self, ct: slicer.vtkMRMLScalarVolumeNode, opacity: float = 0.5, threshold: float = 0.2,
                progress: ProgressCallback | None = None) -> DetectionNodes:
        """Detect on ``ct`` in this process; create or replace its heatmap, candidate points and table; show them.

        ``progress(fraction)`` returning True cancels (:class:`DetectionCancelled`) before any node is
        touched, so a cancelled run leaves the scene as it was. The panel runs detection in a background
        process instead (:class:`NoduleDetectLib.process.BackgroundDetection`); batch mode uses this.
        """
        if self.detector is None:
            raise RuntimeError("no model loaded: choose the bundled model or a checkpoint file")
        image = image_from_volume_node(ct)
        validate_ct(image, ct.GetName())
        result = self.detector.detect(image, progress)
        return self.show_result(ct, result, opacity, threshold)

    def show_result(self, ct: slicer.vtkMRMLScalarVolumeNode, result: DetectionResult, opacity: float = 0.5,
                    threshold: float = 0.2) -> DetectionNodes:
        """Put a detection result of ``ct`` into the scene: reuse its result nodes on a re-run, place them under
        the CT's parent transform (they follow it as the CT does), show the heatmap in every slice view."""
        name = ct.GetName()
        heatmap = _reference(ct, HEATMAP_REF, "vtkMRMLScalarVolumeNode", f"{name} NoduleAI heatmap")
        update_volume_node(heatmap, result.heatmap)
        self._show_heatmap(ct, heatmap, opacity, threshold)
        points = _reference(ct, CANDIDATES_REF, "vtkMRMLMarkupsFiducialNode", f"{name} NoduleAI candidates")
        points.RemoveAllControlPoints()
        for c in result.candidates:
            points.AddControlPoint(vtk.vtkVector3d(*c.position_ras), f"{c.rank}: {c.probability:.2f}")
        table = _reference(ct, TABLE_REF, "vtkMRMLTableNode", f"{name} NoduleAI candidates table")
        self._fill_table(table, result)
        for key, value in (("NoduleAI.scan_probability", f"{result.scan_probability:.6f}"),
                           (THRESHOLD_ATTRIBUTE, repr(result.decision_threshold()[0])),  # exact, as reports
                           ("NoduleAI.model", json.dumps(result.model)), ("NoduleAI.disclaimer", DISCLAIMER),
                           (CASE_ATTRIBUTE, name)):
            table.SetAttribute(key, value)
        table.SetNodeReferenceID(VOLUME_REF, ct.GetID())
        for node in (heatmap, points):
            # Results are in the CT's own coordinates: under the same transform they stay on the anatomy.
            node.SetAndObserveTransformNodeID(ct.GetTransformNodeID())
        self._group_under_study(ct, (heatmap, points, table))
        return DetectionNodes(heatmap, points, table, result)

    @staticmethod
    def nodes_for(ct: slicer.vtkMRMLScalarVolumeNode | None) -> DetectionNodes | None:
        """The result nodes of ``ct`` as the scene holds them (also after a scene reload), or None."""
        if ct is None:
            return None
        nodes = [ct.GetNodeReference(role) for role in (HEATMAP_REF, CANDIDATES_REF, TABLE_REF)]
        return DetectionNodes(*nodes) if all(n is not None for n in nodes) else None

    @classmethod
    def update_heatmap_display(cls, ct: slicer.vtkMRMLScalarVolumeNode, opacity: float, threshold: float) -> bool:
        """Apply opacity and lower threshold to ``ct``'s heatmap now (live sliders); False if it has none."""
        nodes = cls.nodes_for(ct)
        if nodes is None:
            return False
        cls._show_heatmap(ct, nodes.heatmap, opacity, threshold)
        return True

    @staticmethod
    def _show_heatmap(ct, heatmap, opacity: float, threshold: float) -> None:
        scene = ct.GetScene()
        if heatmap.GetDisplayNode() is None:
            heatmap.CreateDefaultDisplayNodes()
        display = heatmap.GetDisplayNode()
        display.SetAndObserveColorNodeID(heat_color_node(scene).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.ApplyThresholdOn()
        display.SetLowerThreshold(threshold)
        display.SetUpperThreshold(1.0)
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetBackgroundVolumeID(ct.GetID())
            composite.SetForegroundVolumeID(heatmap.GetID())
            composite.SetForegroundOpacity(opacity)

    @staticmethod
    def _fill_table(table: slicer.vtkMRMLTableNode, result: DetectionResult) -> None:
        table.RemoveAllColumns()
        numeric = {"rank", "probability", "diameter_mm", "R", "A", "S"}
        for column in TABLE_COLUMNS:
            array = vtk.vtkDoubleArray() if column in numeric else vtk.vtkStringArray()
            array.SetName(column)
            table.AddColumn(array)
        for c in result.candidates:
            row = table.AddEmptyRow()
            values = (c.rank, c.probability, c.diameter_mm, *c.position_ras)
            for col, value in enumerate(values):
                table.GetTable().GetColumn(col).SetValue(row, float(value))
            table.SetCellText(row, TABLE_COLUMNS.index("review"), "unreviewed")
            table.SetCellText(row, TABLE_COLUMNS.index("note"), "")
        table.Modified()

    @staticmethod
    def _group_under_study(ct, nodes) -> None:
        """Put the results in a 'NoduleAI' folder beside the CT in the subject hierarchy (its study)."""
        sh = ct.GetScene().GetSubjectHierarchyNode()
        if sh is None:
            return
        ct_item = sh.GetItemByDataNode(ct) or sh.CreateItem(sh.GetSceneItemID(), ct)
        parent = sh.GetItemParent(ct_item) or sh.GetSceneItemID()
        folder = sh.GetItemChildWithName(parent, "NoduleAI") or sh.CreateFolderItem(parent, "NoduleAI")
        for node in nodes:
            item = sh.GetItemByDataNode(node) or sh.CreateItem(folder, node)
            sh.SetItemParent(item, folder)

    # -- review ------------------------------------------------------------------------------------------
    # Every mark lives in the table node (saved with the scene): nothing is kept in Python between calls.
    @staticmethod
    def candidate_ras(table: slicer.vtkMRMLTableNode, row: int) -> tuple[float, float, float]:
        """The candidate's position in its CT's own RAS coordinates (as detection found it), mm."""
        cols = [TABLE_COLUMNS.index(k) for k in ("R", "A", "S")]
        return tuple(float(table.GetTable().GetColumn(c).GetValue(row)) for c in cols)

    @classmethod
    def candidate_world_ras(cls, table: slicer.vtkMRMLTableNode, row: int) -> tuple[float, float, float]:
        """The candidate's position in world RAS: through its CT's parent transform, as it is now."""
        point = cls.candidate_ras(table, row)
        ct = table.GetNodeReference(VOLUME_REF)
        parent = ct.GetParentTransformNode() if ct is not None else None
        if parent is None:
            return point
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, to_world)
        return tuple(float(v) for v in to_world.TransformPoint(point))

    def centre_on(self, table: slicer.vtkMRMLTableNode, row: int) -> tuple[float, float, float]:
        """Centre every slice view on the candidate of ``row``; returns that point (world RAS)."""
        if not 0 <= row < table.GetNumberOfRows():
            raise IndexError(f"row {row} is not a candidate row of {table.GetName()}")
        r, a, s = self.candidate_world_ras(table, row)
        for slice_node in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            slice_node.JumpSliceByCentering(r, a, s)
        return r, a, s

    @staticmethod
    def set_review(table: slicer.vtkMRMLTableNode, row: int, state: str, note: str | None = None) -> None:
        """Mark a candidate accepted, rejected or unreviewed in the table node (saved with the scene).

        An empty or missing ``note`` keeps the note already there: Accept without typing must not erase it.
        """
        if state not in REVIEW_STATES:
            raise ValueError(f"review must be one of {REVIEW_STATES}, not {state!r}")
        if not 0 <= row < table.GetNumberOfRows():
            raise IndexError(f"row {row} is not a candidate row of {table.GetName()}")
        table.SetCellText(row, TABLE_COLUMNS.index("review"), state)
        if note:
            table.SetCellText(row, TABLE_COLUMNS.index("note"), note)
        table.Modified()

    @staticmethod
    def review_rows(table: slicer.vtkMRMLTableNode) -> list[dict]:
        """The table's rows as dicts (rank, probability, diameter_mm, R, A, S in the CT's RAS, review, note)."""
        rows = []
        for r in range(table.GetNumberOfRows()):
            row = {}
            for c, column in enumerate(TABLE_COLUMNS):
                text = table.GetCellText(r, c)
                row[column] = text if column in ("review", "note") else float(text)
            row["rank"] = int(row["rank"])
            rows.append(row)
        return rows

    def export_review(self, table: slicer.vtkMRMLTableNode, out_dir: str | os.PathLike,
                      case: str | None = None) -> dict[str, Path]:
        """Write ``<case>_review.csv`` and ``<case>_review.json`` into ``out_dir`` (an absolute folder).

        ``case`` defaults to the case the results belong to (not whatever volume is selected now).
        Positions are the CT's own RAS coordinates in mm, like the detection files.
        """
        if out_dir in (None, "") or not Path(out_dir).is_absolute():
            raise ValueError(f"choose an export folder (an absolute path), not {str(out_dir)!r}")
        import pandas as pd

        case = case or table.GetAttribute(CASE_ATTRIBUTE) or table.GetName()
        out = Path(out_dir)
        rows = self.review_rows(table)
        paths = {"csv": out / f"{case}_review.csv", "json": out / f"{case}_review.json"}
        with atomic_path(paths["csv"]) as tmp:
            pd.DataFrame(rows, columns=list(TABLE_COLUMNS)).to_csv(tmp, index=False)
        write_json_atomic({"case": case, "disclaimer": DISCLAIMER,
                           "coordinate_system": "RAS mm (R, A, S) of the CT volume, before any parent transform",
                           "scan_probability": float(table.GetAttribute("NoduleAI.scan_probability") or "nan"),
                           "candidates": rows}, paths["json"])
        return paths

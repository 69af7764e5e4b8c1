"""Background processes: the shared helper's tree kill, and NoduleDetect's detection in a child process on a
real CT in a real MRML scene (progress phases, results under the CT's parent transform, cancel, failure)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import slicer
import vtk
from conftest import TS_NIFTI, require
from launcher import gone, make_launcher, python_children
from NoduleDetectLib.logic import DetectionLogic
from NoduleDetectLib.process import BackgroundDetection, ProgressState
from slicer_scene import load_volume, new_scene

from noduleai.checkpoint import bundled_model_path
from noduleai.modelpath import ModelNotFoundError, resolve_model_path
from noduleai.process import BackgroundProcess
from noduleai.progress import JsonLinesReader, ProgressWriter


def _wait(condition, timeout: float, step: float = 0.1) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def test_killing_the_launcher_alone_orphans_its_child_and_the_tree_kill_does_not(tmp_path):
    launcher = make_launcher(tmp_path)
    sleeper = [str(launcher), "-c", "import time; time.sleep(120)"]
    alone = BackgroundProcess(sleeper, tmp_path / "a.log").start()
    assert _wait(lambda: python_children(alone.pid), 20)
    child = python_children(alone.pid)[0].pid
    alone.popen.kill()  # what the old Cancel did: only the launcher
    alone.popen.wait(10)
    time.sleep(0.5)
    assert not gone(child), "the child survives its launcher: this is the bug a tree kill fixes"
    assert child in alone.alive_pids(), "found by its inherited tag, though no longer the launcher's child"
    alone.kill()
    assert _wait(lambda: gone(child), 10)

    tree = BackgroundProcess(sleeper, tmp_path / "b.log").start()
    assert _wait(lambda: python_children(tree.pid), 20)
    child = python_children(tree.pid)[0].pid
    tree.kill()
    assert gone(tree.pid) and _wait(lambda: gone(child), 10)
    assert tree.alive_pids() == [] and not tree.running


@pytest.fixture(scope="module")
def transformed_ct():
    """The real TotalSegmentator example CT under a rotation + translation (a registration result)."""
    scene = new_scene()
    ct = load_volume(scene, str(require(TS_NIFTI)), "example_ct")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    matrix = vtk.vtkMatrix4x4()
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    for r, row in enumerate(((c, -s, 0, 12.0), (s, c, 0, -20.0), (0, 0, 1, 5.0))):
        for k, v in enumerate(row):
            matrix.SetElement(r, k, v)
    transform.SetMatrixTransformToParent(matrix)
    ct.SetAndObserveTransformNodeID(transform.GetID())
    return scene, ct, matrix


def _poll_until_done(job: BackgroundDetection, timeout: float) -> list[ProgressState]:
    states = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job.poll()
        states.append(ProgressState(**vars(state)))
        if not state.running:
            return states
        time.sleep(0.2)
    job.cancel()
    pytest.fail(f"detection did not finish in {timeout} s; last state {states[-1]}")


def test_background_detection_reports_phases_and_its_results_follow_the_ct_transform(transformed_ct, tmp_path):
    scene, ct, matrix = transformed_ct
    job = BackgroundDetection(ct, bundled_model_path(), "cpu", work_dir=tmp_path)
    job.start()
    assert job.poll().running, "start() returns while the child works"
    states = _poll_until_done(job, 600)
    final = states[-1]
    assert final.finished and final.error is None, final
    seen = [s.phase for s in states]  # polled every 0.2 s: short phases may pass between two polls
    assert "scanning the lung with the model" in seen and seen[-1] == "finished" and len(set(seen)) >= 4, seen
    fractions = [s.fraction for s in states]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    written = [r["phase"] for r in JsonLinesReader(job.folder / "progress.jsonl").read_new()]
    order = ["reading the CT", "preprocessing (lung mask, resampling)", "scanning the lung with the model",
             "Grad-CAM heatmaps", "writing results", "done"]
    assert [p for p in dict.fromkeys(written) if p in order] == order, written
    nodes = job.load_results(opacity=0.4, threshold=0.3)
    job.cleanup()
    assert not job.folder.exists()

    # The heatmap lies on the CT's own grid and, like the points, under the CT's transform.
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    ct.GetIJKToRASMatrix(a)
    nodes.heatmap.GetIJKToRASMatrix(b)
    assert all(abs(a.GetElement(r, k) - b.GetElement(r, k)) < 1e-6 for r in range(4) for k in range(4))
    assert nodes.heatmap.GetTransformNodeID() == ct.GetTransformNodeID() is not None
    assert nodes.candidates.GetTransformNodeID() == ct.GetTransformNodeID()
    assert slicer.util.arrayFromVolume(nodes.heatmap).shape == slicer.util.arrayFromVolume(ct).shape
    assert nodes.heatmap.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.3)
    # Candidates: CT coordinates in the table, world coordinates where the views are centred.
    assert nodes.table.GetNumberOfRows() == len(nodes.result.candidates) > 0
    top = nodes.result.candidates[0]
    assert np.allclose(DetectionLogic.candidate_ras(nodes.table, 0), top.position_ras, atol=1e-4)
    world = DetectionLogic().centre_on(nodes.table, 0)
    expected = matrix.MultiplyPoint((*top.position_ras, 1.0))[:3]
    assert np.allclose(world, expected, atol=1e-3)
    shown = [0.0, 0.0, 0.0]
    nodes.candidates.GetNthControlPointPositionWorld(0, shown)
    assert np.allclose(shown, expected, atol=1e-3)
    # A candidate is inside the CT's bounds (the written file kept the geometry).
    ijk = vtk.vtkMatrix4x4()
    ct.GetRASToIJKMatrix(ijk)
    index = ijk.MultiplyPoint((*top.position_ras, 1.0))[:3]
    dims = ct.GetImageData().GetDimensions()
    assert all(-0.5 <= index[i] <= dims[i] - 0.5 for i in range(3))
    # Found again from the scene alone, as the panel does after a scene reload.
    found = DetectionLogic.nodes_for(ct)
    assert found.table.GetID() == nodes.table.GetID() and found.case == "example_ct"


def test_cancel_kills_the_launcher_and_its_python_leaves_no_files_and_no_nodes(transformed_ct, tmp_path):
    scene, ct, _ = transformed_ct
    before = scene.GetNumberOfNodes()
    job = BackgroundDetection(ct, bundled_model_path(), "cpu", python=make_launcher(tmp_path), work_dir=tmp_path)
    job.start()
    launcher_pid = job.process.pid
    assert _wait(lambda: python_children(launcher_pid), 30)
    child = python_children(launcher_pid)[0].pid
    assert _wait(lambda: job.poll().phase.startswith(("preprocessing", "scanning")), 120), job.poll()
    job.cancel()
    state = job.poll()
    assert state.cancelled and not state.running and state.phase == "cancelled"
    assert gone(launcher_pid) and _wait(lambda: gone(child), 10), "python-real must not outlive Cancel"
    assert not job.folder.exists(), "no partial files"
    assert scene.GetNumberOfNodes() == before, "the scene is unchanged"
    with pytest.raises(RuntimeError, match="no results"):
        job.load_results()
    job.cleanup()  # idempotent


def test_a_volume_that_is_not_a_ct_fails_with_the_engines_message(tmp_path):
    scene = new_scene()
    mr_like = slicer.util.addVolumeFromArray(np.full((20, 40, 40), 300, np.int16), name="T1 brain")
    assert mr_like.GetScene() is scene
    job = BackgroundDetection(mr_like, bundled_model_path(), "cpu", work_dir=tmp_path)
    job.start()
    final = _poll_until_done(job, 180)[-1]
    assert not final.running and final.error and not final.finished
    assert "T1 brain" in final.error and "Hounsfield" in final.error, final.error
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0
    job.cleanup()
    assert not job.folder.exists()


def test_a_missing_model_is_refused_before_anything_starts(transformed_ct, tmp_path):
    _, ct, _ = transformed_ct
    job = BackgroundDetection(ct, tmp_path / "nope.pt", "cpu", work_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        job.start()
    assert job.process is None and list(tmp_path.iterdir()) == []


def test_progress_lines_are_read_once_and_a_half_written_line_waits(tmp_path):
    path = tmp_path / "progress.jsonl"
    writer = ProgressWriter(path)
    reader = JsonLinesReader(path)
    assert reader.read_new() == []
    writer.write("reading the CT", 0.0, case="a")
    writer.write("scanning", 1.7)  # clamped into [0, 1]
    assert [(r["phase"], r["fraction"]) for r in reader.read_new()] == [("reading the CT", 0.0), ("scanning", 1.0)]
    with open(path, "a") as f:
        f.write('{"phase": "half')  # a writer killed mid-line, or still writing
    assert reader.read_new() == []
    with open(path, "a") as f:
        f.write('way", "fraction": 0.5}\nnot json\n')
    assert [r["phase"] for r in reader.read_new()] == ["halfway"]
    writer.close()


def test_the_model_choice_is_explicit_then_handed_over_then_bundled(tmp_path):
    bundled = bundled_model_path()
    handed = tmp_path / "trained.pt"
    handed.write_bytes(b"x")
    explicit = tmp_path / "chosen.pt"
    explicit.write_bytes(b"x")
    assert resolve_model_path(explicit, handed) == explicit
    assert resolve_model_path("", handed) == handed, "Use in NoduleDetect wins over the bundled model"
    assert resolve_model_path(None, tmp_path / "deleted.pt") == bundled
    assert resolve_model_path(None, "") == bundled
    with pytest.raises(ModelNotFoundError, match="typo.pt"):
        resolve_model_path(tmp_path / "typo.pt", handed)  # never a silent fall-back to another model

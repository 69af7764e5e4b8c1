"""Batch detection over a folder of scans, with no dialog: the same logic as the NoduleDetect panel.

In Slicer: ``Slicer --no-main-window --python-script NoduleDetect/Scripts/batch_detect.py -- --input DIR
--output DIR``. Under plain Python with slicer-core (tests), :func:`run_batch` takes the scene to work in.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import slicer

from noduleai import DISCLAIMER
from noduleai.files import write_json_atomic
from noduleai.inputs import expand_inputs
from noduleai.io import read_ct
from noduleai.modelpath import ModelNotFoundError, resolve_model_path
from noduleai.report import write_detection
from NoduleDetectLib.logic import DetectionLogic, image_from_volume_node, update_volume_node
from NoduleDetectLib.scene import plain_python_scene

EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE = 0, 1, 2


def check_output_folder(output: str | os.PathLike) -> Path:
    """Create ``output`` if needed and prove it writable now, before minutes of detection (OSError if not)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".noduleai-write-test-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    probe.unlink()
    return out


def run_batch(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, model: str | os.PathLike,
              scene: slicer.vtkMRMLScene, device: str = "auto", logic: DetectionLogic | None = None) -> dict:
    """Detect on every scan; per case heatmap, candidates, report and a ``.mrb`` scene; then a summary.

    A case that fails is recorded and the batch goes on; nothing of it is left on disk. ``logic`` with
    the model already loaded may be passed in (else ``model`` is loaded on ``device``).
    """
    out = check_output_folder(output)
    if logic is None:
        logic = DetectionLogic()
        logic.load_model(model, device)
    done, failed = [], []
    for name, path in expand_inputs(inputs):
        try:
            volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            update_volume_node(volume, read_ct(path))  # SimpleITK reads DICOM, NRRD, NIfTI alike
            nodes = logic.process(volume)
            write_detection(nodes.result, image_from_volume_node(volume), out, name)
            mrb = out / f"{name}.mrb"
            if not scene.WriteToMRB(str(mrb)):
                raise OSError(f"{mrb}: the scene could not be written")
            done.append({"case": name, "scan_probability": nodes.result.scan_probability,
                         "n_candidates": len(nodes.result.candidates)})
        except Exception as err:  # one bad case must not stop the batch; it is listed in the summary
            failed.append({"case": name, "input": str(path), "error": str(err)})
        finally:
            scene.Clear(0)
    summary = {"disclaimer": DISCLAIMER, "model": str(model), "succeeded": done, "failed": failed}
    write_json_atomic(summary, out / "summary.json")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The batch command: 0 all done, 1 some case failed, 2 bad arguments, missing model or unwritable output."""
    parser = argparse.ArgumentParser(prog="batch_detect.py", description=f"NoduleDetect batch mode. {DISCLAIMER}")
    parser.add_argument("--input", nargs="+", required=True, help="scans or folders of scans")
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", help="checkpoint (default: the bundled model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    try:
        model = resolve_model_path(args.model)
        check_output_folder(args.output)
        logic = DetectionLogic()
        logic.load_model(model, args.device)
    except (ModelNotFoundError, OSError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"batch_detect: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    scene = slicer.mrmlScene if getattr(slicer, "mrmlScene", None) is not None else plain_python_scene()
    summary = run_batch(args.input, args.output, model, scene, args.device, logic)
    for row in summary["failed"]:
        print(f"FAILED {row['case']}: {row['error']}")
    print(f"{len(summary['succeeded'])} succeeded, {len(summary['failed'])} failed; summary in "
          f"{Path(args.output) / 'summary.json'}; {DISCLAIMER}")
    return EXIT_OK if not summary["failed"] else EXIT_CASE_FAILED

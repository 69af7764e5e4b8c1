"""Batch detection over a folder of scans, with no dialog: the same logic as the NoduleDetect panel.

In Slicer: ``Slicer --no-main-window --python-script NoduleDetect/batch_detect.py -- --input DIR --output DIR``.
Under plain Python with slicer-core (tests), :func:`run_batch` takes the scene to work in.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import slicer

from noduleai import DISCLAIMER
from noduleai.cli import expand_inputs
from noduleai.files import write_json_atomic
from noduleai.io import read_ct
from noduleai.report import write_detection
from NoduleDetectLib.logic import DetectionLogic, image_from_volume_node, update_volume_node


def run_batch(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, model: str | os.PathLike,
              scene: slicer.vtkMRMLScene, device: str = "auto") -> dict:
    """Detect on every scan; per case heatmap, candidates, report and a ``.mrb`` scene; then a summary.

    A case that fails is recorded and the batch goes on; nothing of it is left on disk.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
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
    parser = argparse.ArgumentParser(description=f"NoduleDetect batch mode. {DISCLAIMER}")
    parser.add_argument("--input", nargs="+", required=True, help="scans or folders of scans")
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", help="checkpoint (default: the bundled model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    from noduleai.cli import _model_path

    summary = run_batch(args.input, args.output, _model_path(args.model), slicer.mrmlScene, args.device)
    for row in summary["failed"]:
        print(f"FAILED {row['case']}: {row['error']}")
    print(f"{len(summary['succeeded'])} succeeded, {len(summary['failed'])} failed; {DISCLAIMER}")
    return 0 if not summary["failed"] else 1

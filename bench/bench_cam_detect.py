"""Benchmark: Grad-CAM cost over plain inference (ours vs MONAI's GradCAM), and `detect` on LIDC-IDRI-0001.

Every number is a ratio against a baseline measured in the same run, on the same input (the machine
is shared and noisy). Run: .venv/bin/python bench/bench_cam_detect.py [--model CKPT] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LIDC = REPO.parent / "shared" / "data" / "LIDC-IDRI" / "LIDC-IDRI-0001"


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_cam(repeats: int, size: int, width: float) -> dict:
    from monai.visualize import GradCAM as MonaiGradCAM

    from noduleai.cam import grad_cam
    from noduleai.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18_3d", width=width).eval()
    x = torch.randn(1, 1, size, size, size)

    def plain():
        with torch.no_grad():
            model(x)

    def ours():
        grad_cam(model, x, "layer4", 1)

    # A copy: MONAI registers hooks on the module it wraps, which would tax our runs too.
    monai_cam = MonaiGradCAM(nn_module=copy.deepcopy(model), target_layers="layer4")

    def monai():
        monai_cam(x, class_idx=1)

    t_plain, t_ours, t_monai = (_median_time(f, repeats) for f in (plain, ours, monai))
    return {"input": f"1x1x{size}^3", "model": f"resnet18_3d x{width}", "plain_s": t_plain,
            "ours_over_plain": t_ours / t_plain, "monai_over_plain": t_monai / t_plain,
            "monai_over_ours": t_monai / t_ours}


CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(2)
from noduleai.io import read_ct
t = time.perf_counter()
ct = read_ct(sys.argv[1])
mode = sys.argv[2]
if mode == "read_preprocess":
    from noduleai.preprocess import PATCH_PREPROCESS, preprocess_ct
    preprocess_ct(ct, PATCH_PREPROCESS)
    timings = {}
else:
    from noduleai.detect import Detector
    timings = Detector.from_checkpoint(sys.argv[3], "cpu").detect(ct).timings_s
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "timings": timings}))
"""


def bench_detect(model: Path) -> dict:
    runs = {}
    for mode in ("read_preprocess", "detect"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(LIDC), mode, str(model)], capture_output=True,
                             text=True, check=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base, det = runs["read_preprocess"], runs["detect"]
    return {"detect_wall_s": det["wall_s"], "detect_peak_rss_mb": det["peak_rss_mb"],
            "baseline_wall_s": base["wall_s"], "baseline_peak_rss_mb": base["peak_rss_mb"],
            "wall_over_baseline": det["wall_s"] / base["wall_s"],
            "rss_over_baseline": det["peak_rss_mb"] / base["peak_rss_mb"], "stages_s": det["timings"]}


def _demo_or_random_model(path: str | None) -> Path:
    if path:
        return Path(path)
    demo = REPO / "noduleai-output" / "demo" / "model" / "best_model.pt"
    if demo.exists():
        return demo
    from noduleai.checkpoint import ModelInfo, save_model
    from noduleai.preprocess import PATCH_PREPROCESS

    info = ModelInfo(arch="resnet10_3d", task="patch", input_size=(32, 32, 32), preprocess=PATCH_PREPROCESS.to_dict(),
                     width=0.125, small_input=True, name="untrained (timing only)")
    target = Path("/tmp/noduleai-bench-model.pt")
    save_model(target, info.build(), info)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="patch checkpoint for detect (default: the demo's, else untrained)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=96, help="CAM input cube edge")
    parser.add_argument("--width", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cam = bench_cam(args.repeats, args.size, args.width)
    print(f"Grad-CAM on {cam['model']}, input {cam['input']} (plain inference {cam['plain_s']:.2f} s = 1.00):")
    print(f"  ours (gradients w.r.t. layer4 activations only): {cam['ours_over_plain']:.2f}x inference")
    print(f"  MONAI GradCAM (full backward, baseline):         {cam['monai_over_plain']:.2f}x inference")
    print(f"  MONAI / ours:                                    {cam['monai_over_ours']:.2f}x")
    if LIDC.exists():
        det = bench_detect(_demo_or_random_model(args.model))
        print(f"detect on LIDC-IDRI-0001 (512x512x133): {det['detect_wall_s']:.1f} s, peak RSS "
              f"{det['detect_peak_rss_mb']:.0f} MB")
        print(f"  = {det['wall_over_baseline']:.1f}x the time and {det['rss_over_baseline']:.2f}x the memory of "
              f"read + preprocess alone ({det['baseline_wall_s']:.1f} s, {det['baseline_peak_rss_mb']:.0f} MB)")
        print("  stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in det["stages_s"].items()))
    else:
        print(f"LIDC-IDRI-0001 not found at {LIDC}: detect benchmark skipped")
    print(f"(peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()

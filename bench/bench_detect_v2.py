"""Benchmark: `detect` end to end on LIDC-IDRI-0001 with the v2 two-stage detector beside the v1 patch model,
both measured in this run (the machine is shared and noisy: compare the ratios, not the seconds).

Each detector runs in its own process (reading, preprocessing, candidates, classifier, Grad-CAM, and every
output file `noduleai detect` writes), so its peak RSS is its own. A third process only reads the CT:
the floor both stand on. Issue 10's budget: v2 <= 20 s wall and <= 2 GB peak RSS on 2 cores.
Run: .venv/bin/python bench/bench_detect_v2.py [--v1 CKPT] [--v2 CKPT] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIDC = REPO.parent / "shared" / "data" / "LIDC-IDRI" / "LIDC-IDRI-0001"
V1_MODEL = REPO / "Resources" / "Models" / "noduleai_patch_v1.pt"

CHILD = """
import json, resource, sys, tempfile, time, torch
torch.set_num_threads(2)
t = time.perf_counter()
from noduleai.io import load_ct
loaded = load_ct(sys.argv[1])
timings = {"read": time.perf_counter() - t}
if sys.argv[2] != "read":
    from noduleai.detect_v2 import load_detector
    from noduleai.report import write_detection
    detector = load_detector(sys.argv[2], "cpu")
    result = detector.detect(loaded.image)
    timings |= result.timings_s
    t_write = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        write_detection(result, loaded.image, out, "bench", source=loaded)  # as `noduleai detect` does
    timings["write"] = time.perf_counter() - t_write
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss_mb":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "timings": timings}))
"""


def run(model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(LIDC), model], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from noduleai.modelpath import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--v1", default=str(V1_MODEL), help="v1 patch checkpoint (baseline)")
    parser.add_argument("--v2", default=bundled_model_path(), help="two-stage detector file (default: bundled)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not LIDC.exists():
        sys.exit(f"{LIDC}: LIDC-IDRI-0001 not found (see ../shared/data/README.md)")
    if args.v2 is None:
        sys.exit("no bundled detector in Resources/Models: pass --v2 FILE")
    runs: dict[str, list[dict]] = {"read": [], "v1": [], "v2": []}
    for _ in range(args.repeats):  # interleaved, so drift of the machine's load hits all alike
        for name, model in (("read", "read"), ("v1", args.v1), ("v2", str(args.v2))):
            runs[name].append(run(model))
    wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    stages = {k: {s: round(statistics.median(r["timings"][s] for r in v), 2) for s in v[0]["timings"]}
              for k, v in runs.items()}
    print(json.dumps({"ct": "LIDC-IDRI-0001 (512x512x133)", "repeats": args.repeats, "median_wall_s": wall,
                      "peak_rss_mb": rss, "v2_over_v1_wall": wall["v2"] / wall["v1"],
                      "v2_over_v1_rss": rss["v2"] / rss["v1"], "stages_s": stages}, indent=2))
    print(f"v2: {wall['v2']:.1f} s, {rss['v2']:.0f} MB = {wall['v2'] / wall['v1']:.2f}x the time and "
          f"{rss['v2'] / rss['v1']:.2f}x the memory of v1 ({wall['v1']:.1f} s, {rss['v1']:.0f} MB) in this run; "
          f"reading alone {wall['read']:.1f} s, {rss['read']:.0f} MB. Budget: 20 s, 2048 MB.")


if __name__ == "__main__":
    main()

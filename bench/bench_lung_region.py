"""Benchmark: the v2 lung region ("envelope") against the v1 mask ("closing") on LIDC-IDRI-0001.

Printed as a ratio against the v1 mask measured in the same run, on the same CT (the machine is shared
and noisy). Run: .venv/bin/python bench/bench_lung_region.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIDC = REPO.parent / "shared" / "data" / "LIDC-IDRI" / "LIDC-IDRI-0001"


def main() -> None:
    from noduleai.io import read_ct
    from noduleai.preprocess import PreprocessConfig, lung_mask

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ct = read_ct(LIDC)
    times: dict[str, list[float]] = {"closing": [], "envelope": []}
    for _ in range(args.repeats):
        for region in times:  # interleaved, so drift of the machine's load hits both alike
            config = PreprocessConfig(lung_region=region)
            start = time.perf_counter()
            lung_mask(ct, config)
            times[region].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"ct": "LIDC-IDRI-0001", "median_s": median,
                      "envelope_over_closing": median["envelope"] / median["closing"]}, indent=2))


if __name__ == "__main__":
    main()

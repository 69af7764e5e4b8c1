"""Console summaries shared by the command line and the demo."""

from __future__ import annotations

from typing import Any


def print_evaluation(summary: dict[str, Any]) -> None:
    """Print an evaluation summary (scan-level metrics, FROC/CPM, sensitivity by size, failures)."""
    scan = summary.get("scan_level")
    if scan:
        auc = "n/a" if scan["auc"] is None else f"{scan['auc']:.3f}"
        print(f"Scan level ({scan['n']} scans): accuracy {scan['accuracy']:.3f}, precision {scan['precision']:.3f},"
              f" recall {scan['recall']:.3f}, F1 {scan['f1']:.3f}, AUC {auc}")
    if summary.get("froc"):
        f = summary["froc"]
        ci = f" (95 % CI {f['cpm_ci95'][0]:.3f}-{f['cpm_ci95'][1]:.3f})" if f.get("cpm_ci95") else ""
        print(f"FROC: CPM {f['cpm']:.3f}{ci} over {f['n_nodules']} nodules in {f['n_scans']} scans; sensitivity at "
              + ", ".join(f"{k} FP/scan {v:.2f}" for k, v in f["sensitivity_at"].items()))
        if f.get("protocol"):
            print(f"  protocol: {f['protocol']}")
    for row in summary.get("by_size", []):
        # pandas turns an empty bin's None into NaN on the way to the summary
        empty = row["sensitivity"] is None or row["sensitivity"] != row["sensitivity"]
        sens = "n/a" if empty else f"{row['sensitivity']:.2f}"
        print(f"  {row['size']:>8}: {row['detected']}/{row['nodules']} detected (sensitivity {sens})")
    for fail in summary.get("failures", []):
        print(f"  FAILED {fail['case']}: {fail['error']}")

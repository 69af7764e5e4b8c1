"""Model cards: what a model was trained on, what it is for, its limits and its measured metrics."""

from __future__ import annotations

import os
from typing import Any

from noduleai import DISCLAIMER
from noduleai.checkpoint import ModelInfo
from noduleai.files import atomic_path

INTENDED_USE = ("Research and teaching: exploring nodule detection and Grad-CAM explanations on chest CT. "
                "Not a medical device; not validated for clinical use.")


def _metrics_table(metrics: dict[str, Any]) -> str:
    keys = ("n", "accuracy", "precision", "recall", "f1", "auc")
    rows = ["| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for split in ("validation", "test"):
        m = metrics.get(split)
        if m:
            cells = ["n/a" if m.get(k) is None else (f"{m[k]:.3f}" if isinstance(m[k], float) else str(m[k]))
                     for k in keys]
            rows.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def model_card(info: ModelInfo, data_description: str, limits: list[str], extra: str = "") -> str:
    """Markdown text of the card; ``extra`` (markdown) is appended, e.g. a detection evaluation."""
    td = info.training_data
    return f"""# Model card: {info.name}

**{DISCLAIMER}**

## Model
- Architecture: {info.arch}, width x{info.width}, {'patch (nodule-level)' if info.task == 'patch' else 'scan-level'}
  classifier, input {info.input_size[0]}x{info.input_size[1]}x{info.input_size[2]} voxels,
  classes {', '.join(info.class_names)}; Grad-CAM layer `{info.cam_layer}`.
- Preprocessing (recorded in the checkpoint, replayed at detection): `{info.preprocess}`
- Engine version: {info.engine_version}

## Data
{data_description}
- Cases: {td.get('cases')} from {td.get('patients')} patients; split (train/validation/test cases):
  {td.get('split_cases')}, by patient; training samples {td.get('train_samples')}, of which positive
  {td.get('train_positives')}.

## Intended use
{INTENDED_USE}

## Limits
""" + "\n".join(f"- {item}" for item in limits) + f"""

## Measured metrics (best epoch {info.metrics.get('best_epoch')}, threshold 0.5)
{_metrics_table(info.metrics)}
""" + extra


def write_model_card(path: str | os.PathLike, info: ModelInfo, data_description: str, limits: list[str],
                     extra: str = "") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(model_card(info, data_description, limits, extra))


DETECTOR_LIMITS = [
    "Trained and measured on four real host CTs (one per scanner/kernel/protocol) with real LIDC nodule crops "
    "pasted in; four hosts are far too few to claim robustness to acquisition: every number below comes "
    "from three to nine CTs per held-out host, hence the wide intervals.",
    "Small nodules (3-10 mm) are the weak stage: the candidate network misses many of them, and every one "
    "under 5 mm in the held-out tests (see the size table); a negative result never rules a nodule out.",
    "A candidate's diameter is read from the candidate map, not measured on the CT: a rough size for review "
    "(on validation cohorts within 2x of the readers' diameter for about three in four nodules; masses are "
    "reported smaller than they are).",
    "Pasted lesions are real LIDC pixels added as contrast over the host, not lesions grown in that patient: "
    "partial volume and kernel follow the crop's scanner, not the host's.",
    "Probabilities are calibrated (temperature, bias and the candidate score's weight) on validation cohorts "
    "of hosts the model was trained on; on an unseen scanner they may be off. The operating threshold is a "
    "working point chosen on those cohorts (a false-positive budget per validation CT), not a diagnosis.",
    "Each number is one training run per fold: the intervals resample scans, not training runs. Retraining "
    "with the same code, settings and seeds on another machine gave other networks (float rounding differs by "
    "CPU); once measured (README, training variance), two folds' CPM moved by 0.07-0.09 and both real lesions "
    "lost their first place.",
    "Not tested on: real slices thicker than 5 mm (thicker ones only simulated from thinner ones), paediatric CT, "
    "low-dose screening protocols, post-operative "
    "lungs, diffuse lung disease.",
]


def _pct(value: float | None, ci=None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f} %" + (f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f} %)" if ci else "")


def _cpm(froc: dict) -> str:
    """CPM with its interval when there is one (none from a single scan or without nodules)."""
    ci = froc.get("cpm_ci")
    return f"{froc['cpm']:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else " (no interval)")


def _at(sensitivity_at: dict, fp: float):
    """A FROC operating point from a dict whose float keys may have become strings in JSON."""
    return next((v for k, v in sensitivity_at.items() if float(k) == fp), None)


# What a candidate network was trained to output, by loss (the card says it in words).
_TARGETS = {"centre_focal": "a Gaussian at each lesion's centre, sigma half its equivalent radius; CenterNet's "
                            "penalty-reduced focal loss, so that every lesion weighs the same"}


def detector_card(detector, summary: dict, hosts: dict[str, str]) -> str:
    """Markdown card of a two-stage detector (:class:`noduleai.detect_v2.TwoStageDetector`) with its
    leave-one-host-out ``summary`` (:func:`noduleai.recipe_v2.summarise_loho`) and the hosts' acquisitions."""
    from noduleai.candidate_net import PEAK_PROMINENCE_LOG, PROPOSAL_LIMIT, size_fraction

    info = detector.info
    rows = ["| held-out host (acquisition) | candidate stage: nodules >= 5 mm within 50 | CPM (95 % CI) | "
            "sensitivity at 2 FP/scan | at the fold's operating threshold: sensitivity, FP/scan | real lesion "
            "on the original CT: rank, P | false positives on the original CT at the operating threshold "
            "(at P >= 0.5) |", "|---|---|---|---|---|---|---|"]
    ranking_rows = ["| held-out host | " + " | ".join(RANKING_LABELS.values()) + " |", "|---|---|---|---|"]
    for name, fold in summary["folds"].items():
        stage = fold["candidate_stage"]
        froc = fold.get("froc")
        real = fold.get("original_ct", {}).get("real_lesions", [])
        lesions = _lesions(real, "none annotated")
        original = fold.get("original_ct", {})
        at_threshold = original.get("false_positives_at_operating_threshold", "n/a")
        rows.append(f"| {name} ({hosts.get(name, '?')}) | {_pct(stage['sensitivity'], stage.get('sensitivity_ci'))} "
                    f"of {stage['nodules']} | "
                    + (f"{_cpm(froc)} | {_pct(_at(froc['sensitivity_at'], 2.0))} | " if froc else "n/a | n/a | ")
                    + f"{_point(fold.get('operating_point'))} | {lesions} | "
                    f"{at_threshold} ({_pct_free(original.get('false_positives_at', {}))}) |")
        if fold.get("cpm_by_ranking"):
            ranking_rows.append(f"| {name} | " + " | ".join(_cpm(fold["cpm_by_ranking"][way]) for way in RANKING_LABELS)
                                + " |")
    pooled, stage = summary.get("pooled"), summary["pooled_candidate_stage"]
    if pooled:
        rows.append(f"| **pooled** | {_pct(stage['sensitivity'], stage.get('sensitivity_ci'))} of {stage['nodules']} "
                    f"| {_cpm(pooled)} | {_pct(_at(pooled['sensitivity_at'], 2.0))} | "
                    f"{_point(pooled.get('operating_point'))} | | |")
        if pooled.get("cpm_by_ranking"):
            ranking_rows.append("| **pooled** | " + " | ".join(
                f"{pooled['cpm_by_ranking'][way]:.2f}" for way in RANKING_LABELS) + " |")
    sizes = " / ".join(f"{b['size']}: {_pct(b['sensitivity'])} of {b['nodules']}" for b in stage["by_size"])
    return f"""# Model card: {info.name}

**{DISCLAIMER}**

## Model
- Stage 1, candidates: MONAI BasicUNet, features {list(detector.candidate_config.features)}, on the shared
  preprocessing at {detector.candidate_preprocess.spacing_mm} mm (`{detector.candidate_preprocess.to_dict()}`),
  sliding windows of {detector.candidate_config.roi}^3 with Gaussian blending over the lung region; the peaks of
  its lesion probability that stand out from any higher peak (dynamic >= {PEAK_PROMINENCE_LOG} in log P) are the
  proposals (at most {PROPOSAL_LIMIT} per scan), each centred on its basin cut at half its height, its
  diameter from the basin cut at {size_fraction(detector.candidate_config):.2f} of its height (where the training
  target puts the lesion's edge); trained {detector.candidate_config.steps} steps, crops centred on lesions
  drawn {detector.candidate_config.lesion_sampling.replace("_", " ")}, loss {detector.candidate_config.loss}
  (targets: {_TARGETS.get(detector.candidate_config.loss, "the lesion masks")}).
- Stage 2, decision and explanation: {info.arch} width x{info.width}, {info.input_size[0]}^3 patches on
  `{info.preprocess}`, trained {info.training_data.get('classifier_epochs', '?')} epochs on the candidate
  network's own false positives as negatives; its logit
  difference z fused with the candidate score s as P = sigmoid(z / {detector.temperature:.2f}
  {detector.candidate_weight:+.2f} logit(s) {detector.bias:+.2f}) (temperature, weight and bias fitted on
  validation cohorts); a proposal inside a better-ranked one is the same lesion and is not listed twice;
  operating threshold {_threshold(detector.operating_threshold)}, chosen on the validation cohorts as the lowest
  P at which they hold at most {info.metrics.get("calibration", {}).get("operating_fp_per_scan", "?")} false
  positive(s) per CT on average (the decision threshold of reports unless the user sets one); Grad-CAM
  (`{info.cam_method}`, layer `{info.cam_layer}`) of each listed candidate, blended onto the CT grid.
- Engine version: {info.engine_version}

## Data
- Real hosts (background, real noise and kernel): {', '.join(f'{k} ({v})' for k, v in hosts.items())}.
- Lesions: 990 real LIDC-IDRI nodule crops (549 patients, readers' masks; LIDC-IDRI-0001..0003 left out),
  split by patient into train / validation / test parts, pasted as contrast over the smoothed host so that
  the host's own noise stays; 3 mm nodules to 80 mm masses (masses are scaled real crops), isolated,
  juxta-vascular and juxta-pleural. The hosts' own lesions are labelled, never cut away.

## Intended use
{INTENDED_USE}

## Limits
""" + "\n".join(f"- {item}" for item in DETECTOR_LIMITS) + f"""

## Measured metrics: leave one real host out
{summary['protocol']}

Each row is scored by a model (same recipe) that never saw that host, nor the test-part patients whose
crops are pasted into its test CTs. FROC/CPM as LUNA16 computes it (sensitivity interpolated at
1/8..8 false positives per scan, averaged); intervals are 95 % bootstrap over scans. The shipped model is the
same recipe trained on all four hosts.

{chr(10).join(rows)}

What each stage contributes (CPM of the same proposals of the held-out test cohorts, ranked three ways, each
ranking then listing one candidate per lesion):

{chr(10).join(ranking_rows)}

Candidate stage by size (pooled): {sizes}.
{_explanation_section(info.metrics.get("held_out_explanations"))}{_not_held_out(summary)}

## Acquisitions tested (held out)
{chr(10).join(f'- {k}: {v}' for k, v in hosts.items() if k in summary['folds'])}
{_stress_section(info.metrics.get("thick_slice_stress"))}
## Regenerate
`noduleai build-model --data ../shared/data` (resumable; leave-one-host-out first, then the shipped model).
"""


RANKING_LABELS = {"candidate_alone": "candidate score alone", "classifier_alone": "classifier alone",
                  "fused": "fused (shipped)"}  # the rankings of noduleai.recipe_v2.RANKINGS, in that order


def _lesions(rows: list[dict], none: str) -> str:
    """Real lesions of an original CT: size, then rank and P, or missed."""
    return "; ".join(f"{r['diameter_mm']:.0f} mm: rank {r['rank']}, P {r['probability']:.2f}" if r["rank"]
                     else f"{r['diameter_mm']:.0f} mm: missed" for r in rows) or none


def _explanation_section(explained: dict | None) -> str:
    """Where each held-out fold's heatmap peaks on its host's real lesions (run as ``detect`` runs)."""
    if not explained:
        return ""

    def where(r: dict) -> str:
        if r["heat_peak_distance_mm"] is None:
            return "no heat"
        inside = "inside it" if r["heat_peak_inside"] else "outside it"
        return f"{inside}, {r['heat_peak_distance_mm']:.0f} mm from its centre"

    lines = [f"- {host}: {r['diameter_mm']:.0f} mm lesion "
             + (f"rank {r['rank']}, P {r['probability']:.2f}" if r["rank"] else "not listed")
             + f"; heatmap peak {where(r)}" for host, rows in explained.items() for r in rows]
    return ("\nThe unseen real lesions as a reader sees them (each host's own fold detector, `detect` with "
            "Grad-CAM on the original CT; the peak is the heatmap's hottest voxel, inside by the hit rule):\n"
            + "\n".join(lines) + "\n")


def _stress_section(stress: dict | None) -> str:
    """The thick-slice stress test: each fold's model on its own held-out host re-sliced thick."""
    if not stress:
        return ""
    rows = ["| held-out host | slices | CPM (95 % CI) | at the operating threshold: sensitivity, FP/scan | real "
            "lesion: rank, P | FP on the original CT at the operating threshold |", "|---|---|---|---|---|---|"]
    for host, by_thickness in stress.items():
        for thickness, m in by_thickness.items():
            real = m["original_ct"]["real_lesions"]
            lesions = _lesions(real, "none")
            rows.append(f"| {host} | {float(thickness):g} mm (simulated) | {_cpm(m['froc'])} | "
                        f"{_point(m['operating_point'])} | {lesions} | "
                        f"{m['original_ct']['false_positives_at_operating_threshold']} |")
    return ("\n### Thicker slices than any host (simulated from the held-out host's own CTs)\n"
            "Each fold's model on its own held-out host again, every CT averaged into thick slabs "
            "(`noduleai.acquisition.thick_slices`); same reference, protocol and thresholds as above. No "
            "model was trained on thick slices.\n\n" + "\n".join(rows) + "\n")


def _not_held_out(summary: dict) -> str:
    missing = summary.get("not_held_out") or []
    return (f"Not measured held out (in every fold's training data, but no fold of its own in this build): "
            f"{', '.join(missing)}.\n" if missing else "")


def _point(point: dict | None) -> str:
    if not point or point.get("sensitivity") is None:
        return "n/a"
    return f"{_pct(point['sensitivity'])}, {point['false_positives_per_scan']:.1f}"


def _threshold(value: float | None) -> str:
    return "none stored (reports use 0.5)" if value is None else f"P >= {value:.2f}"


def _pct_free(fps: dict) -> str:
    value = next((v for k, v in fps.items() if float(k) == 0.5), None)
    return "n/a" if value is None else str(value)


def write_detector_card(path: str | os.PathLike, detector) -> None:
    """Write :func:`detector_card` from the leave-one-host-out summary in the detector's metrics."""
    from noduleai.real_cohort import HOSTS

    summary = detector.info.metrics["leave_one_host_out"]
    hosts = list(summary["folds"]) + list(summary.get("not_held_out", []))
    with atomic_path(path) as tmp:
        tmp.write_text(detector_card(detector, summary, {h: HOSTS[h][1] for h in hosts}))

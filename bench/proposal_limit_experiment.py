"""Experiment: how many candidate-map peaks the classifier should score, measured on fresh validation CTs.

A finished leave-one-host-out fold's detector (its candidate network, classifier, calibration and threshold,
rebuilt from the work folder) scores the validation CTs of the fold's training hosts that were *not* used to
fit its calibration or threshold: the build fits them on the first ``COHORT_SIZES["validation"]`` CTs per
host, so the work folder's validation cohorts must hold more (``bench/candidate_stage_experiment.py
--cohort-size validation=6`` makes them; they come from validation-part patients: never trained on). The
held-out host and every test cohort are never touched. Per proposal limit: the candidate stage (nodules
>= 5 mm among the proposals), FROC/CPM of the fused ranking (one listing per lesion, LUNA16's hit rule,
95 % bootstrap over scans) and the operating point at the fold's threshold.

Run: .venv/bin/python bench/proposal_limit_experiment.py --data ../shared/data \
         --work noduleai-output/detector-v2 --fold lidc0001 --limit 50 --limit 100
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from noduleai.evaluate import candidate_stage, froc, hits_any
from noduleai.io import read_ct
from noduleai.recipe_v2 import COHORT_SIZES, V2Paths, build_v2_cohorts, fold_detector, operating_point


def first(scored, n: int):
    """``scored`` as the detector would have it with at most ``n`` proposals (they come best first)."""
    return replace(scored, proposals=scored.proposals[:n], centres=scored.centres[:n], z=scored.z[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--work", default="noduleai-output/detector-v2")
    parser.add_argument("--fold", default="lidc0001", help="the held-out host (never used here)")
    parser.add_argument("--validation-size", type=int, default=6, help="validation CTs per host in the work folder")
    parser.add_argument("--limit", type=int, action="append", required=True, help="proposals per scan")
    args = parser.parse_args()
    paths = V2Paths(Path(args.work))
    cohorts, _real = build_v2_cohorts(args.data, paths, sizes={**COHORT_SIZES, "validation": args.validation_size})
    fold = json.loads(paths.fold_result(args.fold).read_text())
    detector = fold_detector(paths, fold)
    fitted_on = COHORT_SIZES["validation"]
    fresh = [c for host in cohorts if host != args.fold for c in cohorts[host]["validation"][fitted_on:]]
    if not fresh:
        raise SystemExit(f"{paths.root}: no validation CTs beyond the first {fitted_on} per host")
    truths = [[(n.center_lps, n.diameter_mm) for n in c.nodules] for c in fresh]
    excluded = [[(n.center_lps, n.diameter_mm) for n in c.excluded] for c in fresh]
    detector.proposal_limit = max(args.limit)
    scored = [detector.scored_proposals(read_ct(c.image_path)) for c in fresh]
    # Taking the first n of the largest run is the detector's own n-proposal run (checked on one CT).
    detector.proposal_limit = min(args.limit)
    again = detector.scored_proposals(read_ct(fresh[0].image_path))
    assert np.allclose(again.z, first(scored[0], min(args.limit)).z, atol=1e-4), "proposals are not a prefix"
    results = {}
    for limit in sorted(args.limit):
        ranked = []
        for found in (first(s, limit) for s in scored):
            probs = detector.probabilities(found)
            ranked.append([(found.proposals[i][0], float(probs[i])) for i in detector.ranked(found, probs)])
        curve = froc(ranked, truths, excluded)
        stage = candidate_stage([[p for p, _s, _d in first(s, limit).proposals if not hits_any(p, c.excluded)]
                                 for s, c in zip(scored, fresh)], truths, limit)
        point = operating_point(ranked, truths, excluded, detector.operating_threshold)
        results[limit] = {"candidate_stage": stage, "cpm": curve.cpm, "cpm_ci": curve.cpm_ci,
                          "sensitivity_at": curve.sensitivity_at, "operating_point": point}
        print(f"limit {limit}: candidate stage {stage['sensitivity']:.2f} {stage.get('sensitivity_ci')} of "
              f"{stage['nodules']} >= 5 mm, {stage['candidates_per_scan']:.1f}/scan; CPM {curve.cpm:.3f} "
              f"{curve.cpm_ci}; at P >= {detector.operating_threshold:.2f}: sensitivity "
              f"{point['sensitivity']:.2f}, {point['false_positives_per_scan']:.2f} FP/scan", flush=True)
    out = paths.root / "experiments" / f"proposal_limit_{args.fold}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": __doc__.splitlines()[2:10], "fold": args.fold,
                               "validation_cts": [c.case_id for c in fresh], "results": results}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()

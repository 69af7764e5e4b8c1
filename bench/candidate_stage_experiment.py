"""Experiment: the candidate stage alone under training variants, measured on validation cohorts only.

One leave-one-host-out fold's training CTs (the other hosts' train cohorts) train the candidate network
once per variant; each is measured on the same fold's *validation* cohorts (the other hosts' validation
cohorts: their crops come from LIDC patients that no training cohort uses). The held-out host and every
test cohort are never touched, so the choice this informs does not leak into the card's numbers.
Printed: sensitivity (nodules >= 5 mm, within 50 proposals, 95 % bootstrap interval over scans) by size,
and the proposals per scan, at two map thresholds.

Run: .venv/bin/python bench/candidate_stage_experiment.py --data ../shared/data --fold lidc0001 \
         --steps 250 --variant per_voxel --variant per_lesion:dice_focal
(cohorts and the prepared grid are shared with `noduleai build-model` under --work).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from noduleai.candidate_net import load_candidate_net, probability_map, proposals_from_map, train_candidate_net
from noduleai.evaluate import candidate_stage, hits_any
from noduleai.files import content_key
from noduleai.geometry import array_index_to_lps
from noduleai.recipe_v2 import (
    CANDIDATE_LIMIT,
    CANDIDATE_PREPROCESS,
    V2Paths,
    build_v2_cohorts,
    candidate_config,
    prepare,
)


def measure(net, config, cases, prepared, thresholds) -> dict:
    truths = [[(n.center_lps, n.diameter_mm) for n in c.nodules] for c in cases]
    maps = [probability_map(net, p.volume, config) for p in prepared]
    out = {}
    for threshold in thresholds:
        proposals = []
        for case, p, prob in zip(cases, prepared, maps):
            spacing = p.reference.GetSpacing()[::-1]
            found = [array_index_to_lps(p.reference, q.zyx) for q in
                     proposals_from_map(prob, p.lung, spacing, threshold=threshold, limit=CANDIDATE_LIMIT)]
            proposals.append([f for f in found if not hits_any(f, case.excluded)])
        out[str(threshold)] = candidate_stage(proposals, truths, CANDIDATE_LIMIT)
    return out


def _share(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--work", default="noduleai-output/detector-v2")
    parser.add_argument("--fold", default="lidc0001", help="the held-out host (never used here)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--variant", action="append", required=True,
                        help="SAMPLING[:LOSS[:MIN_TARGET_MM]], e.g. per_lesion:dice_focal:6 (CandidateNetConfig's "
                             "lesion_sampling, loss, min_target_diameter_mm)")
    parser.add_argument("--threshold", type=float, action="append", help="map thresholds (default 0.05 and 0.01)")
    args = parser.parse_args()
    paths = V2Paths(Path(args.work))
    cohorts, _real = build_v2_cohorts(args.data, paths)
    others = [name for name in cohorts if name != args.fold]
    training = [c for name in others for c in cohorts[name]["train"]]
    validation = [c for name in others for c in cohorts[name]["validation"]]
    prepared_training, prepared_validation = prepare(training, paths), prepare(validation, paths)
    results = {}
    for variant in args.variant:
        sampling, loss, widen = (variant.split(":") + ["", ""])[:3]
        config = replace(candidate_config(args.steps), lesion_sampling=sampling, loss=loss or "dice_ce",
                         min_target_diameter_mm=float(widen or 0.0))
        run = paths.root / "experiments" / f"fold-{args.fold}-{variant.replace(':', '-')}-{args.steps}"
        net, config, _ = load_candidate_net(train_candidate_net(prepared_training, config, CANDIDATE_PREPROCESS, run))
        results[variant] = measure(net, config, validation, prepared_validation, args.threshold or [0.05, 0.01])
        for threshold, stage in results[variant].items():
            sizes = ", ".join(f"{b['size']} {_share(b['sensitivity'])} of {b['nodules']}" for b in stage["by_size"])
            print(f"{variant} (map >= {threshold}): {stage['sensitivity']:.2f} {stage.get('sensitivity_ci')} of "
                  f"{stage['nodules']} >= 5 mm; {sizes}; {stage['candidates_per_scan']:.1f} proposals/scan", flush=True)
    out = paths.root / "experiments" / f"candidate_stage_{args.fold}_{args.steps}_{content_key(args.variant)[:8]}.json"
    out.write_text(json.dumps({"protocol": __doc__.splitlines()[2:6], "fold": args.fold, "steps": args.steps,
                               "training_cts": len(training), "validation_cts": len(validation),
                               "results": results}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()

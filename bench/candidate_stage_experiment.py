"""Experiment: the candidate stage alone under training variants, measured on validation cohorts only.

One leave-one-host-out fold's training CTs (the other hosts' train cohorts) train the candidate network
once per variant; each is measured on the same fold's *validation* cohorts (the other hosts' validation
cohorts: their crops come from LIDC patients that no training cohort uses). The held-out host and every
test cohort are never touched, so the choice this informs does not leak into the card's numbers.
Printed: sensitivity (nodules >= 5 mm, within the first 50 proposals or each --limit, 95 % bootstrap interval
over scans) by size, and the proposals per scan, at each map --threshold (default 0.05 and 0.01). --spacing
trains and measures on another grid; --cohort-size writes larger cohorts of a part (the other parts are
unchanged: same crops, same seeds; a larger part starts with the same CTs), in another --work because cohort
folders are per host and part.

Run: .venv/bin/python bench/candidate_stage_experiment.py --data ../shared/data --fold lidc0001 \
         --steps 250 --variant per_voxel --variant per_lesion:dice_focal
(cohorts and the prepared grid are shared with `noduleai build-model` under --work).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from noduleai.candidate_net import (
    PROPOSAL_LIMIT,
    PROPOSAL_THRESHOLD,
    load_candidate_net,
    probability_map,
    train_candidate_net,
)
from noduleai.evaluate import candidate_stage, hits_any
from noduleai.files import content_key
from noduleai.recipe_v2 import (
    CANDIDATE_PREPROCESS,
    COHORT_SIZES,
    V2Paths,
    build_v2_cohorts,
    candidate_config,
    prepare,
    proposals_on_map,
)


def measure(net, config, cases, prepared, thresholds, limits) -> dict:
    truths = [[(n.center_lps, n.diameter_mm) for n in c.nodules] for c in cases]
    maps = [probability_map(net, p.volume, config) for p in prepared]
    out = {}
    for threshold in thresholds:
        proposals = [[lps for lps, _score, _d in proposals_on_map(prob, p, config, threshold, max(limits))
                      if not hits_any(lps, case.excluded)] for case, p, prob in zip(cases, prepared, maps)]
        for limit in limits:
            out[f"{threshold}" if limit == PROPOSAL_LIMIT else f"{threshold} first {limit}"] = \
                candidate_stage(proposals, truths, limit)
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
    parser.add_argument("--cohort-size", action="append", default=[], metavar="PART=N",
                        help="insertion CTs per host in a part, e.g. train=18 (default: the recipe's; use another "
                             "--work, the cohort folders are per host and part)")
    parser.add_argument("--spacing", type=float, help="candidate grid in mm (default: the recipe's)")
    parser.add_argument("--limit", type=int, action="append",
                        help=f"proposals per scan counted (default {PROPOSAL_LIMIT}, the recipe's)")
    parser.add_argument("--threshold", type=float, action="append", help="map thresholds (default 0.05 and 0.01)")
    args = parser.parse_args()
    paths = V2Paths(Path(args.work))
    sizes = {**COHORT_SIZES, **{part: int(n) for part, n in (item.split("=") for item in args.cohort_size)}}
    cohorts, _real = build_v2_cohorts(args.data, paths, sizes=sizes)
    others = [name for name in cohorts if name != args.fold]
    training = [c for name in others for c in cohorts[name]["train"]]
    validation = [c for name in others for c in cohorts[name]["validation"]]
    grid = CANDIDATE_PREPROCESS if args.spacing is None else \
        replace(CANDIDATE_PREPROCESS, spacing_mm=(args.spacing,) * 3)
    prepared_training, prepared_validation = (prepare(cases, paths, preprocess=grid)
                                              for cases in (training, validation))
    grid_name = "" if args.spacing is None else f"-{args.spacing:g}mm"
    results = {}
    for variant in args.variant:
        sampling, loss, widen = (variant.split(":") + ["", ""])[:3]
        config = replace(candidate_config(args.steps), lesion_sampling=sampling, loss=loss or "dice_ce",
                         min_target_diameter_mm=float(widen or 0.0))
        run = paths.root / "experiments" / f"fold-{args.fold}-{variant.replace(':', '-')}-{args.steps}{grid_name}"
        net, config, _ = load_candidate_net(train_candidate_net(prepared_training, config, grid, run))
        results[variant] = measure(net, config, validation, prepared_validation,
                                   args.threshold or [PROPOSAL_THRESHOLD, 0.01], args.limit or [PROPOSAL_LIMIT])
        for threshold, stage in results[variant].items():
            by_size = ", ".join(f"{b['size']} {_share(b['sensitivity'])} of {b['nodules']}" for b in stage["by_size"])
            print(f"{variant} (map >= {threshold}): {stage['sensitivity']:.2f} {stage.get('sensitivity_ci')} of "
                  f"{stage['nodules']} >= 5 mm; {by_size}; {stage['candidates_per_scan']:.1f} proposals/scan",
                  flush=True)
    out = paths.root / "experiments" / (f"candidate_stage_{args.fold}_{args.steps}{grid_name}_"
                                        f"{content_key([args.variant, args.threshold, args.limit])[:8]}.json")
    out.write_text(json.dumps({"protocol": __doc__.splitlines()[2:6], "fold": args.fold, "steps": args.steps,
                               "grid_mm": grid.spacing_mm, "cohort_sizes": sizes,
                               "training_cts": len(training), "validation_cts": len(validation),
                               "results": results}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()

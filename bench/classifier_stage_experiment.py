"""Experiment: the classifier stage under training lengths, measured on validation cohorts only.

One leave-one-host-out fold's candidate network (the build's own, reused by its key) proposes on the fold's
training and validation CTs; a classifier is trained per variant (classifier epochs) on the candidate
network's own false positives, calibrated on the fold's *validation* cohorts, and measured on them: CPM of
the proposals ranked by the candidate score alone, by the classifier alone (no fitted parameter changes its
order) and fused (temperature, weight and bias fitted on these same CTs: optimistic, shown for reference).
The held-out host and every test cohort are never touched (the classifier gets no test part).

Run: .venv/bin/python bench/classifier_stage_experiment.py --data ../shared/data \
         --work noduleai-output/detector-v2-centre --fold lidc0001 --epochs 4 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from noduleai.evaluate import froc
from noduleai.io import read_ct
from noduleai.recipe_v2 import RANKINGS, V2Paths, build_v2_cohorts, train_candidates, train_classifier_stage


def ranked_three_ways(detector, cases) -> dict:
    """Each validation CT's listed proposals ranked by the candidate score, the classifier, the fusion."""
    rankings = {way: [] for way in RANKINGS}
    for case in cases:
        found = detector.scored_proposals(read_ct(case.image_path))
        for way, probs in (("candidate_alone", np.array([s for _p, s, _d in found.proposals])),
                           ("classifier_alone", detector.probabilities(found, fused=False)),
                           ("fused", detector.probabilities(found))):
            rankings[way].append([(found.proposals[i][0], float(probs[i])) for i in detector.ranked(found, probs)])
    return rankings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--work", default="noduleai-output/detector-v2")
    parser.add_argument("--fold", default="lidc0001", help="the held-out host (never used here)")
    parser.add_argument("--candidate-steps", type=int, default=250)
    parser.add_argument("--epochs", type=int, action="append", required=True, help="classifier epochs per variant")
    args = parser.parse_args()
    paths = V2Paths(Path(args.work))
    cohorts, _real = build_v2_cohorts(args.data, paths)
    others = [name for name in cohorts if name != args.fold]
    training = [c for name in others for c in cohorts[name]["train"]]
    validation = [c for name in others for c in cohorts[name]["validation"]]
    truths = [[(n.center_lps, n.diameter_mm) for n in c.nodules] for c in validation]
    excluded = [[(n.center_lps, n.diameter_mm) for n in c.excluded] for c in validation]
    net, config = train_candidates(args.fold, training, paths, args.candidate_steps)
    results = {}
    for epochs in args.epochs:
        name = f"experiment-{args.fold}-epochs{epochs}"
        # Mining depends on the network and cases only, and its record is keyed by them: the fold's own is
        # reused when it matches (it is recomputed otherwise).
        mined, fold_mined = paths.root / "mined" / f"{name}.json", paths.root / "mined" / f"{args.fold}.json"
        if not mined.exists() and fold_mined.exists():
            shutil.copy(fold_mined, mined)
        detector, _result, calibration = train_classifier_stage(name, net, config, training, validation, [], paths,
                                                                epochs)
        curves = {way: froc(r, truths, excluded) for way, r in ranked_three_ways(detector, validation).items()}
        results[epochs] = {"calibration": calibration,
                           "cpm": {way: {"cpm": c.cpm, "cpm_ci": c.cpm_ci} for way, c in curves.items()},
                           "sensitivity_at": {way: c.sensitivity_at for way, c in curves.items()}}
        print(f"epochs {epochs}: CPM on validation " + ", ".join(
            f"{way} {c.cpm:.2f} ({c.cpm_ci[0]:.2f}-{c.cpm_ci[1]:.2f})" for way, c in curves.items())
            + f"; operating threshold {calibration['operating_threshold']:.2f}", flush=True)
    out = paths.root / "experiments" / f"classifier_stage_{args.fold}_{'-'.join(map(str, args.epochs))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": __doc__.splitlines()[2:8], "fold": args.fold,
                               "training_cts": len(training), "validation_cts": len(validation),
                               "results": results}, indent=1, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()

"""Diagnosis: where each fold's candidate network puts its held-out host's real lesion.

For every finished fold of a leave-one-host-out work folder whose held-out host has real lesions, the fold's
own candidate network (never trained on that host) maps the host's original CT; printed per lesion: the map
at the lesion's centre and its highest value within the lesion's radius, the lesion's rank among *all* the
map's peaks (the hit rule; no proposal limit, threshold 1e-4) and the score of the last proposal the recipe
keeps (PROPOSAL_LIMIT). It tells a lesion the candidate stage ranks too low from one it never responds to.

Run: .venv/bin/python bench/real_lesion_candidate_rank.py --data ../shared/data --work noduleai-output/detector-v2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from noduleai.candidate_net import CANDIDATE_NET_FILE, PROPOSAL_LIMIT, load_candidate_net, probability_map
from noduleai.evaluate import hits
from noduleai.geometry import lps_to_array_index
from noduleai.real_cohort import HOSTS, load_real_host
from noduleai.recipe_v2 import V2Paths, original_case, prepare, proposals_on_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--work", default="noduleai-output/detector-v2")
    args = parser.parse_args()
    paths = V2Paths(Path(args.work))
    for fold in HOSTS:
        network = paths.candidate_run(fold) / CANDIDATE_NET_FILE
        host = load_real_host(args.data, fold)
        if not network.exists() or not host.reference:
            continue
        net, config, _preprocess = load_candidate_net(network)
        case = original_case(host)
        prepared = prepare([case], paths, with_labels=False)[0]
        prob = probability_map(net, prepared.volume, config)
        peaks = proposals_on_map(prob, prepared, config, threshold=1e-4, limit=10_000)
        last_kept = f"{peaks[PROPOSAL_LIMIT - 1][1]:.3f}" if len(peaks) >= PROPOSAL_LIMIT else "(fewer peaks)"
        spacing = np.asarray(prepared.reference.GetSpacing()[::-1])
        for lesion in case.nodules:
            centre = np.asarray(lps_to_array_index(prepared.reference, lesion.center_lps))
            # The lesion's ball, in the box around it only (a whole-map index grid held ~0.2 GB).
            reach = np.ceil(lesion.diameter_mm / 2 / spacing).astype(int)
            low = np.maximum(np.floor(centre).astype(int) - reach, 0)
            high = np.minimum(np.ceil(centre).astype(int) + reach + 1, prob.shape)
            box = tuple(slice(a, b) for a, b in zip(low, high))
            offsets = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(low, high)), indexing="ij"), -1)
            inside = np.linalg.norm((offsets - centre) * spacing, axis=-1) <= lesion.diameter_mm / 2
            rank = next((i + 1 for i, (p, _s, _d) in enumerate(peaks)
                         if hits(p, lesion.center_lps, lesion.diameter_mm)), None)
            at_centre = prob[tuple(np.round(centre).astype(int))]
            print(f"fold {fold}: {lesion.diameter_mm:.0f} mm lesion: map {at_centre:.3f} at its centre, "
                  f"{prob[box][inside].max():.3f} at most inside; rank {rank} of {len(peaks)} peaks; proposal "
                  f"{PROPOSAL_LIMIT} (the last kept) scores {last_kept}")


if __name__ == "__main__":
    main()

"""The seed article's experiment, reproduced on lesion-insertion CTs: a scan-level 3D ResNet-18 on the
whole preprocessed CT (128^3), focal loss with effective-number class weights, the seed's 3D
augmentation, a 70/15/15 split, its metrics table; measured against the classical blob detector's
scan score on the same test CTs.

``noduleai build-model --data ../shared/data --scan-experiment`` runs it (after, or instead of, the
patch recipe; the LIDC outlines are shared through the work folder). The scan model is not the
default detector: it answers "is there a nodule in this CT" and its Grad-CAM is coarse.
"""

from __future__ import annotations

import os
from pathlib import Path

from noduleai.config import TrainConfig
from noduleai.preprocess import SCAN_PREPROCESS
from noduleai.recipe import BUNDLED_PREPROCESS, SEED, RecipePaths, data_paths, lidc_outlines, training_hosts

SCAN_MODEL_NAME = "noduleai-scan-resnet18-w0.25-insertion-seed-experiment"
SCAN_CASES = 80
SCAN_DATA = (
    "Lesion insertion (`noduleai.insertion`, as for the bundled patch model): {n_cases} CTs built from "
    "LIDC-IDRI-0001 and radiomics lung1 (real lesions cut away) and two phantoms, half of them with 1-3 real "
    "LIDC reader outlines inserted (3-30 mm, from LIDC patients of the patch model's training part), half "
    "without; split 70/15/15 by case. LIDC-IDRI data: Armato et al., Med Phys 2011; TCIA, CC BY 3.0.")
SCAN_LIMITS = [
    "A reproduction of a teaching experiment, not a detector: one probability per CT, from a few dozen training "
    "CTs of four hosts.",
    "At 128^3 over the whole lung crop a voxel is about 2.5 mm: nodules under ~8 mm are a few voxels.",
    "Trained without real LIDC pixels at scale (inserted lesions only); the test part is a dozen CTs.",
]


def scan_experiment_config(epochs: int = 50) -> TrainConfig:
    """The seed's CONFIG (``TrainConfig``'s defaults: ResNet-18, focal loss gamma 2, effective-number
    weights, augmentation, Adam 2e-4, batch 8, 50 epochs, 70/15/15) at width 0.25: the full-width
    network on 128^3 takes ~16x the arithmetic, beyond a CPU's hour for 50 epochs."""
    return TrainConfig(width=0.25, epochs=epochs, seed=SEED)


def build_scan_cohort(hosts: list, shapes: list, out: Path, n_cases: int = SCAN_CASES):
    """Half the CTs with 1-3 inserted nodules, half without (reused when already written)."""
    from noduleai.insertion import existing_cohort, write_insertion_cohort

    return existing_cohort(out, n_cases) or write_insertion_cohort(
        hosts, shapes, out, n_cases, nodules_per_case=(1, 3), negative_fraction=0.5, seed=SEED + 7, prefix="scan")


def blob_scan_scores(cases) -> list[float]:
    """The classical baseline's scan score: its best candidate's score (0 when it finds none)."""
    from noduleai.baseline import BlobBaseline
    from noduleai.io import read_ct

    baseline = BlobBaseline(BUNDLED_PREPROCESS)
    return [max((c.probability for c in baseline.detect(read_ct(case.image_path)).candidates), default=0.0)
            for case in cases]


def run_scan_experiment(data_root: str | os.PathLike, work_dir: str | os.PathLike, epochs: int = 50,
                        progress: bool = True) -> dict:
    """Cohort, cache, the seed's training, the baseline on the same test CTs; the model and its card
    (with both measured) in ``<work>/scan_run``; returns the comparison."""
    from noduleai.cache import build_cache
    from noduleai.checkpoint import load_model, save_model
    from noduleai.data import split_by_patient
    from noduleai.evaluate import classification_metrics
    from noduleai.files import write_json_atomic
    from noduleai.insertion import load_shapes, split_shapes
    from noduleai.modelcard import write_model_card
    from noduleai.train import train

    paths = RecipePaths(Path(work_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    out = paths.root / "scan_cohort"
    if progress:
        print(f"the scan-level insertion cohort ({SCAN_CASES} CTs) in {out} ...")
    train_shapes, _ = split_shapes(load_shapes(lidc_outlines(paths, progress)), seed=SEED)
    cases = build_scan_cohort(training_hosts(data_paths(data_root)), train_shapes, out)
    entries, _ = build_cache(cases, SCAN_PREPROCESS, paths.root / "scan_cache", workers=2, progress=progress)
    config = scan_experiment_config(epochs)
    result = train(entries, config, SCAN_PREPROCESS, paths.root / "scan_run", progress=progress)
    test_ids = {entries[i].case_id for i in split_by_patient(entries, config.split, config.seed)[2]}
    test_cases = [c for c in cases if c.case_id in test_ids]
    labels = [c.label for c in test_cases]
    blob = classification_metrics(labels, blob_scan_scores(test_cases))
    comparison = {"test_cases": len(test_cases), "positives": int(sum(labels)),
                  "model": result.test_metrics, "blob_baseline_auc": blob["auc"]}
    write_json_atomic(comparison, paths.root / "scan_run" / "comparison.json")
    model, info = load_model(result.best_model)
    info.name = SCAN_MODEL_NAME
    save_model(result.best_model, model, info)
    write_model_card(result.best_model.with_suffix(".md"), info, SCAN_DATA.format(n_cases=len(cases)), SCAN_LIMITS,
                     scan_markdown(comparison))
    return comparison


def scan_markdown(comparison: dict) -> str:
    """The card's comparison: the scan model's test AUC against the blob baseline's on the same CTs."""
    m = comparison["model"]
    auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
    base = comparison["blob_baseline_auc"]
    return (f"\n## Against the classical baseline (same {comparison['test_cases']} test CTs, "
            f"{comparison['positives']} with nodules)\n\n| | scan model | blob baseline (best candidate's score) |\n"
            f"|---|---|---|\n| AUC | {auc} | {'n/a' if base is None else f'{base:.3f}'} |\n")

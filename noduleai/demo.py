"""``noduleai demo``: the whole pipeline on a fresh machine, on the CPU, with no download.

Phantom cohort -> preprocessing cache -> a small patch model -> evaluation (FROC, CPM, sizes) ->
detection with Grad-CAM on a held-out phantom -> every output file, with where they are printed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from noduleai import DISCLAIMER
from noduleai.assessment import evaluate_cases
from noduleai.cache import build_cache
from noduleai.checkpoint import load_model, save_model
from noduleai.detect import Detector
from noduleai.io import read_ct
from noduleai.preprocess import PATCH_PREPROCESS
from noduleai.records import load_manifest
from noduleai.report import write_detection
from noduleai.synthetic import write_phantom_cohort
from noduleai.train import TrainConfig, train

DEMO_MODEL_NAME = "demo-phantom-patch-resnet10-w0.125"


def demo_config(epochs: int = 6, seed: int = 7) -> TrainConfig:
    """A patch model small enough to train in a few minutes on 2 CPU cores.

    ResNet-10 at width 0.125 (8 base channels, 225 k parameters): a 32^3 patch costs ~13 ms forward
    on 2 cores, ResNet-18 at width 0.25 about 2x that for no gain on phantoms.
    """
    return TrainConfig(task="patch", arch="resnet10_3d", width=0.125, epochs=epochs, batch_size=16, lr=2e-3,
                       seed=seed, patch_size=32, negatives_per_case=24, max_steps_per_epoch=40, device="cpu")


@dataclass
class DemoResult:
    out_dir: Path
    model_path: Path
    evaluation: dict
    detection_files: dict[str, Path]
    held_out_case: str


def run_demo(out_dir: str | os.PathLike = "noduleai-output/demo", n_cases: int = 24, epochs: int = 6, seed: int = 7,
             progress: bool = True) -> DemoResult:
    """Run the demo into ``out_dir`` and print a summary; safe to re-run (cache and run resume)."""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = Path(out_dir)
    t0 = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    say(f"NoduleAI demo ({DISCLAIMER})\n1/5 generating {n_cases} phantom CTs + 1 held-out ...")
    manifest = out / "data" / "manifest.json"
    cases = load_manifest(manifest) if manifest.exists() else write_phantom_cohort(out / "data", n_cases, seed)
    if len(cases) != n_cases:
        cases = write_phantom_cohort(out / "data", n_cases, seed)
    held_out = write_phantom_cohort(out / "held_out", 1, seed + 1000, negative_fraction=0.0, prefix="heldout")[0]
    say("2/5 preprocessing (shared with detection) ...")
    entries, skipped = build_cache(cases, PATCH_PREPROCESS, out / "cache", progress=progress)
    config = demo_config(epochs, seed)
    say(f"3/5 training {config.arch} x{config.width} on patches for {epochs} epochs (CPU) ...")
    result = train(entries, config, PATCH_PREPROCESS, out / "model", progress=progress)
    model, info = load_model(result.best_model)
    if info.name != DEMO_MODEL_NAME:
        info.name = DEMO_MODEL_NAME
        save_model(result.best_model, model, info)
    detector = Detector(model, info, "cpu", source=str(result.best_model), min_probability=0.05)
    say("4/5 evaluating on the held-out test phantoms (FROC, CPM, by size) ...")
    test_ids = set(info.training_data["test_cases"])
    evaluation = evaluate_cases(detector, [c for c in cases if c.case_id in test_ids], out / "evaluation",
                                progress=progress)
    say("5/5 detecting with Grad-CAM on a held-out phantom ...")
    ct = read_ct(held_out.image_path)
    files = write_detection(detector.detect(ct), ct, out / "detection", held_out.case_id)
    from noduleai.cli import _print_evaluation  # the CLI owns console formatting

    say(f"\nModel used: {DEMO_MODEL_NAME} (trained just now on phantoms; not the bundled model)")
    _print_evaluation(evaluation) if progress else None
    say(f"\nDone in {time.perf_counter() - t0:.0f} s. Results in {out.resolve()}:")
    say(f"  model + card:      {result.best_model}  (history.csv, test_results.csv, roc_curve.png,"
        " confusion_matrix.png beside it)")
    say(f"  evaluation:        {out / 'evaluation'}  (evaluation.json, froc.png, by_size.csv)")
    say(f"  detection:         {out / 'detection'}  ({', '.join(p.name for p in files.values())})")
    say(f"  ground truth of the held-out phantom: {out / 'held_out' / 'manifest.json'}")
    say(DISCLAIMER)
    return DemoResult(out, result.best_model, evaluation, files, held_out.case_id)

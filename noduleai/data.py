"""Training data from the cache: patient-level splits, patch sampling, and torch datasets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from noduleai.cache import CacheEntry
from noduleai.candidates import blob_centres, inscribed_radius
from noduleai.patches import extract_patch

NEGATIVE_KINDS = ("blob", "dense", "pleura", "lung")
NEGATIVE_SHARES = {"blob": 0.4, "dense": 0.2, "pleura": 0.2}  # the rest: anywhere in the lung
DENSE_THRESHOLD = 0.35  # normalised intensity ~ -510 HU with the default window: vessels, airway walls


def split_by_patient(entries: Sequence[CacheEntry], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     seed: int = 42) -> tuple[list[int], list[int], list[int]]:
    """Indices of ``entries`` for train/validation/test; no patient appears in two parts.

    Patients are stratified by whether any of their scans is positive, so each part sees both classes
    when there are enough patients; every part gets at least one patient when there are three.
    """
    if abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions} must sum to 1")
    patients: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        patients.setdefault(e.patient_id, []).append(i)
    rng = np.random.default_rng(seed)
    parts: list[list[str]] = [[], [], []]
    for positive in (True, False):
        group = sorted(p for p, idx in patients.items() if any(entries[i].label for i in idx) == positive)
        rng.shuffle(group)
        n_val = int(round(fractions[1] * len(group)))
        n_test = int(round(fractions[2] * len(group)))
        parts[1] += group[:n_val]
        parts[2] += group[n_val:n_val + n_test]
        parts[0] += group[n_val + n_test:]
    for k in (1, 2):  # small cohorts: borrow one patient from training so no part is empty
        if not parts[k] and len(parts[0]) > 1:
            parts[k].append(parts[0].pop())
    return tuple(sorted(i for p in part for i in patients[p]) for part in parts)  # type: ignore[return-value]


@dataclass(frozen=True)
class PatchItem:
    """One training patch: a cached case, a centre (voxel z, y, x), a label and what it shows."""

    entry: int
    center_zyx: tuple[float, float, float]
    label: int
    diameter_mm: float = 0.0
    kind: str = "nodule"


def sample_patch_items(entries: Sequence[CacheEntry], negatives_per_case: int = 40, seed: int = 0,
                       min_diameter_mm: float = 3.0, positive_repeats: int = 1, clearance_mm: float = 5.0,
                       hard_negatives: Mapping[str, Sequence[Sequence[float]]] | None = None) -> list[PatchItem]:
    """Positives at every nodule >= ``min_diameter_mm`` (each ``positive_repeats`` times: the dataset
    jitters every copy differently); negatives of four kinds per case.

    40 % are compact blobs found by the detector's own candidate generator (vessel crossings, thick
    vessels: the hard negatives), 20 % dense tissue (vessels, airway walls), 20 % pleura, 20 % anywhere
    in the lung. Negatives keep clear of every annotated nodule (radius + ``clearance_mm``).
    ``hard_negatives`` (case id -> voxel centres, e.g. a first model's false positives) are added as
    negatives of kind "mined".
    """
    rng = np.random.default_rng(seed)
    items: list[PatchItem] = []
    for k, entry in enumerate(entries):
        nodules = entry.nodules
        for n in nodules:
            if n["diameter_mm"] >= min_diameter_mm:
                item = PatchItem(k, tuple(n["zyx"]), 1, float(n["diameter_mm"]), n.get("texture") or "nodule")
                items += [item] * positive_repeats
        volume = np.asarray(entry.load(), np.float32)
        mask = np.asarray(entry.load_mask(), bool)
        spacing = np.asarray(entry.spacing[::-1])
        pools = {
            "blob": blob_centres(inscribed_radius(volume, mask, spacing)),
            "dense": np.argwhere(mask & (volume > DENSE_THRESHOLD)),
            "pleura": np.argwhere(mask & ~ndimage.binary_erosion(mask, iterations=2)),
            "lung": np.argwhere(mask),
        }
        counts = {kind: int(round(share * negatives_per_case)) for kind, share in NEGATIVE_SHARES.items()}
        counts["lung"] = negatives_per_case - sum(counts.values())
        centres = np.array([n["zyx"] for n in nodules]) if nodules else np.zeros((0, 3))
        clearance = np.array([n["diameter_mm"] / 2 + clearance_mm for n in nodules])
        for kind in NEGATIVE_KINDS:
            pool = pools[kind]
            if len(pool) == 0:
                continue
            picks = pool[rng.choice(len(pool), size=min(len(pool), counts[kind] * 3), replace=False)]
            if len(centres):
                dist = np.linalg.norm((picks[:, None, :] - centres[None]) * spacing, axis=-1)
                picks = picks[(dist > clearance).all(axis=1)]
            for p in picks[:counts[kind]]:
                items.append(PatchItem(k, tuple(float(v) for v in p), 0, 0.0, kind))
        for p in (hard_negatives or {}).get(entry.case_id, []):
            items.append(PatchItem(k, tuple(float(v) for v in p), 0, 0.0, "mined"))
    return items


class PatchDataset(Dataset):
    """Patches around :class:`PatchItem` centres; positives shifted by up to ``jitter_mm`` per axis so the
    network must find the nodule instead of reading the patch centre from the border padding."""

    def __init__(self, entries: Sequence[CacheEntry], items: Sequence[PatchItem], patch_size: int = 32,
                 augment=None, jitter_mm: float = 3.0, seed: int = 0):
        self.entries, self.items = list(entries), list(items)
        self.patch_size, self.augment, self.jitter_mm = patch_size, augment, jitter_mm
        self.rng = np.random.default_rng(seed)
        self._volumes: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def _volume(self, k: int) -> np.ndarray:
        if k not in self._volumes:  # memory-mapped: workers share the page cache
            self._volumes[k] = self.entries[k].load()
        return self._volumes[k]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        center = np.asarray(item.center_zyx, float)
        if item.label == 1 and self.jitter_mm > 0:
            limit = self.jitter_mm
            center = center + self.rng.uniform(-limit, limit, 3) / np.asarray(self.entries[item.entry].spacing[::-1])
        patch = torch.from_numpy(extract_patch(self._volume(item.entry), center, self.patch_size))[None]
        if self.augment is not None:
            patch = self.augment(patch)
        return patch, item.label


class ScanDataset(Dataset):
    """Whole preprocessed scans (the seed's scan-level task)."""

    def __init__(self, entries: Sequence[CacheEntry], augment=None):
        self.entries, self.augment = list(entries), augment

    def __len__(self) -> int:
        return len(self.entries)

    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.asarray(self.entries[i].load(), np.float32))[None]
        if self.augment is not None:
            x = self.augment(x)
        return x, self.entries[i].label

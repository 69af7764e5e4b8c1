"""Plain records shared by data sources (LIDC, phantoms), the cache, training and evaluation."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from noduleai.files import write_json_atomic


@dataclass(frozen=True)
class NoduleRecord:
    """A ground-truth nodule: centre in LPS millimetres, volume-equivalent diameter, texture."""

    center_lps: tuple[float, float, float]
    diameter_mm: float
    texture: str | None = None


@dataclass
class CaseRecord:
    """One CT with its labels. ``label`` is the scan-level class (1: at least one nodule >= threshold)."""

    case_id: str
    patient_id: str
    image_path: str
    label: int
    nodules: list[NoduleRecord] = field(default_factory=list)
    series_uid: str | None = None
    excluded: list[NoduleRecord] = field(default_factory=list)  # findings neither hit nor missed (LUNA16)

    @classmethod
    def from_dict(cls, data: dict) -> CaseRecord:
        nodules = [NoduleRecord(tuple(n["center_lps"]), float(n["diameter_mm"]), n.get("texture"))
                   for n in data.get("nodules", [])]
        excluded = [NoduleRecord(tuple(n["center_lps"]), float(n["diameter_mm"]), n.get("texture"))
                    for n in data.get("excluded", [])]
        return cls(data["case_id"], data["patient_id"], data["image_path"], int(data["label"]), nodules,
                   data.get("series_uid"), excluded)


def save_manifest(cases: list[CaseRecord], path: str | os.PathLike) -> None:
    """Write a cohort manifest (JSON list of cases)."""
    write_json_atomic([asdict(c) for c in cases], path)


def load_manifest(path: str | os.PathLike) -> list[CaseRecord]:
    """Read a cohort manifest written by :func:`save_manifest`; relative image paths are resolved."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        cases = [CaseRecord.from_dict(d) for d in data]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a valid case manifest ({err})") from err
    for case in cases:
        if not os.path.isabs(case.image_path):
            case.image_path = str(path.parent / case.image_path)
    return cases

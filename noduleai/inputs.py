"""Which scans a list of paths names: one case per file, per DICOM folder or per patient sub-folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from noduleai.io import case_name, is_volume_file


def _has_files(folder: Path) -> bool:
    return any(p.is_file() for p in folder.iterdir())


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(case name, path) for every scan named in ``paths``.

    A file is one case. A folder holding volume files (NRRD, NIfTI, MHA) gives one case per file and
    one per sub-folder; a folder holding only sub-folders, two or more, gives one case per sub-folder
    (a folder of DICOM patients); any other folder is one DICOM case. Repeated names get ``_2``, ``_3``...
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

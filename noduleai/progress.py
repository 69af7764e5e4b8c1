"""Machine-readable progress of engine commands: JSON lines with a phase and a fraction, and their reader.

``noduleai detect --progress-json FILE`` and ``noduleai train --progress-json FILE`` write them; the Slicer
modules read them while the command runs in the background.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any


def detection_phase(fraction: float) -> str:
    """What a detector is doing when it reports ``fraction``. Both report 0 before preprocessing and 0.1
    after it; v1 (``Detector``) up to 0.8 while scanning patches, 0.9 after the candidates; v2
    (``TwoStageDetector``) 0.8 after the candidate network's map, 0.9 after the classifier; 1 at the end."""
    if fraction < 0.1:
        return "preprocessing (lung mask, resampling)"
    if fraction < 0.8 - 1e-6:
        return "scanning the lung with the model"
    if fraction < 0.9 - 1e-6:
        return "finding candidates"
    if fraction < 1.0:
        return "Grad-CAM heatmaps"
    return "detection finished"


class JsonLinesReader:
    """Reads the records appended to a JSON-lines file since the last call; a half-written last line waits."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        records = []
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not ours (e.g. a line of a killed writer); progress goes on with the next
            if isinstance(record, dict):
                records.append(record)
        return records


class ProgressWriter:
    """Machine-readable progress: one JSON object per line (``phase``, ``fraction`` in [0, 1], more keys).

    ``path`` None writes nothing; ``"-"`` writes to standard output. Each line is flushed at once so a
    polling reader sees it.
    """

    def __init__(self, path: str | os.PathLike | None):
        self._file: IO[str] | None = None
        self._own = False
        if path in (None, ""):
            return
        if str(path) == "-":
            self._file = sys.stdout
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._own = True

    def write(self, phase: str, fraction: float, **extra: Any) -> None:
        if self._file is None:
            return
        record = {"phase": phase, "fraction": round(min(1.0, max(0.0, float(fraction))), 4), "time": time.time()}
        self._file.write(json.dumps(record | extra) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._own and self._file is not None:
            self._file.close()
        self._file = None

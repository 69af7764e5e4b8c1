"""Atomic file writing (a file is either complete at its final path or absent) and keyed work (reused only
when the inputs that made it are unchanged)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix(es) last: writers (SimpleITK, matplotlib) choose the format from it.
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(data: Any, path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- keyed work: reused only when everything that made it is unchanged ------------------------------------
def content_key(value: Any) -> str:
    """A hash of ``value`` (JSON-able: settings, case ids, other keys) naming what made a piece of work."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_jsonable).encode()).hexdigest()


def read_keyed(path: str | os.PathLike, key: str) -> dict | None:
    """The JSON record at ``path`` when its ``"key"`` is ``key``; None when absent or made from other inputs."""
    path = Path(path)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key else None


def keyed_folder(folder: str | os.PathLike, key: str) -> Path:
    """``folder`` ready for work made from ``key``: a folder holding work made from anything else (or from
    unknown inputs) is wiped first, so that resuming never mixes inputs."""
    folder = Path(folder)
    stamp = folder / "data_key.json"
    if folder.exists() and read_keyed(stamp, key) is None:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"key": key}, stamp)
    return folder

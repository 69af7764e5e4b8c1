"""A stand-in for Slicer's ``PythonSlicer``: a launcher process that runs the real interpreter as its child.

Killing only the launcher leaves the child running, exactly as with PythonSlicer and python-real.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil


def make_launcher(folder: Path) -> Path:
    """An executable shell script that starts ``sys.executable`` with its arguments as a child (no exec)."""
    path = folder / "FakePythonSlicer"
    path.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nstatus=$?\nexit $status\n')
    path.chmod(0o755)
    return path


def gone(pid: int) -> bool:
    """True when no process ``pid`` runs any more (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def python_children(pid: int) -> list[psutil.Process]:
    """The Python interpreters among the descendants of ``pid``."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    real = os.path.realpath(sys.executable)
    return [k for k in kids if _exe(k) in (sys.executable, real)]


def _exe(proc: psutil.Process) -> str:
    try:
        return os.path.realpath(proc.exe())
    except psutil.Error:
        return ""

"""The environment for child processes started from Slicer (shared by NoduleDetect and NoduleTraining)."""

from __future__ import annotations

import os


def startup_environment() -> dict[str, str]:
    """Slicer's startup environment, without the launcher's own settings: the child is ``PythonSlicer``, a
    launcher that sets them up again (as ``slicer.util.launchConsoleProcess`` assumes). Outside the Slicer
    application (plain Python, slicer-core) this process's environment."""
    try:
        import slicer

        return dict(slicer.util.startupEnvironment())
    except Exception:  # no slicer.app: not inside the application
        return dict(os.environ)

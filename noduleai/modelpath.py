"""Where models are: the bundled model and the choice between an explicit, a handed-over and the bundled one.

Torch-free on purpose, so that a Slicer panel can name the model it will use before torch is installed.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """No usable model file: the message says which one was looked for and what to do."""


def bundled_models_dir() -> Path:
    """``Resources/Models`` beside the engine package.

    In a source checkout that is ``<repo>/Resources/Models``; in the installed extension the engine is
    ``lib/Slicer-X.Y/qt-scripted-modules/noduleai`` and the top-level CMakeLists.txt installs the models to
    ``lib/Slicer-X.Y/qt-scripted-modules/Resources/Models``.
    """
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


BUNDLED_MODEL_FILE = "noduleai_detector_v2.pt"  # the two-stage detector (issue 10), card beside it (.md)


def bundled_model_path() -> Path | None:
    """The model shipped with NoduleAI, when it is installed."""
    path = bundled_models_dir() / BUNDLED_MODEL_FILE
    return path if path.is_file() else None


def resolve_model_path(explicit: str | os.PathLike | None = None,
                       handed_over: str | os.PathLike | None = None) -> Path:
    """The model to use: an explicit path, else the one NoduleTraining handed over, else the bundled one.

    An explicit path must exist (a typo must not silently fall back to another model); a handed-over
    model that has since been deleted is skipped. Empty strings count as not given.
    """
    if explicit not in (None, ""):
        path = Path(explicit)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: model file does not exist")
        return path
    if handed_over not in (None, "") and Path(handed_over).is_file():
        return Path(handed_over)
    bundled = bundled_model_path()
    if bundled is None:
        raise ModelNotFoundError(f"no model given and no bundled model in {bundled_models_dir()}; train one with "
                                 "`noduleai train` or `noduleai demo`, or choose a checkpoint file")
    return bundled

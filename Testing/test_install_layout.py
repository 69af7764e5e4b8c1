"""The installed extension, as the CMake lists describe it, imports its engine and finds the bundled model.

The install tree is reproduced from the CMakeLists.txt files with the semantics of the macros they call:
- ``slicerMacroBuildScriptedModule`` (Slicer, CMake/SlicerMacroBuildScriptedModule.cmake) copies SCRIPTS and
  RESOURCES, paths kept, to ``${Slicer_QTSCRIPTEDMODULES_LIB_DIR}`` (a ``/<folder>`` more with WITH_SUBDIR) and
  installs them with NO_INSTALL_SUBDIR (without it, with WITH_SUBDIR) into
  ``${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}``;
- ``ctkMacroCompilePythonScript`` (CTK, CMake/ctkMacroCompilePythonScript.cmake) runs
  ``install(DIRECTORY DESTINATION_DIR DESTINATION INSTALL_DIR)``, with a trailing ``/`` only under
  NO_INSTALL_SUBDIR: without it the folder itself goes *into* INSTALL_DIR;
- ``install(FILES ... DESTINATION ...)`` for the bundled models.
Then a fresh interpreter, with only that folder and site-packages on ``sys.path`` (``-S``: no ``.pth``
file runs, so the editable install of ``noduleai`` cannot leak in), imports what Slicer would import.
"""

from __future__ import annotations

import json
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from noduleai.modelpath import BUNDLED_MODEL_FILE

SLICER_LIB = "lib/Slicer-5.10"
QT_SCRIPTED = f"{SLICER_LIB}/qt-scripted-modules"
VARIABLES = {  # build and install trees have the same relative layout
    "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}": QT_SCRIPTED,
    "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}": QT_SCRIPTED,
    "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}": QT_SCRIPTED,
}


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _set_lists(text: str) -> dict[str, list[str]]:
    """Every ``set(NAME item ...)`` of a CMakeLists.txt, ``${NAME}`` of earlier sets expanded."""
    values: dict[str, list[str]] = {}
    for name, body in re.findall(r"\bset\((\w+)\s+(.*?)\)", _strip_comments(text), re.S):
        items = []
        for item in body.split():
            for var, val in values.items():
                item = item.replace("${" + var + "}", " ".join(val))
            items.append(item.strip('"'))
        values[name] = items
    return values


def _call_args(text: str, macro: str) -> tuple[dict[str, list[str]], set[str]]:
    """Keyword arguments and options of the one call of ``macro`` (variables expanded)."""
    text = _strip_comments(text)
    match = re.search(rf"\b{macro}\((.*?)\n\s*\)", text, re.S)
    assert match, f"no {macro}() call"
    values = _set_lists(text)
    keywords = {"TARGET_NAME", "NAME", "SCRIPTS", "RESOURCES", "DESTINATION_DIR", "INSTALL_DIR", "SOURCE_DIR"}
    options = {"NO_INSTALL_SUBDIR", "WITH_SUBDIR", "WITH_GENERIC_TESTS", "GLOBAL_TARGET", "VERBOSE"}
    args: dict[str, list[str]] = {}
    found: set[str] = set()
    key = None
    for token in match.group(1).split():
        token = token.strip('"')
        if token in keywords:
            key = token
            args[key] = []
        elif token in options:
            found.add(token)
            key = None
        elif key is not None:
            for var, val in values.items():
                if token == "${" + var + "}":
                    token = " ".join(val)
            for var, val in VARIABLES.items():
                token = token.replace(var, val)
            args[key] += token.split()
    return args, found


def _ctk_install(prefix: Path, source_dir: Path, scripts: list[str], resources: list[str], destination_dir: str,
                 install_dir: str, no_install_subdir: bool) -> None:
    """What ``ctkMacroCompilePythonScript`` puts into the install tree under ``prefix``."""
    target = prefix / install_dir
    if not no_install_subdir:  # install(DIRECTORY dir DESTINATION d) without a trailing slash: d/<basename(dir)>
        target = target / Path(destination_dir).name
    for rel in scripts + resources:
        src = source_dir / rel
        assert src.is_file(), f"{src} is listed in CMake but does not exist"
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target / rel)


def build_install_tree(repo: Path, prefix: Path) -> Path:
    """The extension's install tree as its CMake lists describe it; returns the qt-scripted-modules folder."""
    top = (repo / "CMakeLists.txt").read_text()
    subdirs = re.findall(r"add_subdirectory\((\w+)\)", _strip_comments(top))
    for sub in subdirs:
        text = (repo / sub / "CMakeLists.txt").read_text()
        if "slicerMacroBuildScriptedModule" in text:
            args, options = _call_args(text, "slicerMacroBuildScriptedModule")
            with_subdir = "WITH_SUBDIR" in options
            destination = QT_SCRIPTED + (f"/{sub}" if with_subdir else "")
            _ctk_install(prefix, repo / sub, args.get("SCRIPTS", []), args.get("RESOURCES", []), destination,
                         QT_SCRIPTED, no_install_subdir=not with_subdir)
        else:
            args, options = _call_args(text, "ctkMacroCompilePythonScript")
            _ctk_install(prefix, repo / sub, args.get("SCRIPTS", []), args.get("RESOURCES", []),
                         args["DESTINATION_DIR"][0], args["INSTALL_DIR"][0], "NO_INSTALL_SUBDIR" in options)
    values = _set_lists(top)
    for files_var, destination in re.findall(r"install\(FILES\s+\$\{(\w+)\}\s+DESTINATION\s+(\S+)",
                                             _strip_comments(top)):
        for var, val in VARIABLES.items():
            destination = destination.replace(var, val)
        for rel in values[files_var]:
            (prefix / destination).mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, prefix / destination / Path(rel).name)
    return prefix / QT_SCRIPTED


CHECK = r"""
import json, subprocess, sys
tree = sys.argv[1]
import noduleai
import noduleai.checkpoint as checkpoint
from noduleai.process import engine_environment
import NoduleDetectLib.logic, NoduleDetectLib.process, NoduleDetectLib.batch, NoduleDetectLib.environment
import NoduleTrainingLib.logic
env = engine_environment({})
child = subprocess.run([sys.executable, "-S", "-c", "import noduleai; print(noduleai.__file__)"], env=env,
                       capture_output=True, text=True)
print(json.dumps({
    "engine": noduleai.__file__,
    "bundled": str(checkpoint.bundled_model_path()),
    "modules": [NoduleDetectLib.logic.__file__, NoduleDetectLib.process.__file__, NoduleDetectLib.batch.__file__,
                NoduleTrainingLib.logic.__file__],
    "editable_finder_loaded": any("editable" in name for name in sys.modules),
    "child_pythonpath": env["PYTHONPATH"].split(__import__("os").pathsep)[0],
    "child_engine": child.stdout.strip(),
}))
"""


def _fresh_interpreter(tree: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -S`` with sys.path = [tree, site-packages]: no .pth file (editable finder), no repository."""
    paths = [str(tree)] + site.getsitepackages()
    boot = f"import sys; sys.path[:0] = {paths!r}; sys.argv[1:] = {list(args)!r}\n" + code
    return subprocess.run([sys.executable, "-S", "-c", boot], capture_output=True, text=True, timeout=300,
                          cwd=tree.parent, env={"PATH": "/usr/bin:/bin", "HOME": str(tree.parent)})


def test_installed_extension_imports_its_engine_and_finds_the_bundled_model(tmp_path):
    tree = build_install_tree(REPO, tmp_path / "NoduleAI")
    done = _fresh_interpreter(tree, CHECK, str(tree))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["engine"] == str(tree / "noduleai" / "__init__.py"), "a real package, from the install tree"
    assert found["bundled"] == str(tree / "Resources" / "Models" / BUNDLED_MODEL_FILE)
    assert all(path.startswith(str(tree) + "/") for path in found["modules"]), found["modules"]
    assert not found["editable_finder_loaded"]
    assert found["child_pythonpath"] == str(tree), "background processes import the installed engine"
    assert found["child_engine"] == str(tree / "noduleai" / "__init__.py")


def test_install_tree_has_only_the_modules_at_the_top_and_every_shipped_file(tmp_path):
    """Slicer registers every top-level .py of qt-scripted-modules as a module (CTK's file-based factory
    lists the folder without recursing): only the two modules may be there. Every source file the
    extension ships is in the tree."""
    tree = build_install_tree(REPO, tmp_path / "NoduleAI")
    assert sorted(p.name for p in tree.glob("*.py")) == ["NoduleDetect.py", "NoduleTraining.py"]
    assert (tree / "Scripts" / "batch_detect.py").is_file()
    for module in ("NoduleDetect", "NoduleTraining"):
        assert sorted(p.name for p in (REPO / module).glob("*.py")) == [f"{module}.py"]
        for src in (REPO / module).rglob("*"):
            if src.is_file() and "__pycache__" not in src.parts and src.name != "CMakeLists.txt":
                assert (tree / src.relative_to(REPO / module)).is_file(), f"{src} is not installed"
    for src in (REPO / "noduleai").glob("*.py"):
        assert (tree / "noduleai" / src.name).is_file(), f"{src} is not installed"
    for src in (REPO / "Resources" / "Models").iterdir():
        assert (tree / "Resources" / "Models" / src.name).is_file(), f"{src} is not installed"


def test_the_layout_check_catches_an_engine_installed_into_a_subfolder(tmp_path):
    """The same build from CMake lists whose engine lacks NO_INSTALL_SUBDIR (the defect of issue 8):
    the engine lands in noduleai/noduleai and the fresh interpreter cannot find the bundled model."""
    broken = tmp_path / "broken"
    for sub in ("NoduleDetect", "NoduleTraining", "noduleai", "Resources"):
        shutil.copytree(REPO / sub, broken / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "CMakeLists.txt", broken / "CMakeLists.txt")
    cmake = broken / "noduleai" / "CMakeLists.txt"
    cmake.write_text(cmake.read_text().replace("NO_INSTALL_SUBDIR\n", ""))
    tree = build_install_tree(broken, tmp_path / "NoduleAI")
    assert (tree / "noduleai" / "noduleai" / "__init__.py").is_file()
    done = _fresh_interpreter(tree, CHECK, str(tree))
    assert done.returncode != 0
    assert "No module named 'noduleai.checkpoint'" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("module", ["NoduleDetect", "NoduleTraining"])
def test_no_logic_file_imports_the_command_line_module(module):
    """The CLI is an entry point, not a library: nothing of the engine or the modules imports it."""
    files = list((REPO / "noduleai").glob("*.py")) + list((REPO / module).rglob("*.py"))
    for path in files:
        if path.name in ("cli.py", "__main__.py"):
            continue
        assert not re.search(r"^\s*(from noduleai\.cli |from noduleai import cli|import noduleai\.cli)",
                             path.read_text(), re.M), path


# Variables the top-level CMakeLists may read after find_package(Slicer): set by Slicer's
# CMake/SlicerConfig.cmake.in (read at v5.6.0, v5.8.0, v5.10.0 and main 583e9b37). Slicer_VERSION is not
# among them (only the version file's PACKAGE_VERSION), so a guard written on it would be unreliable.
SLICER_CONFIG_SETS = {"Slicer_REQUIRED_PYTHON_VERSION", "Slicer_USE_FILE", "Slicer_REQUIRED_QT_VERSION"}


def test_the_extension_refuses_a_slicer_whose_python_the_engine_cannot_run():
    """Slicer 5.6/5.8 embed Python 3.9: configuring against them must stop, on the variable Slicer's config
    really sets, at the engine's own minimum (pyproject.toml requires-python)."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    guard = re.search(r'if\((\w+) VERSION_LESS "([\d.]+)"\)\s*\n\s*message\(FATAL_ERROR', cmake)
    assert guard, "no version guard before the modules"
    variable, minimum = guard.groups()
    assert variable in SLICER_CONFIG_SETS
    requires = re.search(r'requires-python = ">=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert minimum == requires
    assert cmake.index(guard.group(0)) < cmake.index("add_subdirectory(")

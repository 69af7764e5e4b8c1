"""Background engine processes: start without a console window, follow JSON-lines progress, kill the tree.

Shared by NoduleDetect (detection) and NoduleTraining (training). In Slicer, ``sys.executable`` is
``PythonSlicer``, a launcher whose child ``python-real`` does the work: stopping only the launcher would
leave the child running, so :meth:`BackgroundProcess.kill` ends every descendant too (psutil). No Slicer,
Qt or VTK here: the modules poll from their own timers.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

TAG_VARIABLE = "NODULEAI_PROCESS_TAG"


def engine_pythonpath() -> str:
    """The folder holding the ``noduleai`` package (repository root, or Slicer's qt-scripted-modules)."""
    return str(Path(__file__).resolve().parent.parent)


def engine_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the engine's folder first on ``PYTHONPATH``,
    so that the child imports this very engine, also where it is not pip-installed (the extension)."""
    env = dict(os.environ if base is None else base)
    paths = [engine_pythonpath()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log shows what the child printed up to a kill
    return env


def _hidden_window_options() -> dict[str, Any]:
    """Popen options that keep Windows from showing a console window for the child, as
    ``slicer.util.launchConsoleProcess`` does; nothing elsewhere.

    A hidden console (SW_HIDE), not CREATE_NO_WINDOW: with no console at all, the launcher's own console
    child (python-real) would get a new, visible one; with a hidden one it inherits that.
    """
    if os.name != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = 0  # SW_HIDE
    return {"startupinfo": info}


class BackgroundProcess:
    """One command run in the background with its output appended to a log file."""

    def __init__(self, args: Sequence[str], log_path: str | os.PathLike, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None):
        self.args = [str(a) for a in args]
        self.log_path = Path(log_path)
        # A tag every descendant inherits: finds the tree even after the launcher died and its child
        # was re-parented away from it.
        self.tag = uuid.uuid4().hex
        self.env = dict(os.environ if env is None else env) | {TAG_VARIABLE: self.tag}
        self.cwd = cwd
        self.popen: subprocess.Popen | None = None
        self.killed = False
        self._tree: dict[int, psutil.Process] = {}

    def start(self) -> BackgroundProcess:
        """Start the command; returns at once."""
        if self.popen is not None:
            raise RuntimeError("this process was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own handle
            self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=self.env, cwd=self.cwd, **_hidden_window_options())
        return self

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def _remember_tree(self) -> None:
        """Note every live descendant: by parentage while the launcher runs, and by the inherited tag."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                root = psutil.Process(self.popen.pid)
                for proc in [root, *root.children(recursive=True)]:
                    self._tree.setdefault(proc.pid, proc)
            except psutil.Error:
                pass
        for proc in psutil.process_iter():
            if proc.pid in self._tree:
                continue
            try:
                if proc.environ().get(TAG_VARIABLE) == self.tag:
                    self._tree[proc.pid] = proc
            except psutil.Error:  # another user's process, or gone meanwhile
                pass

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the end (``subprocess.TimeoutExpired`` after ``timeout`` seconds)."""
        if self.popen is None:
            raise RuntimeError("the process was never started")
        return self.popen.wait(timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Kill the process and every descendant (the launcher's ``python-real``, data-loader workers)."""
        if self.popen is None:
            return
        self._remember_tree()
        self.killed = True
        procs = list(self._tree.values())
        for proc in procs:
            # The launcher first, so that it cannot start anything new; psutil checks the creation time,
            # so a recycled pid of an unrelated process is never hit.
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=timeout)
        try:
            self.popen.wait(timeout)  # reap: no zombie left behind
        except subprocess.TimeoutExpired:
            pass

    def alive_pids(self) -> list[int]:
        """Pids of this process and its known descendants that still run (zombies count as gone)."""
        self._remember_tree()
        alive = []
        for pid, proc in self._tree.items():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the output, for error messages."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, self.log_path.stat().st_size - chars))
            return f.read().decode("utf-8", "replace")

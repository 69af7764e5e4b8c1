"""NoduleTraining logic: runs `noduleai train` as a background process and follows its progress.

No GUI and no Qt: the panel polls :meth:`TrainingRun.poll` and :attr:`TrainingRun.phase` from a timer, so
Slicer stays responsive. Cancel kills the whole process tree (in Slicer the launcher ``PythonSlicer`` and
its ``python-real``). A cancelled or killed run resumes from its last completed epoch when started again
on the same folder; its earlier epochs are in :attr:`TrainingRun.resumed_epochs`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from noduleai.config import TrainConfig
from noduleai.process import BackgroundProcess, engine_environment
from noduleai.progress import JsonLinesReader

LAST_MODEL_KEY = "NoduleAI/LastTrainedModel"
SEED_RECIPE = TrainConfig()  # the engine's defaults: the seed article's recipe
EPOCHS_FILE = "progress.jsonl"  # one line per finished epoch, written by the engine's train()
PHASE_FILE = "phase.jsonl"  # loading cases / preprocessing k of n / training epoch e of E
PID_FILE = ".training-process.json"  # which process trains into this folder


@dataclass
class TrainingParameters:
    """What the panel offers; defaults are the seed article's recipe."""

    output_dir: str
    lidc_dir: str = ""
    manifest: str = ""
    task: str = SEED_RECIPE.task
    arch: str = SEED_RECIPE.arch
    width: float = SEED_RECIPE.width
    epochs: int = SEED_RECIPE.epochs
    batch_size: int = SEED_RECIPE.batch_size
    lr: float = SEED_RECIPE.lr
    focal_gamma: float = SEED_RECIPE.focal_gamma
    class_weights: str = SEED_RECIPE.class_weights
    augment: bool = SEED_RECIPE.augment
    device: str = SEED_RECIPE.device
    max_steps: int | None = SEED_RECIPE.max_steps_per_epoch
    negatives: int = SEED_RECIPE.negatives_per_case

    def command(self, python: str | None = None) -> list[str]:
        if bool(self.lidc_dir) == bool(self.manifest):
            raise ValueError("choose exactly one data source: an LIDC-IDRI DICOM folder or a case manifest")
        cmd = [python or sys.executable, "-m", "noduleai", "-q", "train", "--out", self.output_dir, "--task", self.task,
               "--arch", self.arch, "--width", str(self.width), "--epochs", str(self.epochs),
               "--batch-size", str(self.batch_size), "--lr", str(self.lr), "--focal-gamma", str(self.focal_gamma),
               "--class-weights", self.class_weights, "--device", self.device, "--negatives", str(self.negatives)]
        cmd += ["--lidc", self.lidc_dir] if self.lidc_dir else ["--manifest", self.manifest]
        if not self.augment:
            cmd.append("--no-augment")
        if self.max_steps:
            cmd += ["--max-steps", str(self.max_steps)]
        return cmd + ["--progress-json", str(Path(self.output_dir) / PHASE_FILE)]


def read_history(output_dir: str | Path) -> list[dict]:
    """The per-epoch records (epoch, train_loss, val_loss, val_auc, ...) a run folder holds so far."""
    return JsonLinesReader(Path(output_dir) / EPOCHS_FILE).read_new()


def _live_owner(output_dir: Path) -> psutil.Process | None:
    """The process recorded as training into ``output_dir``, if it still runs (checked by creation time,
    so a recycled pid does not count)."""
    try:
        record = json.loads((output_dir / PID_FILE).read_text())
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["create_time"])) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        pass
    return None


@dataclass
class TrainingRun:
    """A training process and what it has reported so far."""

    params: TrainingParameters
    process: BackgroundProcess
    epochs: list[dict] = field(default_factory=list)
    resumed_epochs: list[dict] = field(default_factory=list)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self._epoch_reader = JsonLinesReader(self.out / EPOCHS_FILE)
        self._phase_reader = JsonLinesReader(self.out / PHASE_FILE)
        self._phase: dict[str, Any] = {"phase": "starting", "fraction": 0.0}
        self.epochs = self._epoch_reader.read_new()
        self.resumed_epochs = list(self.epochs)  # a resumed run's earlier epochs, for the panel to show

    @property
    def out(self) -> Path:
        return Path(self.params.output_dir)

    def poll(self) -> list[dict]:
        """New per-epoch records (epoch, train_loss, val_loss, val_auc, ...) since the last call."""
        self.process.poll()
        new = self._epoch_reader.read_new()
        self.epochs.extend(new)
        return new

    @property
    def phase(self) -> dict[str, Any]:
        """What the run is doing: ``phase`` (loading cases, preprocessing, training, done), ``fraction`` of
        that phase, and ``done``/``total`` scans while preprocessing or ``epoch``/``epochs`` while training."""
        for record in self._phase_reader.read_new():
            self._phase = record
        if self.cancelled:
            return {"phase": "cancelled", "fraction": self._phase.get("fraction", 0.0)}
        return dict(self._phase)

    @property
    def running(self) -> bool:
        return self.process.running

    def cancel(self, timeout: float = 30.0) -> None:
        """Kill the process tree; the last completed epoch stays on disk for a resume. No-op once it ended."""
        if not self.running:
            return
        self.cancelled = True
        self.process.kill(timeout)
        (self.out / PID_FILE).unlink(missing_ok=True)

    def error(self) -> str | None:
        """The end of the log when the process failed, else None (also None after a cancel)."""
        if self.running or self.cancelled or self.process.returncode == 0:
            return None
        log = self.out / "training.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        return f"training stopped with exit status {self.process.returncode}\n{tail}"

    def results(self) -> dict:
        """Test metrics and the report figures, once the run has finished."""
        import pandas as pd

        table = self.out / "test_results.csv"
        metrics = pd.read_csv(table).iloc[0].to_dict() if table.exists() else {}
        return {"metrics": metrics, "roc_curve": self.out / "roc_curve.png",
                "confusion_matrix": self.out / "confusion_matrix.png", "model": self.out / "best_model.pt",
                "model_card": self.out / "MODEL_CARD.md"}


class TrainingLogic:
    """Starts, follows, cancels and resumes training runs; hands the result to NoduleDetect.

    One run at a time: :meth:`start` refuses while :attr:`active_run` runs, or while any other process
    (another Slicer, an orphan of an older version) trains into the same folder.
    """

    def __init__(self, settings: MutableMapping[str, str] | None = None, python: str | None = None,
                 environment: MutableMapping[str, str] | None = None):
        self.settings = settings if settings is not None else {}
        self.python = python or sys.executable  # read now: Slicer sets it to PythonSlicer at start-up
        self.environment = environment  # None: Slicer's startup environment (plain Python: this process's)
        self.active_run: TrainingRun | None = None

    @property
    def is_running(self) -> bool:
        return self.active_run is not None and self.active_run.running

    def start(self, params: TrainingParameters) -> TrainingRun:
        """Start (or resume, when the folder holds an interrupted run) a background training process."""
        if self.is_running:
            raise RuntimeError(f"a training run is already going on in {self.active_run.out}; cancel it first")
        out = Path(params.output_dir)
        owner = _live_owner(out)
        if owner is not None:
            raise RuntimeError(f"process {owner.pid} is still training into {out}; stop it or choose another folder")
        command = params.command(self.python)
        out.mkdir(parents=True, exist_ok=True)
        (out / PHASE_FILE).unlink(missing_ok=True)  # the phase is of this process only; epochs stay (resume)
        if self.environment is None:
            from NoduleDetectLib.environment import startup_environment  # one rule for both modules' children

            base = startup_environment()
        else:
            base = self.environment
        process = BackgroundProcess(command, out / "training.log", env=engine_environment(base)).start()
        try:
            proc = psutil.Process(process.pid)
            (out / PID_FILE).write_text(json.dumps({"pid": proc.pid, "create_time": proc.create_time()}))
        except psutil.Error:
            pass  # it has already ended: nothing can train into the folder
        self.active_run = TrainingRun(params, process)
        return self.active_run

    def cancel(self) -> None:
        """Cancel the active run, if any."""
        if self.is_running:
            self.active_run.cancel()

    def use_in_detect(self, run: TrainingRun) -> Path:
        """Make the run's best model NoduleDetect's model (stored in the application settings)."""
        model = run.results()["model"]
        if not model.exists():
            raise FileNotFoundError(f"{model}: the run has produced no model yet")
        self.settings[LAST_MODEL_KEY] = str(model)
        return model

    def handed_over_model(self) -> Path | None:
        """The model last handed to NoduleDetect, if it still exists."""
        path = self.settings.get(LAST_MODEL_KEY) or ""
        return Path(path) if path and Path(path).is_file() else None

"""NoduleTraining logic: runs `noduleai train` as a background process and follows its progress.

No GUI and no Qt: the panel polls :meth:`TrainingRun.poll` from a timer, so Slicer stays responsive.
A cancelled or killed run resumes from its last completed epoch when started again on the same folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from noduleai.config import TrainConfig

LAST_MODEL_KEY = "NoduleAI/LastTrainedModel"
SEED_RECIPE = TrainConfig()  # the engine's defaults: the seed article's recipe


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

    def command(self, python: str = sys.executable) -> list[str]:
        if bool(self.lidc_dir) == bool(self.manifest):
            raise ValueError("choose exactly one data source: an LIDC-IDRI DICOM folder or a case manifest")
        cmd = [python, "-m", "noduleai.cli", "-q", "train", "--out", self.output_dir, "--task", self.task,
               "--arch", self.arch, "--width", str(self.width), "--epochs", str(self.epochs),
               "--batch-size", str(self.batch_size), "--lr", str(self.lr), "--focal-gamma", str(self.focal_gamma),
               "--class-weights", self.class_weights, "--device", self.device, "--negatives", str(self.negatives)]
        cmd += ["--lidc", self.lidc_dir] if self.lidc_dir else ["--manifest", self.manifest]
        if not self.augment:
            cmd.append("--no-augment")
        if self.max_steps:
            cmd += ["--max-steps", str(self.max_steps)]
        return cmd


@dataclass
class TrainingRun:
    """A training process and what it has reported so far."""

    params: TrainingParameters
    process: subprocess.Popen
    epochs: list[dict] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.params.output_dir)

    def poll(self) -> list[dict]:
        """New per-epoch records (epoch, train_loss, val_loss, val_auc, ...) since the last call."""
        path = self.out / "progress.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        complete = [json.loads(line) for line in lines if line.endswith("}")]
        new = complete[len(self.epochs):]
        self.epochs.extend(new)
        return new

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def cancel(self, timeout: float = 30.0) -> None:
        """Stop the process; its last completed epoch stays on disk for a resume."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def error(self) -> str | None:
        """The end of the log when the process failed, else None."""
        if self.running or self.process.returncode == 0:
            return None
        log = self.out / "training.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        return f"training stopped with exit status {self.process.returncode}\n{tail}"

    def results(self) -> dict:
        """Test metrics and the report figures, once the run has finished."""
        table = self.out / "test_results.csv"
        metrics = pd.read_csv(table).iloc[0].to_dict() if table.exists() else {}
        return {"metrics": metrics, "roc_curve": self.out / "roc_curve.png",
                "confusion_matrix": self.out / "confusion_matrix.png", "model": self.out / "best_model.pt",
                "model_card": self.out / "MODEL_CARD.md"}


class TrainingLogic:
    """Starts, follows, cancels and resumes training runs; hands the result to NoduleDetect."""

    def __init__(self, settings: MutableMapping[str, str] | None = None, python: str = sys.executable):
        self.settings = settings if settings is not None else {}
        self.python = python

    def start(self, params: TrainingParameters) -> TrainingRun:
        """Start (or resume, when the folder holds an interrupted run) a background training process."""
        out = Path(params.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "training.log", "a")  # noqa: SIM115 - owned by the child process
        env = dict(os.environ)
        engine_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (engine_root, env.get("PYTHONPATH", "")) if p)
        process = subprocess.Popen(params.command(self.python), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        run = TrainingRun(params, process)
        run.poll()  # a resumed run reports its earlier epochs too
        return run

    def use_in_detect(self, run: TrainingRun) -> Path:
        """Make the run's best model NoduleDetect's model (stored in the application settings)."""
        model = run.results()["model"]
        if not model.exists():
            raise FileNotFoundError(f"{model}: the run has produced no model yet")
        self.settings[LAST_MODEL_KEY] = str(model)
        return model

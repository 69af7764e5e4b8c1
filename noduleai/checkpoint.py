"""Model checkpoints: one file with weights and metadata, loaded with ``weights_only=True`` only."""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noduleai import __version__
from noduleai.files import atomic_path
from noduleai.modelpath import bundled_model_path, bundled_models_dir, resolve_model_path  # noqa: F401 (public here)
from noduleai.models import ResNet3D, build_model
from noduleai.preprocess import PreprocessConfig

MODEL_FORMAT = "noduleai-model"
STATE_FORMAT = "noduleai-training-state"
FORMAT_VERSION = 1
TASKS = ("scan", "patch")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")


@dataclass
class ModelInfo:
    """Everything needed to rebuild a model and use it exactly as it was trained."""

    arch: str
    task: str
    input_size: tuple[int, int, int]  # (z, y, x) model input
    preprocess: dict[str, Any]
    width: float = 1.0
    small_input: bool = False
    class_names: tuple[str, ...] = ("no nodule", "nodule")
    cam_layer: str = "layer3"
    cam_method: str = "gradcam"
    metrics: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    engine_version: str = __version__
    name: str = "unnamed"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        self.input_size = tuple(int(v) for v in self.input_size)
        self.class_names = tuple(self.class_names)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build(self) -> ResNet3D:
        return build_model(self.arch, num_classes=len(self.class_names), width=self.width,
                           small_input=self.small_input)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model  # DistributedDataParallel


def save_model(path: str | os.PathLike, model: torch.nn.Module, info: ModelInfo) -> None:
    """Write a model checkpoint atomically."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    payload = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "info": info.to_dict(),
               "state_dict": state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def safe_load(path: str | os.PathLike, expected_format: str | dict[str, int]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every failure turned into a :class:`CheckpointError`.
    ``expected_format``: one format (newest version understood: :data:`FORMAT_VERSION`), or several as a
    dict of format -> newest version understood."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise CheckpointError(path, "corrupt, truncated or not a PyTorch checkpoint (not a zip archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(path, "refused: it pickles Python objects other than tensors and plain data "
                                    f"(only weights and metadata are loaded, for safety): {_first(err)}") from err
    except Exception as err:  # zip/EOF/format errors: the file is damaged or not a torch file
        raise CheckpointError(path, f"corrupt, truncated or not a PyTorch checkpoint ({_first(err)})") from err
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(path, "not a NoduleAI checkpoint (no 'format' field; a bare state_dict or "
                                    "another program's file?)")
    accepted = {expected_format: FORMAT_VERSION} if isinstance(expected_format, str) else expected_format
    if payload["format"] not in accepted:
        raise CheckpointError(path, f"is a {payload['format']!r} file, expected "
                                    f"{' or '.join(repr(f) for f in accepted)}")
    if payload.get("format_version", 0) > accepted[payload["format"]]:
        raise CheckpointError(path, f"format version {payload.get('format_version')} is newer than this "
                                    f"engine ({__version__}) understands; update NoduleAI")
    return payload


def _first(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    unsafe = [ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln]
    return (unsafe or lines or [type(err).__name__])[0]


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ResNet3D, ModelInfo]:
    """Rebuild the model from a checkpoint, in eval mode on ``device``."""
    return model_from_payload(safe_load(path, MODEL_FORMAT), path, device)


def model_from_payload(payload: dict[str, Any], path: str | os.PathLike,
                       device: str | torch.device = "cpu") -> tuple[ResNet3D, ModelInfo]:
    """:func:`load_model` from a loaded payload (``info``, ``state_dict``): also the classifier part of a
    two-stage detector file. ``path`` names the file in errors."""
    try:
        info = ModelInfo(**payload["info"])
        model = info.build()
        model.load_state_dict(payload["state_dict"], strict=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(path, f"metadata or weights do not describe a valid model ({err})") from err
    return model.to(device).eval(), info

"""Training configuration: a plain dataclass (no torch import), so GUIs can show its defaults cheaply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    """Training parameters. Defaults are the seed article's CONFIG (scan task, ResNet-18, 128^3)."""

    task: str = "scan"
    arch: str = "resnet18_3d"
    width: float = 1.0
    epochs: int = 50
    batch_size: int = 8
    lr: float = 2e-4
    focal_gamma: float = 2.0
    class_weights: str = "effective"
    loss: str = "focal"
    augment: bool = True
    seed: int = 42
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    patch_size: int = 32
    negatives_per_case: int = 40
    positive_repeats: int = 4
    jitter_mm: float = 3.0  # patch task: random offset of the nodule from the patch centre
    num_workers: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None  # cap for CPU demos; None: the whole training set
    lr_schedule: str = "constant"  # the seed's Adam at a fixed rate; "cosine" anneals to 0 over epochs
    cam_layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

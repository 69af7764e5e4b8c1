"""3-D augmentation with the seed's ranges and probabilities (MONAI for the geometric transforms)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Rand3DElastic, RandAffine


@dataclass
class CTAugmentation3D:
    """Random rotation, scale, shift, noise, brightness, contrast and elastic deformation.

    Works on a (1, D, H, W) float tensor in [0, 1] and returns one of the same shape. Defaults are
    the seed's: rotation +-15 deg (p 0.7), scale 0.85-1.15 (p 0.5), shift +-10 voxels (p 0.5), Gaussian
    noise 0.02 (p 0.3), brightness and contrast 0.9-1.1 (p 0.4 each), elastic (p 0.2).
    """

    rotation_range: tuple[float, float] = (-15.0, 15.0)
    scale_range: tuple[float, float] = (0.85, 1.15)
    shift_range: tuple[float, float] = (-10.0, 10.0)
    noise_factor: float = 0.02
    brightness_range: tuple[float, float] = (0.9, 1.1)
    contrast_range: tuple[float, float] = (0.9, 1.1)
    p_rotation: float = 0.7
    p_scale: float = 0.5
    p_shift: float = 0.5
    p_noise: float = 0.3
    p_brightness: float = 0.4
    p_contrast: float = 0.4
    p_elastic: float = 0.2
    seed: int | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        rot = tuple(math.radians(abs(v)) for v in self.rotation_range)
        common = dict(padding_mode="border", mode="bilinear")
        self._rotate = RandAffine(prob=1.0, rotate_range=(max(rot),) * 3, **common)
        self._scale = RandAffine(prob=1.0, scale_range=(tuple(v - 1 for v in self.scale_range),) * 3, **common)
        self._shift = RandAffine(prob=1.0, translate_range=(self.shift_range,) * 3, **common)
        self._elastic = Rand3DElastic(sigma_range=(5, 8), magnitude_range=(20, 60), prob=1.0, **common)

    def reseed(self, seed: int) -> None:
        """Make the random stream repeatable (one call per worker/epoch)."""
        self.rng = np.random.default_rng(seed)
        for i, t in enumerate((self._rotate, self._scale, self._shift, self._elastic)):
            t.set_random_state(seed + i)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for p, transform in ((self.p_rotation, self._rotate), (self.p_scale, self._scale),
                             (self.p_shift, self._shift), (self.p_elastic, self._elastic)):
            if self.rng.random() < p:
                x = _plain(transform(x))
        if self.rng.random() < self.p_noise:
            x = x + torch.as_tensor(self.rng.normal(0, self.noise_factor, x.shape), dtype=x.dtype)
        if self.rng.random() < self.p_brightness:
            x = x * float(self.rng.uniform(*self.brightness_range))
        if self.rng.random() < self.p_contrast:
            mean = x.mean()
            x = (x - mean) * float(self.rng.uniform(*self.contrast_range)) + mean
        return x.clamp(0, 1).float()


def _plain(x) -> torch.Tensor:
    """MONAI returns MetaTensors; plain tensors collate faster and pickle smaller."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
